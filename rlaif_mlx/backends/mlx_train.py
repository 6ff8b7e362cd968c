"""The MLX backend's training arithmetic: accumulated gradients over micro-batches, AdamW.

``MlxBackend.train_step`` and ``gradients`` call ``accumulate`` (the value and
gradient of the loss per micro-batch, added up, then under mlx.launch summed over
the processes) and ``ops.clip_grad_norm``.
Its PyTorch twin is ``backends/torch_train.py``.
"""

from __future__ import annotations

from typing import Any

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_map

from rlaif_mlx.backends import mlx_collectives as collectives
from rlaif_mlx.backends import mlx_groups as grouped
from rlaif_mlx.backends import mlx_ops as ops
from rlaif_mlx.backends.base import LossSettings, SequenceBatch, TrainBatch
from rlaif_mlx.backends.common import MicroBatchStats
from rlaif_mlx.config import TrainingConfig
from rlaif_mlx.rl import objective


def adamw(training: TrainingConfig) -> optim.Optimizer:
    """AdamW with the ``training`` section's settings; bias-corrected, as torch's (mlx's default omits it)."""
    return optim.AdamW(
        training.learning_rate,
        betas=[training.adam_beta1, training.adam_beta2],
        weight_decay=training.weight_decay,
        bias_correction=True,
    )


def arrays(rows: SequenceBatch):
    """``(input_ids, attention_mask)`` as int32 arrays."""
    ids = mx.array(np.asarray(rows.input_ids, dtype=np.int32))
    attn = mx.array(np.asarray(rows.attention_mask, dtype=np.int32))
    return ids, attn


def accumulate(
    model: nn.Module, batch: TrainBatch, settings: LossSettings, *, micro_batch_size: int, whole_rows: bool
) -> tuple[dict, dict[str, Any]]:
    """The loss's gradient per micro-batch, added up to the full-batch gradient.

    Shared prompts forward once (``mlx_groups``); gradients through the repeated
    KV cache match the whole-row forward's.

    Args:
        whole_rows: forward every row whole, never a shared prompt once (under
            dropout a shared prompt would share its dropout mask).

    Returns:
        The gradient tree of the trainable parameters, and keyword arguments for
        ``StepStats`` (all but ``grad_norm`` and ``lr``).
    """
    model.train()
    combined = MicroBatchStats()
    total = None
    for start in range(0, len(batch.sequences), micro_batch_size):
        index = slice(start, start + micro_batch_size)
        rows = batch.sequences.rows(index)
        groups = None if whole_rows else grouped.find_groups(rows)
        layout = None if groups is None else groups.to_completion_layout
        width = rows.loss_mask.shape[1]
        inputs = {
            "old_logp": _part(batch.old_logp, index, width, layout),
            "ref_logp": _part(batch.ref_logp, index, width, layout),
            "advantages": _part(batch.advantages, index, None),
            "token_weights": _part(batch.token_weights, index, width, layout),
        }
        ids_attn = arrays(rows) if groups is None else None

        def loss_fn(model, groups=groups, ids_attn=ids_attn, inputs=inputs):
            # inside the differentiated computation
            logp = (
                ops.token_logp(model, *ids_attn, settings.temperature)
                if groups is None
                else grouped.grouped_logp(model, groups, prompt_targets=False, temperature=settings.temperature)[1]
            )
            return objective.policy_loss(
                ops.MlxOps(),
                logp=logp,
                clip_eps_low=settings.clip_eps_low,
                clip_eps_high=settings.clip_eps_high,
                kl_coef=settings.kl_coef,
                kl_estimator=settings.kl_estimator,
                **inputs,
            )

        (value, stats), grads = nn.value_and_grad(model, loss_fn)(model)
        total = grads if total is None else tree_map(mx.add, total, grads)
        mx.eval(total, value, stats)
        combined.add(value, stats)
    model.eval()
    # Under mlx.launch: every process's share added up before clipping (token weights are normalised over the
    # whole batch, so the sum is one process's gradient); a no-op in one process.
    total = collectives.sum_gradients(total)
    collectives.sum_statistics(combined)
    return total, combined.result()


def _part(array: np.ndarray | None, index: slice, width: int | None, layout=None):
    """A micro-batch's rows (and first ``width`` columns) of a per-row array, float32, in ``layout`` if given."""
    if array is None:
        return None
    values = np.asarray(array[index] if width is None else array[index, :width], dtype=np.float32)
    return mx.array(values if layout is None else layout(values))
