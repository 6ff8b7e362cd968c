"""Which objective learns on the quickstart's own tasks? The training reward of `configs/quickstart.yaml` under each.

The quickstart ships ``baseline: none`` (no group baseline, no division by the group's std). This runs
``rlaif-mlx train --config configs/quickstart.yaml`` as a user does, once per setting and seed, with
only ``rlaif.baseline``, ``rlaif.scale_by_std`` and ``training.learning_rate`` changed, and reports the mean
reward of the first 5 and the last 10 RL steps, the test pass fraction of the last 10, and the largest KL.

    python benchmarks/quickstart_objectives.py --work /tmp/qso --out benchmarks/results/quickstart_objectives.md
    python benchmarks/quickstart_objectives.py --work /tmp/qso --summarise   # the table again
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
SETTINGS = {  # name -> (baseline, scale_by_std, learning rate); the quickstart's learning rate is 1e-3
    "none": ("none", False, 1.0e-3),
    "grpo": ("group_mean", True, 1.0e-3),
    "grpo-lr3e-4": ("group_mean", True, 3.0e-4),
    "grpo-lr1e-4": ("group_mean", True, 1.0e-4),
    "drgrpo": ("group_mean", False, 1.0e-3),
}


def run(setting: str, seed: int, work: Path) -> None:
    config = yaml.safe_load((ROOT / "configs" / "quickstart.yaml").read_text())
    baseline, scale, lr = SETTINGS[setting]
    config["rlaif"].update(baseline=baseline, scale_by_std=scale)
    config["training"]["learning_rate"] = lr
    config["model"]["base_model"] = str(work / "tiny-qwen2")
    path = work / f"{setting}.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    command = ["rlaif-mlx", "train", "--config", str(path), "--seed", str(seed), "--no-dashboard", "--overwrite"]
    command += ["--output-dir", str(work / f"{setting}-{seed}")]
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    with open(work / f"{setting}-{seed}.log", "w") as log:
        subprocess.run(command, check=True, stdout=log, stderr=subprocess.STDOUT, env=env)


def summary(folder: Path) -> dict:
    records = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "reward_mean" in r]
    return {
        "first5": statistics.fmean(r["reward_mean"] for r in steps[:5]),
        "last10": statistics.fmean(r["reward_mean"] for r in steps[-10:]),
        "tests_last10": statistics.fmean(r.get("reward/tests", 0.0) for r in steps[-10:]),
        "max_kl": max(r["kl"] for r in steps),
    }


def table(work: Path, seeds: list[int]) -> str:
    lines = [
        "| setting | baseline, std, lr | "
        + " | ".join(f"seed {s}: first 5 -> last 10" for s in seeds)
        + " | tests passed, last 10 | largest KL |",
        "| --- | --- | " + "--- | " * len(seeds) + "--- | --- |",
    ]
    for name, (baseline, scale, lr) in SETTINGS.items():
        found = {s: summary(work / f"{name}-{s}") for s in seeds if (work / f"{name}-{s}" / "metrics.jsonl").exists()}
        if not found:
            continue
        cells = [f"{found[s]['first5']:.3f} -> {found[s]['last10']:.3f}" if s in found else "-" for s in seeds]
        tests = ", ".join(f"{v['tests_last10']:.3f}" for v in found.values())
        kl = ", ".join(f"{v['max_kl']:.2f}" for v in found.values())
        lines.append(f"| {name} | {baseline}, {scale}, {lr:g} | {' | '.join(cells)} | {tests} | {kl} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--settings", default=",".join(SETTINGS))
    parser.add_argument("--work", required=True, help="scratch folder: the tiny model, configs and runs")
    parser.add_argument("--summarise", action="store_true", help="only print the table of the runs in --work")
    parser.add_argument("--out", help="write the table here too")
    args = parser.parse_args()
    work, seeds = Path(args.work), [int(s) for s in args.seeds.split(",")]
    work.mkdir(parents=True, exist_ok=True)
    if not args.summarise:
        for seed in seeds:
            for setting in args.settings.split(","):
                run(setting, seed, work)
    text = table(work, seeds)
    print(text)
    if args.out:
        Path(args.out).write_text(text)


if __name__ == "__main__":
    sys.exit(main())
