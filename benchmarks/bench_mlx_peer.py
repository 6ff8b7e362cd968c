"""Time per RL step and peak memory on MLX: rlaif-mlx's trainer vs mlx-lm-lora's GRPO, on the CPU.

Both sides do the same work each step: B prompts x G samples of up to T new
tokens at temperature 1, the completion's digit share as reward, reference
log-probs, and one AdamW step on the clipped GRPO loss with a KL term (beta),
token-mean aggregation, LoRA of the same rank and alpha on q/v. mlx-lm-lora
differentiates B rows at a time; ours uses ``--micro-batch`` rows (default B).
Each side runs in a fresh subprocess (``step_mlx_ours.py``, ``step_mlx_lora.py``),
so its peak RSS (``ru_maxrss``) is its own; rounds alternate which side goes first.
One untimed warm-up step per process, then ``--steps`` timed ones.

mlx-lm-lora is for this benchmark only (``pip install mlx-lm-lora``). Run by hand:

    python benchmarks/bench_mlx_peer.py --model 30m --steps 3 --rounds 3

MLX's CPU backend calls BLAS for its matrix products; ``--blas`` (default
Debian's OpenBLAS, when present) is preloaded into both sides and named in the report.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import sys
from pathlib import Path

from bench_step import merge_rounds, run_round
from step_common import StepSettings, default_model_dir, machine, resolve_model, versions

HERE = Path(__file__).resolve().parent
OPENBLAS = "/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0"
SIDES = ("mlx_ours", "mlx_lora")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Seconds per RL step and peak RSS: rlaif-mlx vs mlx-lm-lora (MLX).")
    parser.add_argument("--model", default="30m", help="tiny, 30m or a local model folder (default 30m)")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per process after one warm-up (default 3)")
    parser.add_argument("--rounds", type=int, default=3, help="fresh processes per side, alternating (default 3)")
    parser.add_argument("--prompts", type=int, default=4, help="B (default 4)")
    parser.add_argument("--group", type=int, default=4, help="G (default 4)")
    parser.add_argument("--new-tokens", type=int, default=64, help="T (default 64)")
    parser.add_argument("--lora-rank", type=int, default=8, help="LoRA rank (default 8, alpha 2 x rank)")
    parser.add_argument("--kl", type=float, default=0.04, help="beta (default 0.04)")
    parser.add_argument("--learning-rate", type=float, default=1e-5, help="constant (default 1e-5)")
    parser.add_argument("--micro-batch", type=int, default=None, help="our rows per forward/backward (default B)")
    parser.add_argument("--blas", default=OPENBLAS if Path(OPENBLAS).exists() else "", help="a BLAS to LD_PRELOAD")
    parser.add_argument("--quiet", type=float, default=1.0, help="see bench_step.py (default 1.0: never wait)")
    parser.add_argument("--retries", type=int, default=0, help="see bench_step.py (default 0)")
    parser.add_argument("--max-wait", type=float, default=0, help="see bench_step.py (default 0)")
    parser.add_argument("--target", type=float, default=0.45, help="goal for our step time / theirs (default 0.45)")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "mlx_peer.md", help="report; .json beside it")
    parser.add_argument("--model-dir", type=Path, default=default_model_dir(), help="where tiny / 30m are built")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.blas:
        os.environ["LD_PRELOAD"] = args.blas
    settings = StepSettings(
        model_path=str(resolve_model(args.model, args.model_dir)),
        lora=True,
        steps=args.steps,
        prompts=args.prompts,
        group=args.group,
        new_tokens=args.new_tokens,
        lora_rank=args.lora_rank,
        lora_alpha=2.0 * args.lora_rank,
        kl=args.kl,
        learning_rate=args.learning_rate,
        micro_batch=args.micro_batch,
    )
    records: dict[str, list[dict]] = {side: [] for side in SIDES}
    for index in range(args.rounds):
        for side in SIDES if index % 2 == 0 else SIDES[::-1]:
            records[side].append(run_round(side, settings, args, f"{side} round {index + 1}/{args.rounds}"))
    ours, theirs = (merge_rounds(records[side]) for side in SIDES)
    for side in SIDES:
        merged = ours if side == "mlx_ours" else theirs
        merged["round_peak_rss_mb"] = [r["peak_rss_mb"] for r in records[side]]
        merged["mlx_peak_mb"] = max(r["mlx_peak_mb"] for r in records[side])
    run = {
        "model": args.model,
        "ours": ours,
        "theirs": theirs,
        "step_ratio": ours["median_step_s"] / theirs["median_step_s"],
        "rss_ratio": ours["peak_rss_mb"] / theirs["peak_rss_mb"],
    }
    write_report(args, run, argv if argv is not None else sys.argv[1:])
    print(f"ours/theirs: step {run['step_ratio']:.2f}x, peak RSS {run['rss_ratio']:.2f}x", file=sys.stderr)


def write_report(args: argparse.Namespace, run: dict, argv: list[str]) -> None:
    meta = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine(),
        "blas": args.blas or "MLX's own (nothing preloaded)",
        "versions": versions("mlx", "mlx-lm", "mlx-lm-lora", "rlaif-mlx"),
        "command": "python benchmarks/bench_mlx_peer.py " + shlex.join(argv),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps({**meta, "run": run}, indent=2))
    ours, theirs = run["ours"], run["theirs"]
    settings = ours["settings"]
    meets = lambda ok: "meets" if ok else "misses"  # noqa: E731
    lines = [
        "# MLX RL step: rlaif-mlx vs mlx-lm-lora GRPO",
        "",
        f"`{meta['command']}` ({meta['date']}; {meta['machine']}; BLAS: {meta['blas']}; "
        + ", ".join(f"{k} {v}" for k, v in meta["versions"].items())
        + ").",
        "",
        f"Work per step: {settings['prompts']} prompts x {settings['group']} samples x up to "
        f"{settings['new_tokens']} tokens, LoRA r={settings['lora_rank']} on q/v, beta {settings['kl']}; "
        f"ours micro-batch {settings.get('micro_batch') or settings['prompts']} rows, theirs {settings['prompts']}. "
        f"{len(ours['round_medians_s'])} rounds per side, fresh process each, alternating; "
        f"{settings['steps']} timed steps each after one warm-up.",
        "",
        "| | ours | mlx-lm-lora | ours / theirs | target |",
        "| --- | --- | --- | --- | --- |",
        f"| median s/step | {ours['median_step_s']:.2f} | {theirs['median_step_s']:.2f} | "
        f"**{run['step_ratio']:.2f}x** | <= {args.target}x ({meets(run['step_ratio'] <= args.target)}) |",
        f"| round medians, s | {_join(ours['round_medians_s'])} | {_join(theirs['round_medians_s'])} | | |",
        f"| peak RSS, MiB (highest round) | {ours['peak_rss_mb']:.0f} | {theirs['peak_rss_mb']:.0f} | "
        f"**{run['rss_ratio']:.2f}x** | <= 1.0x ({meets(run['rss_ratio'] <= 1.0)}) |",
        f"| peak RSS per round, MiB | {_join(ours['round_peak_rss_mb'], 0)} | "
        f"{_join(theirs['round_peak_rss_mb'], 0)} | | |",
        f"| RSS after imports / setup, MiB | {ours['rss_after_imports_mb']:.0f} / {ours['rss_after_setup_mb']:.0f} | "
        f"{theirs['rss_after_imports_mb']:.0f} / {theirs['rss_after_setup_mb']:.0f} | | |",
        f"| MLX allocator peak, MiB | {ours['mlx_peak_mb']:.0f} | {theirs['mlx_peak_mb']:.0f} | | |",
        f"| mean completion tokens | {ours['completion_len_mean']:.1f} | {theirs['completion_len_mean']:.1f} | | |",
        f"| others' share of the cores | {ours['foreign_load_mean']:.0%} | {theirs['foreign_load_mean']:.0%} | | |",
        "",
        f"Our peak RSS after each part of the first timed step, MiB: {_parts(ours.get('rss_after_part_mb'))}.",
    ]
    args.out.write_text("\n".join(lines) + "\n")


def _join(values: list[float], digits: int = 2) -> str:
    return ", ".join(f"{v:.{digits}f}" for v in values)


def _parts(parts: dict | None) -> str:
    return ", ".join(f"{k} {v:.0f}" for k, v in (parts or {}).items()) or "-"


if __name__ == "__main__":
    main()
