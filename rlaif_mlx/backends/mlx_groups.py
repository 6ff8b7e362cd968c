"""Log-probs of rows that share a prompt, with each prompt forwarded once.

A sampled batch holds G completions per prompt. Scoring each row whole
forwards the prompt G times; here each unique prompt of a micro-batch is
forwarded once into mlx-lm's ``BatchKVCache`` (left-padded, so RoPE offsets and
padding masks are per row), the cache is repeated to the rows that share the
prompt, and only the completions are forwarded on top of it. The first
completion token's log-prob comes from the prompt's last logit.

Two layouts: the *row* layout of ``SequenceBatch`` (``[R, T-1]``, column ``t``
scores ``ids[t+1]``) and the *completion* layout (``[R, C]``, column ``j``
scores completion token ``j``). The loss is a weighted sum over tokens, so
training can run in the completion layout by moving its inputs there.
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
import numpy as np

from rlaif_mlx.backends import mlx_ops as ops
from rlaif_mlx.backends.base import SequenceBatch
from rlaif_mlx.backends.common import prompt_owners


@dataclass
class PromptGroups:
    """The rows of a micro-batch grouped by prompt.

    Attributes:
        prompts: the unique prompts' ids, in first-seen order.
        owner: ``[R]`` index into ``prompts`` of each row's prompt.
        prompt_len: ``[R]`` prompt length (from ``loss_mask``: first completion target + 1).
        completion_len: ``[R]`` completion length (real tokens after the prompt), each >= 1.
        completions: ``[R, C]`` int32 completion ids, right-padded with 0.
    """

    prompts: list[list[int]]
    owner: np.ndarray
    prompt_len: np.ndarray
    completion_len: np.ndarray
    completions: np.ndarray

    def _columns(self):
        """Row-layout column of each completion-layout cell, and which cells are real tokens."""
        j = np.arange(self.completions.shape[1])[None, :]
        return self.prompt_len[:, None] - 1 + j, j < self.completion_len[:, None]

    def to_completion_layout(self, array: np.ndarray) -> np.ndarray:
        """``[R, T-1]`` row layout -> ``[R, C]`` completion layout (0 past each completion's end)."""
        columns, real = self._columns()
        picked = np.take_along_axis(array, np.minimum(columns, array.shape[1] - 1), axis=1)
        return np.where(real, picked, 0).astype(array.dtype)

    def to_row_layout(self, prompt_logp: np.ndarray | None, completion_logp: np.ndarray, width: int) -> np.ndarray:
        """Assembles ``[R, width]`` row-layout log-probs (0 on padding targets).

        Args:
            prompt_logp: ``[U, P-1]`` log-probs of the left-padded unique prompts' own tokens
                (None: the prompt targets stay 0).
            completion_logp: ``[R, C]`` in the completion layout.
            width: ``T - 1`` of the micro-batch.
        """
        rows = len(self.owner)
        out = np.zeros((rows, width), dtype=np.float32)
        columns, real = self._columns()
        out[np.nonzero(real)[0], columns[real]] = completion_logp[real]
        if prompt_logp is None:
            return out
        # prompt target t of row r sits at column (P - 1) - (prompt_len - 1) + t of its left-padded prompt
        shift = prompt_logp.shape[1] - (self.prompt_len - 1)
        t = np.arange(prompt_logp.shape[1])[None, :]
        inside = t < (self.prompt_len - 1)[:, None]
        source = prompt_logp[self.owner[:, None], np.minimum(t + shift[:, None], prompt_logp.shape[1] - 1)]
        out[:, : prompt_logp.shape[1]] = np.where(inside, source, out[:, : prompt_logp.shape[1]])
        return out


def find_groups(rows: SequenceBatch) -> PromptGroups | None:
    """Groups a micro-batch's rows by prompt; None when no prompt is shared or a row has no completion token.

    Any split point gives the same log-probs; the loss mask's first completion
    target marks it, as ``SequenceBatch.from_completions`` writes it.
    """
    prompt_len, owner, count = prompt_owners(rows.input_ids, rows.attention_mask, rows.loss_mask)
    completion_len = rows.attention_mask.sum(axis=1) - prompt_len
    if (completion_len < 1).any() or count == len(owner):
        return None
    firsts = np.unique(owner, return_index=True)[1]  # a row of each prompt, in prompt order
    width = int(completion_len.max())
    completions = np.zeros((len(owner), width), dtype=np.int32)
    columns = np.minimum(prompt_len[:, None] + np.arange(width)[None, :], rows.input_ids.shape[1] - 1)
    picked = np.take_along_axis(rows.input_ids, columns, axis=1)
    completions[:] = np.where(np.arange(width)[None, :] < completion_len[:, None], picked, 0)
    prompts = [rows.input_ids[i, : prompt_len[i]].tolist() for i in firsts]
    return PromptGroups(prompts, owner, prompt_len, completion_len, completions)


def grouped_logp(model, groups: PromptGroups, *, prompt_targets: bool, temperature: float = 1.0):
    """Float32 log-probs at ``temperature`` with each prompt forwarded once.

    Args:
        model: an mlx-lm model (called inside ``nn.value_and_grad`` for training).
        groups: from ``find_groups``.
        prompt_targets: also score the prompts' own tokens (the LM head then
            runs on every prompt position of the unique prompts, not only the last).
        temperature: score ``softmax(logits / temperature)`` (the sampling temperature).

    Returns:
        ``(prompt_logp [U, P-1] or None, completion_logp [R, C])``; completion
        cells past a row's end hold garbage (mask them with the row lengths).
    """
    ids, padding = ops.left_pad(groups.prompts, pad_id=0)
    cache = ops.batch_cache(model, padding, capacity=ids.shape[1] + groups.completions.shape[1])
    prompt_logp = None
    if prompt_targets:
        logits = model(ids, cache=cache).astype(mx.float32)
        prompt_logp = (
            ops.target_logp(logits[:, :-1], ids[:, 1:], temperature) if ids.shape[1] > 1 else mx.zeros((len(ids), 0))
        )
        last = logits[:, -1]
    else:
        last = ops.last_logits(model, ids, cache).astype(mx.float32)
    owner = mx.array(groups.owner)
    completions = mx.array(groups.completions)
    first = ops.target_logp(last[owner], completions[:, 0], temperature)[:, None]
    if completions.shape[1] == 1:
        return prompt_logp, first
    ops.select_cache_rows(cache, owner)
    logits = model(completions[:, :-1], cache=cache).astype(mx.float32)
    return prompt_logp, mx.concatenate([first, ops.target_logp(logits, completions[:, 1:], temperature)], axis=1)
