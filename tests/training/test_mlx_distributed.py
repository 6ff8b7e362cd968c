"""Data parallelism under mlx.launch: two MLX processes (ring backend, localhost) train what one process trains.

The end-to-end tests launch ``tests/training/distributed_worker.py`` (``rlaif-mlx train`` with a
reward computed from the text) under ``mlx.launch -n 2 --backend ring`` and compare its checkpoints,
metrics and samples with one plain process given the same config and global batch, for LoRA and a
full fine-tune; a 2-process run SIGKILLed mid-step and resumed under mlx.launch against the
uninterrupted one; and checkpoints crossing between 2 MLX processes and one PyTorch process.
The configs and comparisons are ``test_distributed.py``'s (the torchrun tests).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from rlaif_mlx.monitor.metrics import read_metrics
from rlaif_mlx.training.distributed import DistContext, DistributedSetupError, context_from_env

pytest.importorskip("mlx_lm")

from test_distributed import (  # noqa: E402 - the torchrun tests' configs and comparisons
    RUNS,
    TESTS,
    assert_records_like_one_process,
    assert_trains_like_one_process,
    load_tensors,
    samples,
    write_config,
)

MLX_LAUNCH = shutil.which("mlx.launch", path=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
KILL_AT_STEP = 3  # the killed run dies while scoring step 3; its last checkpoint is step 2's


# ---- the launcher's variables, in one process --------------------------------------------


def test_mlx_launch_variables_make_an_mlx_context(tmp_path):
    hostfile = tmp_path / "ring.json"
    hostfile.write_text(json.dumps([["127.0.0.1:5000"], ["127.0.0.1:5001"], ["127.0.0.1:5002"]]))
    ctx = context_from_env({"MLX_RANK": "2", "MLX_HOSTFILE": str(hostfile)})
    assert (ctx.rank, ctx.world_size, ctx.engine, ctx.is_main) == (2, 3, "mlx", False)
    assert ctx.launcher == "mlx.launch (ring)" and ctx.local_processes == 3  # all on this machine: they share it
    devices = tmp_path / "devices.json"
    devices.write_text(json.dumps([[None, "rdma_en3"], ["rdma_en3", None]]))
    jaccl = context_from_env({"MLX_RANK": "0", "MLX_IBV_DEVICES": str(devices), "MLX_JACCL_COORDINATOR": "10.0.0.1:1"})
    assert (jaccl.world_size, jaccl.launcher) == (2, "mlx.launch (jaccl)")
    assert context_from_env({"OMPI_COMM_WORLD_RANK": "1", "OMPI_COMM_WORLD_SIZE": "2"}).launcher == "mlx.launch (mpi)"
    empty = tmp_path / "one.json"
    empty.write_text("")  # mlx.launch writes an empty hostfile for a single process
    assert not context_from_env({"MLX_RANK": "0", "MLX_HOSTFILE": str(empty)}).enabled
    with pytest.raises(DistributedSetupError, match="rank 3 is not in 0..2"):
        context_from_env({"MLX_RANK": "3", "MLX_HOSTFILE": str(hostfile)})
    with pytest.raises(DistributedSetupError, match="start the job with mlx.launch"):
        context_from_env({"MLX_RANK": "0"})


def test_a_launcher_and_a_backend_that_do_not_match_are_one_line_errors(tmp_path):
    from rlaif_mlx.training.distributed import init_from_env

    hostfile = tmp_path / "ring.json"
    hostfile.write_text(json.dumps([["127.0.0.1:5000"], ["127.0.0.1:5001"]]))
    with pytest.raises(DistributedSetupError, match="set backend: mlx, or start the torch backend with torchrun"):
        init_from_env(backend="torch", environ={"MLX_RANK": "0", "MLX_HOSTFILE": str(hostfile)})
    with pytest.raises(DistributedSetupError, match="set backend: torch, or start the mlx backend with mlx.launch"):
        init_from_env(backend="mlx", environ={"RANK": "0", "WORLD_SIZE": "2"})
    assert DistContext().all_gather({"a": 1}) == [{"a": 1}]  # one process: no engine at all


# ---- two processes against one -------------------------------------------------------------


def mlx_launch(folder: Path, commands: list[str], *, processes: int, expect_kill: bool = False) -> str:
    """Runs ``rlaif-mlx`` commands in turn in ``distributed_worker.py``: under ``mlx.launch -n processes
    --backend ring`` on localhost with ``processes`` > 1, else in one plain process. Returns its stdout;
    fails the test on a non-zero exit (unless ``expect_kill``: the worker killed its launch)."""
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
        "SCORED_LOG_DIR": str(folder),
        "PYTHONPATH": os.pathsep.join([str(TESTS.parent.parent), str(TESTS), os.environ.get("PYTHONPATH", "")]),
    }
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MLX_RANK", "MLX_HOSTFILE"):
        env.pop(var, None)
    worker = [str(TESTS / "distributed_worker.py"), *" --- ".join(commands).split()]
    if processes > 1:
        if MLX_LAUNCH is None:
            pytest.skip("mlx.launch is not installed")
        port = str(free_ports(processes))
        command = [MLX_LAUNCH, "-n", str(processes), "--backend", "ring", "--starting-port", port]
        command += ["--python", sys.executable, "--", *worker]
    else:
        command = [sys.executable, *worker]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=1800, start_new_session=True)
    if expect_kill:
        assert done.returncode != 0, done.stdout[-2000:]
    else:
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout


def free_ports(count: int) -> int:
    """The first of ``count`` consecutive free localhost ports (the ring backend listens on port + rank)."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            first = s.getsockname()[1]
        try:
            held = []
            for port in range(first, first + count):
                s = socket.socket()
                held.append(s)
                s.bind(("127.0.0.1", port))
            return first
        except OSError:
            continue
        finally:
            for s in held:
                s.close()
    raise RuntimeError("no free ports")


