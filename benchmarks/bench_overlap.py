"""Step time with a slow teacher: scoring alone, overlapped with the reference, and with `rlaif.sample_ahead`.

A local server speaking the OpenAI wire format (``tests/llm_server.py``) plays
the teacher and answers every judgement after ``--latency`` seconds. For each
latency, ``rlaif-mlx train`` runs the quickstart's tasks and settings (B=16
prompts x G=4, 64 new tokens, the unit tests plus the teacher as reward) twice:
with ``sample_ahead`` off and on. The step records say where the time went.

Without sampling ahead a step takes sample + max(score, reference) + train;
with it, max(score, reference + next sample) + train. The table compares the
measured step time with the sum (sample + score + train) and with the ideal
max(sample, score) + train.

Run by hand (about 1 minute per latency on a 2-core CPU):

    python benchmarks/bench_overlap.py --latency 0.5,2,4
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(HERE))

from llm_server import LLMServer  # noqa: E402
from sampling_models import resolve_model  # noqa: E402

MARKER = "<!-- Hand-written notes below this line are kept when the file is regenerated. -->"
PARTS = (
    "sample_seconds",
    "score_seconds",
    "reference_seconds",
    "sample_ahead_seconds",
    "train_seconds",
    "step_seconds",
)


def run_config(model: str, out: Path, server: LLMServer, *, ahead: bool, tests: bool, args: argparse.Namespace) -> Path:
    """The quickstart's reward and shapes, no warm-up, the judge at ``server``."""
    config = {
        "seed": 0,
        "backend": args.backend,
        "output_dir": str(out),
        "model": {"base_model": model, "use_lora": False},
        "data": {"train_file": str(_tasks(out.parent, with_tests=tests)), "use_chat_template": True},
        "training": {
            "max_steps": args.steps,
            "batch_size": args.prompts,
            "micro_batch_size": 2 * args.prompts,
            "learning_rate": 1e-4,
            "save_steps": 10_000,
            "save_total_limit": 1,
        },
        "rlaif": {
            "num_samples_per_prompt": args.group,
            "max_new_tokens": args.new_tokens,
            "baseline": "none",
            "scale_by_std": False,
            "kl_penalty": 0.02,
            "sample_ahead": ahead,
        },
        "rewards": {"weights": {"parses": 0.1, "tests": 0.6, "teacher": 0.3}, "test_timeout_s": 5, "max_workers": 2},
        "teacher": {
            "provider": "openai_compatible",
            "model": "judge",
            "base_url": server.openai_url,
            "max_concurrency": args.prompts * args.group,
            "gate": "always",
            "cache_path": None,
            "max_retries": 0,
        },
        "logging": {"dashboard": False},
    }
    path = out.parent / f"{out.name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _tasks(folder: Path, *, with_tests: bool) -> Path:
    """The quickstart's training tasks; without their tests, scoring is the teacher alone (no sandbox)."""
    from rlaif_mlx.data.tasks import load_tasks

    path = folder / ("tasks.jsonl" if with_tests else "tasks-without-tests.jsonl")
    tasks = load_tasks("builtin:quickstart_train.jsonl").tasks
    path.write_text(
        "".join(
            json.dumps(
                {
                    "id": t.id,
                    "prompt": t.prompt,
                    "entry_point": t.entry_point,
                    "reference": t.reference,
                    "difficulty": t.difficulty,
                    **({"tests": t.tests} if with_tests else {}),
                }
            )
            + "\n"
            for t in tasks
        )
    )
    return path


