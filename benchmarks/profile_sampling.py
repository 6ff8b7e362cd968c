"""Where our sampling spends its time: per-phase timers and a cProfile of one call.

The phases are timed by wrapping the functions `Backend.sample` calls
(the decode module's `forward_step`, the ops module's `choose` / `target_logp`, the KV-cache
repeat, `DecodeBook.add` / `completions`); the rest of the call is "loop
overhead". MLX evaluates lazily, so each wrapper forces `mx.eval` on what it
returns: compute is charged to the phase that asked for it. Forced evaluation
only adds sync points where ours already syncs once per step.

Run by `bench_sampling.py --profile` (in a child process), or by hand:

    python benchmarks/profile_sampling.py --model tiny --backend torch --group 8
"""

from __future__ import annotations

import argparse
import cProfile
import dataclasses
import io
import json
import pstats
import statistics
import sys
import time
from collections import defaultdict
from contextlib import ExitStack, contextmanager
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import sampling_case  # noqa: E402

_NEVER_MATCHES = "\x00no-such-stop\x00"
_NOTES = {
    "torch": (
        "Loop overhead = the rest of `TorchBackend.sample`: `torch.where` on the chosen ids, "
        "`.tolist()` of ids and log-probs, `torch.tensor(alive)`, growing the attention mask with "
        "`torch.cat`, position ids, the Python loop itself."
    ),
    "mlx": (
        "Loop overhead = the rest of `MlxBackend.sample`: `mx.random.split`, `mx.where`, the per-step "
        "`mx.eval` + `.tolist()` sync of ids and log-probs, `mx.array(alive)`, the Python loop itself. "
        "Each wrapper forces `mx.eval`, so compute is charged to the phase that produced it."
    ),
}


