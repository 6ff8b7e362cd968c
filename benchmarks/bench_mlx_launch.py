"""Step time of one MLX process against two under ``mlx.launch --backend ring``, same config, same global batch.

    python benchmarks/bench_mlx_launch.py [--model tiny|30m] [--steps 8] [--rounds 2] [--json out.json]

Each round runs ``rlaif-mlx train`` on the quickstart tasks (unit-test rewards in
the sandbox, no warm-up) once in one process and once in two processes on
localhost, and reads ``step_seconds`` and its parts from ``metrics.jsonl``. The
first step (compilation, caches) is left out; the median of the rest is
reported. On one machine the two processes share its cores (and, here, with
whatever else runs on it): the figure says what the collectives cost, not what
two Macs gain.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
PARTS = ("step_seconds", "sample_seconds", "score_seconds", "reference_seconds", "train_seconds")


def write_config(folder: Path, model: str, *, steps: int) -> Path:
    config = {
        "seed": 0,
        "backend": "mlx",
        "output_dir": str(folder / "run"),
        "model": {"base_model": model, "use_lora": False},
        "data": {"train_file": "builtin:quickstart_train.jsonl"},
        "training": {"max_steps": steps, "batch_size": 8, "micro_batch_size": 16, "learning_rate": 1e-4},
        "rlaif": {"num_samples_per_prompt": 4, "max_new_tokens": 64},
        "rewards": {"max_workers": 1},
        "logging": {"dashboard": False, "save_samples": False},
    }
    path = folder / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def run(config: Path, processes: int) -> list[dict]:
    """Trains ``config`` in ``processes`` processes; returns its metrics records."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE.parent), os.environ.get("PYTHONPATH", "")])}
    train = ["-m", "rlaif_mlx.cli", "train", "--config", str(config), "--no-dashboard"]
    if processes == 1:
        command = [sys.executable, *train]
    else:
        launcher = shutil.which("mlx.launch", path=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
        port = str(_free_port())
        command = [launcher, "-n", str(processes), "--backend", "ring", "--starting-port", port]
        command += ["--python", sys.executable, "--", *train]
    shutil.rmtree(config.parent / "run", ignore_errors=True)
    subprocess.run(command, env=env, check=True, capture_output=True, text=True)
    return [json.loads(line) for line in (config.parent / "run" / "metrics.jsonl").read_text().splitlines()]


def _free_port() -> int:
    for _ in range(50):
        with socket.socket() as a, socket.socket() as b:
            a.bind(("127.0.0.1", 0))
            try:
                b.bind(("127.0.0.1", a.getsockname()[1] + 1))
            except OSError:
                continue
            return a.getsockname()[1]
    raise RuntimeError("no two consecutive free ports")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    from sampling_models import resolve_model

    model = resolve_model(args.model)
    steps: dict[int, dict[str, list[float]]] = {1: {p: [] for p in PARTS}, 2: {p: [] for p in PARTS}}
    with tempfile.TemporaryDirectory() as tmp:
        config = write_config(Path(tmp), model, steps=args.steps)
        for _ in range(args.rounds):
            for processes in (1, 2):
                for record in run(config, processes)[1:]:
                    for part in PARTS:
                        steps[processes][part].append(record[part])
    result = {
        "model": args.model,
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}",
        "medians": {n: {p: statistics.median(v) for p, v in parts.items()} for n, parts in steps.items()},
        "steps_measured": len(steps[1]["step_seconds"]),
    }
    for n in (1, 2):
        medians = result["medians"][n]
        print(f"{n} process(es): " + ", ".join(f"{p.removesuffix('_seconds')} {medians[p]:.2f} s" for p in PARTS))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
