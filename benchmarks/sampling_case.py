"""One measured sampling case, run in a fresh child process of `bench_sampling.py`.

A case is (backend, implementation, G): load the model, sample once to warm
up, then time `repeats` identical calls. Peak memory is per process, so each
case gets its own: the resident-set high-water mark is reset after the model is
loaded (Linux `/proc/self/clear_refs`), and MLX's own peak counter likewise.

Every side generates exactly `new_tokens` tokens for each of the
`prompts x G` rows, checked on the returned ids:
- ours: the backend's EOS set is emptied (`backend.eos_ids = ()`), so EOS is
  sampled like any other token and never ends a row; no stop strings.
- transformers: `min_new_tokens == max_new_tokens` (its own way to forbid EOS
  until the length is reached).
- mlx-lm: `batch_generate` gets the tokenizer with an empty `eos_token_ids`,
  so it stops on length only.
"""

from __future__ import annotations

import gc
import hashlib
import os
import platform
import resource
import time
from collections.abc import Callable
from pathlib import Path

Generate = Callable[[], list[int]]  # one sampling call; returns the generated-token count per row


def run_case(case: dict) -> dict:
    """Runs one case and returns its measurements (a JSON-able dict).

    Args:
        case: backend ("torch" | "mlx"), impl ("ours" | "peer"), model, prompts
            (token id lists), group (G), new_tokens (T), repeats, seed.
    """
    runners = {
        ("torch", "ours"): _torch_ours,
        ("torch", "peer"): _torch_peer,
        ("mlx", "ours"): _mlx_ours,
        ("mlx", "peer"): _mlx_peer,
    }
    generate, memory = runners[(case["backend"], case["impl"])](case)
    gc.collect()
    loaded_rss = _status_kb("VmRSS") * 1024
    memory.reset()
    hwm_reset = _reset_rss_peak()

    expected = [case["new_tokens"]] * (len(case["prompts"]) * case["group"])
    _check(generate(), expected)  # warm-up
    seconds = []
    before = _cpu_counters()
    for _ in range(case["repeats"]):
        start = time.perf_counter()
        counts = generate()
        seconds.append(time.perf_counter() - start)
        _check(counts, expected)
    other_cores = _other_cores(before, _cpu_counters())
    peak_rss = (_status_kb("VmHWM") if hwm_reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024
    return {
        **{k: case[k] for k in ("backend", "impl", "group", "new_tokens", "repeats", "round")},
        "rows": len(expected),
        "tokens_per_call": sum(expected),
        "seconds": seconds,
        "other_cores": other_cores,
        "rss_loaded": loaded_rss,
        "rss_peak": peak_rss,
        "rss_peak_method": "VmHWM after clear_refs" if hwm_reset else "ru_maxrss (includes loading)",
        **memory.read(),
        "env": _environment(case["backend"]),
    }


def _check(counts: list[int], expected: list[int]) -> None:
    if counts != expected:
        raise RuntimeError(f"generated token counts differ from the fixed length: {counts} != {expected}")


# ------------------------------------------------------------------ PyTorch


def _torch_ours(case: dict) -> tuple[Generate, _Memory]:
    from rlaif_mlx.backends.base import SamplingParams

    backend = _our_backend("torch", case)
    params = SamplingParams(max_new_tokens=case["new_tokens"], temperature=1.0, seed=case["seed"])

    def generate() -> list[int]:
        return [len(c.completion_ids) for c in backend.sample(case["prompts"], n=case["group"], params=params)]

    return generate, _Memory()


def _torch_peer(case: dict) -> tuple[Generate, _Memory]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    torch.manual_seed(case["seed"])
    tokenizer = AutoTokenizer.from_pretrained(case["model"])
    model = AutoModelForCausalLM.from_pretrained(case["model"], dtype=torch.float32).eval()
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    ids, mask = _left_pad_torch(torch, case["prompts"], pad)
    t = case["new_tokens"]
    settings = {
        "do_sample": True,
        "temperature": 1.0,
        "top_k": 0,
        "top_p": 1.0,
        "num_return_sequences": case["group"],
        "min_new_tokens": t,
        "max_new_tokens": t,
        "pad_token_id": pad,
        "use_cache": True,
    }

    def generate() -> list[int]:
        with torch.inference_mode():
            out = model.generate(input_ids=ids, attention_mask=mask, **settings)
        return [out.shape[1] - ids.shape[1]] * out.shape[0]

    return generate, _Memory()


def _left_pad_torch(torch, prompts: list[list[int]], pad: int):
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :] = torch.tensor(p)
        mask[i, width - len(p) :] = 1
    return ids, mask


# ---------------------------------------------------------------------- MLX


def _mlx_ours(case: dict) -> tuple[Generate, _Memory]:
    from rlaif_mlx.backends.base import SamplingParams

    backend = _our_backend("mlx", case)
    params = SamplingParams(max_new_tokens=case["new_tokens"], temperature=1.0, seed=case["seed"])

    def generate() -> list[int]:
        return [len(c.completion_ids) for c in backend.sample(case["prompts"], n=case["group"], params=params)]

    return generate, _MlxMemory()


