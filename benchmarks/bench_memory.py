"""The memory plan against measured peaks: one RL step's three phases, each backend, a fresh process per case.

    python benchmarks/bench_memory.py --model tiny 30m --backend mlx torch [--json out.json]

Each case loads the model, runs one whole step (sample, reference log-probs,
update: the optimizer's state then exists, as in every later step) and measures
the second step phase by phase: MLX's ``mx.get_peak_memory`` (every array the
allocator holds), and for PyTorch the profiler's allocation events (every CPU or
CUDA tensor allocation; the peak over a phase plus what lived at its start:
weights, reference, AdamW state). Completions run to ``new_tokens`` (EOS is
ignored), so the shapes are the plan's. The plan
(``rlaif_mlx/training/memory_plan.py``) is computed for the same shapes; both
count tensor memory, not the interpreter or the frameworks' code.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

PHASES = ("sampling", "reference", "update")


def case_settings(model: str, backend: str, *, lora: bool, **overrides) -> dict:
    """One measured case: 4 prompts x 4 samples, 48-token prompts, 48 new tokens, micro-batches of 8 rows."""
    settings = {
        "model": model,
        "backend": backend,
        "lora": lora,
        "dtype": "float32",
        "prompts": 4,
        "group": 4,
        "prompt_tokens": 48,
        "new_tokens": 48,
        "micro_batch": 8,
        "lora_r": 8,
    }
    return settings | overrides


def measure(settings: dict, model_path: str) -> dict[str, int]:
    """Peak bytes per phase of one case, measured in this process (a fresh one, or one whose earlier cases
    left no arrays behind: MLX's peak counts every live array)."""
    import numpy as np
    from sampling_models import make_prompts

    from rlaif_mlx.backends.base import LossSettings, SamplingParams, SequenceBatch, TrainBatch
    from rlaif_mlx.config import ModelConfig, TrainingConfig
    from rlaif_mlx.rl.objective import aggregation_weights

    model = ModelConfig(
        base_model=model_path,
        dtype=settings["dtype"],
        use_lora=settings["lora"],
        lora_r=settings["lora_r"],
        torch={"device": "cpu"} if settings["backend"] == "torch" else {},
    )
    training = TrainingConfig(micro_batch_size=settings["micro_batch"], learning_rate=1e-4)
    prompts = make_prompts(model_path, count=settings["prompts"], length=settings["prompt_tokens"])
    probe = _TorchProbe() if settings["backend"] == "torch" else _MlxProbe()
    with probe.running():
        if settings["backend"] == "torch":
            from rlaif_mlx.backends.torch import create
        else:
            from rlaif_mlx.backends.mlx import create
        backend = create(model, training, seed=0, total_steps=4)
        backend.eos_ids = ()  # every completion runs to new_tokens: the plan's shapes
        rng = np.random.default_rng(0)
        peaks = {}
        for step in range(2):
            with probe.phase("sampling", backend, record=step == 1):
                params = SamplingParams(max_new_tokens=settings["new_tokens"], temperature=1.0, seed=step)
                completions = backend.sample(prompts, n=settings["group"], params=params)
            sequences = SequenceBatch.from_completions(completions, pad_id=backend.pad_id)
            with probe.phase("reference", backend, record=step == 1):
                ref = backend.logprobs(sequences, reference=True, prompt_targets=False)  # as the trainer scores
            weights = aggregation_weights(sequences.loss_mask, aggregation="token_mean").astype(np.float32)
            advantages = rng.standard_normal(len(completions)).astype(np.float32)
            batch = TrainBatch(sequences, advantages, weights, ref_logp=ref)
            with probe.phase("update", backend, record=step == 1):
                backend.train_step(batch, loss=LossSettings(kl_coef=0.05))
    peaks.update(probe.peaks())
    del backend, completions, sequences, batch, ref
    import gc

    gc.collect()
    return peaks


class _MlxProbe:
    def __init__(self) -> None:
        import mlx.core as mx

        self.mx, self.found = mx, {}

    def running(self):
        import contextlib

        return contextlib.nullcontext()

    def phase(self, name, backend, *, record):
        import contextlib

        @contextlib.contextmanager
        def measured():
            self.mx.synchronize()
            self.mx.reset_peak_memory()
            yield
            self.mx.synchronize()
            if record:
                self.found[name] = int(self.mx.get_peak_memory())

        return measured()

    def peaks(self):
        return self.found


class _TorchProbe:
    """Tensor bytes alive at a phase's start (weights, reference, optimizer state) plus the most allocated
    during it, from the allocation events of a profiler around the phase."""

    def __init__(self) -> None:
        self.found = {}

    def running(self):
        import contextlib

        return contextlib.nullcontext()

    def phase(self, name, backend, *, record):
        import contextlib

        import torch
        from torch.profiler import ProfilerActivity, profile

        if not record:
            return contextlib.nullcontext()

        @contextlib.contextmanager
        def measured():
            at_start = _live_tensor_bytes(backend)
            activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
            with profile(activities=activities, profile_memory=True) as profiler:
                yield
            self.found[name] = at_start + _peak_allocated(profiler)

        return measured()

    def peaks(self):
        return self.found


def _peak_allocated(profiler) -> int:
    """The most bytes allocated at once during a profile, over its allocation and free events."""
    from torch._C._profiler import _EventType

    events = []

    def walk(nodes):
        for node in nodes:
            if node.tag == _EventType.Allocation:
                events.append((node.start_time_ns, node.extra_fields.alloc_size))
            walk(node.children)

    walk(profiler.profiler.kineto_results.experimental_event_tree())
    total = peak = 0
    for _, size in sorted(events):
        total += size
        peak = max(peak, total)
    return peak


def _live_tensor_bytes(backend) -> int:
    """Bytes of the weights, the reference copy and the optimizer state (distinct storages)."""
    import torch

    seen, total = set(), 0
    tensors = list(backend._model.parameters()) + list(backend._model.buffers())
    if backend._reference is not None:
        tensors += list(backend._reference.parameters()) + list(backend._reference.buffers())
    for state in backend._optimizer.state.values():
        tensors += [v for v in state.values() if isinstance(v, torch.Tensor)]
    for t in tensors:
        key = t.untyped_storage().data_ptr()
        if key not in seen:
            seen.add(key)
            total += t.untyped_storage().nbytes()
    return total


def planned(settings: dict, model_path: str) -> dict[str, int]:
    """The plan's peak per phase for the same shapes."""
    from rlaif_mlx.training.memory_plan import ModelShape, Workload, plan

    shape = ModelShape.from_config(json.loads((Path(model_path) / "config.json").read_text()))
    workload = Workload(
        backend=settings["backend"],
        dtype=settings["dtype"],
        use_lora=settings["lora"],
        lora_r=settings["lora_r"],
        lora_targets=("q_proj", "k_proj", "v_proj", "o_proj"),
        prompts=settings["prompts"],
        samples_per_prompt=settings["group"],
        prompt_tokens=settings["prompt_tokens"],
        new_tokens=settings["new_tokens"],
        micro_batch_size=settings["micro_batch"],
    )
    return {p.name: p.total for p in plan(shape, workload).phases}


def run_cases(cases: list[dict]) -> list[dict]:
    """Measures ``cases`` (``case_settings`` plus ``model_path``) in fresh processes, one per backend, and
    returns each case's phases with the measured and planned peak bytes."""
    rows = []
    for backend in dict.fromkeys(c["backend"] for c in cases):
        mine = [c for c in cases if c["backend"] == backend]
        child = [sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(mine)]
        done = subprocess.run(child, capture_output=True, text=True)
        if done.returncode:
            raise RuntimeError(done.stderr[-3000:])
        for case, measured in zip(mine, json.loads(done.stdout.strip().splitlines()[-1]), strict=True):
            estimate = planned(case, case["model_path"])
            rows += [{**case, "phase": p, "measured": measured[p], "planned": estimate[p]} for p in PHASES]
    return rows


def markdown(rows: list[dict]) -> str:
    """The rows as a table: one line per model, backend, kind and workload, the three phases side by side."""
    lines = [
        "| model | backend | training | step | sampling (planned / measured) | reference | update |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    cases: dict[tuple, dict[str, dict]] = {}
    for r in rows:
        tokens = f"{r['prompt_tokens']}+{r['new_tokens']} tokens"
        step = f"{r['prompts']}x{r['group']}, {tokens}, micro-batch {r['micro_batch']}"
        key = (r["model"], r["backend"], "LoRA" if r["lora"] else "full", step)
        cases.setdefault(key, {})[r["phase"]] = r
    for key, phases in cases.items():
        cells = [
            f"{phases[p]['planned'] / 2**20:.1f} / {phases[p]['measured'] / 2**20:.1f} MiB "
            f"({phases[p]['planned'] / phases[p]['measured'] - 1:+.0%})"
            for p in PHASES
        ]
        lines.append("| " + " | ".join([*key, *cells]) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", nargs="+", default=["tiny"], help="tiny, 30m or a model folder")
    parser.add_argument("--backend", nargs="+", default=["mlx", "torch"])
    parser.add_argument("--kind", nargs="+", default=["lora", "full"])
    parser.add_argument("--set", default="{}", help="JSON overrides of case_settings, e.g. '{\"micro_batch\": 4}'")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--markdown", type=Path, help="print the table of an earlier --json file and exit")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.markdown:
        print(markdown(json.loads(args.markdown.read_text())))
        return
    if args.child:
        print(json.dumps([measure(case, case["model_path"]) for case in json.loads(args.child)]))
        return
    from sampling_models import resolve_model

    cases = [
        case_settings(model, backend, lora=kind == "lora", **json.loads(args.set))
        | {"model_path": resolve_model(model)}
        for model in args.model
        for backend in args.backend
        for kind in args.kind
    ]
    rows = run_cases(cases)
    for r in rows:
        kind = "lora" if r["lora"] else "full"
        print(
            f"{r['model']:>5} {r['backend']:>5} {kind:>4} {r['phase']:>9}: measured {r['measured'] / 2**20:8.2f} MiB"
            f"  planned {r['planned'] / 2**20:8.2f} MiB  ({r['planned'] / r['measured'] - 1:+.0%})"
        )
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
