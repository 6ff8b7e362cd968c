"""``rlaif-mlx sample``: completions from a checkpoint for one prompt, to look at what training did.

The prompt is built exactly as training builds it (chat template, the config's
system prompt), and sampling uses the config's filters (top-k, top-p, min-p,
stop strings), so what is printed is what the trainer would have scored.
"""

from __future__ import annotations

import argparse
import sys

from .common import UserError, one_line_errors


def add_parser(sub: argparse._SubParsersAction) -> None:
    sample = sub.add_parser("sample", help="print completions of a checkpoint for one prompt")
    sample.add_argument(
        "--checkpoint",
        required=True,
        help="a checkpoint folder (run/checkpoints/step-NNNNNN), or a run folder for its newest",
    )
    sample.add_argument(
        "--prompt",
        required=True,
        help="the task, as a user would write it (the chat template and system prompt of training are added)",
    )
    sample.add_argument("-n", type=int, default=1, help="how many completions (default 1)")
    sample.add_argument("--max-new-tokens", type=int, help="default: the config's rlaif.max_new_tokens")
    sample.add_argument(
        "--temperature", type=float, help="0 is greedy; default: the config's rlaif.generation_temperature"
    )
    sample.add_argument(
        "--backend",
        choices=["auto", "torch", "mlx"],
        help="backend to load the checkpoint with (default: the checkpoint config's)",
    )
    sample.add_argument("--model", help="override model.base_model, e.g. where the base model lives on this machine")
    sample.add_argument(
        "--allow-other-base",
        action="store_true",
        help="load the checkpoint onto a base model other than the one it was trained from",
    )
    sample.add_argument("--seed", type=int, help="sampling seed (default: the config's seed)")
    sample.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """Runs ``rlaif-mlx sample``; returns the exit code."""
    from ..data.tasks import DataError, Task
    from ..training.settings import sampling_params, task_prompt_ids
    from ..training.setup import load_checkpoint

    if args.n < 1:
        raise UserError(f"-n must be at least 1 (got {args.n})")
    if args.max_new_tokens is not None and args.max_new_tokens < 1:
        raise UserError(f"--max-new-tokens must be at least 1 (got {args.max_new_tokens})")
    if args.temperature is not None and args.temperature < 0:
        raise UserError(f"--temperature must be 0 (greedy) or more (got {args.temperature})")
    loaded = load_checkpoint(
        args.checkpoint,
        backend=args.backend,
        model=args.model,
        seed=args.seed,
        allow_other_base=args.allow_other_base,
        log=lambda line: print(line, file=sys.stderr),
    )
    config, backend = loaded.config, loaded.backend
    task = Task(id="--prompt", prompt=args.prompt)
    with one_line_errors(DataError):
        prompt = task_prompt_ids(backend.tokenizer, [task], config.data)[task.id]
    # --seed already replaced the config's seed: the same command prints the same samples
    params = sampling_params(
        config.rlaif, seed=config.seed, temperature=args.temperature, max_new_tokens=args.max_new_tokens
    )
    completions = backend.sample([prompt], n=args.n, params=params)
    for i, completion in enumerate(completions, start=1):
        if i > 1:
            print()
        print(
            f"--- sample {i} of {len(completions)}: {len(completion.completion_ids)} tokens, "
            f"finish: {completion.finish_reason} ---"
        )
        print(completion.text)
    return 0
