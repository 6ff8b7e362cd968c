"""The quickstart's RL step time on this machine, and where it goes: `rlaif-mlx train` as a user runs it.

Runs ``configs/quickstart.yaml`` (tiny model, its supervised warm-up, B=16 prompts x G=4, unit-test
rewards on ``rewards.max_workers: 2``) for ``--steps`` RL steps with ``--no-dashboard``, in a scratch
folder (the tiny model is built there once and reused), and prints the medians of the step records in
``metrics.jsonl`` (sample, score, reference, train, step seconds), leaving out the first step.

Run it against another checkout (``PYTHONPATH=/path/to/checkout``) for a before/after pair:

    python benchmarks/bench_quickstart_step.py --steps 20 --work /tmp/qs --out benchmarks/results/x.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PARTS = ("sample_seconds", "score_seconds", "reference_seconds", "train_seconds", "step_seconds")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--work", required=True, help="scratch folder: the tiny model and the runs go here")
    parser.add_argument("--label", default="")
    parser.add_argument("--out")
    args = parser.parse_args()
    import rlaif_mlx

    code = Path(rlaif_mlx.__file__).parent
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    out = work / f"run-{int(time.time() * 1000)}"
    cli = "import sys; from rlaif_mlx.cli import main; sys.exit(main(sys.argv[1:]))"
    command = [sys.executable, "-c", cli, "train", "--config", str(ROOT / "configs" / "quickstart.yaml")]
    command += ["--output-dir", str(out), "--max-steps", str(args.steps), "--no-dashboard"]
    start = time.perf_counter()
    done = subprocess.run(command, cwd=work, env=dict(os.environ, HF_HUB_OFFLINE="1"), capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"train failed ({done.returncode}):\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "step_seconds" in r][1:]
    row = {
        "label": args.label,
        "steps": len(steps),
        **{k: round(statistics.median(r.get(k, 0.0) for r in steps), 3) for k in PARTS},
        "step_seconds_mean": round(statistics.fmean(r["step_seconds"] for r in steps), 3),
        "reward_mean": round(statistics.fmean(r["reward_mean"] for r in steps), 4),
        "run_seconds": round(time.perf_counter() - start, 1),
        "code": str(code),
        "cpus": os.cpu_count(),
        "load_1min_after": round(os.getloadavg()[0], 2),
        "python": platform.python_version(),
    }
    print(json.dumps(row), flush=True)
    if args.out:
        with open(args.out, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    sys.exit(main())
