"""Worker: time TRL's ``GRPOTrainer`` step on the same work as ``step_ours.py``.

Run by ``bench_step.py`` in a fresh subprocess, so ``ru_maxrss`` is this side's
own peak. Usage: ``python benchmarks/step_trl.py SETTINGS_JSON RESULT_PATH``.

Settings that change the work are set to match ours explicitly (group size,
completion length, temperature, LoRA, beta with TRL's k3 KL, learning rate,
one optimizer step per generation batch, per-device batch = B*G, no gradient
accumulation, float32 (or `--dtype`) on the same device, no vLLM, no gradient checkpointing). TRL's
own implementation choices (its fused log-prob head, its default fused AdamW,
``generate``) are left as they are: they are what a TRL user gets.

A step is timed from ``on_step_begin`` to ``on_step_end`` (generation, scoring,
reference log-probs, loss, backward, clipping, optimizer), after one untimed
warm-up step. The split wraps the trainer's own methods (``_generate``,
``_calculate_rewards``, the no-grad ``_get_per_token_logps_and_entropies``
calls, ``_prepare_inputs``).
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time

import torch
from datasets import Dataset
from peft import LoraConfig
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
    torch_threads,
    write_result,
)
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
from trl import GRPOConfig, GRPOTrainer


def digit_reward(completions, **kwargs) -> list[float]:
    """TRL reward function: ``step_common.digit_fraction`` of each completion's text."""
    return [digit_fraction(text) for text in completions]


class StepTimer(TrainerCallback):
    """Wall time per optimizer step and its parts; the first step is the untimed warm-up."""

    def __init__(self, clock: PartClock, lengths: list[float]) -> None:
        self.clock, self.lengths, self.times = clock, lengths, StepTimes()
        self.meter = UsageMeter()
        self._start = 0.0
        self._before: dict[str, float] = {}

    def on_step_begin(self, args, state, control, **kwargs):
        self._before = self.clock.snapshot()
        self.meter.start()
        self._start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        seconds = time.perf_counter() - self._start
        usage = self.meter.stop()
        if state.global_step <= 1:
            return  # warm-up
        now = self.clock.snapshot()
        spent = {k: now.get(k, 0.0) - self._before.get(k, 0.0) for k in ("sample", "score", "reference", "prepare")}
        parts = {
            "sample": spent["sample"],
            "score": spent["score"],
            "reference": spent["reference"],
            # everything outside _prepare_inputs: loss forward, backward, clipping, AdamW
            "update": seconds - spent["prepare"],
            # inside _prepare_inputs but not sampling / scoring / reference: padding, advantages, metrics
            "other": spent["prepare"] - spent["sample"] - spent["score"] - spent["reference"],
        }
        self.times.add(seconds, parts, self.lengths[-1], usage)


def build_args(settings: StepSettings, output_dir: str) -> GRPOConfig:
    return GRPOConfig(
        output_dir=output_dir,
        seed=SEED,
        use_cpu=settings.device == "cpu",
        bf16=False,
        fp16=False,
        gradient_checkpointing=False,  # GRPOConfig turns it on by default; ours has none
        per_device_train_batch_size=settings.prompts * settings.group,  # completions, B*G
        gradient_accumulation_steps=1,
        num_generations=settings.group,
        max_completion_length=settings.new_tokens,
        temperature=TEMPERATURE,
        top_p=1.0,
        top_k=0,
        beta=settings.kl,  # k3: exp(ref - logp) - (ref - logp) - 1, as ours
        num_iterations=1,
        epsilon=0.2,
        loss_type="dapo",  # token mean over the batch = ours' token_mean
        scale_rewards="group",  # (r - group mean) / group std = ours' group_mean + scale_by_std
        learning_rate=settings.learning_rate,
        lr_scheduler_type="constant",
        warmup_steps=0,
        max_grad_norm=1.0,
        max_steps=settings.steps + 1,
        use_vllm=False,
        log_completions=False,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        dataloader_num_workers=0,
    )


def main(settings_json: str, result_path: str) -> None:
    settings = StepSettings.from_json(settings_json)
    rss_imports = peak_rss_mb()
    out = tempfile.mkdtemp(prefix="bench-step-trl-")
    tokenizer = AutoTokenizer.from_pretrained(settings.model_path, padding_side="left")
    model = AutoModelForCausalLM.from_pretrained(settings.model_path, dtype=getattr(torch, settings.dtype))
    peft_config = None
    if settings.lora:
        peft_config = LoraConfig(
            r=settings.lora_rank,
            lora_alpha=settings.lora_alpha,
            lora_dropout=0.0,
            target_modules=list(LORA_TARGETS),
            task_type="CAUSAL_LM",
        )
    dataset = Dataset.from_list([{"prompt": p} for p in benchmark_prompts(settings.prompts)])
    trainer = GRPOTrainer(
        model=model,
        reward_funcs=[digit_reward],
        args=build_args(settings, out),
        train_dataset=dataset,
        processing_class=tokenizer,
        peft_config=peft_config,
    )
    trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in trainer.model.parameters())
    rss_setup = peak_rss_mb()

    clock = PartClock()
    lengths: list[float] = []
    generate = clock.wrap("sample", trainer._generate)

    def generate_and_count(prompts):
        result = generate(prompts)
        lengths.append(statistics.fmean(len(ids) for ids in result[1]))  # result[1]: completion ids per row
        return result

    trainer._generate = generate_and_count
    trainer._calculate_rewards = clock.wrap("score", trainer._calculate_rewards)
    trainer._get_per_token_logps_and_entropies = clock.wrap(
        "reference", trainer._get_per_token_logps_and_entropies, when=lambda: not torch.is_grad_enabled()
    )
    trainer._prepare_inputs = clock.wrap("prepare", trainer._prepare_inputs)
    timer = StepTimer(clock, lengths)
    trainer.add_callback(timer)
    trainer.train()

    write_result(
        result_path,
        {
            "side": "trl",
            "settings": vars(settings),
            "trainable_params": trainable,
            "total_params": total,
            "torch_threads": torch_threads(),
            "times": timer.times.as_dict(),
            "rss_after_imports_mb": rss_imports,
            "rss_after_setup_mb": rss_setup,
            "peak_rss_mb": peak_rss_mb(),
            "peak_gpu_mb": peak_gpu_mb(),
            "trl_optimizer": type(
                trainer.optimizer.optimizer if hasattr(trainer.optimizer, "optimizer") else trainer.optimizer
            ).__name__
            + f" ({trainer.args.optim})",
        },
    )


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
