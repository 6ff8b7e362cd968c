"""Sizing a run to its device before anything loads: the memory plan of a config, against the device's memory.

``train`` calls ``fit_to_memory`` before the model is loaded: it refuses a config
whose plan cannot fit, with one line naming the phase and the setting to lower,
and turns ``training.micro_batch_size: auto`` into the largest size that fits.
``doctor --config`` prints the same plan (``size_run``). The arithmetic is
``memory_plan.py``'s; the model's shape comes from its ``config.json`` (a local
folder or the Hugging Face cache, never the network), the device's memory from
``backends/formats.py``.

The plan counts the run's arrays. On a device that shares the system's RAM
(a CPU run) the interpreter and the frameworks' code need room too: about
``RUNTIME_BYTES`` is kept back for them. Metal's working set and a CUDA GPU's
memory hold the arrays only.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..config import RunConfig
from ..errors import SetupError
from .memory_plan import GB, MemoryPlan, ModelShape, Workload, largest_micro_batch, plan

RUNTIME_BYTES = 1 * GB
AUTO_WITHOUT_PLAN = 4  # micro_batch_size: auto when the model's shape cannot be read before loading it
CHARS_PER_TOKEN = 2.5  # a cautious rate for code and English (BPE vocabularies average 3-4)
TEMPLATE_TOKENS = 64  # the chat template's turns around a prompt


@dataclass(frozen=True)
class Sizing:
    """A config's memory plan on this machine.

    Attributes:
        plan: the resident memory and each phase's peak.
        budget: bytes the plan may use (the device's memory less ``RUNTIME_BYTES`` on system RAM).
        device: the memory's size and name, for people (``"10.7 GB (Metal's recommended working set)"``), with
            what is kept back or shared (``"20.8 GB (available system RAM), 19.8 GB usable"``).
        work: what the plan was made for (micro-batch, prompts per process, tokens).
    """

    plan: MemoryPlan
    budget: int
    device: str
    work: Workload


def gb(n: float) -> str:
    return f"{n / GB:.1f} GB" if n >= GB else f"{n / 2**20:.0f} MB" if n >= 2**24 else f"{n / 2**20:.1f} MB"


def model_shape(base_model: str, *, build_tiny: bool = False) -> ModelShape | None:
    """The model's shape from its ``config.json``, in a local folder or the local Hugging Face cache; None if
    neither has it (a hub model not downloaded yet) or it lacks a key. With ``build_tiny``, a missing folder
    is the tiny model ``model.build_tiny_if_missing`` will build there."""
    path = Path(base_model).expanduser() / "config.json"
    if not path.is_file() and build_tiny:
        return _tiny_shape()
    if not path.is_file():
        try:
            from huggingface_hub import try_to_load_from_cache

            cached = try_to_load_from_cache(base_model, "config.json")
        except (ImportError, ValueError, OSError):
            return None
        if not isinstance(cached, str):
            return None
        path = Path(cached)
    try:
        return ModelShape.from_config(json.loads(path.read_text()))
    except (OSError, ValueError):
        return None


def _tiny_shape() -> ModelShape:
    """The shape ``data.tiny_model.build_tiny_model`` builds by default."""
    import inspect

    from ..data.tiny_model import build_tiny_model

    d = {k: p.default for k, p in inspect.signature(build_tiny_model).parameters.items()}
    return ModelShape(
        hidden_size=d["hidden_size"],
        num_layers=d["num_layers"],
        num_heads=d["num_heads"],
        num_kv_heads=d["num_kv_heads"],
        head_dim=d["hidden_size"] // d["num_heads"],
        intermediate_size=d["intermediate_size"],
        vocab_size=d["vocab_size"],
        tie_word_embeddings=True,
    )


def prompt_tokens(config: RunConfig, prompts: list[str] | None) -> int:
    """The longest prompt in tokens, guessed from characters (cautiously), at most ``data.max_prompt_tokens``."""
    if not prompts:
        return config.data.max_prompt_tokens
    longest = max(len(p) for p in prompts) + len(config.data.system_prompt or "")
    return min(config.data.max_prompt_tokens, math.ceil(longest / CHARS_PER_TOKEN) + TEMPLATE_TOKENS)


def task_prompts(config: RunConfig) -> list[str] | None:
    """The training tasks' prompts, or None when the task file does not load (doctor reports that itself)."""
    from ..data import load_task_set
    from ..data.tasks import DataError

    try:
        return [t.prompt for t in load_task_set(config.data.train_file, on_bad_line="skip").tasks]
    except (DataError, OSError):
        return None


