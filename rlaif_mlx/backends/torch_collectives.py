"""``torch.distributed`` for ``training.distributed``: the few collectives a data-parallel run uses.

The run's logic (what is sharded, gathered and summed) lives in
``training.distributed.DistContext``; this module is the engine under it for
processes started by ``torchrun``: NCCL between GPUs, gloo between CPUs.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist


def start(*, device: str, local_rank: int, timeout: timedelta) -> bool:
    """Starts the process group for this torchrun process.

    Each process drives GPU ``local_rank`` over NCCL; without CUDA (or with
    ``model.torch.device: cpu``) the processes talk over gloo.

    Args:
        device: ``model.torch.device`` (``auto``, ``cuda`` or ``cpu``).
        local_rank: this process's index on its machine.
        timeout: how long a collective may wait for the slowest process.

    Returns:
        True when this call started the group (the caller then ends it), False when one was running.

    Raises:
        ValueError: a device several processes cannot share (the message names the key).
    """
    if device in ("auto", "cuda") and torch.cuda.is_available():
        torch.cuda.set_device(local_rank)  # "cuda" now means this process's GPU
        group = "nccl"
    elif device in ("auto", "cpu", "cuda"):  # "cuda" without a GPU: the backend says so when it loads
        group = "gloo"
    else:
        raise ValueError(f"model.torch.device {device!r} cannot be shared by several processes")
    if dist.is_initialized():  # the caller's own group
        return False
    dist.init_process_group(group, timeout=timeout)
    return True


def all_gather_object(value: Any, world_size: int) -> list[Any]:
    """Every process's ``value`` (any picklable object), in rank order."""
    out: list[Any] = [None] * world_size
    dist.all_gather_object(out, value)
    return out


def barrier() -> None:
    dist.barrier()


def stop() -> None:
    """Ends the process group, if one is running."""
    if dist.is_initialized():
        dist.destroy_process_group()
