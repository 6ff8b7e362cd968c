"""Data parallelism under torchrun: two CPU processes (gloo) train exactly what one process trains.

The end-to-end tests launch ``tests/distributed_worker.py`` (``rlaif-mlx train``
with a reward computed from the text) under ``torch.distributed.run
--nproc_per_node 2`` and compare its checkpoints, metrics and samples with a
single process given the same config and global batch: with whole replicas
(DDP), and with the weights sharded over the two (``model.torch.fsdp``).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import yaml

from rlaif_mlx.cli import main
from rlaif_mlx.data.tasks import Task, TaskSet
from rlaif_mlx.monitor.metrics import read_metrics
from rlaif_mlx.training.distributed import DistContext, DistributedSetupError, context_from_env

TESTS = Path(__file__).parent
# Float32 sums run in another order (micro-batches in a process, then across processes) and batches are
# padded to other widths: gradients differ by ~1e-7 relative. Almost every weight then agrees within
# CLOSE; AdamW divides each gradient element by its own running magnitude, so an element whose gradient
# is near zero can turn that into a visible part of one step (measured: 15 of 427k weights above 1e-6,
# at most 2e-5 = lr / 100). Hence: every weight within lr / 50, and 99.9% within CLOSE. A real
# difference (a missing or doubled shard) moves weights by whole steps of about lr.
CLOSE = 1e-6
# With sharded weights (FSDP) every forward takes whole rows: the shared-prompt forward
# (backends/torch_forward.py) calls the decoder and the head directly, which would skip FSDP's hooks. Its
# log-probs differ from one process's by ~1e-6, which Adam amplifies as above (measured, full fine-tune:
# 5 of 427k weights above 1e-5, at most 7e-5 = lr / 30; one process forwarding whole rows like FSDP comes
# within 7e-6 of it). Hence every weight within lr / 20 for sharded runs. The runs train at their sampling
# temperature, 0.7, where a log-prob difference is 1/0.7 larger in the logits: measured, LoRA, 13 of 7,168
# adapter weights above CLOSE (at most 1.2e-5 = lr / 800; 2 at temperature 1). Hence 99.5% within CLOSE
# for sharded runs; a missing or doubled shard still moves nearly every weight by about lr.
SHARDED_WORST = 1 / 20
SHARDED_CLOSE_SHARE = 0.995
RUNS = {  # name -> (LoRA?, micro-batch, learning rate): micro-batches that match the shards, and that do not
    "lora": (True, 2, 1e-2),
    "full": (False, 8, 2e-3),
}


# ---- the pieces, in one process ----------------------------------------------------


def test_context_comes_from_torchruns_variables():
    assert context_from_env({}) == DistContext()
    ctx = context_from_env({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1"})
    assert (ctx.rank, ctx.world_size, ctx.local_rank, ctx.is_main, ctx.enabled) == (3, 4, 1, False, True)
    with pytest.raises(DistributedSetupError, match="torchrun: rank 4 is not in 0..3"):
        context_from_env({"RANK": "4", "WORLD_SIZE": "4"})


def test_each_process_takes_a_contiguous_share_of_prompts_and_rows():
    second = DistContext(rank=1, world_size=2)
    assert second.shard(list("abcd")) == ["c", "d"]
    rows = np.arange(16).reshape(8, 2)  # 4 prompts x G=2, prompt-major
    assert second.local_rows(rows, 4).tolist() == rows[4:].tolist()
    assert DistContext().shard(list("abc")) == list("abc")
    with pytest.raises(DistributedSetupError, match="batch_size 6 does not split over 4 processes"):
        DistContext(rank=0, world_size=4).check_batch_size(6)


class _TwinRanks(DistContext):
    """Rank 0 of two whose peer holds exactly what it holds (no process group needed)."""

    def all_gather(self, value):
        return [value, value]


class _Teacher:
    def __init__(self, spent_usd: float, judged: int) -> None:
        from rlaif_mlx.teachers.cost import CostLedger
        from rlaif_mlx.teachers.judge import BatchStats

        self.ledger = CostLedger(price=(1.0, 1.0), budget_usd=0.8)
        self.ledger.load_state_dict({"spent_usd": spent_usd, "calls": judged})
        self.last_batch = BatchStats(requests=judged, calls=judged, latencies_s=[0.1] * judged, cost_usd=spent_usd)
        self.judged = judged

    def state_dict(self):
        return {"ledger": self.ledger.state_dict(), "failed_batches": 1, "requests_judged": self.judged}

    def check_budget(self, requests):
        self.ledger.check(reserve_usd=self.ledger.spent_usd / self.judged * requests)


def test_the_teacher_budget_and_ledger_count_every_process():
    from rlaif_mlx.teachers.cost import BudgetExceeded

    teacher, twins = _Teacher(spent_usd=0.3, judged=6), _TwinRanks(rank=0, world_size=2)
    DistContext().check_budget(teacher, 6)  # alone: $0.30 spent + $0.30 expected <= $0.80
    with pytest.raises(BudgetExceeded, match=r"\$0.60 spent of \$0.80"):
        twins.check_budget(teacher, 6)  # together: $0.60 spent + $0.30 expected > $0.80
    saved = twins.teacher_state(teacher)
    assert saved["ledger"]["spent_usd"] == pytest.approx(0.6) and saved["requests_judged"] == 12
    assert saved["failed_batches"] == 1  # a streak, not a count: the longest one
    assert _TwinRanks(rank=1, world_size=2).teacher_share(saved)["ledger"] == {}  # rank 0 carries the spend
    metrics = twins.teacher_metrics(teacher)
    assert metrics["teacher/calls"] == 12 and metrics["teacher/spent_usd"] == pytest.approx(0.6)


def test_a_failure_on_one_process_is_raised_on_every_process():
    from rlaif_mlx.teachers.cost import BudgetExceeded

    class PeerFails(DistContext):
        def all_gather(self, value):
            return [value, (BudgetExceeded, "teacher budget reached")]

    with pytest.raises(BudgetExceeded, match="teacher budget reached"):
        PeerFails(rank=0, world_size=2).run_together(lambda: 42)
    assert _TwinRanks(rank=0, world_size=2).run_together(lambda: 42) == 42


def test_a_prompts_samples_do_not_depend_on_the_other_prompts_of_the_call(tmp_path, tiny_model_path):
    """Per-prompt seeds: the second half of a batch, sampled alone, gives what the whole batch gave it."""
    from rlaif_mlx.backends.torch import create
    from rlaif_mlx.config import load_config
    from rlaif_mlx.training.trainer import Trainer

    tasks = [Task(id=f"t{i}", prompt=f"Write f{i // 2}(x).", entry_point="f") for i in range(4)]  # prompts twice
    cfg = load_config(write_config(tmp_path, tiny_model_path, "lora"))
    backend = create(cfg.model, cfg.training, seed=0, total_steps=1)
    trainer = Trainer(cfg, backend=backend, train=TaskSet(tasks, 0, "test"), rewards=None, output_dir=tmp_path)
    whole = trainer.sample(tasks)
    half = trainer.sample(tasks[2:], first_index=2)
    assert [c.completion_ids for c in half] == [c.completion_ids for c in whole[4:]]
    # the same prompt at another place in the batch draws other samples
    assert [c.completion_ids for c in whole[:2]] != [c.completion_ids for c in whole[2:4]]


@pytest.mark.parametrize("kind", ["torch", "mlx"])
def test_both_backends_sample_each_prompt_from_its_own_seed(tiny_model_path, kind):
    import importlib

    from rlaif_mlx.backends.base import SamplingParams
    from rlaif_mlx.config import ModelConfig, TrainingConfig

    pytest.importorskip("mlx_lm" if kind == "mlx" else "transformers")
    module = importlib.import_module(f"rlaif_mlx.backends.{kind}")
    backend = module.create(
        ModelConfig(base_model=str(tiny_model_path), lora_r=4), TrainingConfig(), seed=0, total_steps=1
    )
    prompts = [backend.tokenizer.encode(t, add_special_tokens=False) for t in ("def f(x):", "a much longer prompt =")]
    params = SamplingParams(max_new_tokens=6, seed=(11, 12))
    whole = backend.sample(prompts, n=3, params=params)
    alone = backend.sample(prompts[1:], n=3, params=SamplingParams(max_new_tokens=6, seed=(12,)))
    assert [c.completion_ids for c in alone] == [c.completion_ids for c in whole[3:]]
    with pytest.raises(ValueError, match="2 seeds for 1 prompts"):
        backend.sample(prompts[:1], n=1, params=params)


def test_mlx_under_torchrun_is_a_one_line_error(tmp_path, tiny_model_path, monkeypatch, capsys):
    """torchrun joins PyTorch processes; MLX's are joined by mlx.launch (``test_mlx_distributed.py``)."""
    path = write_config(tmp_path, tiny_model_path, "lora", backend="mlx")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    assert main(["train", "--config", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "torchrun started 2 processes for the torch backend" in err
    assert "set backend: torch, or start the mlx backend with mlx.launch" in err


def test_a_batch_that_does_not_split_is_a_one_line_error(tmp_path, tiny_model_path, monkeypatch, capsys):
    path = write_config(tmp_path, tiny_model_path, "lora")
    monkeypatch.setenv("WORLD_SIZE", "3")
    monkeypatch.setenv("RANK", "0")
    assert main(["train", "--config", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "training.batch_size 4 does not split over 3 processes" in err


# ---- two processes against one -------------------------------------------------------


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_model_path):
    """The same configs trained by two torchrun processes and by one; plus a 2-process stop-and-resume."""
    root = tmp_path_factory.mktemp("distributed")
    out = {}
    for side in ("single", "multi"):
        folder = root / side
        folder.mkdir()
        paths = {name: write_config(folder, tiny_model_path, name) for name in RUNS}
        commands = [f"train --config {paths[name]}" for name in RUNS]
        if side == "multi":  # stopped after step 2, resumed to 3: every process loads the checkpoint
            resumed = write_config(folder, tiny_model_path, "lora", name="resumed", max_steps=2)
            commands += [f"train --config {resumed}", f"train --config {resumed} --max-steps 3 --resume"]
        out[side] = (folder, launch(folder, commands, processes=2 if side == "multi" else 1))
    return out


def test_two_processes_end_with_the_weights_of_one(runs):
    for name in RUNS:
        assert_trains_like_one_process(runs["single"][0], runs["multi"][0], name)


def test_two_processes_record_the_metrics_and_samples_of_one(runs):
    for name in RUNS:
        assert_records_like_one_process(runs["single"][0] / name, runs["multi"][0] / name)


def test_each_process_scores_its_half_and_only_rank_0_speaks(runs):
    folder, stdout = runs["multi"]
    ranks = [(folder / f"scored-rank{r}.txt").read_text().split() for r in (0, 1)]
    assert len(ranks[0]) == len(ranks[1]) > 0
    # Both configs' runs (and the stop-and-resume) scored what one process scored for them, split in two.
    single = (runs["single"][0] / "scored-rank0.txt").read_text().split()
    assert Counter(ranks[0] + ranks[1]) == Counter(single) + Counter(_resumed_prompts(folder))
    assert stdout.count("step    3/3") == len(RUNS) + 1  # rank 1 prints nothing
    assert "torchrun: 2 processes, 2 of the 4 prompts of each step on each" in stdout
    for name in (*RUNS, "resumed"):
        assert [p.name for p in (folder / name / "checkpoints").iterdir()] == ["step-000003"]


def test_a_resumed_two_process_run_continues_exactly(runs):
    folder = runs["multi"][0]
    straight = load_tensors(folder / "lora" / "checkpoints" / "step-000003" / "adapter_model.safetensors")
    resumed = load_tensors(folder / "resumed" / "checkpoints" / "step-000003" / "adapter_model.safetensors")
    for key in straight:
        np.testing.assert_array_equal(resumed[key], straight[key], err_msg=key)
    assert [r["reward_mean"] for r in read_metrics(folder / "resumed" / "metrics.jsonl")] == [
        r["reward_mean"] for r in read_metrics(folder / "lora" / "metrics.jsonl")
    ]


# ---- FSDP: two processes with sharded weights against one ------------------------------


@pytest.fixture(scope="module")
def fsdp_runs(runs, tiny_model_path) -> tuple[Path, str]:
    """Two torchrun processes with ``model.torch.fsdp: true``: the ``RUNS`` configs (LoRA with a periodic
    evaluation at steps 2 and 3), the full fine-tune resumed from its step 2 in another folder, a LoRA run
    begun on whole replicas and resumed sharded, and ``uneven-shares`` (``distributed_worker.uneven_shares``)."""
    folder = runs["single"][0].parent / "fsdp"
    folder.mkdir()
    sharded = {"model": {"torch": {"fsdp": True}}}
    lora = write_config(
        folder,
        tiny_model_path,
        "lora",
        **sharded,
        data={"eval_file": str(folder / "tasks.jsonl")},
        eval={"every_steps": 2, "num_samples": 2, "max_tasks": 3, "max_new_tokens": 8},
    )
    every_step = {"save_steps": 1, "save_total_limit": 3}  # step 2 resumes in another folder
    full = write_config(folder, tiny_model_path, "full", **sharded, training=every_step)
    resumed = write_config(folder, tiny_model_path, "full", name="full-resumed", **sharded, training=every_step)
    whole = write_config(
        folder, tiny_model_path, "lora", name="whole-half", output="mixed", max_steps=2, training={"save_steps": 1}
    )
    half = write_config(
        folder, tiny_model_path, "lora", name="sharded-half", output="mixed", **sharded, training={"save_steps": 1}
    )
    commands = [
        f"train --config {lora}",
        f"train --config {full}",
        f"train --config {resumed} --resume {folder / 'full' / 'checkpoints' / 'step-000002'}",
        f"train --config {whole}",
        f"train --config {half} --resume",
        f"uneven-shares {tiny_model_path} {folder}",
    ]
    return folder, launch(folder, commands, processes=2)


def test_sharded_processes_end_with_the_weights_of_one(runs, fsdp_runs):
    for name in RUNS:
        assert_trains_like_one_process(
            runs["single"][0], fsdp_runs[0], name, worst=SHARDED_WORST, share=SHARDED_CLOSE_SHARE
        )


def test_sharded_processes_sample_and_record_what_one_does(runs, fsdp_runs):
    for name in RUNS:
        assert_records_like_one_process(runs["single"][0] / name, fsdp_runs[0] / name)
    # Rank 0 evaluated alone on gathered weights, at step 2 (training went on after it) and at the end.
    evaluated = [r["step"] for r in read_metrics(fsdp_runs[0] / "lora" / "metrics.jsonl") if "eval/reward_mean" in r]
    assert evaluated == [2, 3]
    assert "gradients summed; weights, gradients and AdamW state sharded (FSDP)" in fsdp_runs[1]


def test_a_sharded_checkpoint_has_the_layout_of_one_process(runs, fsdp_runs):
    for name in RUNS:
        want = runs["single"][0] / name / "checkpoints" / "step-000003"
        got = fsdp_runs[0] / name / "checkpoints" / "step-000003"
        assert sorted(p.name for p in got.iterdir()) == sorted(p.name for p in want.iterdir())
        for file in want.glob("*.safetensors"):
            a, b = load_tensors(file), load_tensors(got / file.name)
            assert {k: (t.shape, t.dtype) for k, t in b.items()} == {k: (t.shape, t.dtype) for k, t in a.items()}
        for file in want.glob("*.json"):  # backend_state.json (RNG state included), PEFT's and HF's configs
            assert _settings(got / file.name) == _settings(file), (name, file.name)
    assert "lm_head.weight" not in load_tensors(
        fsdp_runs[0] / "full" / "checkpoints" / "step-000003" / "model.safetensors"
    )  # tied to the embedding: saved once


def test_a_resumed_sharded_run_continues_exactly(fsdp_runs):
    folder = fsdp_runs[0]
    for file in ("model.safetensors", "optimizer.safetensors"):
        straight = load_tensors(folder / "full" / "checkpoints" / "step-000003" / file)
        resumed = load_tensors(folder / "full-resumed" / "checkpoints" / "step-000003" / file)
        assert resumed.keys() == straight.keys()
        for key in straight:
            np.testing.assert_array_equal(resumed[key], straight[key], err_msg=f"{file}: {key}")
    # Step 3 trains on the batch step 2 sampled ahead, which the checkpoint carried.
    (resumed,) = read_metrics(folder / "full-resumed" / "metrics.jsonl")
    straight = read_metrics(folder / "full" / "metrics.jsonl")[-1]
    assert resumed["sampled_ahead"] == straight["sampled_ahead"] == 1
    assert (resumed["step"], resumed["reward_mean"], resumed["loss"]) == (3, straight["reward_mean"], straight["loss"])


def test_a_sharded_run_resumes_a_checkpoint_of_whole_replicas(runs, fsdp_runs):
    assert_trains_like_one_process(
        runs["single"][0], fsdp_runs[0], "lora", run="mixed", worst=SHARDED_WORST, share=SHARDED_CLOSE_SHARE
    )


def test_one_process_and_mlx_load_a_sharded_checkpoint(fsdp_runs, tmp_path, caplog):
    """Loaded and saved again in one process (where ``fsdp: true`` only warns), on either backend: the same files."""
    import importlib
    import importlib.util

    from rlaif_mlx.config import load_config

    kinds = ["torch"] + (["mlx"] if importlib.util.find_spec("mlx_lm") else [])
    for kind in kinds:
        module = importlib.import_module(f"rlaif_mlx.backends.{kind}")
        for name in RUNS:
            checkpoint = fsdp_runs[0] / name / "checkpoints" / "step-000003"
            config = load_config(fsdp_runs[0] / f"{name}.yaml")
            backend = module.create(config.model, config.training, seed=0, total_steps=3)
            backend.load(checkpoint)
            backend.save(tmp_path / kind / name)
            for file in checkpoint.glob("*.safetensors"):
                again = load_tensors(tmp_path / kind / name / file.name)
                for key, tensor in load_tensors(file).items():
                    np.testing.assert_array_equal(again[key], tensor, err_msg=f"{kind} {name}: {key}")
    assert "this run has one process, which holds the whole model" in caplog.text


def test_uneven_shares_run_as_many_collectives_and_train_what_one_process_trains(fsdp_runs, tiny_model_path, tmp_path):
    """Rank 0 had 3 micro-batches, rank 1 had 1 and ran 2 empty ones: the result is one process's on all 4 rows,
    through a rebase too (the fresh adapter A drawn as one process draws it, not per shard)."""
    from distributed_worker import UNEVEN_LR, uneven_backend, uneven_batch, uneven_steps

    folder = fsdp_runs[0]
    whole = uneven_backend(str(tiny_model_path), fsdp=False)
    batch = uneven_batch(whole)
    want = whole.logprobs(batch.sequences, reference=True)
    for rank, rows in ((0, slice(0, 3)), (1, slice(3, 4))):
        got = np.load(folder / f"uneven-logp-rank{rank}.npy")
        np.testing.assert_allclose(got, want[rows, : got.shape[1]], atol=1e-5)
        assert not want[rows, got.shape[1] :].any()
    norms = uneven_steps(whole, batch)
    assert json.loads((folder / "uneven-norms.json").read_text()) == pytest.approx(norms, rel=1e-5)
    whole.save(tmp_path / "whole")
    for file in ("adapter_model.safetensors", "reference_model.safetensors", "optimizer.safetensors"):
        want, got = (load_tensors(p / file) for p in (tmp_path / "whole", folder / "uneven"))
        assert_close_weights(want, got, atol=UNEVEN_LR / 50, label=file)  # rows share no prompt: whole rows here too
    adapters = load_tensors(tmp_path / "whole" / "adapter_model.safetensors")
    assert max(np.abs(t).max() for k, t in adapters.items() if "lora_B" in k) > UNEVEN_LR / 2  # B moved from 0


# ---- helpers ---------------------------------------------------------------------------


def launch(folder: Path, commands: list[str], *, processes: int) -> str:
    """Runs ``rlaif-mlx`` commands in turn in ``tests/distributed_worker.py``: under torchrun with
    ``processes`` > 1, else in one plain process. Returns its stdout; fails the test on a non-zero exit."""
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
        "SCORED_LOG_DIR": str(folder),
        "PYTHONPATH": os.pathsep.join([str(TESTS.parent), str(TESTS), os.environ.get("PYTHONPATH", "")]),
    }
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        env.pop(var, None)
    launcher = (
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            str(processes),
            "--master_addr",
            "127.0.0.1",
            "--master_port",
            str(free_port()),
        ]
        if processes > 1
        else [sys.executable]
    )
    done = subprocess.run(
        [*launcher, str(TESTS / "distributed_worker.py"), *" --- ".join(commands).split()],
        env=env,
        capture_output=True,
        text=True,
        timeout=1800,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout


def assert_trains_like_one_process(
    single: Path, multi: Path, name: str, *, run: str | None = None, worst: float = 1 / 50, share: float = 0.999
) -> None:
    """Run ``run`` (default ``name``) in folder ``multi`` ends step 3 with the weights of run ``name`` in
    ``single`` (each weight within ``worst`` x lr, a ``share`` of them within ``CLOSE``), and those weights
    moved far more than the tolerance."""
    lora, _, lr = RUNS[name]
    file = "adapter_model.safetensors" if lora else "model.safetensors"
    want = load_tensors(single / name / "checkpoints" / "step-000003" / file)
    got = load_tensors(multi / (run or name) / "checkpoints" / "step-000003" / file)
    assert_close_weights(want, got, atol=worst * lr, label=run or name, share=share)
    if lora:  # B starts at 0: the adapters moved far more than the tolerance
        moved = max(np.abs(t).max() for k, t in want.items() if "lora_B" in k)
    else:
        base = load_tensors(
            Path(yaml.safe_load((single / f"{name}.yaml").read_text())["model"]["base_model"]) / "model.safetensors"
        )
        moved = max(np.abs(want[k] - base[k]).max() for k in want if k in base)
    assert moved > lr, (name, moved)


def assert_close_weights(
    want: dict[str, np.ndarray], got: dict[str, np.ndarray], *, atol: float, label: str, share: float = 0.999
) -> None:
    """The same tensors: every element within ``atol``, and a ``share`` of them within ``CLOSE``."""
    assert want.keys() == got.keys()
    for key in want:
        np.testing.assert_allclose(got[key], want[key], rtol=0, atol=atol, err_msg=f"{label}: {key}")
    diffs = np.concatenate([np.abs(got[k] - want[k]).ravel() for k in want])
    assert (diffs <= CLOSE).mean() >= share, (label, np.sort(diffs)[-10:])


def assert_records_like_one_process(single: Path, multi: Path) -> None:
    """Run folder ``multi`` recorded the metrics and samples of run folder ``single``, from rank 0 alone."""
    want, got = read_metrics(single / "metrics.jsonl"), read_metrics(multi / "metrics.jsonl")
    assert [r["step"] for r in got] == [1, 2, 3]  # one writer: rank 0
    for a, b in zip(want, got, strict=True):
        assert b["reward_mean"] == a["reward_mean"] and b["reward_std"] == a["reward_std"]
        assert b["completion_len_mean"] == a["completion_len_mean"]
        for key in ("loss", "kl", "kl_coef", "grad_norm", "clip_fraction"):
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-7), (multi.name, key)
    # the whole batch, numbered as one process numbers it (gathered from both shards)
    assert samples(multi) == samples(single)


def write_config(
    folder: Path,
    model_path: Path,
    kind: str,
    *,
    name: str | None = None,
    backend: str = "torch",
    max_steps: int = 3,
    output: str | None = None,
    **sections: dict,
) -> Path:
    """A 3-step run, B=4 prompts x G=2 samples, 8 new tokens; ``kind`` picks a ``RUNS`` entry.

    Written to ``folder/<name>.yaml``, writing into ``folder/<output or name>``; ``sections``
    (e.g. ``model={"torch": {"fsdp": True}}``) are merged into the config's sections of those names.
    """
    lora, micro_batch, lr = RUNS[kind]
    name = name or kind
    tasks = folder / "tasks.jsonl"
    tasks.write_text(
        "".join(
            json.dumps({"id": f"t{i}", "prompt": f"Write f{i}(x) returning {i}*x.", "entry_point": f"f{i}"}) + "\n"
            for i in range(6)
        )
    )
    config = {
        "seed": 3,
        "backend": backend,
        "output_dir": str(folder / (output or name)),
        "model": {"base_model": str(model_path), "use_lora": lora, "lora_r": 4},
        "data": {"train_file": str(tasks)},
        "training": {
            "max_steps": max_steps,
            "batch_size": 4,
            "micro_batch_size": micro_batch,
            "learning_rate": lr,
            "lr_scheduler_type": "constant",
            "save_steps": 1 if name == "resumed" else 3,
            "save_total_limit": 1,
        },
        "rlaif": {
            "num_samples_per_prompt": 2,
            "max_new_tokens": 8,
            "generation_temperature": 0.7,
            "kl_penalty": 0.01,
            "sample_ahead": kind == "full",
        },  # each process samples its next share
        "logging": {"dashboard": False},
    }
    for section, values in sections.items():
        config[section] = {**config.get(section, {}), **values}
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def load_tensors(path: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    return load_file(str(path))


def samples(run: Path) -> list[tuple]:
    return [
        (s["step"], s["uid"], s["task_id"], s["completion"], s["reward"])
        for s in map(json.loads, (run / "samples.jsonl").read_text().splitlines())
    ]


def _settings(file: Path) -> dict:
    """A JSON file's contents; PEFT writes its target modules from a set, in any order; every run has its own id."""
    settings = json.loads(file.read_text())
    settings.pop("run_id", None)
    if isinstance(settings.get("target_modules"), list):
        settings["target_modules"] = sorted(settings["target_modules"])
    return settings


def _resumed_prompts(folder: Path) -> list[str]:
    """What the stop-and-resume run scored: the lora run's prompts again (same seed, same batches)."""
    return [s[2] for s in samples(folder / "lora")]