def workload(config: RunConfig, *, backend: str, world_size: int, prompts: list[str] | None = None) -> Workload:
    """What one process of ``config`` does in a step (its share of the prompts)."""
    micro = config.training.micro_batch_size
    return Workload(
        backend=backend,
        dtype=config.model.dtype,
        use_lora=config.model.use_lora,
        lora_r=config.model.lora_r,
        lora_targets=tuple(config.model.lora_target_modules),
        prompts=max(1, config.training.batch_size // world_size),
        samples_per_prompt=config.rlaif.num_samples_per_prompt,
        prompt_tokens=prompt_tokens(config, prompts),
        new_tokens=config.rlaif.max_new_tokens,
        micro_batch_size=1 if micro == "auto" else micro,
    )


def size_run(
    config: RunConfig, *, world_size: int = 1, sharing: int = 1, prompts: list[str] | None = None
) -> Sizing | str:
    """The config's plan against this machine's device, or why there is none (one line).

    Args:
        world_size: processes in the run (each plans its share of the prompts).
        sharing: processes on this machine: they share its RAM or its Mac's GPU (not CUDA GPUs: one each).
    """
    from ..backends import BackendUnavailable, resolve_backend_name
    from ..backends.formats import device_memory

    shape = model_shape(config.model.base_model, build_tiny=config.model.build_tiny_if_missing)
    if shape is None:
        return f"no config.json for {config.model.base_model} here yet (it is read once the model is downloaded)"
    try:
        backend = resolve_backend_name(config.backend)
        memory, where = device_memory(backend, torch_device=config.model.torch.device)
    except (BackendUnavailable, ImportError, OSError, RuntimeError, ValueError) as exc:
        return f"the device's memory cannot be read: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"
    budget = memory - RUNTIME_BYTES if "system RAM" in where else memory
    if not where.startswith("free memory of cuda"):
        budget //= max(1, sharing)
    work = workload(config, backend=backend, world_size=world_size, prompts=prompts)
    if config.training.micro_batch_size == "auto":
        work = _with_micro_batch(work, largest_micro_batch(shape, work, budget) or 1)
    device = f"{gb(memory)} ({where})" + (f", {gb(budget)} usable" if budget != memory else "")
    return Sizing(plan(shape, work), budget, device, work)


def fit_to_memory(
    config: RunConfig,
    *,
    source: str,
    world_size: int = 1,
    sharing: int = 1,
    prompts: list[str] | None = None,
    log: Callable[[str], None] | None = None,
) -> RunConfig:
    """The config with ``micro_batch_size: auto`` chosen; refuses one whose plan cannot fit the device.

    Raises:
        SetupError: one line: the phase that does not fit, how much it needs of how much, and what to lower.
    """
    sizing = size_run(config, world_size=world_size, sharing=sharing, prompts=prompts)
    auto = config.training.micro_batch_size == "auto"
    if isinstance(sizing, str):
        if log:
            log(f"memory plan: skipped, {sizing}" + (f"; micro_batch_size auto -> {AUTO_WITHOUT_PLAN}" if auto else ""))
        return _set_micro_batch(config, AUTO_WITHOUT_PLAN) if auto else config
    over = sizing.plan.over(sizing.budget)
    if over is not None:
        raise SetupError(refusal(sizing, over.name, source=source, config=config))
    peak = sizing.plan.peak
    if log:
        chosen = f"; micro_batch_size auto -> {sizing.work.micro_batch_size}" if auto else ""
        log(f"memory plan: peak {gb(peak.total)} ({peak.name}) of {sizing.device}{chosen} (rlaif-mlx doctor --config)")
    return _set_micro_batch(config, sizing.work.micro_batch_size) if auto else config


def report(sizing: Sizing, config: RunConfig) -> list[tuple[str, bool, str, str]]:
    """``doctor``'s lines: (name, fits, what was found, the fix) for the device, then each phase."""
    work = sizing.work
    rows = [
        (
            "memory plan",
            True,
            f"{sizing.device}; per step and process {work.prompts} prompt(s) x {work.samples_per_prompt} samples, "
            f"prompts up to {work.prompt_tokens} + {work.new_tokens} new tokens, micro-batches of "
            f"{work.micro_batch_size}",
            "",
        )
    ]
    for phase in sizing.plan.phases:
        fits = phase.total <= sizing.budget
        biggest = sorted(phase.parts.items(), key=lambda kv: -kv[1])[:4]
        found = f"{gb(phase.total)} ({', '.join(f'{name} {gb(size)}' for name, size in biggest)})"
        fix = "" if fits else refusal(sizing, phase.name, source="", config=config).split(": ", 2)[-1]
        rows.append((f"memory {phase.name}", fits, found, fix))
    return rows


def resolve_auto(config: RunConfig) -> RunConfig:
    """The config with ``micro_batch_size: auto`` chosen by the plan, never refused (evaluation, sampling, export)."""
    if config.training.micro_batch_size != "auto":
        return config
    sizing = size_run(config)
    return _set_micro_batch(config, AUTO_WITHOUT_PLAN if isinstance(sizing, str) else sizing.work.micro_batch_size)


def refusal(sizing: Sizing, phase_name: str, *, source: str, config: RunConfig) -> str:
    """The one line that refuses a run: the phase, its need, the device's memory, what to lower."""
    phase = next(p for p in sizing.plan.phases if p.name == phase_name)
    resident = sum(sizing.plan.resident.values())
    if resident > sizing.budget:
        fix = "the model alone does not fit: use LoRA (model.use_lora: true), a 4-bit model, or model.dtype bfloat16"
    elif phase.lower == "training.micro_batch_size" and sizing.work.micro_batch_size > 1:
        fix = f"lower training.micro_batch_size (now {sizing.work.micro_batch_size}), or set it to auto"
    elif phase.lower == "training.micro_batch_size":
        fix = "lower rlaif.max_new_tokens or data.max_prompt_tokens (one row does not fit)"
    else:
        fix = (
            f"lower training.batch_size (now {config.training.batch_size}), rlaif.num_samples_per_prompt "
            f"({config.rlaif.num_samples_per_prompt}) or rlaif.max_new_tokens ({config.rlaif.max_new_tokens})"
        )
    return f"{source}: the {phase.name} phase needs about {gb(phase.total)} but this device has {sizing.device}: {fix}"


def _with_micro_batch(work: Workload, size: int) -> Workload:
    from dataclasses import replace

    return replace(work, micro_batch_size=size)


def _set_micro_batch(config: RunConfig, size: int) -> RunConfig:
    training = config.training.model_copy(update={"micro_batch_size": size})
    return config.model_copy(update={"training": training})