def _mlx_peer(case: dict) -> tuple[Generate, _Memory]:
    import mlx.core as mx
    from mlx_lm import batch_generate, load
    from mlx_lm.sample_utils import make_sampler

    mx.random.seed(case["seed"])
    model, tokenizer = load(case["model"])
    rows = [p for p in case["prompts"] for _ in range(case["group"])]
    sampler = make_sampler(temp=1.0)  # top_p 0 / top_k 0 / min_p 0: plain temperature-1 sampling
    no_eos = _NoEos(tokenizer)

    def generate() -> list[int]:
        # One batch for everything, like ours: every row prefilled and decoded together.
        out = batch_generate(
            model,
            no_eos,
            rows,
            max_tokens=case["new_tokens"],
            sampler=sampler,
            prefill_batch_size=len(rows),
            completion_batch_size=len(rows),
            return_token_ids=True,
        )
        return [len(ids) for ids in out.token_ids]

    return generate, _MlxMemory()


class _NoEos:
    """mlx-lm's tokenizer with no EOS ids, so `batch_generate` stops on length only."""

    eos_token_ids: list[int] = []

    def __init__(self, tokenizer) -> None:
        self._tokenizer = tokenizer

    def decode(self, *args, **kwargs):
        return self._tokenizer.decode(*args, **kwargs)


# ------------------------------------------------------------------- shared


def _our_backend(name: str, case: dict):
    """Our backend as the trainer builds it, full weights, holding one copy of them.

    A full fine-tune keeps a frozen reference copy for the KL term; sampling
    never reads it, so it is dropped to make memory comparable with the peer's
    single model. LoRA is off so both sides run the identical plain model.
    """
    from rlaif_mlx.backends import create_backend
    from rlaif_mlx.config import ModelConfig, TrainingConfig

    model = ModelConfig(
        base_model=case["model"], use_lora=False, **({"torch": {"device": "cpu"}} if name == "torch" else {})
    )
    backend = create_backend(name, model, TrainingConfig(), seed=case["seed"], total_steps=1)
    backend._reference = None
    backend.eos_ids = ()  # EOS never ends a row: every row is exactly new_tokens long
    return backend


class _Memory:
    """No framework-level counter (PyTorch on CPU): resident-set size only."""

    def reset(self) -> None:
        pass

    def read(self) -> dict:
        return {}


class _MlxMemory(_Memory):
    """MLX's allocator counters: memory held after loading, and the peak while sampling."""

    def reset(self) -> None:
        import mlx.core as mx

        mx.clear_cache()
        self._active = mx.get_active_memory()
        mx.reset_peak_memory()

    def read(self) -> dict:
        import mlx.core as mx

        return {"mlx_active_loaded": self._active, "mlx_peak": mx.get_peak_memory()}


def _cpu_counters() -> tuple[float, float, float]:
    """(wall seconds, busy CPU seconds of the whole machine, CPU seconds of this process)."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    busy = sum(fields) - fields[3] - fields[4]  # all but idle and iowait
    own = os.times()
    return time.perf_counter(), busy / os.sysconf("SC_CLK_TCK"), own.user + own.system


def machine_busy_cores(seconds: float) -> float:
    """Average CPU cores the machine keeps busy over `seconds` (call from an idle process)."""
    before = _cpu_counters()
    time.sleep(seconds)
    return _other_cores(before, _cpu_counters()) or 0.0


def _other_cores(before: tuple, after: tuple) -> float | None:
    """Average cores other processes kept busy while the timed calls ran (contention check)."""
    wall = after[0] - before[0]
    if wall <= 0:
        return None
    return max(((after[1] - before[1]) - (after[2] - before[2])) / wall, 0.0)


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def _reset_rss_peak() -> bool:
    """Resets the kernel's resident-set high-water mark (VmHWM) to the current RSS; False if not allowed."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def code_fingerprint() -> str:
    """What `sha256sum rlaif_mlx/backends/*.py | sha256sum | cut -c1-16` prints, run from the repo root."""
    folder = Path(__file__).resolve().parent.parent / "rlaif_mlx" / "backends"
    listing = "".join(
        f"{hashlib.sha256(f.read_bytes()).hexdigest()}  rlaif_mlx/backends/{f.name}\n"
        for f in sorted(folder.glob("*.py"))
    )
    return hashlib.sha256(listing.encode()).hexdigest()[:16]


def _environment(backend: str) -> dict:
    maps = Path("/proc/self/maps").read_text() if Path("/proc/self/maps").exists() else ""
    env = {
        "code": code_fingerprint(),
        "LD_PRELOAD": os.environ.get("LD_PRELOAD", ""),
        "openblas_mapped": "openblas" in maps,
        "machine": platform.machine(),
    }
    if backend == "torch":
        import torch

        env["torch_threads"] = torch.get_num_threads()
    else:
        import mlx.core as mx

        env["mlx_device"] = str(mx.default_device())
    return env
