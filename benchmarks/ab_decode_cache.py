"""Our PyTorch sampling with the preallocated decode cache vs transformers' growing DynamicCache.

One process per case, both variants on the same loaded backend, alternating call by call
(the order flips each pair), so machine noise hits both alike; the figure is the median of
the per-pair ratios (preallocated / dynamic) with its quartiles. The switch is the
backend's ``preallocate_decode_cache``; off, sampling runs the dynamic-cache code.
Before timing, both variants' ids must be equal and their log-probs equal within 1e-6.

Shapes as in ``bench_sampling.py``: 8 prompts of 128 tokens, 64 new tokens, temperature 1,
the backend's EOS set emptied so every row runs full length, float32, 2 intra-op threads.

    python benchmarks/ab_decode_cache.py --model tiny --group 4,8 --pairs 40
    python benchmarks/ab_decode_cache.py --model 30m --group 4 --pairs 12
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import sampling_case  # noqa: E402
import sampling_models  # noqa: E402


def ab_case(model: str, *, group: int, pairs: int, prompts: int, length: int, new_tokens: int) -> dict:
    """Per-pair seconds and ratios (preallocated / dynamic) for one model and G."""
    import numpy as np
    import torch

    from rlaif_mlx.backends.base import SamplingParams

    torch.set_num_threads(2)
    ids = sampling_models.make_prompts(model, count=prompts, length=length)
    backend = sampling_case._our_backend("torch", {"model": model, "seed": 0})
    params = SamplingParams(max_new_tokens=new_tokens, temperature=1.0, seed=0)

    def call(preallocate: bool):
        backend.preallocate_decode_cache = preallocate
        start = time.perf_counter()
        out = backend.sample(ids, n=group, params=params)
        return time.perf_counter() - start, out

    (_, fast), (_, dynamic) = call(True), call(False)  # also the warm-up
    assert [c.completion_ids for c in fast] == [c.completion_ids for c in dynamic], "sampled ids differ"
    assert all(len(c.completion_ids) == new_tokens for c in fast)
    gap = max(float(np.abs(np.subtract(a.logprobs, b.logprobs)).max()) for a, b in zip(fast, dynamic, strict=True))
    assert gap <= 1e-6, f"log-probs differ by {gap}"
    new, old = [], []
    for i in range(pairs):
        order = (True, False) if i % 2 else (False, True)
        seconds = {flag: call(flag)[0] for flag in order}
        new.append(seconds[True])
        old.append(seconds[False])
    ratios = sorted(n / o for n, o in zip(new, old, strict=True))
    quartiles = statistics.quantiles(ratios, n=4)
    return {
        "group": group,
        "rows": prompts * group,
        "pairs": pairs,
        "logp_gap": gap,
        "median_ratio": statistics.median(ratios),
        "q1": quartiles[0],
        "q3": quartiles[2],
        "min": ratios[0],
        "max": ratios[-1],
        "dynamic_s": statistics.median(old),
        "preallocated_s": statistics.median(new),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="tiny", help="tiny, 30m, a local folder or a hub id")
    parser.add_argument("--group", default="4,8", help="comma-separated G values")
    parser.add_argument("--pairs", type=int, default=40)
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=64)
    args = parser.parse_args()
    model = sampling_models.resolve_model(args.model)
    print(
        "| model | G | rows | pairs | preallocated / dynamic (median) | quartiles | min - max "
        "| dynamic s/call | preallocated s/call | max log-prob gap |"
    )
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for group in (int(g) for g in args.group.split(",")):
        r = ab_case(
            model, group=group, pairs=args.pairs, prompts=args.prompts, length=args.length, new_tokens=args.new_tokens
        )
        print(
            f"| {Path(args.model).name} | {group} | {r['rows']} | {r['pairs']} | **{r['median_ratio']:.3f}** "
            f"| {r['q1']:.3f} - {r['q3']:.3f} | {r['min']:.3f} - {r['max']:.3f} | {r['dynamic_s']:.3f} "
            f"| {r['preallocated_s']:.3f} | {r['logp_gap']:.1e} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
