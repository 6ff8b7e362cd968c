"""Sampling throughput and peak memory: our backends vs the peer libraries' batched generation.

For each model, backend (torch, mlx) and G (samples per prompt), two cases run
side by side with the identical model, prompts, sampling settings and token
counts:
- ours: `Backend.sample(prompts, n=G)`; each prompt is prefilled once and its
  KV cache repeated for its G samples;
- peer: transformers `generate(num_return_sequences=G)` for PyTorch, mlx-lm
  `batch_generate` with each prompt listed G times for MLX.

Each case runs in its own child process (this script re-invoked with `--case`)
so that peak memory belongs to that case alone. Results go to a Markdown file;
text below its "hand-written" marker line survives a rerun.

Run by hand, never by the test suite:

    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0 \\
        python benchmarks/bench_sampling.py --model tiny,30m --group 1,4,8 --profile
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # sibling modules, also when imported from elsewhere

import sampling_case  # noqa: E402
import sampling_models  # noqa: E402
import sampling_report  # noqa: E402

IMPLS = ("ours", "peer")
PEER = {"torch": "transformers generate", "mlx": "mlx-lm batch_generate"}


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.case:
        return _child(args.case, args.case_out)
    backends = _csv(args.backends)
    unknown = set(backends) - set(PEER)
    if unknown:
        raise SystemExit(f"--backends: unknown {sorted(unknown)}; choose from torch, mlx")
    groups = [int(g) for g in _csv(args.group)]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    raw = out.with_suffix(".json")
    earlier = _undisturbed(raw, args.quiet_below) if args.resume else {}
    started = datetime.datetime.now().astimezone()
    settings = vars(args) | {"command": _command(argv), "started": started.isoformat(timespec="seconds")}
    runs = []
    for spec in _csv(args.model):
        print(f"== model {spec}", flush=True)
        model = sampling_models.resolve_model(spec)
        prompts = sampling_models.make_prompts(model, count=args.prompts, length=args.prompt_tokens)
        run = {"spec": spec, "model": sampling_models.describe(model), "results": [], "profiles": []}
        runs.append(run)
        common = {"model": model, "prompts": prompts, "new_tokens": args.new_tokens, "seed": args.seed}
        for backend in backends:
            for group in groups:
                for round_ in range(args.rounds):
                    # Alternate the order each round, so slow drift of the machine hits both sides alike.
                    for impl in IMPLS if round_ % 2 == 0 else IMPLS[::-1]:
                        case = common | {
                            "backend": backend,
                            "impl": impl,
                            "group": group,
                            "repeats": args.repeats,
                            "round": round_,
                        }
                        run["results"].append(_reuse_or_measure(case, earlier, args))
                        _print_result(run["results"][-1])
                        _save(raw, settings, runs)  # progress survives an interrupted run (see --resume)
        for backend in backends if args.profile else ():
            case = common | {"profile": True, "backend": backend, "group": max(groups)}
            print(f"-- profiling ours on {backend}, G={case['group']}", flush=True)
            key = _key(case, args)
            if key not in earlier:
                _wait_for_quiet(args.quiet_below, args.max_wait)
                earlier[key] = _spawn(case, args) | {"key": key}
            run["profiles"].append(earlier[key])
            _save(raw, settings, runs)
    out.write_text(sampling_report.markdown(settings, runs, keep=out.read_text() if out.exists() else ""))
    print(f"wrote {out} and {raw}")
    return 0


def _reuse_or_measure(case: dict, earlier: dict, args: argparse.Namespace) -> dict:
    key = _key(case, args)
    if key in earlier:
        print(f"   (reusing the undisturbed result measured at {earlier[key]['measured_at']})", flush=True)
        return earlier[key]
    return _measure(case, args) | {"key": key}


def _key(case: dict, args: argparse.Namespace) -> str:
    """What makes two cases the same measurement: the case itself, and the MLX preload."""
    preload = args.mlx_preload if case["backend"] == "mlx" else ""
    return hashlib.sha256(json.dumps([case, preload], sort_keys=True).encode()).hexdigest()[:16]


def _undisturbed(raw: Path, threshold: float) -> dict:
    """Results and profiles of an earlier (possibly interrupted) run whose timing nothing disturbed, by key."""
    if not raw.exists():
        return {}
    found = {}
    for run in json.loads(raw.read_text())["runs"]:
        for r in run["results"]:
            if "key" in r and r["other_cores"] is not None and r["other_cores"] < threshold:
                found[r["key"]] = r
        found.update({p["key"]: p for p in run["profiles"] if "key" in p})
    return found


def _save(raw: Path, settings: dict, runs: list[dict]) -> None:
    tmp = raw.with_suffix(".json.tmp")
    tmp.write_text(json.dumps({"settings": settings, "runs": runs}, indent=1) + "\n")
    os.replace(tmp, raw)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Sampling throughput (generated tokens/s) and peak memory of rlaif-mlx's backends "
        "vs transformers generate (PyTorch) and mlx-lm batch_generate (MLX), same model, "
        "prompts and token counts. Each case runs in its own process."
    )
    p.add_argument(
        "--model",
        default="tiny,30m",
        help="comma list: 'tiny' and '30m' are random Qwen2 models built under benchmarks/.models/; "
        "anything else is a local model folder or a Hugging Face hub id (default: tiny,30m)",
    )
    p.add_argument("--backends", default="torch,mlx", help="comma list of torch, mlx (default: torch,mlx)")
    p.add_argument("--prompts", type=int, default=8, help="distinct prompts (default: 8)")
    p.add_argument("--group", default="1,4,8", help="comma list of G, samples per prompt (default: 1,4,8)")
    p.add_argument("--prompt-tokens", type=int, default=128, help="tokens in every prompt, exactly (default: 128)")
    p.add_argument("--new-tokens", type=int, default=64, help="tokens generated per sample, exactly (default: 64)")
    p.add_argument("--repeats", type=int, default=3, help="timed calls per case after one warm-up (default: 3)")
    p.add_argument(
        "--rounds",
        type=int,
        default=2,
        help="fresh-process runs of each case, ours and the peer alternating; the timed calls of all "
        "rounds are pooled (default: 2)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--mlx-preload",
        default=os.environ.get("LD_PRELOAD", ""),
        help="LD_PRELOAD for the MLX cases, e.g. OpenBLAS on Linux (default: this shell's "
        "LD_PRELOAD). PyTorch cases always run without LD_PRELOAD.",
    )
    p.add_argument(
        "--quiet-below",
        type=float,
        default=0.3,
        help="before each case, wait until other processes use fewer CPU cores than this; a case "
        "whose timing saw more is run again (default: 0.3)",
    )
    p.add_argument(
        "--max-wait",
        type=float,
        default=300.0,
        help="seconds to wait for a quiet machine before running anyway (default: 300)",
    )
    p.add_argument(
        "--attempts",
        type=int,
        default=3,
        help="runs of a case disturbed by other processes before keeping the least disturbed (default: 3)",
    )
    p.add_argument(
        "--resume",
        action="store_true",
        help="reuse the undisturbed cases of an earlier run with the same settings from the .json "
        "next to --out (written after every case), and measure only the rest",
    )
    p.add_argument(
        "--profile",
        action="store_true",
        help="also profile our sampling per phase (prefill, decode, sampling, bookkeeping) "
        "at the largest G, and a cProfile of one call",
    )
    p.add_argument(
        "--out",
        default=str(HERE / "results" / "sampling.md"),
        help="Markdown report; the raw numbers go next to it as .json (default: %(default)s)",
    )
    p.add_argument("--case", help=argparse.SUPPRESS)  # internal: run one case (JSON) in this process
    p.add_argument("--case-out", help=argparse.SUPPRESS)
    return p


def _child(case_json: str, out: str) -> int:
    case = json.loads(Path(case_json).read_text())
    if case.get("profile"):
        import profile_sampling

        result = profile_sampling.profile_case(case)
    else:
        result = sampling_case.run_case(case)
    Path(out).write_text(json.dumps(result))
    return 0


def _measure(case: dict, args: argparse.Namespace) -> dict:
    """Runs a case on a quiet machine; reruns it when other processes disturbed its timing."""
    best = None
    for attempt in range(1, args.attempts + 1):
        _wait_for_quiet(args.quiet_below, args.max_wait)
        result = _spawn(case, args) | {"attempt": attempt}
        if best is None or result["other_cores"] < best["other_cores"]:
            best = result
        if result["other_cores"] < args.quiet_below:
            break
        print(
            f"   (other processes kept {result['other_cores']:.2f} cores busy during the timing; "
            f"{'running it again' if attempt < args.attempts else 'keeping the least disturbed run'})",
            flush=True,
        )
    return best


def _wait_for_quiet(threshold: float, max_wait: float) -> None:
    start, last_note = time.monotonic(), None
    while (busy := sampling_case.machine_busy_cores(2.0)) >= threshold:
        now = time.monotonic()
        if now - start > max_wait:
            print(f"   (machine still busy, {busy:.2f} cores, after {max_wait:.0f} s; running anyway)", flush=True)
            return
        if last_note is None or now - last_note >= 60:
            print(f"   (waiting for a quiet machine: other processes use {busy:.2f} cores)", flush=True)
            last_note = now
        time.sleep(3.0)


def _spawn(case: dict, args: argparse.Namespace) -> dict:
    """Runs one case in a fresh interpreter; LD_PRELOAD only for MLX (OpenBLAS must not shadow torch's BLAS)."""
    env = dict(os.environ)
    env.pop("LD_PRELOAD", None)
    if case["backend"] == "mlx" and args.mlx_preload:
        env["LD_PRELOAD"] = args.mlx_preload
    with tempfile.TemporaryDirectory() as tmp:
        case_file, out_file = Path(tmp) / "case.json", Path(tmp) / "result.json"
        case_file.write_text(json.dumps(case))
        done = subprocess.run(
            [sys.executable, __file__, "--case", str(case_file), "--case-out", str(out_file)], env=env
        )
        if done.returncode != 0:
            raise SystemExit(
                f"case {case.get('backend')}/{case.get('impl', 'profile')}/G={case['group']} "
                f"failed (exit {done.returncode}); its error is printed above"
            )
        now = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
        return json.loads(out_file.read_text()) | {"measured_at": now}


def _print_result(r: dict) -> None:
    tps = r["tokens_per_call"] / statistics.median(r["seconds"])
    print(
        f"   {r['backend']:5} {r['impl']:4} G={r['group']:<2} round {r.get('round', 0)} {tps:9.1f} tok/s  "
        f"peak RSS {r['rss_peak'] / 2**20:7.1f} MiB  (calls: {', '.join(f'{s:.2f}s' for s in r['seconds'])})",
        flush=True,
    )


def _csv(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def _command(argv: list[str] | None) -> str:
    words = sys.argv[1:] if argv is None else argv
    preload = os.environ.get("LD_PRELOAD")
    prefix = f"LD_PRELOAD={preload} " if preload else ""
    return prefix + "python benchmarks/bench_sampling.py " + " ".join(shlex.quote(w) for w in words)


if __name__ == "__main__":
    sys.exit(main())
