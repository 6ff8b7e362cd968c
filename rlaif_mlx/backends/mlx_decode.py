"""The MLX backend's decode loop: each prompt prefilled once, its KV cache repeated for its samples.

``generate`` prefills a left-padded batch of the prompts in mlx-lm's
``BatchKVCache`` (which offsets RoPE and masks the padding per row; the LM head
on the last position only), repeats each prompt's cache for its ``n`` samples
and decodes all rows together, one token per row per step, handing each
step's tokens and log-probs to a ``DecodeBook``. One inverse-CDF pass gives
each token and its log-prob (``mlx_ops.choose``). Its PyTorch twin is
``backends/torch_decode.py``.
"""

from __future__ import annotations

import mlx.core as mx

from rlaif_mlx.backends import mlx_ops as ops
from rlaif_mlx.backends.base import Completion, SamplingParams
from rlaif_mlx.backends.common import DecodeBook


def generate(
    model, prompts: list[list[int]], n: int, params: SamplingParams, *, uniforms, book: DecodeBook, pad_id: int
) -> list[Completion]:
    """Samples ``n`` completions per prompt from ``model``, prompt-major.

    Args:
        model: an mlx-lm model, in eval mode.
        prompts: token ids per prompt (each at least one token).
        n: samples per prompt.
        params: temperature, filters, length (the stops and EOS are ``book``'s).
        uniforms: ``[max_new_tokens, rows]`` draws in [0, 1) (``ops.sampling_uniforms``).
        book: the call's bookkeeping, for ``len(prompts) * n`` rows.
        pad_id: what finished rows keep decoding.

    Returns:
        ``book.completions()``: ``len(prompts) * n`` records, row ``p * n + s``.
    """
    ids, padding = ops.left_pad(prompts, pad_id=pad_id)
    cache = ops.batch_cache(model, padding, capacity=ids.shape[1] + params.max_new_tokens)
    logits = forward_step(model, ids, cache)
    ops.repeat_cache(cache, n)
    logits = mx.repeat(logits, n, axis=0)

    rows = len(prompts) * n
    pad = mx.full((rows,), pad_id, dtype=mx.int32)
    alive = mx.ones((rows,), dtype=mx.bool_)
    for t in range(params.max_new_tokens):
        chosen, chosen_logp = ops.choose(logits.astype(mx.float32), params, uniforms[t])
        chosen = mx.where(alive, chosen, pad)
        mx.eval(chosen, chosen_logp)
        alive = mx.array(book.add(chosen.tolist(), chosen_logp.tolist()))
        if book.done or t == params.max_new_tokens - 1:
            break
        # Finished rows keep decoding pad tokens; no other row attends to them.
        logits = forward_step(model, chosen[:, None], cache)
    return book.completions()


def forward_step(model, ids, cache):
    """One cached forward of ``ids`` (``[R, L]``); returns the last position's logits ``[R, V]``.

    The cache is updated in place.
    """
    return ops.last_logits(model, ids, cache)
