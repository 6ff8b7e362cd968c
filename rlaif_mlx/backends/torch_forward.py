"""Teacher-forced token log-probs for the PyTorch backend: each prompt once, the LM head in chunks.

The rows of a GRPO batch come in groups that share a prompt. ``sequence_logp``
forwards every distinct prompt of a micro-batch once (left-padded, with a KV
cache), gives each row its prompt's cache, then forwards only the completions,
with position ids that continue the prompt. Gradients flow back through the
shared cache, so the same function serves the training forward.

The LM head runs on the decoder's hidden states at the positions whose next
token is scored, in chunks: no ``[rows, T, vocab]`` float32 logits for the whole
batch. When gradients are on and there is more than one chunk, each chunk's
logits are recomputed in the backward pass instead of kept.

``backends/torch.py`` is the only user; ``torch_ops.token_logp`` (one whole-row
forward, full logits) stays as the plain reference these must equal.
"""

from __future__ import annotations

import functools
import sys

import numpy as np
import torch
from torch.utils.checkpoint import checkpoint

from rlaif_mlx.backends import torch_ops as ops
from rlaif_mlx.backends.common import prompt_owners

# Logit elements per LM-head chunk: 32M float32 values are 128 MB (a Qwen vocabulary: ~220 positions).
HEAD_CHUNK_ELEMENTS = 1 << 25
# Config keys of models whose forward changes the logits after the LM head (soft-capping, scaling).
_LOGIT_POSTPROCESSING = ("final_logit_softcapping", "logit_scale", "logits_scaling")


def sequence_logp(
    model,
    ids: torch.Tensor,
    attn: torch.Tensor,
    loss_mask: np.ndarray,
    *,
    prompt_targets: bool = True,
    temperature: float = 1.0,
) -> torch.Tensor:
    """Per-token log-probs ``[N, T-1]`` (float32) of right-padded prompt + completion rows.

    Each row's prompt is its tokens up to the first completion target (the first 1
    of ``loss_mask``, plus one); a row with no completion target is all prompt.
    Rows with the same prompt share one prompt forward.

    Args:
        model: a transformers causal LM, or a PEFT model wrapping one.
        ids: ``[N, T]`` token ids, right-padded.
        attn: ``[N, T]`` 1 on real tokens.
        loss_mask: ``[N, T-1]`` 1 where the target is a completion token.
        prompt_targets: also score the prompt's own tokens (the ``logprobs``
            contract); the training loss needs completion targets only.
        temperature: score ``softmax(logits / temperature)`` (the sampling temperature).

    Returns:
        Column ``t`` is ``log p(ids[t+1] | ids[:t+1])`` at ``temperature``; 0 on
        padding targets, and on prompt targets unless ``prompt_targets``.
    """
    causal = model.get_base_model() if hasattr(model, "get_base_model") else model
    if _fsdp_root(model) or _fsdp_root(causal) or not _hidden_states_give_logits(causal):
        logp = ops.token_logp(model, ids, attn, temperature)
        return logp if prompt_targets else logp * torch.as_tensor(loss_mask, device=logp.device)
    decoder, head = causal.get_decoder(), causal.get_output_embeddings()
    lengths = attn.sum(dim=1).cpu().numpy()
    prompt_len, group, prompts = prompt_owners(ids.cpu().numpy(), attn.cpu().numpy(), loss_mask)
    if prompts < len(ids):
        return _shared_prompt_logp(
            decoder, head, ids, lengths, prompt_len, group, prompt_targets=prompt_targets, temperature=temperature
        )
    # nothing shared: one whole-row forward
    hidden = decoder(input_ids=ids, attention_mask=attn, use_cache=False).last_hidden_state
    first = 0 if prompt_targets else prompt_len - 1
    return _scatter_logp(head, hidden, ids, first=first, last=lengths - 1, offset=0, temperature=temperature)