def profile_case(case: dict, *, calls: int = 3) -> dict:
    """Profiles our `sample` for one (backend, G): phase timers over `calls` calls, then one cProfile'd call."""
    from rlaif_mlx.backends.base import SamplingParams

    backend = sampling_case._our_backend(case["backend"], case)
    params = SamplingParams(max_new_tokens=case["new_tokens"], temperature=1.0, seed=case["seed"])
    prompts, group = case["prompts"], case["group"]

    def call() -> None:
        backend.sample(prompts, n=group, params=params)

    call()  # warm-up
    runs = []
    for _ in range(calls):
        timers = _Timers()
        with _instrumented(backend, timers):
            start = time.perf_counter()
            call()
            timers.total = time.perf_counter() - start
        runs.append(timers)
    middle = sorted(runs, key=lambda t: t.total)[len(runs) // 2]
    phases = {name: (seconds, middle.calls[name]) for name, seconds in middle.seconds.items()}
    phases["loop overhead (rest of sample)"] = (middle.total - sum(middle.seconds.values()), 0)

    # Uninstrumented, then with a stop string; and the sampled log-probs against a teacher-forced forward.
    plain = statistics.median(_seconds(call) for _ in range(calls))
    check = _logprob_check(backend, backend.sample(prompts, n=group, params=params))
    stop_params = dataclasses.replace(params, stop=(_NEVER_MATCHES,))
    with_stop = statistics.median(
        _seconds(lambda: backend.sample(prompts, n=group, params=stop_params)) for _ in range(calls)
    )

    profiler = cProfile.Profile()
    profiler.enable()
    call()
    profiler.disable()
    text = io.StringIO()
    pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(14)
    body = text.getvalue().splitlines()
    start = next((i for i, line in enumerate(body) if "ncalls" in line), 0)
    return {
        "backend": case["backend"],
        "group": group,
        "rows": len(prompts) * group,
        "calls": calls,
        "total_seconds": middle.total,
        "phases": phases,
        "phase_notes": _NOTES[case["backend"]],
        "prefill_compare": _prefill_compare(backend, prompts, group, middle),
        "plain_seconds": plain,
        "logprob_error": check,
        "stop_seconds": with_stop,
        "stop_check": _stop_check_cost(backend, prompts, group),
        "cprofile": [line.rstrip() for line in body[start:] if line.strip()],
    }


def _stop_check_cost(backend, prompts: list[list[int]], group: int, lengths=(64, 256, 512)) -> dict:
    """Seconds `DecodeBook.add` spends over a whole completion of T tokens, with and without a stop string.

    No model: random token ids, so this isolates the bookkeeping (the stop check
    decodes each row's whole text at every step).
    """
    import numpy as np

    from rlaif_mlx.backends.common import DecodeBook

    rows = len(prompts) * group
    rng = np.random.default_rng(0)
    found = {}
    for length in lengths:
        tokens = rng.integers(0, len(backend.tokenizer), size=(length, rows)).tolist()
        for label, stop in (("without", ()), ("with", (_NEVER_MATCHES,))):
            book = DecodeBook(prompts, group, eos_ids=(), stop=stop, decode=backend._decode)
            start = time.perf_counter()
            for step in tokens:
                book.add(step, [0.0] * rows)
            found[f"{length} {label}"] = time.perf_counter() - start
    return found


def _seconds(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _logprob_check(backend, completions) -> float:
    """Largest gap between the sampled tokens' log-probs and a teacher-forced forward over the same ids."""
    import numpy as np

    from rlaif_mlx.backends.base import SequenceBatch

    batch = SequenceBatch.from_completions(completions, pad_id=backend.pad_id)
    forced = backend.logprobs(batch)
    gap = 0.0
    for row, c in enumerate(completions):
        start = len(c.prompt_ids) - 1
        gap = max(gap, float(np.abs(forced[row, start : start + len(c.logprobs)] - np.array(c.logprobs)).max()))
    return gap


class _Timers:
    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)
        self.total = 0.0
        self.forwards = 0

    def add(self, name: str, seconds: float) -> None:
        self.seconds[name] += seconds
        self.calls[name] += 1


@contextmanager
def _instrumented(backend, timers: _Timers):
    """Wraps the phases of one backend's `sample` with timers, and puts everything back afterwards."""
    from rlaif_mlx.backends import common

    if backend.name == "torch":
        from rlaif_mlx.backends import torch_decode as decode
        from rlaif_mlx.backends import torch_ops as ops

        def force(value, args):  # eager: the work is done when the call returns
            return value

        repeat = (decode, "repeated_cache")
    else:
        import mlx.core as mx

        from rlaif_mlx.backends import mlx_decode as decode
        from rlaif_mlx.backends import mlx_ops as ops

        def force(value, args):
            if value is None:  # repeat_cache(cache, n) works in place: evaluate the repeated cache
                value = [a for c in args[0] for a in (c.keys, c.values) if a is not None]
            mx.eval(value)
            return value

        repeat = (ops, "repeat_cache")

    def as_is(value, args):
        return value

    def forward_label() -> str:
        timers.forwards += 1
        return "prefill forward (P rows)" if timers.forwards == 1 else "decode forward (P x G rows)"

    with ExitStack() as stack:

        def timed(owner, attr: str, label, after=force) -> None:
            original = getattr(owner, attr)

            def wrapper(*args, **kwargs):
                start = time.perf_counter()
                value = original(*args, **kwargs)
                after(value, args)
                timers.add(label() if callable(label) else label, time.perf_counter() - start)
                return value

            if attr in vars(owner):
                stack.callback(setattr, owner, attr, original)
            else:  # inherited or a bound method: drop our shadowing attribute afterwards
                stack.callback(delattr, owner, attr)
            setattr(owner, attr, wrapper)

        timed(decode, "forward_step", forward_label)
        timed(*repeat, "repeat KV cache x G")
        timed(ops, "choose", "sample next token (choose)")
        timed(ops, "target_logp", "log-prob of chosen token")
        timed(common.DecodeBook, "add", "DecodeBook.add (Python bookkeeping)", as_is)
        timed(common.DecodeBook, "completions", "DecodeBook.completions (detokenise + records)", as_is)
        yield


def _prefill_compare(backend, prompts: list[list[int]], group: int, timers: _Timers) -> dict:
    """Seconds of one prefill forward over P rows (ours) vs P x G rows (what the peers prefill)."""
    repeated = [p for p in prompts for _ in range(group)]

    def prefill(rows: list[list[int]]) -> float:
        times = []
        for _ in range(3):
            start = time.perf_counter()
            if backend.name == "torch":
                import torch

                from rlaif_mlx.backends import torch_decode, torch_ops

                with torch.inference_mode():
                    ids, mask = torch_ops.left_pad(rows, pad_id=backend.pad_id, device=backend.device)
                    positions = (mask.cumsum(-1) - 1).clamp(min=0)
                    torch_decode.forward_step(backend._model, ids, mask, positions, None, cache_arg=backend._cache_arg)
            else:
                import mlx.core as mx

                from rlaif_mlx.backends import mlx_decode, mlx_ops

                ids, padding = mlx_ops.left_pad(rows, pad_id=backend.pad_id)
                mx.eval(mlx_decode.forward_step(backend._model, ids, mlx_ops.batch_cache(backend._model, padding)))
            times.append(time.perf_counter() - start)
        return statistics.median(times)

    decode = timers.seconds.get("decode forward (P x G rows)", 0.0)
    steps = max(timers.calls.get("decode forward (P x G rows)", 0), 1)
    return {
        "prompts": len(prompts),
        "rows": len(repeated),
        "ours": prefill(prompts),
        "peer": prefill(repeated),
        "decode_step": decode / steps,
    }


def main(argv: list[str] | None = None) -> int:
    import sampling_models

    p = argparse.ArgumentParser(description="Per-phase profile of rlaif-mlx's batched sampling for one backend.")
    p.add_argument("--model", default="tiny", help="tiny, 30m, a local model folder or a hub id (default: tiny)")
    p.add_argument("--backend", default="torch", choices=("torch", "mlx"))
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--group", type=int, default=8)
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    model = sampling_models.resolve_model(args.model)
    case = {
        "backend": args.backend,
        "model": model,
        "group": args.group,
        "new_tokens": args.new_tokens,
        "seed": args.seed,
        "prompts": sampling_models.make_prompts(model, count=args.prompts, length=args.prompt_tokens),
    }
    print(json.dumps(profile_case(case), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