@pytest.fixture(scope="module")
def mlx_runs(tmp_path_factory, tiny_model_path):
    """The ``RUNS`` configs on MLX in one process and in two, plus the kill-and-resume and cross-backend runs."""
    root = tmp_path_factory.mktemp("mlx-distributed")
    single, multi = root / "single", root / "multi"
    single.mkdir()
    multi.mkdir()

    def config(folder, kind, name=None, **options):
        return write_config(folder, tiny_model_path, kind, name=name, backend=options.pop("backend", "mlx"), **options)

    # One process: the RUNS on MLX, and a PyTorch run to step 2 whose checkpoint both sides resume on MLX.
    torch_half = config(single, "lora", "torch-half", backend="torch", max_steps=2, training={"save_steps": 2})
    from_torch = config(single, "lora", "from-torch")
    torch_checkpoint = single / "torch-half" / "checkpoints" / "step-000002"
    commands = [f"train --config {config(single, name)}" for name in RUNS]
    commands += [f"train --config {torch_half}", f"train --config {from_torch} --resume {torch_checkpoint}"]
    out = {"single": (single, mlx_launch(single, commands, processes=1))}

    # Two processes: the RUNS, the same resume of the PyTorch checkpoint, and a run killed at step 3.
    killed = config(multi, "lora", "killed", training={"save_steps": 1, "save_total_limit": 2})
    commands = [f"train --config {config(multi, name)}" for name in RUNS]
    # backend: auto here: under mlx.launch it means MLX (alone on Linux it would mean PyTorch)
    from_torch = config(multi, "lora", "from-torch", backend="auto")
    commands.append(f"train --config {from_torch} --resume {torch_checkpoint}")
    out["multi"] = (multi, mlx_launch(multi, commands, processes=2))
    os.environ["KILL_AT_STEP"] = str(KILL_AT_STEP)
    try:
        mlx_launch(multi, [f"train --config {killed}"], processes=2, expect_kill=True)
    finally:
        del os.environ["KILL_AT_STEP"]
    out["killed"] = sorted(p.name for p in (multi / "killed" / "checkpoints").iterdir())
    out["resumed"] = mlx_launch(multi, [f"train --config {killed} --resume"], processes=2)

    # One PyTorch process continues the 2-process MLX LoRA run from its step 3.
    to_torch = config(root, "lora", "to-torch", backend="torch", max_steps=4)
    mlx_checkpoint = multi / "lora" / "checkpoints" / "step-000003"
    out["to-torch"] = mlx_launch(root, [f"train --config {to_torch} --resume {mlx_checkpoint}"], processes=1)
    out["root"] = root
    return out


def test_two_mlx_processes_end_with_the_weights_of_one(mlx_runs):
    # Every element within lr / 10, 99.9 % within CLOSE: the two halves' gradients are summed in another
    # order than one process sums them, and AdamW divides by sqrt(v), so an element whose gradient is
    # about 0 can move by a sizeable share of lr on float rounding alone (seen: 1 of 8,192 at lr / 49).
    for name in RUNS:
        assert_trains_like_one_process(mlx_runs["single"][0], mlx_runs["multi"][0], name, worst=1 / 10)


