"""``mx.distributed`` for ``training.distributed``: the collectives a data-parallel MLX run uses.

The run's logic (what is sharded, gathered and summed) lives in
``training.distributed.DistContext``; this module is the engine under it for
processes started by ``mlx.launch``: ring over TCP, JACCL over Thunderbolt
RDMA, MPI or NCCL, whichever the launcher set up. Its torch twin is
``backends/torch_collectives.py`` (same functions, same meaning).

mx.distributed moves arrays only, and an ``all_gather`` wants arrays of one
shape on every process, so an object travels as its pickle: the byte counts are
gathered first, then the bytes padded to the longest. Communication runs on
the CPU stream, as mlx-lm's trainer does (the ring and JACCL backends run there).
"""

from __future__ import annotations

import pickle
from typing import Any

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten, tree_map_with_path

from rlaif_mlx.backends.common import MicroBatchStats

BUCKET_BYTES = 32 << 20  # gradients are summed in flat buckets of about this size (mlx.nn.average_gradients)
_group: Any = None  # the global group ``start`` joined; None in a single process


def start(*, transport: str, world_size: int) -> bool:
    """Joins the processes mlx.launch started.

    Args:
        transport: mx.distributed's backend (``ring``, ``jaccl``, ``mpi``, ``nccl``).
        world_size: how many processes the launcher's variables describe.

    Returns:
        True when this call joined them, False when this process already had.

    Raises:
        RuntimeError: the backend cannot start here, or found another number of processes.
    """
    global _group
    if _group is not None:
        return False
    backend = "jaccl" if transport.startswith("jaccl") else transport
    group = mx.distributed.init(strict=True, backend=backend)
    if group.size() != world_size:
        raise RuntimeError(
            f"mx.distributed ({backend}) joined {group.size()} processes where mlx.launch described {world_size}"
        )
    _group = group
    return True


def several_processes() -> bool:
    """Whether this process runs among others (``start`` joined a group of more than one)."""
    return _group is not None and _group.size() > 1


def all_gather_object(value: Any, world_size: int) -> list[Any]:
    """Every process's ``value`` (any picklable object), in rank order."""
    payload = np.frombuffer(pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL), dtype=np.uint8)
    lengths = _gather(np.array([payload.size], dtype=np.int32)).tolist()
    padded = np.zeros(max(lengths), dtype=np.uint8)
    padded[: payload.size] = payload
    parts = _gather(padded).reshape(world_size, -1)
    return [pickle.loads(parts[r, :n].tobytes()) for r, n in enumerate(lengths)]


def barrier() -> None:
    """Returns once every process has called it."""
    mx.eval(mx.distributed.all_sum(mx.array(0, dtype=mx.int32), group=_group, stream=mx.cpu))


def stop() -> None:
    """Leaves the group: mx.distributed has no call to end one; the processes simply exit."""
    global _group
    _group = None


def sum_gradients(grads: Any) -> Any:
    """The gradient tree summed over the processes, in a few flat ``all_sum`` calls (itself in one process).

    Sums, not means: each process differentiated its share of the batch with
    token weights normalised over the whole batch, so the sum is the one-process gradient.
    """
    if not several_processes():
        return grads
    summed: dict[str, Any] = {}
    bucket: list[tuple[str, Any]] = []
    size = 0
    flat = tree_flatten(grads)
    for i, (key, g) in enumerate(flat):
        bucket.append((key, g))
        size += g.nbytes
        if size >= BUCKET_BYTES or i == len(flat) - 1:
            summed.update(_summed_bucket(bucket))
            bucket, size = [], 0
    return tree_map_with_path(lambda path, g: summed[path], grads)


def sum_floats(values: list[float]) -> list[float]:
    """Element-wise sums over the processes, in float64 and rank order (the same on every process)."""
    if not several_processes():
        return [float(v) for v in values]
    rows = all_gather_object([float(v) for v in values], _group.size())
    return [float(sum(column)) for column in zip(*rows, strict=True)]


def sum_statistics(combined: MicroBatchStats) -> None:
    """Adds up every process's loss statistics of the step, in place (as ``torch_train.sum_across_processes``)."""
    if not several_processes():
        return
    means = MicroBatchStats.MEANS
    local = [
        combined.loss,
        combined.pg_loss,
        combined.weight,
        combined.micro_batches,
        *(combined.weighted[k] for k in means),
    ]
    values = sum_floats(local)
    combined.loss, combined.pg_loss, combined.weight = values[:3]
    combined.micro_batches = int(values[3])
    combined.weighted = dict(zip(means, values[4:], strict=True))


def _summed_bucket(bucket: list[tuple[str, Any]]) -> list[tuple[str, Any]]:
    dtype = bucket[0][1].dtype
    if any(g.dtype != dtype for _, g in bucket):  # mixed dtypes: one call per array
        return [(k, mx.distributed.all_sum(g, group=_group, stream=mx.cpu)) for k, g in bucket]
    flat = mx.concatenate([g.reshape(-1) for _, g in bucket])
    summed = mx.distributed.all_sum(flat, group=_group, stream=mx.cpu)
    offsets = np.cumsum([g.size for _, g in bucket])[:-1].tolist()
    return [(k, part.reshape(g.shape)) for (k, g), part in zip(bucket, mx.split(summed, offsets), strict=True)]


def _gather(array: np.ndarray) -> np.ndarray:
    gathered = mx.distributed.all_gather(mx.array(array), group=_group, stream=mx.cpu)
    return np.array(gathered)
