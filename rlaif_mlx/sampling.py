"""``rlaif-mlx sample``: completions from a checkpoint for one prompt, to look at what training did.

The prompt is built exactly as training builds it (chat template, the config's
system prompt), and sampling uses the config's filters (top-k, top-p, min-p,
stop strings), so what is printed is what the trainer would have scored.
"""

from __future__ import annotations

import argparse

from .cli import _UserError
from .exporting import load_checkpoint


def sample_command(args: argparse.Namespace) -> int:
    """Runs ``rlaif-mlx sample`` (arguments as ``cli`` registers them); returns the exit code."""
    from .backends.base import SamplingParams
    from .data import DataError, Task, prompt_token_ids

    if args.n < 1:
        raise _UserError(f"-n must be at least 1 (got {args.n})")
    if args.max_new_tokens is not None and args.max_new_tokens < 1:
        raise _UserError(f"--max-new-tokens must be at least 1 (got {args.max_new_tokens})")
    if args.temperature is not None and args.temperature < 0:
        raise _UserError(f"--temperature must be 0 (greedy) or more (got {args.temperature})")
    loaded = load_checkpoint(args.checkpoint, backend=args.backend, model=args.model, seed=args.seed)
    config, backend = loaded.config, loaded.backend
    try:
        prompt = prompt_token_ids(backend.tokenizer, Task(id="--prompt", prompt=args.prompt),
                                  use_chat_template=config.data.use_chat_template,
                                  system_prompt=config.data.system_prompt,
                                  max_prompt_tokens=config.data.max_prompt_tokens)
    except DataError as exc:
        raise _UserError(str(exc)) from None
    params = SamplingParams(
        max_new_tokens=args.max_new_tokens or config.rlaif.max_new_tokens,
        temperature=config.rlaif.generation_temperature if args.temperature is None else args.temperature,
        top_k=config.rlaif.top_k, top_p=config.rlaif.top_p, min_p=config.rlaif.min_p,
        stop=tuple(config.rlaif.stop),
        seed=config.seed,  # --seed already replaced it: the same command prints the same samples
    )
    completions = backend.sample([prompt], n=args.n, params=params)
    for i, completion in enumerate(completions, start=1):
        if i > 1:
            print()
        print(f"--- sample {i} of {len(completions)}: {len(completion.completion_ids)} tokens, "
              f"finish: {completion.finish_reason} ---")
        print(completion.text)
    return 0
