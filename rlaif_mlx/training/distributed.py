"""Several processes, one run: data parallelism under ``torchrun`` (PyTorch) or ``mlx.launch`` (MLX).

torchrun starts one process per GPU, mlx.launch one per Mac (or several on one
machine), and each tells its processes their place through the environment
(``training/launchers.py``). ``DistContext`` is the one interface the trainer
sees; under it runs the launcher's own engine, ``torch.distributed``
(``backends/torch_collectives.py``) or ``mx.distributed``
(``backends/mlx_collectives.py``), which offer the same four calls. Every process holds the
whole model and runs the same recipe with the same seed, so all of them draw
the same batch of B prompts. Each keeps B / world_size of them, every prompt
with all G of its samples (a group never spans processes, so group baselines
need no communication), and samples, scores and differentiates only those.
What must be the same everywhere is made global:

- the per-sample records (completions, rewards, reference log-probs) are
  gathered, so every process takes the decisions one process would take on
  the whole batch: advantages (whitening, EMA), the token normaliser of the
  loss, KL control, curriculum, stops;
- the backend sums gradients and loss statistics across processes before
  clipping (``backends/torch_train.py``, ``backends/mlx_train.py``): token weights normalised over the whole
  batch make that sum the single-process gradient, so every process takes the
  same optimizer step and the weights stay identical;
- rank 0 alone writes metrics, samples and checkpoints; every process loads a
  checkpoint to resume;
- each process scores its own completions; the teacher's score cache is one
  SQLite file they share, and its spend is summed for the budget.

Each prompt samples from a seed of its own (run seed, step, place in the whole
batch), so a run samples the same completions on any number of processes. The
supervised warm-up trains the whole (small) warm-up batch on every process at
1/world_size weight; periodic evaluation runs on rank 0 while the others wait.

Every process holds a whole replica, unless (PyTorch only) ``model.torch.fsdp`` shards the
weights, gradients and AdamW state over the processes
(``backends/torch_fsdp.py``). Then every forward and backward outside sampling
is collective: all processes run the same number, and the backend pads with
empty micro-batches where shares differ. Sampling, and rank 0's evaluation, run
on weights gathered whole in every process first (``Backend.gathered``), and a
checkpoint is gathered to rank 0, which writes the same files as one process.

In one process (no launcher, or a job of one) every helper here is a plain
pass-through and no framework is imported (``import rlaif_mlx`` stays free of them).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields, replace
from datetime import timedelta
from types import ModuleType
from typing import Any, TypeVar

import numpy as np

from .launchers import LaunchError, launch_from_env

T = TypeVar("T")

# A collective waits this long for the slowest process (a long teacher batch, rank 0's periodic eval).
COLLECTIVE_TIMEOUT = timedelta(hours=1)


class DistributedSetupError(LaunchError):
    """The run cannot be split over these processes; one line for the person launching it."""


@dataclass(frozen=True)
class DistContext:
    """This process's place in the job; ``DistContext()`` is a single-process run.

    Attributes:
        rank: this process's index among all processes (0 writes the outputs).
        world_size: how many processes share the run.
        local_rank: its index on this machine (which GPU it drives).
        owns_group: ``init_from_env`` started the process group, so ``close`` ends it.
        engine: whose collectives join the processes: ``"torch"`` (torchrun) or ``"mlx"`` (mlx.launch).
        launcher: how a person started them, for the run's first lines (``torchrun``, ``mlx.launch (ring)``).
        local_processes: how many of them run on this machine (sharing its RAM or its Mac's GPU).
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    owns_group: bool = False
    engine: str = "torch"
    launcher: str = "torchrun"
    local_processes: int = 1

    @property
    def is_main(self) -> bool:
        """Whether this process writes logs, metrics and checkpoints."""
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    # ---- splitting the batch ------------------------------------------------

    def check_batch_size(self, batch_size: int) -> None:
        """Raises ``DistributedSetupError`` unless the B prompts of a step split evenly over the processes."""
        if batch_size % self.world_size:
            raise DistributedSetupError(
                f"training.batch_size {batch_size} does not split over {self.world_size} processes: "
                f"use a multiple of {self.world_size} (each process takes the same number of prompts)"
            )

    def shard(self, items: list[T]) -> list[T]:
        """This process's contiguous share of the step's prompts (the whole list in one process)."""
        size = len(items) // self.world_size
        return items[self.rank * size : (self.rank + 1) * size]

    def local_rows(self, array: np.ndarray, rows: int) -> np.ndarray:
        """This process's ``rows`` rows of a whole-batch array (rows are in rank order)."""
        return array[self.rank * rows : (self.rank + 1) * rows] if self.enabled else array

    # ---- collectives (each is a pass-through in one process) -------------------

    def all_gather(self, value: Any) -> list[Any]:
        """Every process's ``value`` (any picklable object), in rank order."""
        if not self.enabled:
            return [value]
        return self._collectives().all_gather_object(value, self.world_size)

    def sum(self, values: list[float]) -> list[float]:
        """Element-wise sums over the processes."""
        if not self.enabled:
            return [float(v) for v in values]
        return [float(sum(column)) for column in zip(*self.all_gather([float(v) for v in values]), strict=True)]

    def any(self, flag: bool) -> bool:
        """True on every process when it is true on at least one."""
        return any(self.all_gather(bool(flag))) if self.enabled else bool(flag)

    def from_main(self, value: T) -> T:
        """Rank 0's ``value`` on every process (also waits for rank 0 to get here)."""
        return self.all_gather(value)[0] if self.enabled else value

    def run_together(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)``; when it raises on any process, the same error is raised on every one.

        A process that failed alone would leave the others waiting in the next
        collective; this way all of them take the same ``except`` branch (for
        a budget stop: save a checkpoint together). The lowest failing rank's
        error wins.
        """
        if not self.enabled:
            return fn(*args)
        value, error = None, None
        try:
            value = fn(*args)
        except Exception as exc:  # noqa: BLE001 - re-raised below, on every process
            error = exc
        failures = self.all_gather(None if error is None else (type(error), str(error)))
        failed = [(rank, f) for rank, f in enumerate(failures) if f is not None]
        if not failed:
            return value
        rank, (kind, message) = failed[0]
        if rank == self.rank:
            raise error
        try:
            raise kind(message)
        except TypeError:  # an exception type that does not take one message
            raise RuntimeError(f"process {rank} failed: {kind.__name__}: {message}") from None

    def gather_rows(self, array: np.ndarray) -> np.ndarray:
        """``[n, w]`` arrays of every process stacked in rank order, narrower ones padded with zeros."""
        if not self.enabled:
            return array
        parts = self.all_gather(np.asarray(array))
        width = max(p.shape[1] for p in parts)
        return np.concatenate([np.pad(p, ((0, 0), (0, width - p.shape[1]))) for p in parts])

    def gather_samples(self, completions: list, results: Mapping[str, Any], *, prompts: int) -> tuple[list, dict]:
        """Every process's completions and rewards, renumbered as one prompt-major batch.

        Args:
            completions: this process's ``Completion`` records (prompt indices count from 0).
            results: uid -> reward result for them.
            prompts: how many prompts this process sampled.

        Returns:
            ``(completions, results)`` of the whole batch, prompt indices and uids
            as one process sampling all prompts would give them.
        """
        if not self.enabled:
            return completions, dict(results)
        everything, out_results, offset = [], {}, 0
        for count, part, scored in self.all_gather((prompts, completions, dict(results))):
            for c in part:
                whole = renumbered(c, offset)
                everything.append(whole)
                out_results[whole.uid] = scored[c.uid]
            offset += count
        return everything, out_results

    def barrier(self) -> None:
        if self.enabled:
            self._collectives().barrier()

    # ---- the teacher: one budget, one ledger ------------------------------------

    def check_budget(self, teacher: Any, requests: int) -> None:
        """``teacher.check_budget`` against the spend of all processes together.

        Raises:
            BudgetExceeded: on every process alike.
        """
        if not self.enabled:
            teacher.check_budget(requests)
            return
        state = self._summed_teacher_state(teacher)
        ledger = _ledger_like(teacher.ledger, state["ledger"])
        judged = state["requests_judged"]
        average = ledger.spent_usd / judged if judged else 0.0
        ledger.check(reserve_usd=average * requests)

    def teacher_state(self, teacher: Any) -> dict[str, Any] | None:
        """The teacher's checkpoint state with every process's spend added up (what rank 0 saves)."""
        if teacher is None:
            return None
        return self._summed_teacher_state(teacher) if self.enabled else teacher.state_dict()

    def teacher_share(self, state: dict[str, Any]) -> dict[str, Any]:
        """The part of a saved teacher state this process restores: rank 0 carries the whole spend."""
        if self.is_main:
            return state
        return {**state, "ledger": {}, "requests_judged": 0}

    def teacher_metrics(self, teacher: Any) -> dict[str, float]:
        """The ``teacher/*`` metrics of the step over all processes' calls."""
        if not self.enabled:
            return teacher.last_batch.metrics(teacher.ledger)
        batches = self.all_gather(teacher.last_batch)
        merged = replace(
            batches[0],
            **{
                f.name: sum((getattr(b, f.name) for b in batches), type(getattr(batches[0], f.name))())
                for f in fields(batches[0])
            },
        )
        return merged.metrics(_ledger_like(teacher.ledger, self._summed_teacher_state(teacher)["ledger"]))

    def _summed_teacher_state(self, teacher: Any) -> dict[str, Any]:
        states = self.all_gather(teacher.state_dict())
        return {
            "ledger": {k: sum(s["ledger"][k] for s in states) for k in states[0]["ledger"]},
            "failed_batches": max(s["failed_batches"] for s in states),
            "requests_judged": sum(s["requests_judged"] for s in states),
        }

    # ---- the process group ----------------------------------------------------

    def close(self) -> None:
        """Ends the process group ``init_from_env`` started (one the caller started stays)."""
        if self.owns_group:
            self._collectives().stop()

    def _collectives(self) -> ModuleType:
        """The engine under this context: ``start``, ``all_gather_object``, ``barrier``, ``stop``."""
        return _engine(self.engine)


def renumbered(completion: Any, offset: int) -> Any:
    """The ``Completion`` moved ``offset`` prompts along the batch, its uid ``"{prompt}-{sample}"`` to match."""
    index = completion.prompt_index + offset
    return replace(completion, uid=f"{index}-{completion.sample_index}", prompt_index=index)


def context_from_env(environ: Mapping[str, str] = os.environ) -> DistContext:
    """This process's place from torchrun's or mlx.launch's variables; a single process without them.

    Raises:
        DistributedSetupError: the variables are inconsistent.
    """
    try:
        found = launch_from_env(environ)
    except LaunchError as exc:
        raise DistributedSetupError(str(exc)) from None
    launcher = f"{found.launcher} ({found.transport})" if found.transport else found.launcher
    return DistContext(
        rank=found.rank,
        world_size=found.world_size,
        local_rank=found.local_rank,
        engine=found.engine,
        launcher=launcher or "torchrun",
        local_processes=found.local_processes,
    )


def init_from_env(
    *, device: str = "auto", backend: str = "torch", environ: Mapping[str, str] = os.environ
) -> DistContext:
    """This process's place, with the processes joined when a launcher started several.

    Under torchrun each process drives GPU ``LOCAL_RANK`` over NCCL; on a machine without
    CUDA (or with ``model.torch.device: cpu``) the processes talk over gloo. Under
    mlx.launch they join through the transport it set up (ring, JACCL, MPI).

    Args:
        device: ``model.torch.device`` (``auto``, ``cuda`` or ``cpu``).
        backend: the resolved backend name: ``torch`` under torchrun, ``mlx`` under mlx.launch.
        environ: where the launcher's variables are read.

    Raises:
        DistributedSetupError: a backend the launcher cannot join, or a device or transport the
            processes cannot share.
    """
    ctx = context_from_env(environ)
    if not ctx.enabled:
        return ctx
    if backend != ctx.engine:
        other = "mlx.launch" if backend == "mlx" else "torchrun"
        raise DistributedSetupError(
            f"{ctx.launcher.split()[0]} started {ctx.world_size} processes for the {ctx.engine} backend but this "
            f"run uses the {backend} backend: set backend: {ctx.engine}, or start the {backend} backend with {other}"
        )
    if ctx.engine == "mlx":
        found = launch_from_env(environ)
        try:
            started = _engine("mlx").start(transport=found.transport, world_size=ctx.world_size)
        except RuntimeError as exc:
            raise DistributedSetupError(
                f"mx.distributed ({found.transport}) cannot join the {ctx.world_size} processes mlx.launch "
                f"started: {str(exc).splitlines()[0]}"
            ) from None
        return replace(ctx, owns_group=started)
    try:
        started = _engine("torch").start(device=device, local_rank=ctx.local_rank, timeout=COLLECTIVE_TIMEOUT)
    except ValueError:
        raise DistributedSetupError(
            f"model.torch.device {device!r} cannot be shared by {ctx.world_size} processes: use auto "
            "(each process takes GPU LOCAL_RANK) or cpu"
        ) from None
    return replace(ctx, owns_group=started)


def _engine(name: str) -> ModuleType:
    """``backends/torch_collectives`` or ``backends/mlx_collectives``, imported when first used."""
    if name == "mlx":
        from ..backends import mlx_collectives

        return mlx_collectives
    from ..backends import torch_collectives

    return torch_collectives


def _ledger_like(ledger: Any, state: dict[str, Any]) -> Any:
    """A ledger with ``ledger``'s price and budget holding the counters in ``state``."""
    from ..teachers.cost import CostLedger

    out = CostLedger(price=ledger.price, budget_usd=ledger.budget_usd)
    out.load_state_dict(state)
    return out
