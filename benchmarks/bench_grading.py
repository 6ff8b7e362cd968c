"""Unit-test grading throughput: completions graded per second, through the reward pipeline.

Two sets, each graded as a trainer step grades them (``RewardPipeline.score`` on a
whole batch, ``rewards.max_workers`` sandboxes at a time):

- quickstart: the 56 bundled training tasks, 4 completions each (the reference, the
  reference with its last line dropped, a wrong constant, and text without code) = 224.
- quickstart-no-loop: the same without ``qs-050#wrong``, whose wrong constant loops until the
  time limit (its 5 s are a floor for the whole set, whatever the grader).
- humaneval: the 164 canonical solutions (prompt + canonical_solution).

Wall clock per completion (best and median of the rounds) and CPU seconds per completion of this
process and all its children (the sandboxes, the driver, the solutions), which the other jobs on a
shared machine disturb far less than the wall clock.

``--batch 64`` grades each set 64 completions at a time, as the quickstart's steps do (16 prompts x 4).

Run by hand; it prints a JSON line per set and, with ``--out``, writes them to a file:

    python benchmarks/bench_grading.py --rounds 3 --out benchmarks/results/grading_after.json

Run it against another checkout (``PYTHONPATH=/path/to/checkout``) for a before/after pair.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time


def quickstart_items():
    from rlaif_mlx.data import load_task_set

    items = []
    for task in load_task_set("builtin:quickstart_train.jsonl").tasks:
        ref = task.reference
        lines = ref.rstrip().splitlines()
        variants = {
            "ref": f"```python\n{ref}```",
            "cut": "```python\n" + "\n".join(lines[:-1] + ["    pass"]) + "\n```",
            "wrong": f"```python\n{ref.replace('1', '2').replace('0', '3')}```",
            "prose": "I am not sure how to write this function.",
        }
        items += [(f"{task.id}#{name}", task, text) for name, text in variants.items()]
    return items


def quickstart_no_loop_items():
    """The quickstart set without the one completion that loops until its time limit (5 s of wall clock
    whatever the grader): what grading costs where no completion hits the limit."""
    return [item for item in quickstart_items() if item[0] != "qs-050#wrong"]


def humaneval_items():
    from rlaif_mlx.data import load_task_set

    return [(task.id, task, f"```python\n{task.reference}\n```") for task in load_task_set("humaneval").tasks]


def measure(name: str, items, *, rounds: int, workers: int, timeout: float, batch: int = 0) -> dict:
    from rlaif_mlx.config import RewardConfig
    from rlaif_mlx.rewards.pipeline import RewardPipeline

    pipeline = RewardPipeline(RewardConfig(max_workers=workers, test_timeout_s=timeout))
    pipeline.score(items[:4])  # the sandbox's one-time probe (and, where there is one, the warm pool's start)
    times, rewards = [], None
    cpu_start = os.times()
    for _ in range(rounds):
        start = time.perf_counter()
        results = {}
        for i in range(0, len(items), batch or len(items)):  # batch by batch, as training steps grade them
            results.update(pipeline.score(items[i : i + (batch or len(items))]))
        times.append(time.perf_counter() - start)
        rewards = results
    try:  # warm sessions are this process's children: their CPU time is counted once they are reaped
        from rlaif_mlx.rewards.grader_pool import close_pools

        close_pools()
    except ImportError:  # a checkout from before the pool
        pass
    cpu = sum(os.times()[:4]) - sum(cpu_start[:4])
    best = min(times)
    scored = [r.reward for r in rewards.values() if r.reward is not None]
    return {
        "set": name,
        "completions": len(items),
        "workers": workers,
        "batch": batch or len(items),
        "seconds_per_round": [round(t, 3) for t in times],
        "completions_per_second": round(len(items) / best, 1),
        "ms_per_completion": round(1000 * best / len(items), 2),
        "ms_per_completion_median": round(1000 * sorted(times)[len(times) // 2] / len(items), 2),
        "cpu_ms_per_completion": round(1000 * cpu / (rounds * len(items)), 2),
        "unscored": len(items) - len(scored),
        "reward_mean": round(sum(scored) / len(scored), 4) if scored else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=5.0)
    parser.add_argument("--sets", default="quickstart,quickstart-no-loop,humaneval")
    parser.add_argument("--batch", type=int, default=0, help="grade in batches of this many (a step's), 0: all at once")
    parser.add_argument("--out")
    args = parser.parse_args()
    import rlaif_mlx

    commit = subprocess.run(
        ["git", "-C", os.path.dirname(os.path.dirname(rlaif_mlx.__file__)), "rev-parse", "--short", "HEAD"],
        capture_output=True,
        text=True,
    ).stdout.strip()
    sets = {
        "quickstart": quickstart_items,
        "quickstart-no-loop": quickstart_no_loop_items,
        "humaneval": humaneval_items,
    }
    rows = []
    for name in args.sets.split(","):
        items = sets[name]()
        row = measure(name, items, rounds=args.rounds, workers=args.workers, timeout=args.timeout, batch=args.batch)
        row.update(
            code=os.path.dirname(rlaif_mlx.__file__),
            commit=commit,
            cpus=os.cpu_count(),
            python=platform.python_version(),
        )
        rows.append(row)
        print(json.dumps(row), flush=True)
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            json.dump(rows, f, indent=2)
            f.write("\n")


if __name__ == "__main__":
    sys.exit(main())
