"""Does RL improve tasks it never saw? Held-out pass@1 on the generated task family, warm-up alone vs warm-up + RL.

For each backend and seed, ``configs/families.yaml`` built in-process as ``rlaif-mlx train``
builds it (``training.setup.build_run``):

1. the supervised warm-up on the training tasks' references (once: every setting starts from it);
2. held-out pass@1 (greedy, all held-out tasks): the warm-up alone;
3. for each advantage setting, RL on the training tasks, held-out pass@1 every ``--eval-every`` steps.

Settings: ``grpo`` is ``baseline: group_mean`` + ``scale_by_std: true`` (the GRPO default);
``drgrpo`` is ``group_mean`` without the division by the group's std (Dr. GRPO, Liu et al. 2025);
``quickstart`` is the quickstart's ``baseline: none`` + ``scale_by_std: false``.

Run by hand (minutes per run on a quiet 2-core CPU; MLX with OpenBLAS preloaded):

    python benchmarks/learning_curves.py --backends torch,mlx --seeds 0,1,2 --out benchmarks/results/learning

It writes ``learning.json`` (every curve), ``learning.md`` (the table in docs/learning.md) and
``learning.png`` (the plot linked from the README); ``--report`` redraws both from the JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SETTINGS = {
    "grpo": {"baseline": "group_mean", "scale_by_std": True},
    "drgrpo": {"baseline": "group_mean", "scale_by_std": False},  # Dr. GRPO: centred, not divided by the std
    "quickstart": {"baseline": "none", "scale_by_std": False},
}


def build(backend: str, seed: int, setting: str, args: argparse.Namespace, out: Path):
    """The trainer ``rlaif-mlx train`` would build for ``configs/families.yaml`` with this setting."""
    from rlaif_mlx.config import load_config
    from rlaif_mlx.training.setup import build_run

    overrides = {
        "backend": backend,
        "seed": seed,
        "output_dir": str(out / f"{backend}-{seed}-{setting}"),
        "training.max_steps": args.steps,
        "eval.every_steps": args.eval_every,
        "model.base_model": str(out / "models" / "tiny"),
        "logging.dashboard": False,
        **{f"rlaif.{k}": v for k, v in SETTINGS[setting].items()},
        **dict(args.set),
    }
    config = load_config(ROOT / "configs" / "families.yaml", overrides=overrides)
    return build_run(config, source="configs/families.yaml", overwrite=True, log=lambda line: None)


def runs_of_one_warmup(backend: str, seed: int, args: argparse.Namespace, out: Path) -> list[dict]:
    """One warm-up per backend and seed, measured once; then RL from it under each setting.

    The warmed-up weights (with the rebased reference and fresh optimizer, as ``rebase_reference``
    leaves them) go through the backend's own checkpoint, so every setting starts from the same state
    a single ``train`` run would have at its first RL step.
    """
    from rlaif_mlx.data import load_task_set
    from rlaif_mlx.training.evaluation import evaluate

    warm_dir = out / f"{backend}-{seed}-warm"
    rows = []
    if args.warm_from:  # an earlier sweep's warm-up (the same sft_* settings): its weights and its measurement
        earlier = Path(args.warm_from)
        warm_dir = earlier / f"{backend}-{seed}-warm"
        done = json.loads((earlier / "learning.json").read_text())["runs"]
        first = next(r for r in done if (r["backend"], r["seed"]) == (backend, seed))
        warm, warm_seconds = first["warmup_pass@1"], first["warmup_seconds"]
    for k, setting in enumerate(args.settings.split(",")):
        trainer = build(backend, seed, setting, args, out)
        heldout = load_task_set(trainer.config.data.eval_file).tasks
        try:
            started = time.perf_counter()
            if k == 0 and not args.warm_from:
                trainer.supervised_warmup()
                warm_dir.mkdir(parents=True, exist_ok=True)
                trainer.backend.save(warm_dir)
                warm = evaluate(trainer.backend, heldout, trainer.rewards, trainer.config)["eval/pass@1"]
                warm_seconds = time.perf_counter() - started
                started = time.perf_counter()
            else:
                trainer.backend.load(warm_dir)
            records = trainer.run(warmup=False)
        finally:
            trainer.close()
        curve = [(0, warm)] + [(r["step"], r["eval/pass@1"]) for r in records if "eval/pass@1" in r]
        rows.append(
            {
                "backend": backend,
                "seed": seed,
                "setting": setting,
                "warmup_pass@1": warm,
                "final_pass@1": curve[-1][1],
                "curve": curve,
                "train_reward_first": records[0]["reward_mean"],
                "train_reward_last": records[-1]["reward_mean"],
                "warmup_seconds": round(warm_seconds, 1),
                "rl_seconds": round(time.perf_counter() - started, 1),
            }
        )
    return rows


def plot(rows: list[dict], path: Path) -> None:
    """One panel per setting (rows) and backend (columns), one line per seed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    backends = sorted({r["backend"] for r in rows})
    settings = [s for s in SETTINGS if any(r["setting"] == s for r in rows)]
    fig, axes = plt.subplots(
        len(settings), len(backends), figsize=(6 * len(backends), 3.2 * len(settings)), squeeze=False, sharey=True
    )
    for row_axes, setting in zip(axes, settings, strict=True):
        for ax, backend in zip(row_axes, backends, strict=True):
            runs = [r for r in rows if (r["backend"], r["setting"]) == (backend, setting)]
            for r in sorted(runs, key=lambda r: r["seed"]):
                steps, values = zip(*r["curve"], strict=True)
                ax.plot(steps, values, color=f"C{r['seed']}", marker="o", markersize=3, label=f"seed {r['seed']}")
            ax.set_title(f"{backend}, {setting}", fontsize=10)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7, ncol=2)
        row_axes[0].set_ylabel("held-out pass@1")
    for ax in axes[-1]:
        ax.set_xlabel("RL step (0 = after the warm-up alone)")
    fig.suptitle("pass@1 on the 285 held-out tasks (one greedy completion each)", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def table(rows: list[dict]) -> str:
    """Markdown: per backend and setting, each seed's held-out pass@1 after the warm-up and after RL."""
    seeds = sorted({r["seed"] for r in rows})
    columns = " | ".join(f"seed {s}: warm-up -> RL" for s in seeds)
    lines = [
        f"| backend | setting | {columns} | RL above warm-up | mean change |",
        "| --- | --- | " + "--- | " * len(seeds) + "--- | --- |",
    ]
    for backend in sorted({r["backend"] for r in rows}, reverse=True):
        for setting in SETTINGS:
            runs = {r["seed"]: r for r in rows if (r["backend"], r["setting"]) == (backend, setting)}
            if not runs:
                continue
            cells = [
                f"{runs[s]['warmup_pass@1']:.3f} -> {runs[s]['final_pass@1']:.3f}" if s in runs else "-" for s in seeds
            ]
            above = sum(r["final_pass@1"] > r["warmup_pass@1"] for r in runs.values())
            change = sum(r["final_pass@1"] - r["warmup_pass@1"] for r in runs.values()) / len(runs)
            lines.append(f"| {backend} | {setting} | {' | '.join(cells)} | {above} of {len(runs)} | {change:+.3f} |")
    return "\n".join(lines) + "\n"


def _override(text: str) -> tuple[str, object]:
    import yaml

    key, _, value = text.partition("=")
    return key, yaml.safe_load(value)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backends", default="torch,mlx")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--settings", default="grpo,drgrpo,quickstart")
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--eval-every", type=int, default=20)
    parser.add_argument("--out", default="benchmarks/results/learning")
    parser.add_argument("--warm-from", help="start RL from an earlier --out's warm-ups (same sft_* settings)")
    parser.add_argument(
        "--set", action="append", default=[], type=_override, metavar="KEY=VALUE", help="a config override (YAML value)"
    )
    parser.add_argument("--report", action="store_true", help="only redraw the plot and table from OUT/learning.json")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.report:
        rows = json.loads((out / "learning.json").read_text())["runs"]
        plot(rows, out / "learning.png")
        (out / "learning.md").write_text(table(rows))
        print(table(rows))
        return
    from rlaif_mlx.data.tiny_model import ensure_tiny_model

    ensure_tiny_model(out / "models" / "tiny")
    rows = []
    results = out / "learning.json"
    for seed in map(int, args.seeds.split(",")):  # seed-major: an early stop leaves every backend measured
        for backend in args.backends.split(","):
            for row in runs_of_one_warmup(backend, seed, args, out):
                rows.append(row)
                print(json.dumps(row), flush=True)
                meta = {
                    "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
                    "ld_preload": os.environ.get("LD_PRELOAD", ""),
                    "overrides": dict(args.set),
                    "steps": args.steps,
                }
                results.write_text(json.dumps({"meta": meta, "runs": rows}, indent=1) + "\n")
    plot(rows, out / "learning.png")
    (out / "learning.md").write_text(table(rows))


if __name__ == "__main__":
    sys.exit(main())
