"""Typed run configuration: YAML in, validated pydantic model out.

Every key is checked at load: each unknown key, wrong type or out-of-range
value becomes a line of the ``ConfigError`` naming the file, the line and the key
path, e.g. ``configs/x.yaml:12: training.learning_rate: must be > 0 (got -1)``
(``config_text``). Section and key names follow the original mlx-rlaif tool where
they fit (``model.base_model``, ``rlaif.num_samples_per_prompt``, ``rlaif.kl_penalty``,
``rlaif.target_kl``, ``training.learning_rate`` ...); a config written for that tool
is read into this layout (``config_legacy``).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .config_legacy import FLAT, RULES, Migration, migrate
from .config_text import ConfigError, error_lines, read_yaml  # ConfigError: imported from here by the commands


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class TorchOptions(_Section):
    """PyTorch-only knobs; the MLX backend ignores them with a note."""

    device: str = "auto"  # auto | cpu | cuda | cuda:N | mps
    attn_implementation: str | None = None  # e.g. sdpa, eager, flash_attention_2
    # Under torchrun: each process keeps 1/N of the weights, gradients and AdamW state (FSDP) instead of a
    # whole replica, for a model that does not fit one GPU. Ignored, with a warning, in a single process.
    fsdp: bool = False


class MlxOptions(_Section):
    """MLX-only knobs; the PyTorch backend ignores them with a note."""

    memory_limit_gb: float | None = Field(default=None, gt=0)  # mx.set_memory_limit (and wired limit on Metal)
    cache_limit_gb: float | None = Field(default=None, ge=0)  # mx.set_cache_limit: freed buffers kept for reuse


def options_set(options: _Section, prefix: str) -> list[str]:
    """Dotted names of a backend's options that differ from their defaults (for the "ignored" note)."""
    return [
        f"{prefix}.{name}"
        for name, field in type(options).model_fields.items()
        if getattr(options, name) != field.get_default(call_default_factory=True)
    ]


class ModelConfig(_Section):
    base_model: str = Field(min_length=1)
    build_tiny_if_missing: bool = False  # build the random tiny model at base_model when absent
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    use_lora: bool = True
    lora_r: int = Field(default=16, ge=1)
    lora_alpha: float = Field(default=32.0, gt=0)
    lora_dropout: float = Field(default=0.0, ge=0, lt=1)
    lora_target_modules: list[str] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"], min_length=1
    )
    torch: TorchOptions = Field(default_factory=TorchOptions)
    mlx: MlxOptions = Field(default_factory=MlxOptions)


class DataConfig(_Section):
    train_file: str
    eval_file: str | None = None
    on_bad_line: Literal["error", "skip"] = "error"
    use_chat_template: bool = True
    system_prompt: str | None = None
    max_prompt_tokens: int = Field(default=1024, ge=8)


