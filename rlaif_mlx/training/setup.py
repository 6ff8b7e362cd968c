"""Run setup, as torchtune's recipe ``setup()``: a config in, a ready ``Trainer`` out.

``build_run`` builds the model, tasks, backend, rewards and reporter, and
restores a checkpoint when asked. ``train`` calls it, and so do tests and
benchmarks, so each of them starts a run the way a user does. Problems a user
can fix are ``SetupError``s of one line that name the file or key.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..config import RunConfig
from ..errors import SetupError, first_line


def create_backend(
    config: RunConfig, *, total_steps: int, source: str, hint: str = "", log: Callable[[str], None] = print
) -> Any:
    """Creates the config's backend; a missing framework or model becomes a one-line ``SetupError``.

    The model path is checked first (``preflight.check_model_path``): a path that looks local
    never reaches the hub, and a hub id that cannot be had fails at once instead of retrying.

    Args:
        config: the run config (backend, model, training, seed).
        total_steps: planned optimizer steps, for the LR schedule.
        source: the config file, named in the error when the backend refuses a setting.
        hint: appended to the error when the base model cannot be loaded.
        log: receives a line when a cached hub model is loaded without the hub, which is out of reach.
    """
    from ..backends import BackendUnavailable
    from ..backends import create_backend as create
    from .memory_fit import resolve_auto
    from .preflight import check_model_path, use_hub_cache_only

    model = config.model.base_model
    found = check_model_path(model, build_tiny=config.model.build_tiny_if_missing, probe_hub=True)
    if not found.ok:
        raise SetupError(found.line("model.base_model") + hint)
    if found.cache_only:
        use_hub_cache_only()
        log(f"model {found.detail} (as with HF_HUB_OFFLINE=1)")
    config = resolve_auto(config)  # micro_batch_size: auto, where no plan was made before (eval, sample, export)
    try:
        return create(config.backend, config.model, config.training, seed=config.seed, total_steps=total_steps)
    except BackendUnavailable as exc:
        raise SetupError(str(exc)) from None
    except OSError as exc:  # transformers / mlx-lm: a file it needs is missing or unreadable, or the hub failed
        raise SetupError(f"model.base_model {model}: cannot be loaded: {first_line(exc)}{hint}") from None
    except ValueError as exc:  # the backend refuses this model with these settings; the message names the key
        raise SetupError(f"{source}: {first_line(exc)}") from None


def create_teacher(config: RunConfig, *, source: str) -> Any:
    """The configured teacher, or None; a missing key or unknown price becomes a one-line ``SetupError``."""
    if config.teacher.provider == "none":
        return None
    from ..teachers.judge import Teacher

    try:
        return Teacher(config.teacher)
    except ValueError as exc:  # MissingApiKey, no price for a budget, an unusable cache file
        raise SetupError(f"{source}: {first_line(exc)}") from None


def ensure_model(config: RunConfig, *, log: Callable[[str], None]) -> None:
    """Builds the tiny random model where ``model.build_tiny_if_missing`` asks for it and none is there yet."""
    model_path = Path(config.model.base_model)
    if config.model.build_tiny_if_missing and not (model_path / "config.json").exists():
        from ..data.tiny_model import ensure_tiny_model

        log(f"building the tiny random model at {model_path} (model.build_tiny_if_missing)")
        ensure_tiny_model(model_path)


def build_run(
    config: RunConfig,
    *,
    source: str,
    resume: bool | str | Path = False,
    overwrite: bool = False,
    allow_other_base: bool = False,
    dashboard: bool = False,
    dist: Any = None,
    log: Callable[[str], None] = print,
) -> Any:
    """A ``Trainer`` ready to ``run``: model, tasks, backend, rewards, reporter, and the checkpoint restored.

    Nothing is written until all of it is set up: a start that fails leaves no output folder.

    Args:
        config: the validated run config.
        source: the config file, named in errors.
        resume: False for a fresh run; True for the newest checkpoint in ``output_dir``; or a
            checkpoint folder, or a run folder (its newest checkpoint).
        overwrite: move a run already in ``output_dir`` aside (never deleted) instead of refusing.
        allow_other_base: resume a checkpoint onto a base model other than the one it was trained from.
        dashboard: show the live dashboard (on a terminal) instead of plain lines.
        dist: this process's place under torchrun or mlx.launch (None: a single process).
        log: receives the setup's human lines (what was built, loaded and restored).

    Returns:
        The trainer; ``trainer.close()`` releases the teacher when the run is over.

    Raises:
        SetupError: an output folder that holds another run or cannot be made, no checkpoint to
            resume, tasks that do not load, a missing model, framework or teacher key; one line each.
    """
    from .distributed import DistContext
    from .fingerprint import base_fingerprint, check_base
    from .run_folder import new_run_id

    dist = dist if dist is not None else DistContext()
    output_dir = Path(config.output_dir)
    checkpoint = _check_output(config, resume=resume, overwrite=overwrite)
    if dist.is_main:
        ensure_model(config, log=log)
    dist.barrier()  # the others load the model rank 0 may have just built
    trainer = _assemble(config, source=source, dashboard=dashboard, dist=dist, log=log)
    trainer.run_id = new_run_id()
    if checkpoint is not None:
        try:
            warning = check_base(checkpoint, config.model.base_model, allow_other=allow_other_base)
        except ValueError as exc:  # another base's checkpoint: the line names both
            trainer.close()
            raise SetupError(str(exc)) from None
        if warning:
            log(warning)
        try:
            trainer.restore(checkpoint)
        except (ValueError, OSError) as exc:  # the weights or data order do not fit this model or task list
            trainer.close()
            raise SetupError(f"cannot resume from {checkpoint}: {first_line(exc)}") from None
    trainer.base = base_fingerprint(config.model.base_model)
    if dist.is_main:
        try:
            _prepare_output(output_dir, trainer, config, overwrite=overwrite, log=log)
        except OSError as exc:
            trainer.close()
            raise SetupError(
                f"{output_dir}: cannot be written ({exc.strerror or exc}); point output_dir elsewhere"
            ) from None
    dist.barrier()
    return trainer


def _check_output(config: RunConfig, *, resume: bool | str | Path, overwrite: bool) -> Path | None:
    """Checks the output folder can take this run; returns the checkpoint to resume (None: a fresh run)."""
    from .checkpoint import check_resumable, find_checkpoint
    from .preflight import check_writable
    from .run_folder import check_fresh_start, check_resume_target, run_entries

    output_dir = Path(config.output_dir)
    found = check_writable(output_dir, "output_dir")
    if not found.ok:
        raise SetupError(found.line("output_dir"))
    try:
        if resume is False:
            check_fresh_start(output_dir, overwrite=overwrite)
            return None
        # Checked before anything is written: the run folder's config.yaml may be the
        # only record of an older checkpoint's config.
        try:
            checkpoint = find_checkpoint(output_dir if resume is True else resume)
        except ValueError as exc:
            leftovers = run_entries(output_dir) if resume is True else []
            raise SetupError(
                f"{exc}; start a new run there with --overwrite (moves {', '.join(leftovers)} aside)"
                if leftovers
                else str(exc)
            ) from None
        check_resumable(checkpoint, config)
        check_resume_target(output_dir, checkpoint, overwrite=overwrite)
        return checkpoint
    except ValueError as exc:  # CheckpointError, RunFolderError: one line each
        raise SetupError(str(exc)) from None


def _assemble(config: RunConfig, *, source: str, dashboard: bool, dist: Any, log: Callable[[str], None]) -> Any:
    """The trainer and its parts: tasks, backend, sandbox, rewards (with the teacher) and reporter."""
    from ..data import load_task_set
    from ..data.tasks import DataError
    from ..monitor.reporting import PlainReporter
    from ..rewards.pipeline import RewardPipeline
    from ..rewards.sandbox import sandbox_capabilities
    from .trainer import Trainer, total_optimizer_steps

    output_dir = Path(config.output_dir)
    try:
        train = load_task_set(config.data.train_file, on_bad_line=config.data.on_bad_line)
        periodic = config.eval.every_steps and config.data.eval_file
        eval_set = load_task_set(config.data.eval_file, on_bad_line=config.data.on_bad_line) if periodic else None
    except DataError as exc:
        raise SetupError(str(exc)) from None
    if train.skipped_lines:
        log(f"skipped {train.skipped_lines} bad line(s) in {train.source} (data.on_bad_line: skip)")

    config = _fit_to_memory(config, source=source, dist=dist, prompts=[t.prompt for t in train.tasks], log=log)
    steps = total_optimizer_steps(config, len(train.tasks))
    backend = create_backend(config, total_steps=steps, source=source, log=log)
    trainable, total = backend.trainable_parameter_count()
    log(
        f"backend {backend.name} on {backend.device}  model {config.model.base_model}  "
        f"trainable {trainable:,} of {total:,} parameters ({'LoRA' if config.model.use_lora else 'full'})"
    )
    log(f"{len(train.tasks)} training tasks from {config.data.train_file}  output {output_dir}")
    if dist.enabled:
        fsdp = config.model.torch.fsdp and backend.name == "torch"
        sharded = "; weights, gradients and AdamW state sharded (FSDP)" if fsdp else ""
        log(
            f"{dist.launcher}: {dist.world_size} processes, {config.training.batch_size // dist.world_size} of the "
            f"{config.training.batch_size} prompts of each step on each; gradients summed{sharded}"
        )
    caps = sandbox_capabilities()
    log(
        f"sandbox: {caps['mode']} (network isolated: {caps['network_isolated']}, "
        f"read-only outside its folder: {caps['fs_readonly']}, other files hidden: {caps['fs_hidden']})"
    )
    rewards = RewardPipeline(config.rewards, teacher=create_teacher(config, source=source))
    if not dist.is_main:
        reporter = PlainReporter(lambda line: None)
    elif dashboard:
        from ..monitor.dashboard import make_reporter

        reporter = make_reporter(dashboard=True, log_every=config.logging.log_every)
    else:
        reporter = PlainReporter(log, log_every=config.logging.log_every)
    try:
        return Trainer(
            config,
            backend=backend,
            train=train,
            rewards=rewards,
            output_dir=output_dir,
            reporter=reporter,
            eval_tasks=eval_set,
            dist=dist,
        )
    except DataError as exc:  # a prompt longer than data.max_prompt_tokens
        if rewards.teacher is not None:
            rewards.teacher.close()
        raise SetupError(str(exc)) from None


def _prepare_output(
    output_dir: Path, trainer: Any, config: RunConfig, *, overwrite: bool, log: Callable[[str], None]
) -> None:
    """Moves an old run aside when asked, then makes the folder with ``config.yaml`` (the config as
    given: ``micro_batch_size: auto`` stays auto, refitted on the next machine) and ``run.json``."""
    from ..config import save_config
    from .run_folder import move_aside, write_run_file

    if overwrite:
        aside = move_aside(output_dir)
        if aside is not None:
            log(f"moved the earlier run in {output_dir} to {aside} (--overwrite)")
    output_dir.mkdir(parents=True, exist_ok=True)
    save_config(config, output_dir / "config.yaml")
    write_run_file(output_dir, run_id=trainer.run_id, resumed_from=trainer.restored_from)


def _fit_to_memory(config: RunConfig, *, source: str, dist: Any, prompts: list[str], log: Callable) -> RunConfig:
    """``memory_fit.fit_to_memory`` before the model loads: a refusal stops every process alike."""
    from .memory_fit import fit_to_memory

    sharing = dist.local_processes  # the processes on this machine share its memory
    return dist.run_together(
        lambda: fit_to_memory(
            config, source=source, world_size=dist.world_size, sharing=sharing, prompts=prompts, log=log
        )
    )


@dataclass
class LoadedCheckpoint:
    """A checkpoint loaded into a backend, ready to sample from, evaluate or export.

    Attributes:
        path: the checkpoint folder (``.../checkpoints/step-NNNNNN``).
        config: the run config it was saved with, after the caller's overrides.
        config_path: where that config was read from (named in errors).
        step: the optimizer step it was saved at.
        backend: the backend holding its weights.
    """

    path: Path
    config: RunConfig
    config_path: Path
    step: int
    backend: Any


def load_checkpoint(
    checkpoint: str | Path,
    *,
    backend: str | None = None,
    model: str | None = None,
    seed: int | None = None,
    allow_other_base: bool = False,
    log: Callable[[str], None] = print,
) -> LoadedCheckpoint:
    """Finds a checkpoint, reads the config saved with it and loads it into a backend.

    Args:
        checkpoint: a checkpoint folder, or a run folder (its newest checkpoint).
        backend: ``auto``, ``torch`` or ``mlx``; None keeps the checkpoint config's.
        model: where the base model lives on this machine; None keeps the config's.
        seed: overrides the config's seed (the backend's random state).
        allow_other_base: load it onto a base model other than the one it was trained from.
        log: receives a warning line when ``allow_other_base`` lets a different base through.

    Raises:
        SetupError: no checkpoint or config there, a missing framework or base
            model, a base other than its own, or weights the backend cannot load; one line each.
    """
    from ..config import load_config
    from .checkpoint import checkpoint_config_path, find_checkpoint, load_trainer_state
    from .fingerprint import check_base

    overrides: dict[str, Any] = {"backend": backend, "model.base_model": model, "seed": seed}
    if model:
        overrides["model.build_tiny_if_missing"] = False  # as in train: a named model is loaded, never built
    try:  # CheckpointError and ConfigError are ValueErrors phrased as one line
        path = find_checkpoint(checkpoint)
        config_path = checkpoint_config_path(path)
        config = load_config(config_path, overrides=overrides)
        step = int(load_trainer_state(path)["step"])
        warning = check_base(path, config.model.base_model, allow_other=allow_other_base)
    except ValueError as exc:
        raise SetupError(str(exc)) from None
    if warning:
        log(warning)
    # total_steps only shapes the LR schedule, which neither export nor sample uses.
    steps = max(config.training.max_steps or 0, step, 1)
    hint = "" if model else " (name the base model on this machine with --model)"
    loaded = create_backend(config, total_steps=steps, source=str(config_path), hint=hint, log=log)
    try:
        loaded.load(path)
    except (ValueError, OSError) as exc:
        raise SetupError(f"{path}: cannot be loaded by the {loaded.name} backend: {first_line(exc)}") from None
    return LoadedCheckpoint(path=path, config=config, config_path=config_path, step=step, backend=loaded)