def measure(model: str, latency: float, ahead: bool, tests: bool, args: argparse.Namespace, work: Path) -> dict:
    out = work / f"latency{latency}-{'ahead' if ahead else 'plain'}-{'tests' if tests else 'teacher'}"
    with LLMServer() as server:
        server.latency_s = latency
        config = run_config(model, out, server, ahead=ahead, tests=tests, args=args)
        env = dict(os.environ, HF_HUB_OFFLINE="1")
        if args.backend == "mlx" and args.mlx_preload:
            env["LD_PRELOAD"] = args.mlx_preload
        code = "import sys; from rlaif_mlx.cli import main; sys.exit(main(sys.argv[1:]))"
        done = subprocess.run(
            [sys.executable, "-c", code, "train", "--config", str(config), "--no-dashboard"],
            env=env,
            capture_output=True,
            text=True,
        )
        if done.returncode:
            raise SystemExit(f"train failed ({done.returncode}):\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
        calls = server.count()
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steady = records[1:]  # the first step has no batch sampled ahead
    medians = {k: statistics.median(r.get(k, 0.0) for r in steady) for k in PARTS}
    return {
        "latency": latency,
        "ahead": ahead,
        "tests": tests,
        "steps": len(records),
        "teacher_calls": calls,
        "sampled_ahead": [r.get("sampled_ahead", 0) for r in records],
        **medians,
    }


def report(rows: list[dict], args: argparse.Namespace, started: str) -> list[str]:
    lines = [
        "# Overlap: step time with a slow teacher",
        "",
        f"Measured {started} by `{' '.join(['python', 'benchmarks/bench_overlap.py', *sys.argv[1:]])}` on "
        f"{platform.machine()} Linux, {os.cpu_count()} cores, backend {args.backend}, model `{args.model}`. "
        f"B={args.prompts} prompts x G={args.group}, {args.new_tokens} new tokens, {args.steps} steps; "
        "medians over steps 2 onwards (step 1 has nothing sampled ahead). Reward: the quickstart's unit "
        "tests (one sandboxed process per sample) plus a teacher, or the teacher alone (the tasks' tests "
        "dropped). The teacher is a local server that answers each judgement after the given latency "
        f"(max_concurrency {args.prompts * args.group}, so one batch of judgements takes about one latency).",
        "",
        "| reward | teacher latency | sample_ahead | sample | score | reference | next sample (beside scoring) | train "
        "| step | sample + score + train | max(sample, score) + train | step / sum |",
        "| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        total = r["sample_seconds"] + r["score_seconds"] + r["train_seconds"]
        ideal = max(r["sample_seconds"], r["score_seconds"]) + r["train_seconds"]
        lines.append(
            f"| {'tests + teacher' if r['tests'] else 'teacher'} | {r['latency']:.1f} s | "
            f"{'on' if r['ahead'] else 'off'} | {r['sample_seconds']:.2f} | "
            f"{r['score_seconds']:.2f} | {r['reference_seconds']:.2f} | {r['sample_ahead_seconds']:.2f} | "
            f"{r['train_seconds']:.2f} | **{r['step_seconds']:.2f}** | {total:.2f} | {ideal:.2f} | "
            f"{r['step_seconds'] / total:.2f} |"
        )
    lines += [
        "",
        "Seconds per step. 'sample' is the time sampling this step's batch took, wherever it ran: with "
        "sample_ahead on it ran during the previous step, beside scoring ('next sample').",
    ]
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--latency", default="0.5,2,4", help="teacher seconds per answer, comma-separated")
    p.add_argument("--model", default="tiny", help="tiny, 30m, or a local path / hub id (default: tiny)")
    p.add_argument("--backend", default="torch", choices=("torch", "mlx"))
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--prompts", type=int, default=16)
    p.add_argument("--group", type=int, default=4)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument(
        "--reward",
        default="tests+teacher,teacher",
        help="tests+teacher (the quickstart's tests in the sandbox, then the teacher) and/or teacher "
        "(the tests dropped: no sandboxed processes compete with sampling for the CPU)",
    )
    p.add_argument("--mlx-preload", default=os.environ.get("LD_PRELOAD", ""))
    p.add_argument("--out", default=str(HERE / "results" / "overlap.md"))
    args = p.parse_args(argv)
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    model = resolve_model(args.model)
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-overlap-") as work:
        variants = itertools.product(
            (r == "tests+teacher" for r in args.reward.split(",")),
            (float(x) for x in args.latency.split(",")),
            (False, True),
        )
        for tests, latency, ahead in variants:
            rows.append(measure(model, latency, ahead, tests, args, Path(work)))
            r = rows[-1]
            print(
                f"{'tests+teacher' if tests else 'teacher'}, latency {latency:.1f} s, sample_ahead "
                f"{'on ' if ahead else 'off'}: step {r['step_seconds']:.2f} s (sample {r['sample_seconds']:.2f}, "
                f"score {r['score_seconds']:.2f}, train {r['train_seconds']:.2f})",
                flush=True,
            )
    out = Path(args.out)
    notes = out.read_text().split(MARKER, 1)[1] if out.exists() and MARKER in out.read_text() else "\n"
    out.write_text("\n".join(report(rows, args, started)) + "\n\n" + MARKER + notes)
    out.with_suffix(".json").write_text(json.dumps({"settings": vars(args), "rows": rows}, indent=1) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
