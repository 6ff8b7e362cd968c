"""Worker: time rlaif-mlx's RL step (``Trainer.train_step``, PyTorch backend) in this process.

Run by ``bench_step.py`` in a fresh subprocess, so ``ru_maxrss`` is this side's
own peak. Usage: ``python benchmarks/step_ours.py SETTINGS_JSON RESULT_PATH``.

The trainer is built in-process as ``tests/training/test_resume.py`` does, with a reward
object scoring the completion text (``step_common.digit_fraction``) instead of
the sandbox. One untimed warm-up step, then ``steps`` timed ones; each step's
time is split into sample / score / reference log-probs / update / other by
wrapping the backend's and the reward's methods.
"""

from __future__ import annotations

import cProfile
import io
import pstats
import sys
import tempfile
import time
from pathlib import Path

from step_common import (
    LORA_TARGETS,
    SEED,
    TEMPERATURE,
    PartClock,
    StepSettings,
    StepTimes,
    UsageMeter,
    benchmark_prompts,
    digit_fraction,
    peak_gpu_mb,
    peak_rss_mb,
    step_parts,
    torch_threads,
    write_result,
)


class DigitRewards:
    """The benchmark reward behind rlaif-mlx's ``RewardPipeline.score`` interface."""

    def score(self, items):
        from rlaif_mlx.rewards.pipeline import RewardResult

        return {uid: RewardResult(digit_fraction(text)) for uid, _, text in items}


def build_config(
    settings: StepSettings,
    output_dir: Path,
    *,
    backend: str = "torch",
    targets: tuple[str, ...] = LORA_TARGETS,
    micro_batch: int | None = None,
):
    """The run config of the benchmark's work (the other side's settings written as ours).

    Args:
        settings: the work both sides do.
        output_dir: the run folder.
        backend: ``torch`` or ``mlx``.
        targets: the modules LoRA adapts.
        micro_batch: rows per forward/backward (default: the whole batch, as TRL).

    Returns:
        A validated ``RunConfig``.
    """
    from rlaif_mlx.config import RunConfig

    return RunConfig.model_validate(
        {
            "seed": SEED,
            "backend": backend,
            "output_dir": str(output_dir),
            "model": {
                "base_model": settings.model_path,
                "dtype": settings.dtype,
                "use_lora": settings.lora,
                "lora_r": settings.lora_rank,
                "lora_alpha": settings.lora_alpha,
                "lora_dropout": 0.0,
                "lora_target_modules": list(targets),
                "torch": {"device": settings.device},
            },
            "data": {"train_file": "benchmark", "use_chat_template": False},
            "training": {
                "max_steps": settings.steps + 1,
                "batch_size": settings.prompts,
                # one forward/backward over the whole batch, as TRL's per-device batch = B*G
                "micro_batch_size": micro_batch or settings.prompts * settings.group,
                "learning_rate": settings.learning_rate,
                "lr_scheduler_type": "constant",
                "warmup_steps": 0,
                "max_grad_norm": 1.0,
                "updates_per_batch": 1,
                "clip_eps_low": 0.2,
                "clip_eps_high": 0.2,
                "loss_aggregation": "token_mean",
                "save_steps": 10_000,
            },
            "rlaif": {
                "num_samples_per_prompt": settings.group,
                "max_new_tokens": settings.new_tokens,
                "generation_temperature": TEMPERATURE,
                "kl_penalty": settings.kl,
                "kl_estimator": "k3",
                "kl_placement": "loss",
                "adaptive_kl": False,
                "baseline": "group_mean",
                "scale_by_std": True,
            },
            "logging": {"dashboard": False, "tensorboard": False},
        }
    )


def main(settings_json: str, result_path: str) -> None:
    settings = StepSettings.from_json(settings_json)
    from rlaif_mlx.backends.torch import create
    from rlaif_mlx.data.tasks import Task, TaskSet
    from rlaif_mlx.training.trainer import Trainer

    rss_imports = peak_rss_mb()
    out = Path(tempfile.mkdtemp(prefix="bench-step-ours-"))
    config = build_config(settings, out)
    tasks = TaskSet(
        [Task(id=f"p{i}", prompt=p) for i, p in enumerate(benchmark_prompts(settings.prompts))],
        skipped_lines=0,
        source="benchmark",
    )
    backend = create(config.model, config.training, seed=config.seed, total_steps=config.training.max_steps)
    rewards = DigitRewards()
    trainer = Trainer(config, backend=backend, train=tasks, rewards=rewards, output_dir=out, log=lambda line: None)
    trainable, total = backend.trainable_parameter_count()
    rss_setup = peak_rss_mb()

    clock = PartClock()
    backend.sample = clock.wrap("sample", backend.sample)
    rewards.score = clock.wrap("score", rewards.score)
    backend.logprobs = clock.wrap("reference", backend.logprobs)  # train_step asks only for reference log-probs
    backend.train_step = clock.wrap("update", backend.train_step)

    trainer.train_step()  # warm-up: first-call allocations, lazy imports
    profiler = cProfile.Profile() if settings.profile else None
    times, meter = StepTimes(), UsageMeter()
    for _ in range(settings.steps):
        before = clock.snapshot()
        if profiler:
            profiler.enable()
        meter.start()
        start = time.perf_counter()
        record = trainer.train_step()
        seconds = time.perf_counter() - start
        usage = meter.stop()
        if profiler:
            profiler.disable()
        times.add(seconds, step_parts(before, clock.snapshot(), seconds), record["completion_len_mean"], usage)

    result = {
        "side": "ours",
        "settings": vars(settings),
        "trainable_params": trainable,
        "total_params": total,
        "torch_threads": torch_threads(),
        "times": times.as_dict(),
        "rss_after_imports_mb": rss_imports,
        "rss_after_setup_mb": rss_setup,
        "peak_rss_mb": peak_rss_mb(),
        "peak_gpu_mb": peak_gpu_mb(),
        "last_record": {k: v for k, v in record.items() if isinstance(v, (int, float))},
    }
    if profiler:
        result["profile"] = {key: _top(profiler, key) for key in ("cumulative", "tottime")}
    write_result(result_path, result)


def _top(profiler: cProfile.Profile, sort: str, limit: int = 40) -> str:
    text = io.StringIO()
    pstats.Stats(profiler, stream=text).sort_stats(sort).print_stats(limit)
    # Paths relative to site-packages / the repo: short, yet they still say which library a function is in.
    dirs = [*sys.path, str(Path(__file__).resolve().parents[1])]
    roots = sorted({str(Path(p)) + "/" for p in dirs if p and Path(p).is_dir()}, key=len, reverse=True)
    lines = []
    for line in text.getvalue().splitlines():
        for root in roots:
            line = line.replace(root, "")
        lines.append(line)
    return "\n".join(lines)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