class TrainingConfig(_Section):
    num_epochs: int = Field(default=1, ge=1)
    max_steps: int | None = Field(default=None, ge=1)
    batch_size: int = Field(default=4, ge=1, description="prompts per optimizer step")
    # sequences per forward/backward; auto: the largest the memory plan fits on this device (training/memory_fit.py)
    micro_batch_size: int | Literal["auto"] = 8
    learning_rate: float = Field(default=1e-5, gt=0)
    weight_decay: float = Field(default=0.0, ge=0)
    adam_beta1: float = Field(default=0.9, ge=0, lt=1)
    adam_beta2: float = Field(default=0.999, ge=0, lt=1)
    warmup_steps: int = Field(default=0, ge=0)
    lr_scheduler_type: Literal["constant", "linear", "cosine"] = "cosine"
    min_lr_ratio: float = Field(default=0.0, ge=0, le=1)
    max_grad_norm: float | None = Field(default=1.0, gt=0)
    updates_per_batch: int = Field(default=1, ge=1, description="PPO epochs over one batch")
    clip_eps_low: float = Field(default=0.2, gt=0, lt=1)
    clip_eps_high: float = Field(default=0.2, gt=0)
    loss_aggregation: Literal["token_mean", "sequence_mean", "constant"] = "token_mean"
    save_steps: int = Field(default=50, ge=1)
    save_total_limit: int = Field(default=3, ge=1)
    # supervised warm-up on the tasks' reference solutions before RL starts
    sft_warmup_steps: int = Field(default=0, ge=0)
    sft_learning_rate: float | None = Field(default=None, gt=0)
    sft_batch_size: int = Field(default=8, ge=1)

    @field_validator("micro_batch_size", mode="before")
    @classmethod
    def _micro_batch_size(cls, value: Any) -> int | str:
        if value == "auto" or (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
            return value
        raise ValueError("must be a whole number >= 1, or auto (the largest the memory plan fits)")


class RlaifConfig(_Section):
    num_samples_per_prompt: int = Field(default=4, ge=1)
    max_new_tokens: int = Field(default=256, ge=1)
    # the temperature samples are drawn at, and the one the trained policy (logits / T) is scored at
    generation_temperature: float = 1.0
    top_k: int = Field(default=0, ge=0)
    top_p: float = Field(default=1.0, gt=0, le=1)
    min_p: float = Field(default=0.0, ge=0, lt=1)
    stop: list[str] = Field(default_factory=list)
    kl_penalty: float = Field(default=0.05, ge=0, description="initial KL coefficient (beta)")
    kl_estimator: Literal["k1", "k3"] = "k3"
    kl_placement: Literal["loss", "reward"] = "loss"
    adaptive_kl: bool = True
    target_kl: float = Field(default=0.05, gt=0, description="per-token KL the controller aims for")
    # The adaptive controller's horizon in optimizer steps: with the KL held at twice the target beta
    # doubles in about 139 steps at 40. ``kl_horizon`` is the old key, in samples, still honoured as
    # ``kl_horizon / (batch_size * num_samples_per_prompt)`` steps when it is set instead.
    kl_horizon_steps: float | None = Field(default=40.0, gt=0)
    kl_horizon: int | None = Field(default=None, ge=1, description="old key, in samples: use kl_horizon_steps")
    baseline: Literal["group_mean", "leave_one_out", "ema", "none"] = "group_mean"
    scale_by_std: bool = True
    whiten_advantages: bool = False
    ema_decay: float = Field(default=0.9, gt=0, lt=1)
    skip_zero_variance_groups: bool = False
    # Sample the next batch while the teacher scores this one; that batch is then one update stale
    # and the loss's ratio is taken against the policy that sampled it (``sample_ahead.py``).
    sample_ahead: bool = False

    @model_validator(mode="before")
    @classmethod
    def _old_horizon_key(cls, data: Any) -> Any:
        # A config (or a checkpoint's saved config) from before kl_horizon_steps keeps its horizon in samples.
        if isinstance(data, dict) and data.get("kl_horizon") is not None and "kl_horizon_steps" not in data:
            data = {**data, "kl_horizon_steps": None}
        return data

    @model_validator(mode="after")
    def _one_horizon(self) -> RlaifConfig:
        if self.kl_horizon is not None and self.kl_horizon_steps is not None:
            raise ValueError(
                "kl_horizon (the old key, in samples) and kl_horizon_steps are both set; keep kl_horizon_steps only"
            )
        if self.kl_horizon is None and self.kl_horizon_steps is None:
            raise ValueError("kl_horizon_steps is null; set the KL controller's horizon in steps, e.g. 40")
        return self

    @model_validator(mode="after")
    def _k1_is_no_loss_penalty(self) -> RlaifConfig:
        if self.kl_estimator == "k1" and self.kl_placement == "loss":
            raise ValueError(
                "kl_estimator: k1 with kl_placement: loss is a penalty with zero expected gradient "
                "(beta * grad log p averages to 0 over samples); use kl_estimator: k3, or kl_placement: reward"
            )
        return self

    @field_validator("generation_temperature")
    @classmethod
    def _a_policy_to_train(cls, t: float) -> float:
        if t < 0.01:
            raise ValueError(
                "must be at least 0.01: the policy trained is softmax(logits / T) at the sampling temperature, "
                "and greedy decoding (0) has none (use eval.temperature: 0 for greedy evaluation)"
            )
        return t

    @model_validator(mode="after")
    def _std_scaling_needs_a_centred_baseline(self) -> RlaifConfig:
        if self.scale_by_std and self.baseline == "none":
            raise ValueError(
                "scale_by_std: true divides raw rewards by their spread; use it with baseline "
                "group_mean, leave_one_out or ema, or set scale_by_std: false"
            )
        return self


class PriceConfig(_Section):
    """US dollars per million tokens."""

    input: float = Field(ge=0)
    output: float = Field(ge=0)
    cache_read: float | None = Field(default=None, ge=0)  # prompt-cache reads; default: the table's rule
    cache_write: float | None = Field(default=None, ge=0)  # prompt-cache writes; default: the table's rule


class TeacherConfig(_Section):
    """The AI judge. ``provider: none`` (the default) trains on the offline graders alone."""

    provider: Literal["none", "anthropic", "openai", "openai_compatible"] = "none"
    model: str | None = None  # e.g. claude-sonnet-4-5, gpt-5-mini, or the local server's model name
    base_url: str | None = None  # openai_compatible: the server, e.g. http://127.0.0.1:8080/v1
    api_key_env: str | None = None  # default ANTHROPIC_API_KEY / OPENAI_API_KEY; local servers need none
    max_concurrency: int = Field(default=8, ge=1)
    timeout_s: float = Field(default=60.0, gt=0)
    max_retries: int = Field(default=3, ge=0)
    max_tokens: int = Field(default=512, ge=16, description="longest answer per completion judged")
    temperature: float = Field(default=0.0, ge=0, le=2)
    cache_path: str | None = "~/.cache/rlaif-mlx/teacher-cache.sqlite"  # null: no cache
    cache_ttl_s: float | None = Field(default=30 * 24 * 3600.0, gt=0)  # null: cached judgements never expire
    budget_usd: float | None = Field(default=None, gt=0)
    prices: PriceConfig | None = None  # overrides the built-in price table for this model
    rubric_weights: dict[str, float] = Field(
        default_factory=lambda: {"correctness": 0.6, "quality": 0.15, "efficiency": 0.1, "readability": 0.15}
    )
    use_reference: bool = True  # show the rubric the task's (or the teacher's) reference solution
    write_reference: bool = False  # ask the teacher for a reference solution where a task has none (cached)
    gate: Literal["always", "parses", "any_test_passes", "all_tests_pass"] = "parses"
    # pointwise: one call per completion. group: one call per prompt judges its completions side by side.
    mode: Literal["pointwise", "group"] = "pointwise"
    max_group: int = Field(default=8, ge=1, le=26, description="completions per group call; larger groups split")
    prompt_cache: bool = True  # mark the shared prompt prefix for the provider's prompt cache

    @field_validator("rubric_weights")
    @classmethod
    def _known_criteria(cls, weights: dict[str, float]) -> dict[str, float]:
        from .teachers.base import CRITERIA

        unknown = sorted(set(weights) - set(CRITERIA))
        if unknown:
            raise ValueError(f"unknown rubric criteria {unknown}; known: {', '.join(CRITERIA)}")
        if any(w < 0 for w in weights.values()) or sum(weights.values()) <= 0:
            raise ValueError("rubric weights must be >= 0 and not all 0")
        return weights

    @model_validator(mode="after")
    def _provider_needs(self) -> TeacherConfig:
        if self.provider != "none" and not self.model:
            raise ValueError(f"teacher.provider {self.provider} needs teacher.model")
        if self.provider == "openai_compatible" and not self.base_url:
            raise ValueError("teacher.provider openai_compatible needs teacher.base_url (the server's /v1 URL)")
        return self


class RewardConfig(_Section):
    weights: dict[str, float] = Field(default_factory=lambda: {"has_code": 0.0, "parses": 0.1, "tests": 0.9})
    test_timeout_s: float = Field(default=10.0, gt=0)
    max_workers: int = Field(default=2, ge=1)
    memory_limit_mb: int = Field(default=1024, ge=64)

    @field_validator("weights")
    @classmethod
    def _known_components(cls, weights: dict[str, float]) -> dict[str, float]:
        unknown = sorted(set(weights) - {"has_code", "parses", "tests", "teacher"})
        if unknown:
            raise ValueError(f"unknown reward component(s) {unknown}; known: has_code, parses, tests, teacher")
        return weights


class CurriculumConfig(_Section):
    enabled: bool = False
    num_buckets: int = Field(default=3, ge=1)
    advance_threshold: float = Field(default=0.7, description="bucket mean reward that moves on")
    # null: a bucket the threshold does not pass is left after 2 passes over its tasks
    advance_after_steps: int | None = Field(default=None, ge=1, description="step budget per bucket")
    window: int = Field(default=16, ge=1)
    mix_previous: float = Field(default=0.0, ge=0, lt=1)  # each batch keeps at least one current-bucket task


class LoggingConfig(_Section):
    log_every: int = Field(default=1, ge=1)
    dashboard: bool = True  # the live terminal dashboard on a TTY (--no-dashboard: plain lines)
    tensorboard: bool = False  # event files in <output_dir>/tensorboard (no TensorFlow or torch needed)
    save_samples: bool = True  # every step's completions with their scores in <output_dir>/samples.jsonl


class EvalConfig(_Section):
    """Evaluation on ``data.eval_file`` (``rlaif-mlx eval``, and during training every ``every_steps``)."""

    every_steps: int | None = Field(default=None, ge=1)
    num_samples: int = Field(default=1, ge=1, description="completions per task (n for pass@k)")
    pass_k: list[int] = Field(default_factory=lambda: [1], min_length=1)
    temperature: float = Field(default=0.0, ge=0, description="0 = greedy")
    max_new_tokens: int | None = Field(default=None, ge=1, description="default: rlaif.max_new_tokens")
    max_tasks: int | None = Field(default=None, ge=1, description="evaluate the first N tasks only")

    @model_validator(mode="after")
    def _k_within_samples(self) -> EvalConfig:
        if max(self.pass_k) > self.num_samples or min(self.pass_k) < 1:
            raise ValueError(f"pass_k {self.pass_k} needs 1 <= k <= num_samples ({self.num_samples})")
        return self


class RunConfig(_Section):
    seed: int = 0
    backend: Literal["auto", "torch", "mlx"] = "auto"
    output_dir: str = "runs/default"
    model: ModelConfig
    data: DataConfig
    training: TrainingConfig = Field(default_factory=TrainingConfig)
    rlaif: RlaifConfig = Field(default_factory=RlaifConfig)
    rewards: RewardConfig = Field(default_factory=RewardConfig)
    teacher: TeacherConfig = Field(default_factory=TeacherConfig)
    curriculum: CurriculumConfig = Field(default_factory=CurriculumConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    logging: LoggingConfig = Field(default_factory=LoggingConfig)

    @model_validator(mode="after")
    def _teacher_weight_needs_a_teacher(self) -> RunConfig:
        if self.rewards.weights.get("teacher", 0) > 0 and self.teacher.provider == "none":
            raise ValueError(
                "rewards.weights.teacher is set but teacher.provider is none; configure the "
                "teacher section or drop the teacher weight"
            )
        if self.teacher.provider != "none" and self.rewards.weights.get("teacher", 0) <= 0:
            raise ValueError(
                f"teacher.provider is {self.teacher.provider} but rewards.weights.teacher is not set; "
                "give the teacher a weight, e.g. rewards.weights: {tests: 0.6, teacher: 0.4}"
            )
        return self


# CLI flag -> dotted key path
CLI_OVERRIDES = {
    "model": "model.base_model",
    "train_file": "data.train_file",
    "eval_file": "data.eval_file",
    "backend": "backend",
    "output_dir": "output_dir",
    "max_steps": "training.max_steps",
    "seed": "seed",
    "save_every": "training.save_steps",
}


def load_config(
    path: str | Path, *, overrides: dict[str, Any] | None = None, on_note: Callable[[str], None] | None = None
) -> RunConfig:
    """Reads, overrides and validates a YAML config.

    Args:
        path: the YAML file. Relative data/model paths inside it are resolved
            against the current directory, as a user typing them would expect.
            A config written for the original mlx-rlaif tool is read into this
            layout (``config_legacy``).
        overrides: dotted key path -> value (e.g. ``{"training.max_steps": 5}``);
            ``None`` values are ignored.
        on_note: receives the note that lists where each key of an original-tool config went.

    Returns:
        The validated ``RunConfig``.

    Raises:
        ConfigError: every problem of the file, one line each, naming the file, line and key path.
    """
    raw, lines, migration = read_config(path)
    if migration is not None and on_note is not None:
        on_note(migration.note(str(path)))
    for dotted, value in (overrides or {}).items():
        if value is not None:
            _set_dotted(raw, dotted, value)
    return validate_config(raw, path=Path(path), lines=lines, migration=migration)


def read_config(path: str | Path) -> tuple[dict[str, Any], dict[tuple, int], Migration | None]:
    """A config file's YAML in this project's layout, not yet validated.

    Returns:
        The keys (migrated when the file is written for the original tool), each key path's
        line in the file, and the migration (None for a file in this layout).

    Raises:
        ConfigError: the file cannot be read, or is not a YAML mapping.
    """
    path = Path(path)
    raw, lines = read_yaml(path)
    migration = migrate(raw, known=is_known_key)
    if migration is None:
        return raw, lines, None
    moved = {new: lines[old] for new, old in migration.moved.items() if old in lines}
    return migration.raw, lines | moved, migration


def validate_config(
    raw: dict[str, Any], *, path: Path, lines: dict[tuple, int], migration: Migration | None = None
) -> RunConfig:
    """``raw`` as a ``RunConfig``; every problem one line of the ``ConfigError``, in file order."""
    try:
        return RunConfig.model_validate(raw)
    except ValidationError as exc:
        origins = migration.origins if migration is not None else {}
        aliases = (*FLAT, *RULES)  # the original tool's names are read too
        raise ConfigError(
            error_lines(exc, path=path, lines=lines, origins=origins, schema=RunConfig, aliases=aliases)
        ) from None


def is_known_key(dotted: str) -> bool:
    """Whether ``dotted`` (``"training.batch_size"``) names a key of this project's config."""
    section: Any = RunConfig
    for part in dotted.split("."):
        fields = getattr(section, "model_fields", None)
        if not fields or part not in fields:
            return False
        section = fields[part].annotation
    return True


def save_config(config: RunConfig, path: str | Path) -> None:
    """Writes the resolved config (every default filled in) as YAML."""
    Path(path).write_text(yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False))


def _set_dotted(raw: dict, dotted: str, value: Any) -> None:
    node = raw
    *parents, leaf = dotted.split(".")
    for key in parents:
        node = node.setdefault(key, {})
    node[leaf] = value
