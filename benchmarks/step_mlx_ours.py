"""Worker: time rlaif-mlx's RL step on the MLX backend in this process (``bench_mlx_peer.py`` runs it).

Usage: ``python benchmarks/step_mlx_ours.py SETTINGS_JSON RESULT_PATH``. The trainer is
built as ``step_ours.py`` builds it, with ``backend: mlx``, LoRA on q/v and one
micro-batch per prompt's group (mlx-lm-lora's GRPO differentiates B rows at a time).
Besides each step's time it records the process's peak RSS after each part of the
first timed step, so the report says which part set the peak.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

from step_common import (
    SEED,
    PartClock,
    StepSettings,
    StepTimes,
    UsageMeter,
    benchmark_prompts,
    peak_rss_mb,
    step_parts,
    write_result,
)
from step_ours import DigitRewards, build_config

MLX_TARGETS = ("q_proj", "v_proj")


def main(settings_json: str, result_path: str) -> None:
    settings = StepSettings.from_json(settings_json)
    import mlx.core as mx

    from rlaif_mlx.backends.mlx import create
    from rlaif_mlx.data.tasks import Task, TaskSet
    from rlaif_mlx.training.trainer import Trainer

    rss_imports = peak_rss_mb()
    out = Path(tempfile.mkdtemp(prefix="bench-mlx-ours-"))
    rows = settings.micro_batch or settings.prompts
    config = build_config(settings, out, backend="mlx", targets=MLX_TARGETS, micro_batch=rows)
    tasks = TaskSet(
        [Task(id=f"p{i}", prompt=p) for i, p in enumerate(benchmark_prompts(settings.prompts))],
        skipped_lines=0,
        source="benchmark",
    )
    backend = create(config.model, config.training, seed=SEED, total_steps=config.training.max_steps)
    rewards = DigitRewards()
    trainer = Trainer(config, backend=backend, train=tasks, rewards=rewards, output_dir=out, log=lambda line: None)
    trainable, total = backend.trainable_parameter_count()
    rss_setup = peak_rss_mb()

    clock, phase_peaks = PartClock(), {}

    def after(name, fn):
        def call(*args, **kwargs):
            result = fn(*args, **kwargs)
            phase_peaks.setdefault(name, peak_rss_mb())
            return result

        return call

    backend.sample = clock.wrap("sample", after("sample", backend.sample))
    rewards.score = clock.wrap("score", rewards.score)
    backend.logprobs = clock.wrap("reference", after("reference", backend.logprobs))
    backend.train_step = clock.wrap("update", after("update", backend.train_step))

    trainer.train_step()  # warm-up: first-call allocations, lazy imports
    warm_peaks, phase_peaks = dict(phase_peaks), {}
    times, meter = StepTimes(), UsageMeter()
    for _ in range(settings.steps):
        before = clock.snapshot()
        meter.start()
        start = time.perf_counter()
        record = trainer.train_step()
        seconds = time.perf_counter() - start
        usage = meter.stop()
        times.add(seconds, step_parts(before, clock.snapshot(), seconds), record["completion_len_mean"], usage)

    write_result(
        result_path,
        {
            "side": "ours",
            "settings": vars(settings),
            "trainable_params": trainable,
            "total_params": total,
            "times": times.as_dict(),
            "rss_after_imports_mb": rss_imports,
            "rss_after_setup_mb": rss_setup,
            "rss_after_part_warmup_mb": warm_peaks,
            "rss_after_part_mb": phase_peaks,
            "peak_rss_mb": peak_rss_mb(),
            "mlx_peak_mb": mx.get_peak_memory() / 2**20,
            "last_record": {k: v for k, v in record.items() if isinstance(v, (int, float))},
        },
    )


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
