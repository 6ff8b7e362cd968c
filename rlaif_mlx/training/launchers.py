"""Which launcher started this process, read from the environment it set: torchrun, mlx.launch, or none.

torchrun sets ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK``. ``mlx.launch`` sets
``MLX_RANK`` for every backend and, per backend, what the processes need to
find each other: ``MLX_HOSTFILE`` (ring: a file holding one list of
``ip:port`` per process), ``MLX_IBV_DEVICES`` and ``MLX_JACCL_COORDINATOR``
(JACCL over Thunderbolt: a file holding one row of RDMA devices per process),
``MLX_WORLD_SIZE`` (NCCL); its ``mpi`` backend runs ``mpirun``, which sets
``OMPI_COMM_WORLD_RANK`` / ``OMPI_COMM_WORLD_SIZE``. Reading them costs no
framework import; the engine itself is started by ``distributed.init_from_env``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path


class LaunchError(ValueError):
    """The launcher's variables do not describe a job; one line for the person launching it."""


@dataclass(frozen=True)
class Launch:
    """How this process was started.

    Attributes:
        engine: ``"torch"`` (torchrun, ``torch.distributed``) or ``"mlx"`` (mlx.launch, ``mx.distributed``).
        launcher: the launcher's name as a person typed it (``torchrun``, ``mlx.launch``), or ``""`` alone.
        rank: this process's index among all processes.
        world_size: how many processes share the run.
        local_rank: its index on this machine (torchrun's ``LOCAL_RANK``; 0 under mlx.launch, one Mac, one GPU).
        transport: mx.distributed's backend (``ring``, ``jaccl``, ``mpi``, ``nccl``); empty under torchrun.
        local_processes: how many of the processes run on this machine (they share its RAM, or its Mac's GPU).
    """

    engine: str = "torch"
    launcher: str = ""
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    transport: str = ""
    local_processes: int = 1


def launch_from_env(environ: Mapping[str, str]) -> Launch:
    """The launcher and this process's place, from the variables the launcher set.

    Raises:
        LaunchError: variables that are not integers, or a rank outside the job.
    """
    if "WORLD_SIZE" in environ or "RANK" in environ:
        world = _integer(environ, "WORLD_SIZE", "1", "torchrun")
        rank = _integer(environ, "RANK", "0", "torchrun")
        local = _integer(environ, "LOCAL_RANK", str(rank), "torchrun")
        local_world = _integer(environ, "LOCAL_WORLD_SIZE", "1", "torchrun")
        found = Launch("torch", "torchrun", rank, world, local, local_processes=local_world)
    elif "MLX_RANK" in environ:
        rank = _integer(environ, "MLX_RANK", "0", "mlx.launch")
        transport, world = _mlx_transport(environ)
        found = Launch("mlx", "mlx.launch", rank, world, 0, transport, _ring_neighbours(environ, rank))
    elif "OMPI_COMM_WORLD_SIZE" in environ:  # mlx.launch --backend mpi runs mpirun, which sets only these
        world = _integer(environ, "OMPI_COMM_WORLD_SIZE", "1", "mpirun")
        rank = _integer(environ, "OMPI_COMM_WORLD_RANK", "0", "mpirun")
        found = Launch("mlx", "mlx.launch", rank, world, 0, "mpi")
    else:
        return Launch()
    if found.world_size < 1 or not 0 <= found.rank < found.world_size:
        raise LaunchError(
            f"{found.launcher}: rank {found.rank} is not in 0..{found.world_size - 1} "
            f"({found.world_size} processes); launch the job again"
        )
    return found


def _mlx_transport(environ: Mapping[str, str]) -> tuple[str, int]:
    """mx.distributed's backend under mlx.launch and the number of processes its variables describe."""
    if "MLX_IBV_DEVICES" in environ:  # one row of RDMA devices per process
        return ("jaccl-ring" if environ.get("MLX_JACCL_RING") else "jaccl"), len(_json_file(environ, "MLX_IBV_DEVICES"))
    if "MLX_WORLD_SIZE" in environ:
        return "nccl", _integer(environ, "MLX_WORLD_SIZE", "1", "mlx.launch")
    if "MLX_HOSTFILE" in environ:  # one list of ip:port per process; empty for a single process
        return "ring", max(1, len(_json_file(environ, "MLX_HOSTFILE")))
    raise LaunchError(
        "MLX_RANK is set but none of MLX_HOSTFILE, MLX_IBV_DEVICES or MLX_WORLD_SIZE is: "
        "start the job with mlx.launch (e.g. mlx.launch --hostfile hosts.json -m rlaif_mlx.cli train ...)"
    )


def _ring_neighbours(environ: Mapping[str, str], rank: int) -> int:
    """Processes of a ring hostfile on this process's address (``mlx.launch -n 2`` puts both on 127.0.0.1)."""
    if "MLX_HOSTFILE" not in environ or "MLX_IBV_DEVICES" in environ:
        return 1
    hosts = [[str(a).rpartition(":")[0] for a in entry] for entry in _json_file(environ, "MLX_HOSTFILE")]
    if not 0 <= rank < len(hosts) or not hosts[rank]:
        return 1
    return sum(1 for entry in hosts if entry and entry[0] == hosts[rank][0])


def _json_file(environ: Mapping[str, str], key: str) -> list:
    path = environ[key]
    try:
        text = Path(path).read_text().strip() if path else ""
        value = json.loads(text) if text else []
    except (OSError, ValueError) as exc:
        raise LaunchError(f"{key} names {path!r}, which mlx.launch should have written: {exc}") from None
    if not isinstance(value, list):
        raise LaunchError(f"{key} names {path!r}, which holds no list of processes")
    return value


def _integer(environ: Mapping[str, str], key: str, default: str, launcher: str) -> int:
    try:
        return int(environ.get(key, default))
    except ValueError:
        raise LaunchError(f"{key} must be an integer ({launcher} sets it), got {environ[key]!r}") from None
