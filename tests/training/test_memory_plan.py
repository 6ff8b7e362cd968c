"""The memory plan: its arithmetic, its estimate against peaks measured on the tiny model (both backends),
``doctor``'s report, ``train`` refusing a config that cannot fit, and ``micro_batch_size: auto``."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import yaml

from rlaif_mlx.cli import main
from rlaif_mlx.config import load_config
from rlaif_mlx.training import memory_fit
from rlaif_mlx.training.memory_plan import GB, ModelShape, Workload, largest_micro_batch, plan

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"
QWEN_CODER_1_5B = ModelShape(  # Qwen/Qwen2.5-Coder-1.5B-Instruct's config.json
    hidden_size=1536,
    num_layers=28,
    num_heads=12,
    num_kv_heads=2,
    head_dim=128,
    intermediate_size=8960,
    vocab_size=151936,
    tie_word_embeddings=True,
)
WORK = Workload(
    backend="mlx",
    dtype="bfloat16",
    use_lora=True,
    lora_r=16,
    lora_targets=("q_proj", "v_proj"),
    prompts=4,
    samples_per_prompt=4,
    prompt_tokens=256,
    new_tokens=256,
    micro_batch_size=4,
)


# ---- the arithmetic -------------------------------------------------------------------------


def test_parameters_and_weights_are_counted_as_the_models_hold_them(tiny_model_path):
    from safetensors.numpy import load_file

    shape = ModelShape.from_config(json.loads((tiny_model_path / "config.json").read_text()))
    held = sum(t.size for t in load_file(str(tiny_model_path / "model.safetensors")).values())
    assert shape.parameter_count() == held == 427_136
    assert QWEN_CODER_1_5B.parameter_count() == 1_543_714_304  # the published count
    # 4-bit, groups of 64: half a byte per matrix weight + a bfloat16 scale and bias per group of 64;
    # norms and biases stay bfloat16.
    q4 = replace(QWEN_CODER_1_5B, quant_bits=4)
    matrices = 28 * (1536 * 1536 * 2 + 1536 * 256 * 2 + 3 * 1536 * 8960) + 151936 * 1536
    assert q4.weight_bytes(2) == int((1_543_714_304 - matrices) * 2 + matrices / 2 + 2 * matrices / 64 * 2)
    mlx_community = {**json.loads((tiny_model_path / "config.json").read_text()), "quantization": {"bits": 4}}
    assert ModelShape.from_config(mlx_community).quant_bits == 4  # mlx-lm's key for a quantised model


def test_each_phase_grows_with_the_setting_it_names():
    base = plan(QWEN_CODER_1_5B, WORK)
    phases = {p.name: p for p in base.phases}
    assert [p.name for p in base.phases] == ["sampling", "reference", "update"]
    longer = {p.name: p.total for p in plan(QWEN_CODER_1_5B, replace(WORK, new_tokens=1024)).phases}
    assert longer["sampling"] > phases["sampling"].total
    bigger = {p.name: p.total for p in plan(QWEN_CODER_1_5B, replace(WORK, micro_batch_size=16)).phases}
    assert bigger["update"] > phases["update"].total and bigger["reference"] > phases["reference"].total
    assert bigger["sampling"] == phases["sampling"].total  # sampling does not use micro-batches
    # LoRA: no reference copy, a small optimizer state; a full fine-tune holds both at full size.
    full = plan(QWEN_CODER_1_5B, replace(WORK, use_lora=False)).resident
    assert full["reference copy"] == full["weights"] and full["optimizer state"] == 2 * full["weights"]
    assert "reference copy" not in base.resident and base.resident["optimizer state"] < GB / 50


def test_the_largest_micro_batch_that_fits_is_chosen():
    totals = [plan(QWEN_CODER_1_5B, replace(WORK, micro_batch_size=m)).peak.total for m in (1, 2, 3, 4)]
    assert totals == sorted(totals)
    assert largest_micro_batch(QWEN_CODER_1_5B, WORK, (totals[2] + totals[3]) // 2) == 3
    assert largest_micro_batch(QWEN_CODER_1_5B, WORK, totals[0] - 1) is None


# ---- the estimate against measured peaks ------------------------------------------------------


@pytest.mark.parametrize("backend", ["mlx", "torch"])
def test_the_plan_is_within_25_percent_of_the_measured_peaks_on_the_tiny_model(tiny_model_path, backend):
    """One RL step's three phases, LoRA and full, measured in a fresh process (``benchmarks/bench_memory.py``:
    ``mx.get_peak_memory``; PyTorch's profiler allocation events)."""
    pytest.importorskip("mlx_lm" if backend == "mlx" else "transformers")
    sys.path.insert(0, str(BENCHMARKS))
    try:
        from bench_memory import case_settings, run_cases
    finally:
        sys.path.remove(str(BENCHMARKS))
    cases = [case_settings("tiny", backend, lora=lora) | {"model_path": str(tiny_model_path)} for lora in (True, False)]
    for row in run_cases(cases):
        ratio = row["planned"] / row["measured"]
        assert 0.75 <= ratio <= 1.25, (row["lora"], row["phase"], row["measured"], row["planned"])


# ---- doctor, train and auto -----------------------------------------------------------------