def _shared_prompt_logp(
    decoder, head, ids, lengths, prompt_len, group, *, prompt_targets: bool, temperature: float
) -> torch.Tensor:
    """``sequence_logp`` where rows share prompts: row ``i`` has prompt ``group[i]`` of ``prompt_len[i]`` tokens."""
    device, (n, width) = ids.device, ids.shape
    firsts = np.unique(group, return_index=True)[1]  # a row of each prompt, in prompt order
    pad_width = int(prompt_len.max())
    pads = torch.as_tensor(pad_width - prompt_len[firsts], device=device)[:, None]
    frame = torch.arange(pad_width, device=device)[None, :]
    prompt_mask = (frame >= pads).long()  # the prompts left-padded: token j of a prompt at pads + j
    prompt_ids = ids[torch.as_tensor(firsts, device=device)].gather(1, (frame - pads).clamp(min=0)) * prompt_mask
    out = decoder(
        input_ids=prompt_ids,
        attention_mask=prompt_mask,
        use_cache=True,
        position_ids=(prompt_mask.cumsum(-1) - 1).clamp(min=0),
    )
    prompt_hidden = out.last_hidden_state
    cache = ops.returned_cache(out)
    rows = torch.as_tensor(group, device=device)

    logp = torch.zeros((n, width - 1), dtype=torch.float32, device=device)
    if prompt_targets and pad_width > 1:
        # Scored once per prompt, in its left-padded frame (prompt token j + 1 at column pad_width - len + j) ...
        scores = _scatter_logp(
            head,
            prompt_hidden,
            prompt_ids,
            first=pad_width - prompt_len[firsts],
            last=pad_width - 1,
            offset=0,
            temperature=temperature,
        )
        # ... then copied to the prompt's rows, at columns 0 .. len - 2.
        column = torch.arange(width - 1, device=device)[None, :]
        take = (column + torch.as_tensor(pad_width - prompt_len, device=device)[:, None]).clamp(0, pad_width - 2)
        inside = column < torch.as_tensor(prompt_len - 1, device=device)[:, None]
        logp = torch.where(inside, scores[rows].gather(1, take), logp)

    # Each row continues its prompt's cache; its inputs are its completion tokens but the last (which
    # predicts nothing), at the positions after the prompt's.
    hidden = prompt_hidden[:, -1:][rows]  # predicts the first completion token
    steps = int((lengths - 1 - prompt_len).max())
    if steps > 0:
        cache.batch_select_indices(rows)  # an index, not a copy per row: gradients flow back to the prompt
        start = torch.as_tensor(prompt_len, device=device)[:, None]
        k = torch.arange(steps, device=device)[None, :]
        real = (k < torch.as_tensor(lengths - 1, device=device)[:, None] - start).long()
        completion = decoder(
            input_ids=ids.gather(1, (start + k).clamp(max=width - 1)),
            position_ids=start + k,
            attention_mask=torch.cat([prompt_mask[rows], real], dim=1),
            use_cache=True,
            **{_cache_kwarg(type(decoder)): cache},
        ).last_hidden_state
        hidden = torch.cat([hidden, completion], dim=1)
    # hidden[:, j] predicts ids[prompt_len + j], the target in column prompt_len - 1 + j
    return logp + _scatter_logp(
        head, hidden, ids, first=0, last=lengths - prompt_len, offset=prompt_len - 1, temperature=temperature
    )


def _scatter_logp(head, hidden, ids, *, first, last, offset, temperature: float) -> torch.Tensor:
    """Scores ``hidden[i, j]`` for ``first[i] <= j < last[i]``: it predicts ``ids[i, offset[i] + j + 1]``.

    ``first``, ``last`` and ``offset`` are ints or numpy arrays, one per row.
    Returns ``[rows, ids.shape[1] - 1]`` with the score in column ``offset[i] + j``, 0 elsewhere.
    """
    rows, positions = hidden.shape[:2]
    device = hidden.device

    def per_row(value):
        return torch.as_tensor(np.broadcast_to(value, (rows,)).copy(), device=device)[:, None]

    j = torch.arange(positions, device=device)[None, :]
    row, col = ((j >= per_row(first)) & (j < per_row(last))).nonzero(as_tuple=True)
    column = (per_row(offset) + j)[row, col]
    scores = head_logp(head, hidden[row, col], ids[row, column + 1], temperature)
    out = torch.zeros((rows, ids.shape[1] - 1), dtype=torch.float32, device=device)
    return out.index_put((row, column), scores)


def head_logp(head, hidden: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """``log_softmax(head(hidden) / temperature)[targets]`` ``[K]`` float32, over chunks of positions.

    Under autograd with several chunks each chunk is checkpointed: its logits are
    recomputed in the backward pass, so at most one chunk's logits are alive.
    """
    chunk = max(1, HEAD_CHUNK_ELEMENTS // head.weight.shape[0])
    if hidden.shape[0] <= chunk:
        return _chunk_logp(head, hidden, targets, temperature)
    recompute = torch.is_grad_enabled() and hidden.requires_grad
    parts = []
    for start in range(0, hidden.shape[0], chunk):
        h, t = hidden[start : start + chunk], targets[start : start + chunk]
        parts.append(
            checkpoint(_chunk_logp, head, h, t, temperature, use_reentrant=False)
            if recompute
            else _chunk_logp(head, h, t, temperature)
        )
    return torch.cat(parts)


def _chunk_logp(head, hidden, targets, temperature):
    return ops.target_logp(head(hidden).float(), targets, temperature)


@functools.cache
def _cache_kwarg(decoder_type: type) -> str:
    """``ops.cache_kwarg``, once per decoder class."""
    return ops.cache_kwarg(decoder_type.forward)


def _hidden_states_give_logits(causal) -> bool:
    """Whether ``head(decoder(...))`` is the model's logits (no soft-capping or scaling after the head)."""
    config = getattr(causal, "config", None)
    if config is None or any(getattr(config, key, None) not in (None, 1, 1.0) for key in _LOGIT_POSTPROCESSING):
        return False
    head = causal.get_output_embeddings() if hasattr(causal, "get_output_embeddings") else None
    return head is not None and hasattr(head, "weight") and hasattr(causal, "get_decoder")


def _fsdp_root(module) -> bool:
    """Sharded by FSDP2 at this module: calling its decoder and head directly would skip the hooks that
    gather their weights. (No FSDP module was imported, no model is sharded: no import cost here.)"""
    fsdp = sys.modules.get("torch.distributed.fsdp")
    return fsdp is not None and isinstance(module, getattr(fsdp, "FSDPModule", ()))
