"""Configs written for the original mlx-rlaif tool, read into this project's layout.

The original tool (github.com/shanksjay/mlx-rlaif-teacher-student, ``scripts/training/train_rlaif.py``)
reads a nested ``config.yaml`` with its own names (``model.use_4bit``, ``teacher.model_name``,
``training.output_dir``, ``training.gradient_accumulation_steps``, ``rlaif.reward_weight``,
``logging.tensorboard_dir``, ``hardware.*``, ``huggingface.*`` ...); its Rust port's README lists flat
names (``base_model``, ``teacher_provider``, ``teacher_model``, ``num_epochs``, ``batch_size``,
``learning_rate``, ``kl_penalty``, ``num_samples_per_prompt``). ``migrate`` maps either form onto ours
and writes one note: each old key and its new home, or why it has none.

Plain data in and out; which keys are ours is the caller's (``known``), so this module never
imports the config schema.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

ORIGINAL = "the original mlx-rlaif tool"

# The Rust port's flat names (and the rest of its ``RlaifConfig``) -> the nested name in config.yaml.
FLAT = {
    "base_model": "model.base_model",
    "use_4bit": "model.use_4bit",
    "max_length": "model.max_length",
    "teacher_provider": "teacher.provider",
    "teacher_model": "teacher.model_name",
    "teacher_api_key_env": "teacher.api_key_env",
    "num_epochs": "training.num_epochs",
    "batch_size": "training.batch_size",
    "gradient_accumulation_steps": "training.gradient_accumulation_steps",
    "learning_rate": "training.learning_rate",
    "warmup_steps": "training.warmup_steps",
    "save_steps": "training.save_steps",
    "eval_steps": "training.eval_steps",
    "logging_steps": "training.logging_steps",
    "max_grad_norm": "training.max_grad_norm",
    "weight_decay": "training.weight_decay",
    "lr_scheduler_type": "training.lr_scheduler_type",
    "reward_weight": "rlaif.reward_weight",
    "kl_penalty": "rlaif.kl_penalty",
    "beta": "rlaif.beta",
    "num_samples_per_prompt": "rlaif.num_samples_per_prompt",
    "generation_temperature": "rlaif.generation_temperature",
    "adaptive_kl_enabled": "rlaif.adaptive_kl_enabled",
    "target_kl": "rlaif.target_kl",
    "curriculum_learning": "rlaif.curriculum_learning",
    "train_file": "data.train_file",
    "eval_file": "data.eval_file",
    "tensorboard_dir": "logging.tensorboard_dir",
    "log_level": "logging.log_level",
    "use_mps": "hardware.use_mps",
    "mixed_precision": "hardware.mixed_precision",
}
LEGACY_SECTIONS = ("hardware", "huggingface", "evaluation")

Assign = list[tuple[str, Any]]  # (our dotted key, value)
Rule = Callable[[Any, dict[str, Any]], tuple[Assign, str]]  # (old value, the whole old config) -> moves, note


def _to(new: str, why: str = "") -> Rule:
    return lambda value, old: ([(new, value)], f"-> {new}" + (f" ({why})" if why else ""))


def _ignored(why: str) -> Rule:
    return lambda value, old: ([], f"ignored ({why})")


def _old(old: dict[str, Any], dotted: str, default: Any = None) -> Any:
    section, _, key = dotted.partition(".")
    node = old.get(section)
    return node.get(key, default) if isinstance(node, dict) else default


def _batch(value: Any, old: dict[str, Any]) -> tuple[Assign, str]:
    accumulation = _number(_old(old, "training.gradient_accumulation_steps", 1)) or 1
    samples = _number(_old(old, "rlaif.num_samples_per_prompt", 4)) or 4
    if not isinstance(value, int) or not isinstance(accumulation, int) or not isinstance(samples, int):
        return [("training.batch_size", value)], "-> training.batch_size"
    moves = [("training.batch_size", value * accumulation), ("training.micro_batch_size", value * samples)]
    return moves, (
        f"-> training.batch_size: {value * accumulation} (prompts per optimizer step: {value} x "
        f"{accumulation} accumulated) and training.micro_batch_size: {value * samples} "
        f"(sequences per forward: {value} prompts x {samples} samples)"
    )


def _accumulation(value: Any, old: dict[str, Any]) -> tuple[Assign, str]:
    if _old(old, "training.batch_size") is None:
        return [], "ignored (without training.batch_size there is nothing to multiply)"
    return [], "-> training.batch_size (multiplied in, as above: gradients are accumulated over the whole batch)"


def _dtype(value: Any, old: dict[str, Any]) -> tuple[Assign, str]:
    dtypes = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32", "no": "float32"}
    if str(value).lower() in dtypes:
        new = dtypes[str(value).lower()]
        return [("model.dtype", new)], f"-> model.dtype: {new}"
    return [], "ignored (model.dtype takes float32, bfloat16 or float16)"


def _qlora(value: Any, old: dict[str, Any]) -> tuple[Assign, str]:
    if value is True:
        return [("model.use_lora", True)], (
            "-> model.use_lora: true (the 4-bit base comes from a quantised MLX model, e.g. "
            "mlx-community/Qwen2.5-Coder-3B-Instruct-4bit, as model.base_model)"
        )
    return [], "ignored (false changes nothing)"


def _targets(value: Any, old: dict[str, Any]) -> tuple[Assign, str]:
    if value is None:
        return [], "ignored (null means auto-detect; model.lora_target_modules keeps its default)"
    return [("model.lora_target_modules", value)], "-> model.lora_target_modules"


def _baseline(value: Any, old: dict[str, Any]) -> tuple[Assign, str]:
    if value == "per_prompt":
        return [("rlaif.baseline", "group_mean")], "-> rlaif.baseline: group_mean (the mean of the prompt's samples)"
    return [], "ignored (only per_prompt has an equivalent: rlaif.baseline: group_mean)"


def _reward_weight(value: Any, old: dict[str, Any]) -> tuple[Assign, str]:
    return [], (
        "-> rewards.weights.teacher (the original's reward is the teacher's score times this factor; "
        "weights here are normalised, so the factor itself changes nothing)"
    )


def _eval_steps(value: Any, old: dict[str, Any]) -> tuple[Assign, str]:
    if not _old(old, "data.eval_file"):
        return [], "ignored (there is no data.eval_file to evaluate)"
    return [("eval.every_steps", value)], "-> eval.every_steps"


_UPLOAD = "nothing is uploaded here; push an exported folder yourself with hf upload"
_TUNING = f"tuning of {ORIGINAL}'s own PyTorch / MPS / MLX pipeline, with no equivalent here"
_SCORING = "the rubric prompt is fixed here, in rlaif_mlx/teachers/rubric.py"
_ONE_BACKEND = "one backend samples from the weights it trains; backend: mlx picks MLX"
_SAMPLE_AHEAD = "sampling ahead here is rlaif.sample_ahead, one batch ahead"

RULES: dict[str, Rule] = {
    "model.base_model": _to("model.base_model"),
    "model.use_4bit": _ignored(
        "nothing is quantised while loading; for LoRA on a 4-bit base, name a quantised MLX model such as "
        "mlx-community/Qwen2.5-Coder-3B-Instruct-4bit as model.base_model"
    ),
    "model.use_flash_attention": _ignored(
        "PyTorch picks its attention kernel; model.torch.attn_implementation names one, e.g. sdpa"
    ),
    "model.max_length": _to(
        "data.max_prompt_tokens", "the original cut prompts to this length; here a longer prompt is an error"
    ),
    "model.device_map": _ignored("the backend places the model; model.torch.device picks auto, cpu, cuda or mps"),
    "model.use_safetensors": _ignored("the backends read safetensors whenever the model has them"),
    "model.low_cpu_mem_usage": _ignored("the backends load as lightly as they can by themselves"),
    "teacher.provider": _to("teacher.provider"),
    "teacher.model_name": _to("teacher.model"),
    "teacher.api_key_env": _to("teacher.api_key_env"),
    "teacher.temperature": _ignored(
        "the original's teacher wrote code at this temperature; here the teacher only judges, at "
        "teacher.temperature, default 0 so that a judgement repeats"
    ),
    "teacher.max_tokens": _to("teacher.max_tokens"),
    "training.output_dir": _to("output_dir"),
    "training.num_epochs": _to("training.num_epochs"),
    "training.batch_size": _batch,
    "training.gradient_accumulation_steps": _accumulation,
    "training.learning_rate": _to("training.learning_rate"),
    "training.warmup_steps": _to("training.warmup_steps", "learning-rate warm-up steps"),
    "training.save_steps": _to("training.save_steps"),
    "training.save_total_limit": _to("training.save_total_limit"),
    "training.eval_steps": _eval_steps,
    "training.logging_steps": _to("logging.log_every"),
    "training.max_grad_norm": _to("training.max_grad_norm"),
    "training.weight_decay": _to("training.weight_decay"),
    "training.lr_scheduler_type": _to("training.lr_scheduler_type"),
    "training.generation_accumulation_batches": _ignored(_SAMPLE_AHEAD),
    "rlaif.reward_weight": _reward_weight,
    "rlaif.kl_penalty": _to("rlaif.kl_penalty"),
    "rlaif.beta": _ignored("the original's reward-scaling temperature; rewards here are combined by rewards.weights"),
    "rlaif.top_k": _to("rlaif.top_k"),
    "rlaif.top_p": _to("rlaif.top_p"),
    "rlaif.num_samples_per_prompt": _to("rlaif.num_samples_per_prompt"),
    "rlaif.generation_temperature": _to("rlaif.generation_temperature"),
    "rlaif.curriculum_learning": _to("curriculum.enabled"),
    "rlaif.reward_bonuses": _ignored(
        "rewards here come from static checks, the tasks' unit tests and the teacher's rubric, "
        "weighted by rewards.weights"
    ),
    "rlaif.use_lora": _to("model.use_lora"),
    "rlaif.use_qlora": _qlora,
    "rlaif.lora_r": _to("model.lora_r"),
    "rlaif.lora_alpha": _to("model.lora_alpha"),
    "rlaif.lora_dropout": _to("model.lora_dropout"),
    "rlaif.lora_target_modules": _targets,
    "rlaif.adaptive_kl_enabled": _to("rlaif.adaptive_kl"),
    "rlaif.target_kl": _to("rlaif.target_kl"),
    "rlaif.kl_gain": _ignored("the KL controller here is Ziegler et al.'s; its speed is rlaif.kl_horizon"),
    "rlaif.top_samples_per_prompt": _ignored("every sample is trained on, weighted by its advantage"),
    "rlaif.use_advantage_normalization": _to("rlaif.whiten_advantages"),
    "rlaif.advantage_baseline_type": _baseline,
    "rlaif.advantage_baseline_ema_alpha": _ignored("rlaif.baseline: group_mean needs no running average"),
    "rlaif.use_tiered_scoring": _ignored(
        "scoring is always tiered here: static checks, then tests, then the teacher behind teacher.gate"
    ),
    "rlaif.heuristic_score_threshold": _ignored("teacher.gate decides which samples the teacher judges"),
    "rlaif.truncate_prompt_for_scoring": _ignored(_SCORING),
    "rlaif.prompt_context_chars": _ignored(_SCORING),
    "rlaif.move_rubric_to_system_prompt": _ignored(_SCORING),
    "rlaif.use_frozen_reference_for_kl": _ignored(
        "the KL reference is always frozen here; with LoRA it is the base with the adapters off"
    ),
    "rlaif.generation_accumulation_batches": _ignored(_SAMPLE_AHEAD),
    "data.train_file": _to("data.train_file"),
    "data.eval_file": _to("data.eval_file"),
    "data.languages": _ignored("each task names its own language in the task file"),
    "data.max_train_samples": _ignored("no equivalent: shorten the task file instead"),
    "data.max_eval_samples": _to("eval.max_tasks"),
    "evaluation.metrics": _ignored(
        "the teacher's criteria are teacher.rubric_weights: correctness, quality, efficiency, readability"
    ),
    "evaluation.reward_threshold": _ignored("rlaif-mlx eval reports the mean reward and pass@k, no threshold"),
    "logging.use_tensorboard": _to("logging.tensorboard"),
    "logging.tensorboard_dir": _ignored("TensorBoard files go to <output_dir>/tensorboard"),
    "logging.use_wandb": _ignored("no Weights & Biases here: metrics.jsonl and TensorBoard"),
    "logging.wandb_project": _ignored("no Weights & Biases here: metrics.jsonl and TensorBoard"),
    "logging.log_level": _ignored("warnings and errors always show, and the run prints its own progress"),
    "hardware.use_mps": _ignored(
        "backend: auto picks MLX on Apple silicon; model.torch.device: mps puts PyTorch on MPS"
    ),
    "hardware.mixed_precision": _dtype,
    "hardware.dataloader_num_workers": _ignored("tasks are held in memory; rewards.max_workers runs the tests"),
    "hardware.save_mlx_format": _ignored("after training, rlaif-mlx export --format mlx writes an MLX folder"),
    "hardware.mlx_quantization": _ignored("rlaif-mlx export --format mlx --quantize 4|8 quantises the export"),
    "hardware.use_mlx_for_generation": _ignored(_ONE_BACKEND),
    "hardware.mlx_model_path": _ignored(_ONE_BACKEND),
}
# Later versions of the original grew many tuning keys; known by their names wherever they sit.
PATTERNS: list[tuple[re.Pattern[str], str]] = [
    (re.compile(r"^(health_check|epoch_health_check|within_epoch_trend)"), _TUNING),
    (re.compile(r"^(mps_|mlx_|use_mlx_|lora_mlx_|unsloth|use_unsloth|torch_generation_)"), _TUNING),
    (re.compile(r"^(require_mlx|allow_4bit)"), _TUNING),
    (re.compile(r"^(debug_checks|gpu_utilization|system_monitor|monitoring_interval|cache_reference)"), _TUNING),
    (re.compile(r"^(json_summaries|save_json_summaries|tensorboard_batch_interval|baseline_eval_batches)"), _TUNING),
    (re.compile(r"^(save_every_epochs|save_every_batches|use_rolling_ema_baseline|resume_from_checkpoint)"), _TUNING),
    (re.compile(r"^(upload_|hf_|repo_id|dataset_|private$|save_datasets)"), _UPLOAD),
]


@dataclass
class Migration:
    """A config read from the original tool's layout.

    Attributes:
        raw: the config in our layout (plain data, not yet validated).
        lines: ``(old key as spelled, "-> new home" or "ignored (why)")``, in file order.
        moved: our key path -> the old key path it came from (for the line numbers in errors).
        origins: our dotted key -> the old key as the file spells it (named in errors).
    """

    raw: dict[str, Any]
    lines: list[tuple[str, str]] = field(default_factory=list)
    moved: dict[tuple[str, ...], tuple[str, ...]] = field(default_factory=dict)
    origins: dict[tuple[str, ...], str] = field(default_factory=dict)

    def note(self, source: str) -> str:
        """The one note for the user: the layout it was read as, then each old key's new home.

        Keys of one section left out for the same reason share a line: ``huggingface.{repo_id, private}: ignored``.
        """
        rows: list[tuple[list[str], str]] = []
        for name, text in self.lines:
            same_section = bool(rows) and rows[-1][0][0].rpartition(".")[0] == name.rpartition(".")[0]
            if same_section and text.startswith("ignored") and rows[-1][1] == text:
                rows[-1][0].append(name)
            else:
                rows.append(([name], text))
        out = [f"note: {source} is written for {ORIGINAL}; read as this project's config:"]
        for names, text in rows:
            if len(names) > 1:
                section = names[0].rpartition(".")[0]
                name = f"{section}.{{{', '.join(n.rpartition('.')[2] for n in names)}}}"
            else:
                name = names[0]
            out.append(f"  {name} {text}" if text.startswith("->") else f"  {name}: {text}")
        out.append(f"  (rlaif-mlx migrate-config {source} > NEW.yaml writes it in this project's form)")
        return "\n".join(out)


def is_legacy(raw: dict[str, Any], known: Callable[[str], bool]) -> bool:
    """Whether ``raw`` uses any name of the original tool that is not also one of ours."""
    for key, value in raw.items():
        if key in LEGACY_SECTIONS or (key in FLAT and not known(key)):
            return True
        if isinstance(value, dict):
            for sub in value:
                dotted = f"{key}.{sub}"
                if not known(dotted) and (dotted in RULES or _pattern(str(sub))):
                    return True
    return False


def migrate(raw: dict[str, Any], known: Callable[[str], bool]) -> Migration | None:
    """``raw`` mapped onto our layout when it is in the original tool's, else None.

    Args:
        raw: the YAML as loaded.
        known: whether a dotted key is one of ours (``"training.batch_size"``).

    Returns:
        The migration: our layout, the note's lines and where each key came from.
        Keys that match nothing are kept as they are, for validation to name.
    """
    if not is_legacy(raw, known):
        return None
    old: dict[str, Any] = {}
    spelled: dict[str, tuple[str, ...]] = {}  # old nested dotted key -> its path in the file
    for key, value in raw.items():
        if key in FLAT and not known(key):
            section, _, sub = FLAT[key].partition(".")
            old.setdefault(section, {})[sub] = copy.deepcopy(value)
            spelled[FLAT[key]] = (key,)
        elif isinstance(value, dict):
            old.setdefault(key, {}).update(copy.deepcopy(value))
            spelled |= {f"{key}.{sub}": (key, sub) for sub in value}
        else:
            old[key] = copy.deepcopy(value)
            spelled[key] = (key,)
    out = Migration(raw={})
    for section, value in old.items():
        if not isinstance(value, dict):
            _put(out.raw, section, value)
            continue
        for sub, item in value.items():
            dotted = f"{section}.{sub}"
            why = _pattern(str(sub)) if not known(dotted) else None
            rule = RULES.get(dotted) or (_ignored(why) if why else None)
            if rule is None:
                _put(out.raw, dotted, item)  # ours, or a key validation will name
                continue
            moves, text = rule(_number(item), old)
            name = ".".join(spelled.get(dotted, (dotted,)))
            out.lines.append((name, text))
            for new, new_value in moves:
                _put(out.raw, new, new_value)
                out.moved[tuple(new.split("."))] = spelled.get(dotted, tuple(dotted.split(".")))
                out.origins[tuple(new.split("."))] = name
    _teacher_weight(out, old)
    return out


def _teacher_weight(out: Migration, old: dict[str, Any]) -> None:
    """The original's reward is the teacher's score alone: give the teacher the whole weight."""
    provider = _old(old, "teacher.provider")
    rewards = out.raw.get("rewards")
    if provider in (None, "none") or (isinstance(rewards, dict) and "weights" in rewards):
        return
    _put(out.raw, "rewards.weights", {"teacher": 1.0})
    out.lines.append(
        (
            "(added)",
            "-> rewards.weights: {teacher: 1.0} (the original's reward is the teacher's score alone; "
            "for tasks with unit tests try {tests: 0.6, teacher: 0.4})",
        )
    )


def _put(tree: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    node = tree
    for key in parents:
        node = node.setdefault(key, {})
    node[leaf] = value


def _pattern(name: str) -> str | None:
    return next((why for pattern, why in PATTERNS if pattern.match(name)), None)


_NUMBER = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$")


def _number(value: Any) -> Any:
    """``"1e-5"`` (a string to YAML 1.1, which wants ``1.0e-5``) -> ``1e-05``; anything else as it is."""
    if isinstance(value, str) and _NUMBER.match(value.strip()):
        number = float(value)
        return int(number) if number.is_integer() and not re.search(r"[.eE]", value) else number
    return value
