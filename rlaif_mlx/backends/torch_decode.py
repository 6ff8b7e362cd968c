"""The PyTorch backend's decode-loop KV cache: preallocated once per sampling call, written in place.

transformers' ``DynamicCache`` grows every layer's keys and values with ``torch.cat`` at
every step, copying the whole cache each time: quadratic in the completion length, and
4-11 % of a sampling call on the benchmark models on a CPU, more for longer completions
(``benchmarks/results/decode_cache.md``). Here, after the prefill, each layer's keys and
values move into buffers sized for the whole call, repeated for each prompt's samples on
the way (in place of ``batch_repeat_interleave``); a decode step writes its one new
position in place and attention reads a view of the filled part: the same values in the
same shapes as the dynamic cache, so the same logits.

``backends/torch.py`` (``TorchBackend._generate``) is the only user.
"""

from __future__ import annotations

import torch

try:  # the per-layer cache classes (transformers >= 4.54; the pyproject asks for >= 4.56)
    from transformers.cache_utils import DynamicLayer
except ImportError:  # pragma: no cover - depends on the installed transformers
    DynamicLayer = None

PREALLOCATE = True  # False: decode with transformers' growing DynamicCache (the tests compare the two)


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


def repeated_cache(cache, repeats: int, *, room: int):
    """The prefill's cache with each row repeated ``repeats`` times, with room for ``room`` more positions.

    Rows stay prompt-major (row ``p * repeats + s``), as ``batch_repeat_interleave`` orders them.
    Preallocated where the cache is a plain ``DynamicCache`` of ``DynamicLayer`` (full attention,
    no offloading) and ``PREALLOCATE`` is on; otherwise (sliding-window or other layer kinds, an
    older transformers) transformers' own cache repeated in place. Returns the cache to decode with.

    The buffers take their full size at once: what the dynamic cache reaches when every row
    runs to the length limit (it also holds a second copy of one layer while it grows).
    """
    layers = getattr(cache, "layers", None)
    plain = (
        PREALLOCATE
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
