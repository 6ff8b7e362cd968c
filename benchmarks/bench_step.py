"""Time per RL step and peak memory: rlaif-mlx's trainer vs TRL's GRPOTrainer, on the CPU (or a GPU).

Both sides do the same work each step: B prompts (plain text, no chat
template) x G samples of up to T new tokens at temperature 1, a reward from
the completion text (share of digit characters, computed in-process: the
trainer is timed, not a grader), reference log-probs, and one AdamW step on
the clipped GRPO loss with a k3 KL term (beta), token-mean aggregation,
group-normalised advantages, LoRA (same rank, alpha, targets) or all weights.
Each side runs in a fresh subprocess (``step_ours.py``, ``step_trl.py``), so
its peak RSS (``ru_maxrss``) is its own. One untimed warm-up step, then the
median of ``--steps`` steps. Where our step misses ``--target`` x TRL's, our
step is re-run under cProfile and the top entries go into the report.

TRL is for this benchmark only: ``pip install -e '.[torch,bench]'``. Run by hand,
never by the test suite:

    python benchmarks/bench_step.py --model tiny --model 30m --steps 5 \\
        --prompts 4 --group 4 --new-tokens 64 --lora-rank 8 --kl 0.05

``--device cuda`` runs both sides on the GPU and adds the allocator's peak GPU
memory (``torch.cuda.max_memory_allocated``) of each side to the table.

The report (``--out``) is rewritten on each run, except anything below the
line ``<!-- notes -->``, which is kept: write findings there.
``step_floor.py`` measures, outside the trainer, what proposed changes to our
step would save.

The machine may be shared: before each run the benchmark waits for the other
processes to go quiet, records the share of the cores they used during the
timed steps, and runs a round again when they used more than ``--quiet``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from step_common import (
    StepSettings,
    default_model_dir,
    machine,
    machine_load,
    pool,
    resolve_model,
    summarise,
    versions,
)

HERE = Path(__file__).resolve().parent
NOTES_MARKER = "<!-- notes -->"
PARTS = ("sample", "score", "reference", "update", "other")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Seconds per RL step and peak memory of rlaif-mlx vs TRL's GRPOTrainer (PyTorch)."
    )
    parser.add_argument(
        "--model",
        action="append",
        default=None,
        help="tiny (0.4M parameters), 30m (about 30M) or a local model folder; repeat for several (default: tiny)",
    )
    parser.add_argument("--lora", action="store_true", help="LoRA adapters (default: both LoRA and full)")
    parser.add_argument("--full", action="store_true", help="full fine-tune (default: both LoRA and full)")
    parser.add_argument("--steps", type=int, default=5, help="timed steps after one warm-up step (default 5)")
    parser.add_argument("--prompts", type=int, default=4, help="B, prompts per step (default 4)")
    parser.add_argument("--group", type=int, default=4, help="G, completions per prompt (default 4)")
    parser.add_argument("--new-tokens", type=int, default=64, help="T, the longest completion (default 64)")
    parser.add_argument("--lora-rank", type=int, default=8, help="LoRA rank (default 8)")
    parser.add_argument("--lora-alpha", type=float, default=None, help="LoRA alpha (default 2 x rank)")
    parser.add_argument("--kl", type=float, default=0.05, help="beta, the KL coefficient in the loss (default 0.05)")
    parser.add_argument("--learning-rate", type=float, default=1e-5, help="constant learning rate (default 1e-5)")
    parser.add_argument(
        "--rounds",
        type=int,
        default=3,
        help="fresh processes per side, alternating which side goes first; the steps of all "
        "rounds are pooled (default 3)",
    )
    parser.add_argument(
        "--quiet",
        type=float,
        default=0.15,
        help="before each run, wait until other processes use at most this share of the cores (default 0.15)",
    )
    parser.add_argument(
        "--retries",
        type=int,
        default=2,
        help="run a round again when others used more than --quiet of the cores during it (default 2)",
    )
    parser.add_argument("--max-wait", type=float, default=300, help="longest wait for a quiet machine, s (default 300)")
    parser.add_argument("--side", choices=("both", "ours", "trl"), default="both", help="which trainer(s) to time")
    parser.add_argument(
        "--profile",
        choices=("auto", "always", "never"),
        default="auto",
        help="cProfile our step: where the target is missed (auto), always, or never",
    )
    parser.add_argument(
        "--dtype", choices=("float32", "bfloat16"), default="float32", help="both sides' weights (default float32)"
    )
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="where both sides run (default cpu)")
    parser.add_argument("--target", type=float, default=0.7, help="goal for our step time / TRL's (default 0.7)")
    parser.add_argument(
        "--out",
        type=Path,
        default=HERE / "results" / "step.md",
        help="the Markdown report; the raw numbers go next to it as .json",
    )
    parser.add_argument("--model-dir", type=Path, default=default_model_dir(), help="where tiny / 30m are built (once)")
    args = parser.parse_args(argv)
    if args.steps < 1 or args.prompts < 1 or args.group < 2 or args.new_tokens < 1:
        parser.error("--steps, --prompts and --new-tokens must be >= 1, --group >= 2 (GRPO needs a group)")
    return args


def run_side(side: str, settings: StepSettings) -> dict:
    """Runs one side in a fresh Python process and returns its result record."""
    with tempfile.TemporaryDirectory(prefix="bench-step-") as tmp:
        result = Path(tmp) / "result.json"
        command = [sys.executable, str(HERE / f"step_{side}.py"), settings.to_json(), str(result)]
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
        done = subprocess.run(command, env=env, capture_output=True, text=True)
        if done.returncode != 0 or not result.exists():
            tail = "\n".join((done.stdout + done.stderr).splitlines()[-40:])
            raise SystemExit(f"the {side} worker failed (exit {done.returncode}):\n{tail}")
        return json.loads(result.read_text())


def wait_for_quiet(threshold: float, max_wait: float) -> float:
    """Waits (up to ``max_wait`` s) until other processes use at most ``threshold`` of the cores; returns the load.

    The machine may be shared: a busy neighbour slows both trainers, but not
    equally (each side's thread pool reacts differently to oversubscription).
    """
    waited, load = 0.0, machine_load()
    while load > threshold and waited < max_wait:
        print(f"  machine {load:.0%} busy, waiting ...", file=sys.stderr, flush=True)
        time.sleep(8)
        waited += 10
        load = machine_load()
    return load


def run_round(side: str, settings: StepSettings, args: argparse.Namespace, label: str) -> dict:
    """One side's round on a quiet machine; repeated (up to ``--retries``) when others used the cores meanwhile."""
    for attempt in range(args.retries + 1):
        load = wait_for_quiet(args.quiet, args.max_wait)
        print(f"{label} (machine {load:.0%} busy before) ...", file=sys.stderr, flush=True)
        record = run_side(side, settings)
        record["load_before"] = load
        record["attempts"] = attempt + 1
        foreign = statistics.fmean(record["times"]["foreign"])
        print(
            f"  median {statistics.median(record['times']['step']):.3f} s/step, peak RSS "
            f"{record['peak_rss_mb']:.0f} MB, others used {foreign:.0%} of the cores",
            file=sys.stderr,
            flush=True,
        )
        if not foreign > args.quiet:
            break
        print("  contended: running this round again", file=sys.stderr, flush=True)
    return record


def merge_rounds(records: list[dict]) -> dict:
    """One side's rounds as one record: per-step lists pooled, peak memory the highest."""
    merged = {k: v for k, v in records[0].items() if k not in ("times", "profile")}
    pooled = pool([r["times"] for r in records])
    merged.update(summarise(pooled))
    merged["times"] = pooled
    merged["round_medians_s"] = [statistics.median(r["times"]["step"]) for r in records]
    merged["load_before"] = [r["load_before"] for r in records]
    merged["attempts"] = [r["attempts"] for r in records]
    for key in ("peak_rss_mb", "rss_after_imports_mb", "rss_after_setup_mb", "peak_gpu_mb"):
        values = [r[key] for r in records if r.get(key) is not None]
        merged[key] = max(values) if values else None
    return merged


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    models = args.model or ["tiny"]
    modes = [m for m, on in (("lora", args.lora), ("full", args.full)) if on] or ["lora", "full"]
    sides = ("ours", "trl") if args.side == "both" else (args.side,)
    alpha = args.lora_alpha if args.lora_alpha is not None else 2.0 * args.lora_rank
    runs = []
    for name in models:
        path = resolve_model(name, args.model_dir)
        for mode in modes:
            settings = StepSettings(
                model_path=str(path),
                lora=mode == "lora",
                steps=args.steps,
                prompts=args.prompts,
                group=args.group,
                new_tokens=args.new_tokens,
                lora_rank=args.lora_rank,
                lora_alpha=alpha,
                kl=args.kl,
                learning_rate=args.learning_rate,
                device=args.device,
                dtype=args.dtype,
            )
            records: dict[str, list[dict]] = {side: [] for side in sides}
            for round_index in range(args.rounds):
                # alternate which side goes first, so a slow drift in the machine hits both alike
                for side in sides if round_index % 2 == 0 else sides[::-1]:
                    records[side].append(
                        run_round(side, settings, args, f"{name} {mode} {side} round {round_index + 1}/{args.rounds}")
                    )
            run = {"model": name, "mode": mode, **{side: merge_rounds(records[side]) for side in sides}}
            ratio = run["ours"]["median_step_s"] / run["trl"]["median_step_s"] if len(sides) == 2 else None
            run["ratio"] = ratio
            run["cpu_ratio"] = run["ours"]["median_cpu_s"] / run["trl"]["median_cpu_s"] if len(sides) == 2 else None
            missed = ratio is None or ratio > args.target
            if "ours" in sides and (args.profile == "always" or (args.profile == "auto" and missed)):
                settings.profile = True
                run["profile"] = run_round("ours", settings, args, f"{name} {mode} ours under cProfile")["profile"]
            runs.append(run)
            if ratio is not None:
                print(f"  ours/TRL = {ratio:.2f}", file=sys.stderr, flush=True)

    write_report(args, runs, argv if argv is not None else sys.argv[1:])


# ---- the report ----------------------------------------------------------------------------------------------


def write_report(args: argparse.Namespace, runs: list[dict], argv: list[str]) -> None:
    out: Path = args.out
    out.parent.mkdir(parents=True, exist_ok=True)
    notes = ""
    if out.exists() and NOTES_MARKER in out.read_text():
        notes = out.read_text().split(NOTES_MARKER, 1)[1]
    meta = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine() + (f", {_gpu_name()}" if args.device != "cpu" else ""),
        "versions": versions("torch", "transformers", "peft", "trl", "accelerate", "datasets", "rlaif-mlx"),
        "command": "python benchmarks/bench_step.py " + shlex.join(argv),
    }
    out.with_suffix(".json").write_text(json.dumps({**meta, "runs": runs}, indent=2))
    gpu = args.device != "cpu"  # one more column: the allocator's peak on the GPU
    columns = [
        "model",
        "mode",
        "params (trainable)",
        "ours s/step",
        "TRL s/step",
        "ours/TRL",
        f"<= {args.target:g}?",
        "CPU-s ours/TRL",
        "others ours / TRL",
        "ours peak MB",
        "TRL peak MB",
        "ours MB above imports",
        "TRL MB above imports",
        "completion len ours / TRL",
        *(["GPU peak MB ours / TRL"] if gpu else []),
    ]
    lines = [
        "# RL step time: rlaif-mlx vs TRL GRPOTrainer",
        "",
        f"Generated by `benchmarks/bench_step.py` on {meta['date']}. Raw numbers: `{out.with_suffix('.json').name}`.",
        "",
        f"- machine: {meta['machine']}",
        "- versions: " + ", ".join(f"{k} {v}" for k, v in meta["versions"].items()),
        f"- command: `{meta['command']}`",
        f"- work per step: B={args.prompts} prompts x G={args.group} samples, up to T={args.new_tokens} new tokens "
        f"at temperature 1, reward = share of digit characters (in-process), beta={args.kl} (k3 KL in the loss), "
        f"LoRA r={args.lora_rank} alpha={args.lora_alpha or 2 * args.lora_rank:g} on q/k/v/o or all weights, "
        f"lr {args.learning_rate:g} constant, one AdamW step per batch, {args.dtype} on {args.device}, "
        f"torch threads {_first(runs, 'torch_threads')}",
        f"- timing: median over {args.rounds} rounds x {args.steps} steps (one untimed warm-up step per round); "
        "each round of each side is a fresh process; peak memory = the highest `ru_maxrss` of its rounds; "
        "'others' = mean share of the cores other processes used during the timed steps (the machine is shared)",
        "",
        "| " + " | ".join(columns) + " |",
        "|" + "---|" * len(columns),
    ]
    for run in runs:
        ours, trl = run.get("ours"), run.get("trl")
        any_side = ours or trl
        ratio = run["ratio"]
        lines.append(
            "| "
            + " | ".join(
                [
                    run["model"],
                    run["mode"],
                    f"{any_side['total_params'] / 1e6:.2f}M ({any_side['trainable_params'] / 1e6:.3f}M)",
                    _num(ours, "median_step_s", "{:.3f}"),
                    _num(trl, "median_step_s", "{:.3f}"),
                    f"{ratio:.2f}" if ratio is not None else "-",
                    ("yes" if ratio <= args.target else "**no**") if ratio is not None else "-",
                    f"{run['cpu_ratio']:.2f}" if run["cpu_ratio"] is not None else "-",
                    f"{_num(ours, 'foreign_load_mean', '{:.0%}')} / {_num(trl, 'foreign_load_mean', '{:.0%}')}",
                    _num(ours, "peak_rss_mb", "{:.0f}"),
                    _num(trl, "peak_rss_mb", "{:.0f}"),
                    _above(ours),
                    _above(trl),
                    f"{_num(ours, 'completion_len_mean', '{:.1f}')} / {_num(trl, 'completion_len_mean', '{:.1f}')}",
                    *([f"{_num(ours, 'peak_gpu_mb', '{:.0f}')} / {_num(trl, 'peak_gpu_mb', '{:.0f}')}"] if gpu else []),
                ]
            )
            + " |"
        )
    lines += [
        "",
        "Per-round medians (s/step) and attempts per round (a round is re-run when other processes used the "
        "cores during it): "
        + "; ".join(
            f"{run['model']} {run['mode']} "
            + ", ".join(
                f"{side} "
                + " ".join(f"{m:.3f}" for m in run[side]["round_medians_s"])
                + f" (attempts {'/'.join(map(str, run[side]['attempts']))})"
                for side in ("ours", "trl")
                if side in run
            )
            for run in runs
        ),
    ]
    lines += [
        "",
        "Where the step goes (median seconds per part; `reference` = reference log-probs, `update` = loss "
        "forward + backward + clipping + AdamW, `other` = the trainer's own bookkeeping: padding, advantages, "
        "records):",
        "",
        "| model | mode | side | " + " | ".join(PARTS) + " | step |",
        "|---|---|---|" + "---|" * (len(PARTS) + 1),
    ]
    for run in runs:
        for side in ("ours", "trl"):
            if side in run:
                r = run[side]
                cells = [
                    f"{r['parts_median_s'][p]:.3f} ({r['parts_median_s'][p] / r['median_step_s']:.0%})" for p in PARTS
                ]
                lines.append(
                    f"| {run['model']} | {run['mode']} | {side} | "
                    + " | ".join(cells)
                    + f" | {r['median_step_s']:.3f} |"
                )
    for run in runs:
        if "profile" in run:
            lines += [
                "",
                f"## cProfile of our step: {run['model']} {run['mode']} ({args.steps} steps, top by cumulative time)",
                "",
                "```",
                _trim_profile(run["profile"]["cumulative"]),
                "```",
                "",
                "Top by own time (tottime):",
                "",
                "```",
                _trim_profile(run["profile"]["tottime"], limit=25),
                "```",
            ]
    text = "\n".join(lines) + "\n\n" + NOTES_MARKER + (notes if notes else "\n")
    out.write_text(text)
    print(f"report: {out}", file=sys.stderr)


def _gpu_name() -> str:
    import torch

    return torch.cuda.get_device_name()


def _first(runs: list[dict], key: str):
    for run in runs:
        for side in ("ours", "trl"):
            if side in run:
                return run[side][key]
    return "-"


def _num(record: dict | None, key: str, fmt: str) -> str:
    return fmt.format(record[key]) if record else "-"


def _above(record: dict | None) -> str:
    return f"{record['peak_rss_mb'] - record['rss_after_imports_mb']:.0f}" if record else "-"


def _trim_profile(text: str, limit: int = 35) -> str:
    """pstats output from the column header on, at most ``limit`` rows."""
    lines = text.splitlines()
    start = next((i for i, line in enumerate(lines) if line.lstrip().startswith("ncalls")), 0)
    return "\n".join(line.rstrip() for line in lines[start : start + 1 + limit])


if __name__ == "__main__":
    main()
