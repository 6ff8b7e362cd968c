"""Shared pieces of the RL-step benchmark (``bench_step.py``): the settings both
trainers run with, the prompts, the reward, the models and the measurements.

Both sides (``step_ours.py``, ``step_trl.py``) import this file, so the work
they are asked to do is written down once: the same prompts, the same reward
function over the completion text, the same group size, completion length,
temperature, LoRA shape, KL coefficient and learning rate.

Framework imports stay inside the functions that need them: the orchestrator
imports this module without loading torch.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

# ``--model 30m``: about 30M parameters with the tiny model's tokenizer (3,719 tokens).
MODEL_PRESETS: dict[str, dict[str, int]] = {
    "tiny": {},  # build_tiny_model's defaults: the quickstart model (0.43M parameters)
    "30m": {
        "hidden_size": 512,
        "num_layers": 8,
        "num_heads": 8,
        "num_kv_heads": 4,
        "intermediate_size": 1792,
        "vocab_size": 8192,
    },
}
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
TEMPERATURE = 1.0
SEED = 0


@dataclass
class StepSettings:
    """Everything one side needs to run the benchmark; serialised to JSON for the worker.

    Attributes:
        model_path: the local Hugging Face model folder.
        lora: True = LoRA adapters, False = all weights.
        steps: timed optimizer steps (after one untimed warm-up step).
        prompts: B, prompts per step.
        group: G, completions per prompt.
        new_tokens: T, the longest completion.
        lora_rank / lora_alpha: the adapters' shape (alpha = 2 * rank by default).
        kl: beta, the KL coefficient in the loss (k3 estimator).
        learning_rate: constant, no warm-up.
        profile: run the timed steps under cProfile (ours only) and report the top entries.
        device: ``cpu`` or ``cuda`` (both sides run on it).
        micro_batch: our rows per forward/backward (None: the worker's default).
        dtype: the weights' and activations' dtype on both sides (``float32`` or ``bfloat16``).
    """

    model_path: str
    lora: bool
    steps: int
    prompts: int
    group: int
    new_tokens: int
    lora_rank: int
    lora_alpha: float
    kl: float
    learning_rate: float
    profile: bool = False
    device: str = "cpu"
    micro_batch: int | None = None
    dtype: str = "float32"

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> StepSettings:
        return cls(**json.loads(text))


@dataclass
class StepTimes:
    """Per-step wall times of one side, and where they went.

    Attributes:
        step: ``[steps]`` seconds per optimizer step (sample + score + ref log-probs + update).
        parts: part name -> ``[steps]`` seconds (sample, score, reference, update, other).
        completion_len: ``[steps]`` mean sampled tokens per completion.
    """

    step: list[float] = field(default_factory=list)
    parts: dict[str, list[float]] = field(default_factory=dict)
    completion_len: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)
    foreign: list[float] = field(default_factory=list)

    def add(self, seconds: float, parts: dict[str, float], completion_len: float, usage: Usage) -> None:
        self.step.append(seconds)
        for name, value in parts.items():
            self.parts.setdefault(name, []).append(value)
        self.completion_len.append(completion_len)
        self.cpu.append(usage.own_cpu)
        self.foreign.append(usage.foreign)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Usage:
    """CPU use over an interval: this process's CPU seconds, and the share of the machine others used.

    ``foreign`` is (machine busy time - this process's CPU time) / (wall x cores), from
    ``/proc/stat``: other processes competing for the cores make a step slower, so
    every timed step records it (NaN off Linux).
    """

    own_cpu: float
    foreign: float


class UsageMeter:
    """``start()`` then ``stop()`` around an interval gives its ``Usage``."""

    def start(self) -> None:
        self._wall, self._cpu, self._busy = time.perf_counter(), time.process_time(), machine_busy_seconds()

    def stop(self) -> Usage:
        wall = time.perf_counter() - self._wall
        cpu = time.process_time() - self._cpu
        busy = machine_busy_seconds()
        if busy is None or self._busy is None or wall <= 0:
            return Usage(cpu, float("nan"))
        return Usage(cpu, max(0.0, (busy - self._busy) - cpu) / (wall * (os.cpu_count() or 1)))


def machine_busy_seconds() -> float | None:
    """CPU seconds all cores have spent busy since boot (``/proc/stat``), or None off Linux."""
    try:
        fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    except OSError:
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in fields[:8])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def machine_load(seconds: float = 2.0) -> float:
    """Share of the machine's cores busy over the next ``seconds`` (NaN off Linux)."""
    before = machine_busy_seconds()
    time.sleep(seconds)
    after = machine_busy_seconds()
    if before is None or after is None:
        return float("nan")
    return (after - before) / (seconds * (os.cpu_count() or 1))


class PartClock:
    """Adds up the wall time spent inside wrapped callables, by part name."""

    def __init__(self) -> None:
        self.total: dict[str, float] = {}

    def wrap(self, name: str, fn: Callable, *, when: Callable[[], bool] = lambda: True) -> Callable:
        """``fn`` with its time added to ``name`` (only the calls where ``when()`` is true at entry)."""

        def timed(*args, **kwargs):
            if not when():
                return fn(*args, **kwargs)
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.total[name] = self.total.get(name, 0.0) + time.perf_counter() - start

        return timed

    def snapshot(self) -> dict[str, float]:
        return dict(self.total)


def step_parts(before: dict[str, float], after: dict[str, float], step_seconds: float) -> dict[str, float]:
    """One step's seconds per part, with ``other`` = the step's time no wrapped part accounts for."""
    parts = {name: after.get(name, 0.0) - before.get(name, 0.0) for name in ("sample", "score", "reference", "update")}
    parts["other"] = step_seconds - sum(parts.values())
    return parts


def benchmark_prompts(count: int) -> list[str]:
    """The first ``count`` prompts of the bundled quickstart tasks, as plain text (no chat template)."""
    import importlib.resources

    text = (importlib.resources.files("rlaif_mlx.data") / "datasets" / "quickstart_train.jsonl").read_text("utf-8")
    prompts = [json.loads(line)["prompt"] for line in text.splitlines() if line.strip()]
    if count > len(prompts):
        raise SystemExit(f"--prompts {count}: the quickstart set has only {len(prompts)} prompts")
    return prompts[:count]


def digit_fraction(text: str) -> float:
    """The reward both trainers use: the share of the completion's characters that are digits.

    Cheap and deterministic, so the benchmark times the trainer, not a grader.
    """
    return sum(ch.isdigit() for ch in text) / len(text) if text else 0.0


def resolve_model(name: str, model_dir: Path) -> Path:
    """``tiny`` / ``30m`` build (once) a random model under ``model_dir``; anything else is a model folder."""
    if name in MODEL_PRESETS:
        from rlaif_mlx.data.tiny_model import ensure_tiny_model

        return ensure_tiny_model(model_dir / f"bench-{name}", **MODEL_PRESETS[name])
    path = Path(name)
    if not (path / "config.json").is_file():
        raise SystemExit(f"--model {name}: not tiny, 30m or a model folder with a config.json")
    return path


def default_model_dir() -> Path:
    return Path(tempfile.gettempdir()) / "rlaif-mlx-bench-models"


def peak_gpu_mb() -> float | None:
    """The most GPU memory PyTorch's allocator held at once in this process, or None without CUDA."""
    import torch

    return torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None


def peak_rss_mb() -> float:
    """This process's peak resident set size so far (``ru_maxrss``, KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if platform.system() == "Darwin" else peak / 1024


def summarise(times: dict[str, Any]) -> dict[str, Any]:
    """Medians of the timed steps (a ``StepTimes.as_dict()``, possibly pooled over rounds)."""
    return {
        "median_step_s": statistics.median(times["step"]),
        "mean_step_s": statistics.fmean(times["step"]),
        "min_step_s": min(times["step"]),
        "max_step_s": max(times["step"]),
        "median_cpu_s": statistics.median(times["cpu"]),
        "parts_median_s": {k: statistics.median(v) for k, v in times["parts"].items()},
        "completion_len_mean": statistics.fmean(times["completion_len"]),
        "foreign_load_mean": statistics.fmean(times["foreign"]),
    }


def pool(records: list[dict[str, Any]]) -> dict[str, Any]:
    """Concatenates the per-step lists of several rounds' ``StepTimes.as_dict()``."""
    pooled: dict[str, Any] = {"step": [], "parts": {}, "completion_len": [], "cpu": [], "foreign": []}
    for times in records:
        for key in ("step", "completion_len", "cpu", "foreign"):
            pooled[key] += times[key]
        for name, values in times["parts"].items():
            pooled["parts"].setdefault(name, []).extend(values)
    return pooled


def write_result(path: str, payload: dict[str, Any]) -> None:
    Path(path).write_text(json.dumps(payload, indent=2))


def torch_threads() -> int:
    import torch

    return torch.get_num_threads()


def versions(*names: str) -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    found = {"python": platform.python_version()}
    for name in names:
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = "not installed"
    return found


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores, {platform.system()} {platform.release()}"
