"""The PyTorch backend's decode loop, and its KV cache preallocated once per sampling call, written in place.

``generate`` prefills each prompt once (a left-padded batch with explicit
position ids), repeats its cache for the prompt's ``n`` samples and decodes all
rows together, one token per row per step, handing each step's tokens and
log-probs (of the tempered, untruncated policy: ``SamplingParams.logprob_temperature``)
to a ``DecodeBook``. Its MLX twin is ``backends/mlx_decode.py``.

transformers' ``DynamicCache`` grows every layer's keys and values with ``torch.cat`` at
every step, copying the whole cache each time: quadratic in the completion length, and
4-11 % of a sampling call on the benchmark models on a CPU, more for longer completions
(``benchmarks/results/decode_cache.md``). Here, after the prefill, each layer's keys and
values move into buffers sized for the whole call, repeated for each prompt's samples on
the way (in place of ``batch_repeat_interleave``); a decode step writes its one new
position in place and attention reads a view of the filled part: the same values in the
same shapes as the dynamic cache, so the same logits.

``backends/torch.py`` (``TorchBackend.sample``) is the only user; its
``preallocate_decode_cache`` says which cache to decode with.
"""

from __future__ import annotations

import torch

from rlaif_mlx.backends import torch_ops as ops
from rlaif_mlx.backends.base import Completion, SamplingParams
from rlaif_mlx.backends.common import DecodeBook

try:  # the per-layer cache classes (transformers >= 4.54; the pyproject asks for >= 4.56)
    from transformers.cache_utils import DynamicLayer
except ImportError:  # pragma: no cover - depends on the installed transformers
    DynamicLayer = None


def generate(
    model,
    prompts: list[list[int]],
    n: int,
    params: SamplingParams,
    *,
    cache_arg: str,
    generators: list,
    book: DecodeBook,
    pad_id: int,
    device: str,
    preallocate: bool,
) -> list[Completion]:
    """Samples ``n`` completions per prompt from ``model``, prompt-major.

    Args:
        model: a transformers causal LM (or a PEFT model around one), in eval mode.
        prompts: token ids per prompt (each at least one token).
        n: samples per prompt.
        params: temperature, filters, length (the stops and EOS are ``book``'s).
        cache_arg: the keyword under which ``model`` takes its KV cache (``ops.cache_kwarg``).
        generators: one for the call, or one per prompt (``ops.choose``).
        book: the call's bookkeeping, for ``len(prompts) * n`` rows.
        pad_id: what finished rows keep decoding.
        device: where the ids and masks live.
        preallocate: decode into buffers sized for the call (``repeated_cache``);
            False keeps transformers' growing cache (the tests compare the two).

    Returns:
        ``book.completions()``: ``len(prompts) * n`` records, row ``p * n + s``.
    """
    ids, mask = ops.left_pad(prompts, pad_id=pad_id, device=device)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    logits, cache = forward_step(model, ids, mask, positions, None, cache_arg=cache_arg)
    room = params.max_new_tokens - 1  # decode steps: the last token is chosen, never fed back
    cache = repeated_cache(cache, n, room=room, preallocate=preallocate)  # no per-step copy
    logits = logits.repeat_interleave(n, dim=0)
    mask = mask.repeat_interleave(n, dim=0)
    next_pos = positions[:, -1].repeat_interleave(n, dim=0) + 1

    rows = len(prompts) * n
    pad = torch.full((rows,), pad_id, dtype=torch.long, device=device)
    alive = torch.ones(rows, dtype=torch.bool, device=device)
    for t in range(params.max_new_tokens):
        logits = logits.float()
        chosen = torch.where(alive, ops.choose(logits, params, generators), pad)
        chosen_logp = ops.target_logp(logits, chosen, params.logprob_temperature)  # tempered, untruncated
        alive = torch.tensor(book.add(chosen.tolist(), chosen_logp.tolist()), device=device)
        if book.done or t == params.max_new_tokens - 1:
            break
        # Finished rows keep decoding pad tokens that nothing attends to.
        mask = torch.cat([mask, alive.long()[:, None]], dim=1)
        logits, cache = forward_step(model, chosen[:, None], mask, next_pos[:, None], cache, cache_arg=cache_arg)
        next_pos = next_pos + 1
    return book.completions()


