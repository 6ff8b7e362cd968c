"""Typed run configuration: YAML in, validated pydantic model out.

Every key is checked at load: an unknown key, a wrong type or an out-of-range
value becomes one ``ConfigError`` line naming the file, the line and the key
path, e.g. ``configs/x.yaml:12: training.learning_rate: must be > 0 (got -1)``.
Section and key names follow the original mlx-rlaif tool where they fit
(``model.base_model``, ``rlaif.num_samples_per_prompt``, ``rlaif.kl_penalty``,
``rlaif.target_kl``, ``training.learning_rate`` ...).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator


class ConfigError(ValueError):
    """A config problem, already phrased as one line for the user."""


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
    generation_temperature: float = Field(default=1.0, gt=0)
    top_k: int = Field(default=0, ge=0)
    top_p: float = Field(default=1.0, gt=0, le=1)
    min_p: float = Field(default=0.0, ge=0, lt=1)
    stop: list[str] = Field(default_factory=list)
    kl_penalty: float = Field(default=0.05, ge=0, description="initial KL coefficient (beta)")
    kl_estimator: Literal["k1", "k3"] = "k3"
    kl_placement: Literal["loss", "reward"] = "loss"
    adaptive_kl: bool = True
    target_kl: float = Field(default=0.05, gt=0, description="per-token KL the controller aims for")
    kl_horizon: int = Field(default=10000, ge=1)
    baseline: Literal["group_mean", "leave_one_out", "ema", "none"] = "group_mean"
    scale_by_std: bool = True
    whiten_advantages: bool = False
    ema_decay: float = Field(default=0.9, gt=0, lt=1)
    skip_zero_variance_groups: bool = False
    # Sample the next batch while the teacher scores this one; that batch is then one update stale
    # and the loss's ratio is taken against the policy that sampled it (``sample_ahead.py``).
    sample_ahead: bool = False

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


class TeacherConfig(_Section):
    """The AI judge. ``provider: none`` (the default) trains on the offline graders alone."""

    provider: Literal["none", "anthropic", "openai", "openai_compatible"] = "none"
    model: str | None = None  # e.g. claude-sonnet-4-5, gpt-5-mini, or the local server's model name
    base_url: str | None = None  # openai_compatible: the server, e.g. http://127.0.0.1:8080/v1
    api_key_env: str | None = None  # default ANTHROPIC_API_KEY / OPENAI_API_KEY; local servers need none
    max_concurrency: int = Field(default=8, ge=1)
    timeout_s: float = Field(default=60.0, gt=0)
    max_retries: int = Field(default=3, ge=0)
    max_tokens: int = Field(default=512, ge=16, description="longest answer the teacher may write")
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
    advance_after_steps: int | None = Field(default=None, ge=1, description="step budget per bucket")
    window: int = Field(default=16, ge=1)
    mix_previous: float = Field(default=0.0, ge=0, le=1)


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


def load_config(path: str | Path, *, overrides: dict[str, Any] | None = None) -> RunConfig:
    """Reads, overrides and validates a YAML config.

    Args:
        path: the YAML file. Relative data/model paths inside it are resolved
            against the current directory, as a user typing them would expect.
        overrides: dotted key path -> value (e.g. ``{"training.max_steps": 5}``);
            ``None`` values are ignored.

    Returns:
        The validated ``RunConfig``.

    Raises:
        ConfigError: one line naming the file, line and key path.
    """
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read config ({exc.strerror})") from None
    try:
        raw = yaml.safe_load(text)
        lines = _key_lines(yaml.compose(text))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise ConfigError(f"{where}: not valid YAML ({getattr(exc, 'problem', exc)})") from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of keys, got {type(raw).__name__}")
    for dotted, value in (overrides or {}).items():
        if value is not None:
            _set_dotted(raw, dotted, value)
    try:
        return RunConfig.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(_first_error_line(exc, path, lines)) from None


def save_config(config: RunConfig, path: str | Path) -> None:
    """Writes the resolved config (every default filled in) as YAML."""
    Path(path).write_text(yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False))


def _set_dotted(raw: dict, dotted: str, value: Any) -> None:
    node = raw
    *parents, leaf = dotted.split(".")
    for key in parents:
        node = node.setdefault(key, {})
    node[leaf] = value


def _key_lines(node: yaml.Node | None, prefix: tuple = ()) -> dict[tuple, int]:
    """Maps each key path in the YAML document to its 1-based line number."""
    found: dict[tuple, int] = {}
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            key = (*prefix, key_node.value)
            found[key] = key_node.start_mark.line + 1
            found.update(_key_lines(value_node, key))
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            found[(*prefix, i)] = item.start_mark.line + 1
            found.update(_key_lines(item, (*prefix, i)))
    return found


def _first_error_line(exc: ValidationError, path: Path, lines: dict[tuple, int]) -> str:
    err = exc.errors()[0]
    loc = tuple(str(p) if not isinstance(p, int) else p for p in err["loc"])
    key = ".".join(str(p) for p in loc) or "(top level)"
    line = None
    for n in range(len(loc), 0, -1):  # the deepest key that exists in the file
        line = lines.get(loc[:n])
        if line is not None:
            break
    where = f"{path}:{line}" if line else str(path)
    kind = err["type"]
    if kind == "extra_forbidden":
        msg = "unknown key"
    elif kind == "missing":
        msg = "required key is missing"
    else:
        msg = err["msg"].removeprefix("Value error, ")
        if "input" in err and not isinstance(err["input"], (dict, list)):
            msg += f" (got {err['input']!r})"
    more = f" (+{len(exc.errors()) - 1} more)" if len(exc.errors()) > 1 else ""
    return f"{where}: {key}: {msg}{more}"
