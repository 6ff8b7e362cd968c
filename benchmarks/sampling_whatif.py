"""Prototypes of the proposed sampling fixes, measured by `profile_sampling.py` against the real code.

Nothing here changes `rlaif_mlx`: each prototype is patched onto one live
backend for the duration of a `with` block, so the profile can time "now" and
"with the fix" alternately in one process. They cover what the benchmark uses
(one seed, temperature only, no top-k / top-p / min-p) and fall back to the real
code otherwise.

- PyTorch: draw the next token by inverse-CDF (`cumsum` of the probabilities,
  one uniform per row, `searchsorted`) instead of `torch.multinomial`, which on
  the CPU costs about 25x more for the same draw.
- MLX: (a) one `exp` pass gives both the sampled token (inverse CDF) and its
  log-prob, where now `mx.random.categorical` and `logsumexp` each pass over
  the vocabulary; (b) the prefill applies the LM head to the last prompt
  position only, where now it computes (and allocates) logits for every
  prompt position and then slices.
"""

from __future__ import annotations

import contextlib
import types


@contextlib.contextmanager
def proposed(backend):
    """Patches the proposed fix onto `backend` (torch or mlx) for the block."""
    if backend.name == "torch":
        from rlaif_mlx.backends import torch_ops

        original = torch_ops.choose
        torch_ops.choose = _torch_choose(original)
        try:
            yield
        finally:
            torch_ops.choose = original
    else:
        backend.sample = types.MethodType(_mlx_sample, backend)
        try:
            yield
        finally:
            del backend.sample


def _plain(params) -> bool:
    return params.temperature > 1e-6 and params.top_k in (0,) and params.top_p >= 1.0 and params.min_p <= 0.0


def _torch_choose(original):
    import torch

    def choose(logits, params, generator):
        if not _plain(params):
            return original(logits, params, generator)
        cdf = (logits / params.temperature).softmax(dim=-1).cumsum(dim=-1)
        u = torch.rand((logits.shape[0], 1), generator=generator, device=cdf.device, dtype=cdf.dtype)
        # right=True: the first token whose cumulative mass exceeds u, never a zero-probability one
        return torch.searchsorted(cdf, u * cdf[:, -1:], right=True).squeeze(-1).clamp_(max=logits.shape[-1] - 1)

    return choose


def _mlx_sample(self, prompts, *, n, params):
    """`MlxBackend.sample` with the two MLX fixes (same loop, same records otherwise)."""
    import mlx.core as mx

    from rlaif_mlx.backends import mlx_ops as ops
    from rlaif_mlx.backends.base import DecodeBook

    if not _plain(params) or isinstance(params.seed, tuple):
        return type(self).sample(self, prompts, n=n, params=params)
    key = self._keys(params.seed, len(prompts))[0]
    ids, padding = ops.left_pad(prompts, pad_id=self.pad_id)
    cache = ops.batch_cache(self._model, padding)
    logits = _last_position_logits(self._model, ids, cache)
    ops.repeat_cache(cache, n)
    logits = mx.repeat(logits, n, axis=0)

    rows = len(prompts) * n
    book = DecodeBook(prompts, n, eos_ids=self.eos_ids, stop=params.stop, decode=self._decode)
    pad = mx.full((rows,), self.pad_id, dtype=mx.int32)
    alive = mx.ones((rows,), dtype=mx.bool_)
    for step in range(params.max_new_tokens):
        key, sub = mx.random.split(key)
        logits = logits.astype(mx.float32)
        scaled = logits if params.temperature == 1.0 else logits / params.temperature
        token, logp = _mlx_draw(scaled, logits, sub)
        chosen = mx.where(alive, token, pad)
        chosen_logp = mx.where(alive, logp, 0.0)
        mx.eval(chosen, chosen_logp)
        alive = mx.array(book.add(chosen.tolist(), chosen_logp.tolist()))
        if book.done or step == params.max_new_tokens - 1:
            break
        logits = self._forward_step(chosen[:, None], cache)
    return book.completions()


def _mlx_draw(scaled, logits, key):
    """Token by inverse CDF over exp(scaled - max), and its temperature-1 log-prob, sharing the exp pass at T=1."""
    import mlx.core as mx

    top = scaled.max(axis=-1, keepdims=True)
    weights = mx.exp(scaled - top)
    total = weights.sum(axis=-1, keepdims=True)
    u = mx.random.uniform(shape=total.shape, key=key) * total
    token = mx.minimum((mx.cumsum(weights, axis=-1) <= u).sum(axis=-1), scaled.shape[-1] - 1).astype(mx.int32)
    picked = mx.take_along_axis(logits, token[:, None], axis=-1).squeeze(-1)
    if scaled is logits:
        return token, picked - (top + mx.log(total)).squeeze(-1)
    return token, picked - mx.logsumexp(logits, axis=-1)


def _last_position_logits(model, ids, cache):
    """The LM head on the last prompt position only (mlx-lm's Qwen2/Llama layout: `model.model` + head)."""
    hidden = model.model(ids, cache=cache)[:, -1:, :]
    head = model.lm_head if hasattr(model, "lm_head") else model.model.embed_tokens.as_linear
    return head(hidden)[:, -1, :]
