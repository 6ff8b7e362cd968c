"""The PyTorch backend's training arithmetic: micro-batches, accumulated gradients, sums across processes, AdamW.

``TorchBackend.train_step`` and ``gradients`` call ``accumulate`` (forward +
backward per micro-batch, then under torchrun the sum over the processes) and
``clip``; ``logprobs`` shares ``micro_batches`` with them, because under FSDP
every forward is collective. Its MLX twin is ``backends/mlx_train.py``.
"""

from __future__ import annotations

import math
from types import ModuleType
from typing import Any

import numpy as np
import torch

from rlaif_mlx.backends import torch_forward as fwd
from rlaif_mlx.backends import torch_ops as ops
from rlaif_mlx.backends.base import LossSettings, SequenceBatch, TrainBatch
from rlaif_mlx.backends.common import MicroBatchStats
from rlaif_mlx.config import TrainingConfig
from rlaif_mlx.rl import objective


def adamw(params: list, training: TrainingConfig) -> torch.optim.Optimizer:
    """AdamW over ``params`` with the ``training`` section's settings; one fused kernel where torch has it."""
    settings = {
        "lr": training.learning_rate,
        "betas": (training.adam_beta1, training.adam_beta2),
        "weight_decay": training.weight_decay,
    }
    try:  # the fused kernel exists for some devices and dtypes only
        return torch.optim.AdamW(params, fused=True, **settings)
    except RuntimeError:
        return torch.optim.AdamW(params, **settings)


def micro_batches(n: int, size: int, *, fsdp: ModuleType | None, device: str) -> list[slice | None]:
    """The micro-batches of ``n`` rows; under FSDP padded with None up to the most any process has.

    A sharded forward or backward is collective, so every process must run
    as many. The shares of a step are the same size; this does not rely on it.
    """
    parts: list[slice | None] = [slice(start, start + size) for start in range(0, n, size)]
    if fsdp is not None:
        most = torch.tensor(len(parts), device=device)
        torch.distributed.all_reduce(most, op=torch.distributed.ReduceOp.MAX)
        parts += [None] * (int(most) - len(parts))
    return parts


def idle_rows(pad_id: int) -> SequenceBatch:
    """One two-token row with no target: a forward that only keeps a sharded model's collectives in step."""
    ids = np.full((1, 2), pad_id, dtype=np.int64)
    return SequenceBatch(ids, np.ones_like(ids), np.zeros((1, 1), dtype=np.float32))


def tensors(rows: SequenceBatch, *, device: str):
    """``(input_ids, attention_mask)`` as long tensors on ``device``."""
    ids = torch.as_tensor(rows.input_ids, dtype=torch.long, device=device)
    attn = torch.as_tensor(rows.attention_mask, dtype=torch.long, device=device)
    return ids, attn


def accumulate(
    model,
    batch: TrainBatch,
    settings: LossSettings,
    *,
    trainable: list,
    micro_batch_size: int,
    pad_id: int,
    device: str,
    fsdp: ModuleType | None,
) -> dict[str, Any]:
    """Forward + backward per micro-batch into the parameters' ``.grad``: they add up to the full-batch gradient.

    Under torchrun the gradients and statistics are then summed over the processes.

    Returns:
        Keyword arguments for ``StepStats`` (all but ``grad_norm`` and ``lr``).
    """
    model.train()
    combined = MicroBatchStats()
    for index in micro_batches(len(batch.sequences), micro_batch_size, fsdp=fsdp, device=device):
        if index is None:  # FSDP: another process has more micro-batches; a zero gradient joins their sums
            rows = idle_rows(pad_id)
            (fwd.sequence_logp(model, *tensors(rows, device=device), rows.loss_mask).sum() * 0.0).backward()
            continue
        rows = batch.sequences.rows(index)
        ids, attn = tensors(rows, device=device)
        width = ids.shape[1] - 1
        # inside the differentiated computation; the loss reads completion targets only
        logp = fwd.sequence_logp(
            model, ids, attn, rows.loss_mask, prompt_targets=False, temperature=settings.temperature
        )
        value, stats = objective.policy_loss(
            ops.TorchOps,
            logp=logp,
            old_logp=_part(batch.old_logp, index, width, device),
            ref_logp=_part(batch.ref_logp, index, width, device),
            advantages=_part(batch.advantages, index, None, device),
            token_weights=_part(batch.token_weights, index, width, device),
            clip_eps_low=settings.clip_eps_low,
            clip_eps_high=settings.clip_eps_high,
            kl_coef=settings.kl_coef,
            kl_estimator=settings.kl_estimator,
        )
        value.backward()
        combined.add(value.detach(), stats)
    sum_across_processes(combined, trainable, fsdp=fsdp, device=device)
    return combined.result()


def _part(array: np.ndarray | None, index: slice, width: int | None, device: str):
    """A micro-batch's rows (and first ``width`` columns) of a per-row array, as float32 on ``device``."""
    if array is None:
        return None
    values = array[index] if width is None else array[index, :width]
    return torch.as_tensor(np.asarray(values, dtype=np.float32), device=device)


@torch.no_grad()
def sum_across_processes(combined: MicroBatchStats, trainable: list, *, fsdp: ModuleType | None, device: str) -> None:
    """Under torchrun: adds up every process's gradients and loss statistics, in place.

    Each process differentiated its share of the batch with token weights
    normalised over the whole batch, so the sum (not the mean) is the
    single-process gradient. Done before clipping: the clip sees the global
    norm, and every process takes the same step. A no-op in one process.
    Under FSDP the backward already summed each gradient into its shard.
    """
    if not ops.several_processes():
        return
    if fsdp is None:
        ops.all_reduce_gradients(trainable)
    means = MicroBatchStats.MEANS
    scalars = torch.tensor(
        [
            combined.loss,
            combined.pg_loss,
            combined.weight,
            float(combined.micro_batches),
            *(combined.weighted[k] for k in means),
        ],
        dtype=torch.float64,
        device=device,
    )
    torch.distributed.all_reduce(scalars)
    values = scalars.tolist()
    combined.loss, combined.pg_loss, combined.weight, micro_batches = values[:4]
    combined.micro_batches = int(micro_batches)
    combined.weighted = dict(zip(means, values[4:], strict=True))


def clip(trainable: list, max_norm: float | None, *, fsdp: ModuleType | None) -> float:
    """Scales the gradients to a global 2-norm of at most ``max_norm`` (None: no limit); returns the norm before."""
    if fsdp is not None:  # the global norm over every process's shards, the same in each
        return fsdp.clip_grad_norm(trainable, max_norm)
    return float(torch.nn.utils.clip_grad_norm_(trainable, max_norm or math.inf))
