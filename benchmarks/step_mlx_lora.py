"""Worker: time mlx-lm-lora's GRPO (``train_grpo``) on the same work, in this process.

Usage: ``python benchmarks/step_mlx_lora.py SETTINGS_JSON RESULT_PATH`` (run by
``bench_mlx_peer.py``). The model is loaded with mlx-lm, LoRA put on q/v by
mlx-lm's tuner, the reference model loaded a second time and frozen (as
``mlx_lm_lora.train`` does), AdamW at a constant rate, the reward the
completion's digit share. ``train_grpo`` reports after every iteration; a step's
time is the gap between two reports. One untimed warm-up iteration.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

from step_common import (
    TEMPERATURE,
    StepSettings,
    StepTimes,
    UsageMeter,
    benchmark_prompts,
    digit_fraction,
    peak_rss_mb,
    write_result,
)

MLX_TARGETS = ("self_attn.q_proj", "self_attn.v_proj")


def digits(prompts, completions, answer, types=None):
    """mlx-lm-lora's reward-function signature over the benchmark's reward."""
    return [digit_fraction(text) for text in completions]


def main(settings_json: str, result_path: str) -> None:
    settings = StepSettings.from_json(settings_json)
    import mlx.core as mx
    import mlx.optimizers as optim
    from mlx_lm import load
    from mlx_lm.tuner.utils import linear_to_lora_layers
    from mlx_lm_lora.trainer.grpo_trainer import GRPOTrainingArgs, train_grpo

    rss_imports = peak_rss_mb()
    mx.random.seed(0)
    model, tokenizer = load(settings.model_path)
    model.freeze()
    lora = {"rank": settings.lora_rank, "scale": settings.lora_alpha / settings.lora_rank, "dropout": 0.0}
    linear_to_lora_layers(model, len(model.layers), {**lora, "keys": list(MLX_TARGETS)})
    reference, _ = load(settings.model_path)
    reference.freeze()
    prompts = benchmark_prompts(settings.prompts)
    dataset = [(tokenizer.encode(p), [], p, "") for p in prompts]
    out = Path(tempfile.mkdtemp(prefix="bench-mlx-lora-"))
    args = GRPOTrainingArgs(
        batch_size=settings.prompts,
        iters=settings.steps + 1,
        steps_per_report=1,
        steps_per_eval=10**9,
        steps_per_save=10**9,
        adapter_file=str(out / "adapters.safetensors"),
        group_size=settings.group,
        beta=settings.kl,
        epsilon=0.2,
        epsilon_high=0.2,
        max_completion_length=settings.new_tokens,
        temperature=TEMPERATURE,
        top_p=1.0,
        top_k=0,
        min_p=0.0,
        grpo_loss_type="bnpo",  # token mean over the batch, as ours
    )
    trainable = sum(v.size for _, v in __import__("mlx.utils").utils.tree_flatten(model.trainable_parameters()))
    rss_setup = peak_rss_mb()

    times, meter, marks = StepTimes(), UsageMeter(), []

    class Clock:
        def on_train_loss_report(self, info):
            now = time.perf_counter()
            if marks:  # the warm-up iteration ends at the first report
                usage = meter.stop()
                parts = {"sample": float("nan"), "score": float("nan"), "reference": float("nan")}
                times.add(
                    now - marks[-1],
                    {**parts, "update": float("nan"), "other": float("nan")},
                    info["train_average_generated_tokens"],
                    usage,
                )
            marks.append(now)
            meter.start()

        def on_val_loss_report(self, info):
            pass

    train_grpo(
        model,
        reference,
        tokenizer,
        optim.AdamW(learning_rate=settings.learning_rate),
        dataset,
        reward_funcs=[digits],
        args=args,
        training_callback=Clock(),
        end_answer_token="",
    )
    write_result(
        result_path,
        {
            "side": "mlx-lm-lora",
            "settings": vars(settings),
            "trainable_params": trainable,
            "times": times.as_dict(),
            "rss_after_imports_mb": rss_imports,
            "rss_after_setup_mb": rss_setup,
            "peak_rss_mb": peak_rss_mb(),
            "mlx_peak_mb": mx.get_peak_memory() / 2**20,
        },
    )


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
