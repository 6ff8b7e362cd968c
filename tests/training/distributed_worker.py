"""Runs ``rlaif-mlx`` commands one after another with a toy reward (torchrun or mlx.launch launches it).

Usage: ``distributed_worker.py train --config A.yaml --- train --config B.yaml --resume``.

For ``tests/training/test_distributed.py`` and ``test_mlx_distributed.py``. The reward is the fraction of a
completion's characters that are letters: a pure function of the text, so a
sharded run and a single process score the same samples the same, and the
tiny random model's groups have spread to learn from (the offline graders
would score all of its output 0). Each process also notes
which completions it scored in ``scored-rank<R>.txt`` beside the run, so the
test can see the prompts were split. With ``KILL_AT_STEP=N`` in the environment, rank 0
SIGKILLs its whole process group (the launcher and every process) while scoring step N.

One more command, ``uneven-shares MODEL OUT``, trains the FSDP backend directly
on shares of different sizes (``uneven_shares``).
"""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

import numpy as np

from rlaif_mlx.backends.base import Completion, LossSettings, SequenceBatch, TrainBatch
from rlaif_mlx.cli import main
from rlaif_mlx.rewards import pipeline as rewards
from rlaif_mlx.rl.objective import aggregation_weights

UNEVEN_LR = 1e-2
UNEVEN_ROWS = (("def add(a, b):", " return a + b"), ("x = ", "42"), ("print(", "'hi')"), ("import os", "\nos.sep"))


class LetterRewards:
    """Stands in for ``rewards.RewardPipeline`` (same constructor, same ``score``)."""

    def __init__(self, config, *, teacher=None) -> None:
        self.teacher = None
        self.rank = os.environ.get("RANK", os.environ.get("MLX_RANK", "0"))
        self.log = Path(os.environ["SCORED_LOG_DIR"]) / f"scored-rank{self.rank}.txt"
        self.calls = 0

    def score(self, items):
        self.calls += 1  # one call per step
        if self.rank == "0" and str(self.calls) == os.environ.get("KILL_AT_STEP"):
            os.killpg(os.getpgrp(), signal.SIGKILL)  # the machine dies: every process of the launch, mid-step
        with self.log.open("a") as f:
            f.write("".join(f"{task.id}\n" for _, task, _ in items))
        out = {}
        for uid, _, text in items:
            value = sum(ch.isalpha() for ch in text) / max(len(text), 1)
            out[uid] = rewards.RewardResult(value, {"letters": value})
        return out


def run(argv: list[str]) -> int:
    """Each ``---``-separated command in turn, ``LetterRewards`` in place of the graders.

    Under torchrun or mlx.launch the processes are joined here, once: the runs share the group
    (``train`` leaves a group it did not start), which spares a launch per run.
    """
    from rlaif_mlx.training.distributed import context_from_env, init_from_env

    original = rewards.RewardPipeline
    rewards.RewardPipeline = LetterRewards
    launched = context_from_env()
    dist = init_from_env(device="cpu", backend=launched.engine) if launched.enabled else launched
    try:
        commands = " ".join(argv).split(" --- ")
        return max(_run_one(command.split()) for command in commands)
    finally:
        rewards.RewardPipeline = original
        dist.barrier()  # gloo aborts a process that leaves while a peer still talks to it
        dist.close()


def _run_one(args: list[str]) -> int:
    if args[0] == "uneven-shares":
        return uneven_shares(*args[1:])
    return main(args + ["--no-dashboard"])


def uneven_backend(model_path: str, *, fsdp: bool):
    """A LoRA ``TorchBackend`` on the CPU with micro-batches of one row."""
    from rlaif_mlx.backends.torch import create
    from rlaif_mlx.config import ModelConfig, TrainingConfig

    model = ModelConfig(base_model=model_path, lora_r=4, torch={"device": "cpu", "fsdp": fsdp})
    training = TrainingConfig(micro_batch_size=1, learning_rate=UNEVEN_LR, lr_scheduler_type="constant")
    return create(model, training, seed=0, total_steps=3)


def uneven_batch(backend) -> TrainBatch:
    """Four rows (``UNEVEN_ROWS``), advantages of both signs, token weights normalised over all four."""
    encode = backend.tokenizer.encode
    completions = [
        Completion(f"{i}-0", i, 0, tuple(encode(p)), tuple(encode(c)), (), c, "length")
        for i, (p, c) in enumerate(UNEVEN_ROWS)
    ]
    sequences = SequenceBatch.from_completions(completions, pad_id=backend.pad_id)
    weights = aggregation_weights(sequences.loss_mask, aggregation="token_mean").astype(np.float32)
    return TrainBatch(sequences, np.array([1.0, -0.5, 0.25, -2.0], dtype=np.float32), weights)


def uneven_shares(model_path: str, out: str) -> int:
    """FSDP on shares of 3 rows and 1 (micro-batches of one): rank 1 pads with empty forwards and backwards.

    Two steps, a rebase of the reference (the adapters folded into the sharded
    base weights, A drawn afresh), one more step. Writes each rank's reference
    log-probs (``uneven-logp-rank<R>.npy``), rank 0's pre-clip gradient norms
    (``uneven-norms.json``) and a checkpoint (``uneven/``); the test compares
    them with ``uneven_steps`` in one process on all four rows.
    """
    import torch.distributed as dist

    rank, out = dist.get_rank(), Path(out)
    backend = uneven_backend(model_path, fsdp=True)
    batch = uneven_batch(backend)
    mine = slice(0, 3) if rank == 0 else slice(3, 4)
    local = TrainBatch(batch.sequences.rows(mine), batch.advantages[mine], batch.token_weights[mine])
    np.save(out / f"uneven-logp-rank{rank}.npy", backend.logprobs(local.sequences, reference=True))
    norms = uneven_steps(backend, local)
    backend.save(out / "uneven" if rank == 0 else None)
    if rank == 0:
        (out / "uneven-norms.json").write_text(json.dumps(norms))
    return 0


def uneven_steps(backend, batch: TrainBatch) -> list[float]:
    """Two steps, a rebase, a step; the pre-clip gradient norms."""
    norms = [backend.train_step(batch, loss=LossSettings()).grad_norm for _ in range(2)]
    backend.rebase_reference()
    return norms + [backend.train_step(batch, loss=LossSettings()).grad_norm]


if __name__ == "__main__":
    sys.exit(run(sys.argv[1:]))