def write_config(tmp_path: Path, model: Path, **training) -> Path:
    tasks = tmp_path / "tasks.jsonl"
    tasks.write_text(json.dumps({"id": "t", "prompt": "Write f(x) returning x.", "entry_point": "f"}) + "\n")
    config = {
        "backend": "torch",
        "output_dir": str(tmp_path / "run"),
        "model": {"base_model": str(model), "lora_r": 4},
        "data": {"train_file": str(tasks)},
        "training": {"max_steps": 1, "batch_size": 4, "micro_batch_size": 8, **training},
        "rlaif": {"num_samples_per_prompt": 2, "max_new_tokens": 8},
        "logging": {"dashboard": False},
    }
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture
def device_of(monkeypatch):
    """Makes the device report ``bytes`` (as Metal's working set: nothing kept back for the runtime)."""

    def set_memory(size: int) -> None:
        monkeypatch.setattr(
            "rlaif_mlx.backends.formats.device_memory", lambda *a, **k: (size, "Metal's recommended working set")
        )

    return set_memory


def test_train_refuses_a_config_that_cannot_fit_in_one_line(tmp_path, tiny_model_path, device_of, capsys):
    path = write_config(tmp_path, tiny_model_path)
    sizing = memory_fit.size_run(load_config(path), prompts=["Write f(x) returning x."])
    phases = {p.name: p.total for p in sizing.plan.phases}
    device_of((phases["sampling"] + phases["update"]) // 2)  # sampling fits, the update does not
    assert main(["train", "--config", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "the update phase needs about" in err
    assert "lower training.micro_batch_size (now 8), or set it to auto" in err
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_micro_batch_size_auto_picks_the_largest_that_fits(tmp_path, tiny_model_path, device_of):
    path = write_config(tmp_path, tiny_model_path, micro_batch_size="auto")
    config = load_config(path)
    prompts = ["Write f(x) returning x."]
    work = memory_fit.workload(config, backend="torch", world_size=1, prompts=prompts)
    shape = ModelShape.from_config(json.loads((tiny_model_path / "config.json").read_text()))
    sizes = [plan(shape, replace(work, micro_batch_size=m)).peak.total for m in range(1, 9)]
    device_of((sizes[4] + sizes[5]) // 2)  # 5 rows fit, 6 do not
    said = []
    fitted = memory_fit.fit_to_memory(config, source=str(path), prompts=prompts, log=said.append)
    assert fitted.training.micro_batch_size == 5
    assert "micro_batch_size auto -> 5" in said[0]
    device_of(10 * GB)
    assert memory_fit.fit_to_memory(config, source=str(path), prompts=prompts).training.micro_batch_size == 8
    # two processes on this machine (mlx.launch -n 2) share its memory: each plans with half
    assert memory_fit.size_run(config, sharing=2).budget == 5 * GB


def test_a_run_with_auto_trains(tmp_path, tiny_model_path, capsys):
    path = write_config(tmp_path, tiny_model_path, micro_batch_size="auto")
    assert main(["train", "--config", str(path), "--no-dashboard"]) == 0
    out = capsys.readouterr().out
    assert "micro_batch_size auto -> 8" in out  # all 8 rows of a step fit this machine
    assert yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["training"]["micro_batch_size"] == "auto"


def test_doctor_prints_the_plan_against_the_device(tmp_path, tiny_model_path, device_of, capsys):
    path = write_config(tmp_path, tiny_model_path)
    device_of(GB)
    main(["doctor", "--config", str(path)])
    out = capsys.readouterr().out
    assert "1.0 GB (Metal's recommended working set)" in out
    for phase in ("sampling", "reference", "update"):
        assert f"memory {phase}" in out
    device_of(1)
    assert main(["doctor", "--config", str(path)]) == 1
    assert "fail  memory sampling" in capsys.readouterr().out


def test_the_chunk_size_is_the_pytorch_backends():
    pytest.importorskip("torch")
    from rlaif_mlx.backends.torch_forward import HEAD_CHUNK_ELEMENTS
    from rlaif_mlx.training import memory_plan

    assert memory_plan.HEAD_CHUNK_ELEMENTS == HEAD_CHUNK_ELEMENTS


def test_the_planner_runs_without_a_framework():
    code = "import sys, rlaif_mlx.training.memory_fit; print('torch' in sys.modules, 'mlx' in sys.modules)"
    done = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
    )
    assert done.stdout.split() == ["False", "False"]


def test_the_16gb_laptop_config_fits_a_16gb_mac():
    """configs/laptop-16gb.yaml: Qwen2.5-Coder-1.5B-Instruct in 4 bits with LoRA, planned with its published
    shape against the ~10.7 GB of Metal working set macOS gives a 16 GB Mac (2/3 of its RAM)."""
    config = load_config(Path(__file__).resolve().parents[2] / "configs" / "laptop-16gb.yaml")
    assert config.model.base_model.endswith("Qwen2.5-Coder-1.5B-Instruct-4bit") and config.model.use_lora
    work = memory_fit.workload(config, backend="mlx", world_size=1)  # prompts at data.max_prompt_tokens
    sized = plan(replace(QWEN_CODER_1_5B, quant_bits=4), work)
    assert sized.over(16 * GB * 2 // 3) is None
    assert sized.peak.total < 6.5 * GB  # room left for the rest of the Mac


@pytest.mark.parametrize("backend", ["mlx", "torch"])
def test_the_device_memory_is_read_where_the_backend_runs(backend):
    pytest.importorskip("mlx.core" if backend == "mlx" else "torch")
    from rlaif_mlx.backends.formats import device_memory, system_memory

    size, where = device_memory(backend, torch_device="cpu")
    assert size > 0
    if where != "Metal's recommended working set":  # a Mac's GPU; elsewhere (here) the CPU's RAM
        assert where == system_memory()[1]
