"""What a teacher costs per 1,000 judged completions: pointwise vs group judging, with and without the prompt cache.

Offline (the default): the loopback server (``tests/llm_server.py``) speaks the
Anthropic and OpenAI wire formats to the real SDKs, counts tokens with a rough
word-piece rule and keeps prompt-cache prefixes as the APIs do
(``tests/llm_usage.py``). It answers every completion with the same four scores
and one-line reason in both modes, so the modes differ only in what is sent and
how the answer is wrapped. Each run judges a task set the way a trainer step
does: 4 prompts x G completions per ``Teacher.judge`` call, 8 calls at a time.
Completions are the task's reference solution, each made distinct by a short
comment (HumanEval: long prompts with docstrings; quickstart: one-line tasks).

    python benchmarks/bench_group_judging.py                # writes benchmarks/results/group_judging.{json,md}

With a real key it measures what the loopback cannot: whether a real model's
group judgements agree with its pointwise ones, and what both cost::

    ANTHROPIC_API_KEY=... python benchmarks/bench_group_judging.py --agreement \
        --provider anthropic --model claude-sonnet-4-5 --tasks 20 --group-size 8

(``--base-url`` points it elsewhere, e.g. at a local OpenAI-compatible judge.)
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))

from llm_server import LLMServer  # noqa: E402

from rlaif_mlx.config import TeacherConfig  # noqa: E402
from rlaif_mlx.data import load_task_set  # noqa: E402
from rlaif_mlx.teachers.base import JudgeRequest  # noqa: E402
from rlaif_mlx.teachers.judge import Teacher  # noqa: E402

TEACHERS = {"anthropic": "claude-sonnet-5-5", "openai": "gpt-5-mini"}
TASK_SETS = {"humaneval": "humaneval", "quickstart": "builtin:quickstart_train.jsonl"}
REASONS = (
    "Correct and idiomatic; handles the empty input.",
    "Solves the task but misses the negative-number case.",
    "Right idea, off by one at the upper bound.",
    "Correct, though it rebuilds the list on every step.",
)
BATCH_PROMPTS = 4  # prompts per Teacher.judge call, as training.batch_size
SOLUTION = re.compile(r"<solution_([A-Z])>\n(.*?)\n</solution_\1>", re.DOTALL)
STUDENT = re.compile(r"<student_solution>\n(.*?)\n</student_solution>", re.DOTALL)


def completions(task_set: str, group_size: int, tasks: int) -> list[list[JudgeRequest]]:
    """Per task, ``group_size`` distinct completions (the reference plus a comment)."""
    out = []
    for task in load_task_set(TASK_SETS[task_set]).tasks[:tasks]:
        ref = (task.reference or "pass").rstrip()
        out.append(
            [
                JudgeRequest(
                    uid=f"{task.id}#{k}",
                    prompt=task.prompt,
                    completion=f"```python\n{ref}\n# attempt {k}: checked by hand\n```",
                    language=task.language,
                    reference=task.reference,
                )
                for k in range(group_size)
            ]
        )
    return out


def verdict(code: str) -> dict:
    """The same answer for a completion in either mode: four scores and a one-line reason."""
    h = hashlib.sha256(code.strip().encode()).digest()
    scores = {name: 4 + h[i] % 7 for i, name in enumerate(("correctness", "quality", "efficiency", "readability"))}
    return scores | {"rationale": REASONS[h[4] % len(REASONS)]}


def answer(request: dict) -> dict:
    content = request["messages"][-1]["content"]
    text = content if isinstance(content, str) else "".join(block["text"] for block in content)
    labelled = SOLUTION.findall(text)
    if labelled:
        return {"scores": [{"label": label, **verdict(code)} for label, code in labelled]}
    return verdict(STUDENT.search(text).group(1))


def measure(server: LLMServer, provider: str, task_set: str, mode: str, group_size: int, cache: bool, args) -> dict:
    os.environ.setdefault("ANTHROPIC_API_KEY", "offline")
    os.environ.setdefault("OPENAI_API_KEY", "offline")
    server.prompt_cache.clear()
    server.prompt_cache.enabled = cache
    config = TeacherConfig(
        provider=provider,
        model=TEACHERS[provider],
        base_url=server.url if provider == "anthropic" else server.openai_url,
        cache_path=None,
        mode=mode,
        max_group=args.max_group or group_size,
        prompt_cache=cache,
        max_retries=0,
    )
    teacher = Teacher(config)
    groups = completions(task_set, group_size, args.tasks)
    scores, started = {}, time.perf_counter()
    for start in range(0, len(groups), BATCH_PROMPTS):
        batch = [r for g in groups[start : start + BATCH_PROMPTS] for r in g]
        got = teacher.judge(batch)
        if any(j.score is None for j in got.values()):
            raise RuntimeError(f"unscored: {next(j.error for j in got.values() if j.score is None)}")
        scores.update({uid: j.score for uid, j in got.items()})
    ledger, n = teacher.ledger, len(scores)
    teacher.close()
    per_k = 1000 / n
    return {
        "provider": provider,
        "model": TEACHERS[provider],
        "task_set": task_set,
        "mode": mode,
        "G": group_size,
        "max_group": config.max_group if mode == "group" else None,
        "prompt_cache": cache,
        "completions": n,
        "calls_per_1k": round(ledger.calls * per_k, 1),
        "input_tokens_per_1k": round(ledger.input_tokens * per_k),
        "cache_read_per_1k": round(ledger.cache_read_tokens * per_k),
        "cache_write_per_1k": round(ledger.cache_write_tokens * per_k),
        "output_tokens_per_1k": round(ledger.output_tokens * per_k),
        "usd_per_1k": round(ledger.spent_usd * per_k, 4),
        "seconds": round(time.perf_counter() - started, 2),
        "scores": scores,
    }


def offline(args) -> None:
    rows = []
    with LLMServer() as server:
        server.usage_mode, server.answer = "counted", answer
        server.prompt_cache.anthropic_minimum = args.anthropic_minimum
        for task_set in args.task_sets:
            for provider in args.providers:
                for g in args.group_sizes:
                    for cache in (False, True):
                        for mode in ("pointwise", "group"):
                            row = measure(server, provider, task_set, mode, g, cache, args)
                            rows.append(row)
                            print(json.dumps({k: v for k, v in row.items() if k != "scores"}), flush=True)
    for row in rows:  # the same answer per completion in both modes
        twin, base = _pointwise(rows, row, cache=row["prompt_cache"]), _pointwise(rows, row, cache=False)
        if row["scores"] != twin["scores"]:
            raise RuntimeError(f"group and pointwise scores differ: {row['provider']} {row['task_set']} G={row['G']}")
        row["vs_pointwise_same_cache"] = round(row["usd_per_1k"] / twin["usd_per_1k"], 3)
        row["vs_pointwise_no_cache"] = round(row["usd_per_1k"] / base["usd_per_1k"], 3)
    for row in rows:
        del row["scores"]
    out = Path(args.out)
    out.with_suffix(".json").write_text(json.dumps({"argv": sys.argv[1:], "rows": rows}, indent=1) + "\n")
    out.with_suffix(".md").write_text("\n".join(report(rows, args)) + "\n")
    print(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.md')}")


def _pointwise(rows: list[dict], row: dict, *, cache: bool) -> dict:
    """The pointwise run of the same teacher, task set and G."""
    same = ("provider", "task_set", "G")
    return next(
        r for r in rows if all(r[k] == row[k] for k in same) and r["mode"] == "pointwise" and r["prompt_cache"] == cache
    )


def report(rows: list[dict], args) -> list[str]:
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    lines = [
        "# Teacher cost: pointwise vs group judging, with and without the prompt cache",
        "",
        f"Measured {when} by `python benchmarks/bench_group_judging.py {' '.join(sys.argv[1:])}` on "
        f"{platform.machine()} Linux against the loopback server (tokens counted by its rough rule; Anthropic "
        f"caches prefixes from {args.anthropic_minimum} tokens, OpenAI from 1,024 in 128-token steps). "
        f"{args.tasks} tasks at most per set, {BATCH_PROMPTS} prompts x G completions per judge call, the same "
        "four scores and one-line reason per completion in both modes. Prices: claude-sonnet-5-5 $2 in / $10 out, "
        "cache read $0.10, write $2.50; gpt-5-mini $0.25 / $2.00, cached $0.025 (per million tokens).",
        "",
        "| task set | teacher | G | prompt cache | mode | calls | input tokens | of which cache read / write "
        "| output tokens | USD | vs pointwise, same cache | vs pointwise, no cache |",
        "| --- | --- | ---: | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        mode = r["mode"] if r["mode"] == "pointwise" else f"group (max_group {r['max_group']})"
        lines.append(
            f"| {r['task_set']} | {r['model']} | {r['G']} | {'on' if r['prompt_cache'] else 'off'} | {mode} "
            f"| {r['calls_per_1k']:,.0f} | {r['input_tokens_per_1k']:,} | {r['cache_read_per_1k']:,} / "
            f"{r['cache_write_per_1k']:,} | {r['output_tokens_per_1k']:,} | {r['usd_per_1k']:.3f} "
            f"| {r['vs_pointwise_same_cache']:.2f} | {r['vs_pointwise_no_cache']:.2f} |"
        )
    lines += [
        "",
        "Per 1,000 judged completions. 'vs pointwise' is the USD ratio to pointwise judging of the same "
        "completions (1.00 on the pointwise rows with the same cache setting).",
    ]
    return lines


def agreement(args) -> None:
    """Judges the same completions pointwise and in groups with a real (or any) teacher; compares the scores."""
    base = args.base_url
    with tempfile.TemporaryDirectory() as tmp:
        results = {}
        for mode in ("pointwise", "group"):
            config = TeacherConfig(
                provider=args.provider,
                model=args.model,
                base_url=base,
                cache_path=str(Path(tmp) / f"{mode}.sqlite"),
                mode=mode,
                max_group=args.group_size,
            )
            teacher = Teacher(config)
            groups = completions(args.task_sets[0], args.group_size, args.tasks)
            got = {}
            for start in range(0, len(groups), BATCH_PROMPTS):
                got.update(teacher.judge([r for g in groups[start : start + BATCH_PROMPTS] for r in g]))
            results[mode] = (got, teacher.ledger.spent_usd, len(got), teacher.ledger.input_tokens)
            teacher.close()
    point, group = results["pointwise"][0], results["group"][0]
    both = [u for u in point if point[u].score is not None and group[u].score is not None]
    xs, ys = [point[u].score for u in both], [group[u].score for u in both]
    pairs = agree = 0
    for i, u in enumerate(both):  # two completions of one task that pointwise tells apart: same order in group?
        for j in range(i + 1, len(both)):
            if u.split("#")[0] == both[j].split("#")[0] and xs[i] != xs[j]:
                pairs += 1
                agree += (xs[i] - xs[j]) * (ys[i] - ys[j]) > 0
    summary = {
        "teacher": f"{args.provider}/{args.model}",
        "completions": len(point),
        "scored_in_both": len(both),
        "pearson": round(statistics.correlation(xs, ys), 3) if len(both) > 2 else None,
        "mean_abs_difference": round(statistics.fmean(abs(x - y) for x, y in zip(xs, ys, strict=True)), 3)
        if both
        else None,
        "pairwise_order_agreement": round(agree / pairs, 3) if pairs else None,
        "usd_per_1k_pointwise": round(1000 * results["pointwise"][1] / max(1, results["pointwise"][2]), 4),
        "usd_per_1k_group": round(1000 * results["group"][1] / max(1, results["group"][2]), 4),
    }
    print(json.dumps(summary, indent=1))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--task-sets", nargs="+", default=list(TASK_SETS), choices=list(TASK_SETS))
    p.add_argument("--providers", nargs="+", default=list(TEACHERS), choices=list(TEACHERS))
    p.add_argument("--group-sizes", nargs="+", type=int, default=[4, 8, 16])
    p.add_argument("--tasks", type=int, default=64, help="tasks per set (at most)")
    p.add_argument("--max-group", type=int, default=None, help="teacher.max_group (default: G, one call per prompt)")
    p.add_argument("--anthropic-minimum", type=int, default=1024, help="the loopback's smallest cached prefix")
    p.add_argument("--out", default=str(HERE / "results" / "group_judging"))
    p.add_argument("--agreement", action="store_true", help="compare group with pointwise on a real teacher")
    p.add_argument("--provider", default="anthropic", choices=["anthropic", "openai", "openai_compatible"])
    p.add_argument("--model", default="claude-sonnet-4-5")
    p.add_argument("--base-url", default=None)
    p.add_argument("--group-size", type=int, default=8)
    args = p.parse_args(argv)
    agreement(args) if args.agreement else offline(args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