def forward_step(model, ids, mask, positions, cache, *, cache_arg: str):
    """One cached forward of ``ids`` (``[R, L]``); returns the last position's logits ``[R, V]`` and the cache.

    ``mask`` covers the cached positions and ``ids``; ``positions`` are ``ids``' position ids.
    """
    out = model(
        input_ids=ids,
        attention_mask=mask,
        position_ids=positions,
        use_cache=True,
        logits_to_keep=1,
        **{cache_arg: cache},
    )
    return out.logits[:, -1, :], ops.returned_cache(out)


class BufferLayer(DynamicLayer or object):
    """One layer's cache: keys and values are views of buffers that ``update`` appends to in place.

    A ``DynamicLayer`` for every reader (sequence length, mask sizes); only ``update`` is
    new. The methods that would replace ``keys`` / ``values`` with other tensors (repeat,
    select, crop, reorder) are refused: the next ``update`` would write past them.
    """

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, length: int) -> None:
        super().__init__()
        self._key_buffer, self._value_buffer, self._length = keys, values, length
        self.keys, self.values = keys[:, :, :length], values[:, :, :length]
        self.device, self.is_initialized = keys.device, True

    def update(self, key_states, value_states, *args, **kwargs):
        start, end = self._length, self._length + key_states.shape[-2]
        if end > self._key_buffer.shape[2]:
            raise RuntimeError(f"the preallocated KV cache holds {self._key_buffer.shape[2]} positions; {end} needed")
        self._key_buffer[:, :, start:end] = key_states
        self._value_buffer[:, :, start:end] = value_states
        self._length = end
        self.keys, self.values = self._key_buffer[:, :, :end], self._value_buffer[:, :, :end]
        return self.keys, self.values

    def _refuse(self, *args, **kwargs):
        raise NotImplementedError("a preallocated decode cache only appends")

    batch_repeat_interleave = batch_select_indices = crop = reorder_cache = _refuse


def repeated_cache(cache, repeats: int, *, room: int, preallocate: bool):
    """The prefill's cache with each row repeated ``repeats`` times, with room for ``room`` more positions.

    Rows stay prompt-major (row ``p * repeats + s``), as ``batch_repeat_interleave`` orders them.
    Preallocated where the cache is a plain ``DynamicCache`` of ``DynamicLayer`` (full attention,
    no offloading) and ``preallocate`` is on; otherwise (sliding-window or other layer kinds, an
    older transformers) transformers' own cache repeated in place. Returns the cache to decode with.

    The buffers take their full size at once: what the dynamic cache reaches when every row
    runs to the length limit (it also holds a second copy of one layer while it grows).
    """
    layers = getattr(cache, "layers", None)
    plain = (
        preallocate
        and DynamicLayer is not None
        and layers
        and not getattr(cache, "offloading", False)
        and all(type(layer) is DynamicLayer and layer.keys is not None for layer in layers)
    )
    if not plain:
        cache.batch_repeat_interleave(repeats)
        return cache
    for i, layer in enumerate(layers):
        layers[i] = BufferLayer(
            *(_repeated_buffer(t, repeats, room) for t in (layer.keys, layer.values)), layer.keys.shape[2]
        )
    return cache


def _repeated_buffer(states: torch.Tensor, repeats: int, room: int) -> torch.Tensor:
    """``[rows * repeats, heads, length + room, dim]``, the first ``length`` positions ``states`` repeated by row."""
    rows, heads, length, dim = states.shape
    buffer = states.new_empty((rows, repeats, heads, length + room, dim))
    buffer[:, :, :, :length] = states[:, None]
    return buffer.view(rows * repeats, heads, length + room, dim)