def test_two_mlx_processes_record_the_metrics_and_samples_of_one(mlx_runs):
    for name in RUNS:
        assert_records_like_one_process(mlx_runs["single"][0] / name, mlx_runs["multi"][0] / name)
    folder, stdout = mlx_runs["multi"]
    ranks = [(folder / f"scored-rank{r}.txt").read_text().split() for r in (0, 1)]
    assert ranks[0][:4] and ranks[1][:4] and not set(ranks[0][:4]) & set(ranks[1][:4])  # each scored its half
    assert "mlx.launch (ring): 2 processes, 2 of the 4 prompts of each step on each; gradients summed" in stdout
    assert stdout.count("step    3/3") == len(RUNS) + 1  # rank 1 prints nothing


def test_a_killed_two_process_run_resumes_to_the_uninterrupted_one(mlx_runs):
    folder = mlx_runs["multi"][0]
    assert mlx_runs["killed"] == ["step-000001", "step-000002"]  # killed during step 3, before its checkpoint
    assert f"resuming from {folder / 'killed' / 'checkpoints' / 'step-000002'} at step 2" in mlx_runs["resumed"]
    for file in ("adapter_model.safetensors", "optimizer.safetensors"):
        straight = load_tensors(folder / "lora" / "checkpoints" / "step-000003" / file)
        resumed = load_tensors(folder / "killed" / "checkpoints" / "step-000003" / file)
        for key in straight:
            np.testing.assert_array_equal(resumed[key], straight[key], err_msg=f"{file}: {key}")
    # killed while scoring step 3 (distributed_worker.LetterRewards): its samples were logged once, after the resume
    logged = [json.loads(line)["step"] for line in (folder / "killed" / "samples.jsonl").read_text().splitlines()]
    assert logged.count(KILL_AT_STEP) == 8
    records = read_metrics(folder / "killed" / "metrics.jsonl")
    assert [r["step"] for r in records][-1] == 3
    assert records[-1]["reward_mean"] == read_metrics(folder / "lora" / "metrics.jsonl")[-1]["reward_mean"]
    assert samples(folder / "killed")[-8:] == samples(folder / "lora")[-8:]


def test_two_mlx_processes_resume_a_pytorch_checkpoint_as_one_does(mlx_runs):
    single, multi = mlx_runs["single"][0], mlx_runs["multi"][0]
    assert_records_like_one_process_from(single / "from-torch", multi / "from-torch", steps=[3])
    want = load_tensors(single / "from-torch" / "checkpoints" / "step-000003" / "adapter_model.safetensors")
    got = load_tensors(multi / "from-torch" / "checkpoints" / "step-000003" / "adapter_model.safetensors")
    for key in want:
        np.testing.assert_allclose(got[key], want[key], rtol=0, atol=RUNS["lora"][2] / 50, err_msg=key)


def test_one_pytorch_process_resumes_a_two_process_mlx_checkpoint(mlx_runs, tmp_path):
    from rlaif_mlx.backends.torch import create
    from rlaif_mlx.config import load_config

    root = mlx_runs["root"]
    checkpoint = mlx_runs["multi"][0] / "lora" / "checkpoints" / "step-000003"
    assert f"resuming from {checkpoint} at step 3" in mlx_runs["to-torch"]
    assert [r["step"] for r in read_metrics(root / "to-torch" / "metrics.jsonl")] == [4]
    # What PyTorch loaded is what the MLX processes saved: loaded and saved again, the same tensors.
    config = load_config(root / "to-torch.yaml")
    backend = create(config.model, config.training, seed=0, total_steps=4)
    backend.load(checkpoint)
    backend.save(tmp_path / "again")
    for file in ("adapter_model.safetensors", "optimizer.safetensors"):
        again = load_tensors(tmp_path / "again" / file)
        for key, tensor in load_tensors(checkpoint / file).items():
            np.testing.assert_array_equal(again[key], tensor, err_msg=f"{file}: {key}")


def assert_records_like_one_process_from(single: Path, multi: Path, *, steps: list[int]) -> None:
    """``assert_records_like_one_process`` for runs resumed from a checkpoint: only ``steps`` recorded."""
    want, got = read_metrics(single / "metrics.jsonl"), read_metrics(multi / "metrics.jsonl")
    assert [r["step"] for r in got] == [r["step"] for r in want] == steps
    for a, b in zip(want, got, strict=True):
        assert b["reward_mean"] == a["reward_mean"] and b["completion_len_mean"] == a["completion_len_mean"]
        for key in ("loss", "kl", "grad_norm"):
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-7), key
    assert samples(multi) == samples(single)
