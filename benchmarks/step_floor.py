"""What the RL step's model math costs in bare PyTorch, and what three shortcuts would save.

A companion of ``bench_step.py``: where our step misses its target against TRL,
this says how much of the step is the dense math both trainers must do (the
floor), and measures, outside the trainer, the savings of changes proposed for
``rlaif_mlx/backends/torch.py``:

- sample with the LoRA adapters merged into the base weights (one matmul per
  projection instead of three, and no PEFT dispatch per decode step);
- score the prompt once per group in the reference and training forwards
  (the G samples of a prompt share it; today every row recomputes it);
- one ``torch.multinomial`` per decode step instead of one per prompt.

Same shapes as the benchmark: B prompts x G samples, T new tokens. Completion
tokens are random ids (the content does not change the cost). Run by hand:

    python benchmarks/step_floor.py --model 30m --lora
"""

from __future__ import annotations

import argparse
import inspect
import statistics
import time

import torch
from peft import LoraConfig, get_peft_model
from step_common import (
    LORA_TARGETS,
    UsageMeter,
    benchmark_prompts,
    default_model_dir,
    machine_load,
    resolve_model,
)
from transformers import AutoModelForCausalLM, AutoTokenizer, Qwen2ForCausalLM

CACHE_ARG = "cache" if "cache" in inspect.signature(Qwen2ForCausalLM.forward).parameters else "past_key_values"


def compare(base, variant, repeats: int, *, quiet: float = 0.15) -> tuple[float, float, int]:
    """Median seconds of ``base()`` and ``variant()``, called in turn (ABAB...) after one warm-up call each.

    A pair during which other processes used more than ``quiet`` of the cores
    is not counted (the machine may be shared); after ``6 * repeats`` tries the
    medians of every pair are returned. Also returns the number of clean pairs.
    """
    base()
    variant()
    clean, every, meter = [], [], UsageMeter()
    while len(clean) < repeats and len(every) < 6 * repeats:
        waited = 0
        while machine_load(1.0) > quiet and waited < 600:  # wait for the neighbours to finish
            time.sleep(4)
            waited += 5
        pair, busy = [], False
        for fn in (base, variant):
            meter.start()
            start = time.perf_counter()
            fn()
            pair.append(time.perf_counter() - start)
            busy |= meter.stop().foreign > quiet
        every.append(pair)
        if not busy:
            clean.append(pair)
    pairs = clean or every
    return statistics.median(p[0] for p in pairs), statistics.median(p[1] for p in pairs), len(clean)


def left_pad(rows: list[list[int]], pad: int):
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, width - len(row) :] = torch.tensor(row)
        mask[i, width - len(row) :] = 1
    return ids, mask


def cache_of(out):
    """The KV cache a forward returned (transformers 5 renamed ``past_key_values`` to ``cache``)."""
    return out.get("cache") if out.get("cache") is not None else out.past_key_values


def decode(model, ids, mask, *, group: int, new_tokens: int, per_prompt_draws: bool) -> None:
    """Prefill once per prompt, repeat the cache G times, then ``new_tokens`` sampled steps (as ours does)."""
    prompts = ids.shape[0]
    generators = [torch.Generator().manual_seed(i) for i in range(prompts if per_prompt_draws else 1)]
    with torch.inference_mode():
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, logits_to_keep=1)
        cache = cache_of(out)
        cache.batch_repeat_interleave(group)
        logits = out.logits[:, -1].repeat_interleave(group, dim=0)
        mask = mask.repeat_interleave(group, dim=0)
        pos = positions[:, -1:].repeat_interleave(group, dim=0) + 1
        for _ in range(new_tokens):
            probs = logits.float().softmax(-1)
            if per_prompt_draws:
                chosen = torch.cat(
                    [torch.multinomial(p, 1, generator=g) for p, g in zip(probs.split(group), generators, strict=True)]
                )
            else:
                chosen = torch.multinomial(probs, 1, generator=generators[0])
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            out = model(
                input_ids=chosen,
                attention_mask=mask,
                position_ids=pos,
                use_cache=True,
                logits_to_keep=1,
                **{CACHE_ARG: cache},
            )
            cache, logits, pos = cache_of(out), out.logits[:, -1], pos + 1


def token_logp(logits, targets):
    picked = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    return picked - torch.logsumexp(logits, dim=-1)


def whole_forward(model, ids, mask):
    """Every row's prompt + completion in one forward (what both trainers do today)."""
    logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
    return token_logp(logits[:, :-1].float(), ids[:, 1:])


def shared_prompt_forward(model, prompt_ids, prompt_mask, completion_ids, *, group: int):
    """The prompt once per group (its KV cache repeated G times, gradients flow through it), then completions."""
    positions = (prompt_mask.cumsum(-1) - 1).clamp(min=0)
    out = model(
        input_ids=prompt_ids, attention_mask=prompt_mask, position_ids=positions, use_cache=True, logits_to_keep=1
    )
    cache = cache_of(out)
    cache.batch_repeat_interleave(group)
    first = out.logits[:, -1].repeat_interleave(group, dim=0)
    mask = torch.cat([prompt_mask.repeat_interleave(group, dim=0), torch.ones_like(completion_ids)], dim=1)
    start = positions[:, -1:].repeat_interleave(group, dim=0) + 1
    steps = torch.arange(completion_ids.shape[1])[None, :]
    logits = model(
        input_ids=completion_ids, attention_mask=mask, position_ids=start + steps, use_cache=True, **{CACHE_ARG: cache}
    ).logits
    logits = torch.cat([first[:, None], logits[:, :-1]], dim=1)
    return token_logp(logits.float(), completion_ids)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="30m", help="tiny, 30m or a model folder (default 30m)")
    parser.add_argument("--lora", action="store_true", help="LoRA (default: full fine-tune)")
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--group", type=int, default=4)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--lora-rank", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5, help="clean A/B pairs per comparison")
    args = parser.parse_args()
    torch.manual_seed(0)

    path = resolve_model(args.model, default_model_dir())
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    if args.lora:
        model = get_peft_model(
            model,
            LoraConfig(
                r=args.lora_rank,
                lora_alpha=2 * args.lora_rank,
                target_modules=list(LORA_TARGETS),
                task_type="CAUSAL_LM",
            ),
        )
    pad = tokenizer.pad_token_id
    prompt_rows = [tokenizer.encode(p) for p in benchmark_prompts(args.prompts)]
    prompt_ids, prompt_mask = left_pad(prompt_rows, pad)
    rows = args.prompts * args.group
    vocab = model.config.vocab_size if not args.lora else model.get_base_model().config.vocab_size
    completion = torch.randint(3, vocab, (rows, args.new_tokens))
    ids = torch.cat([prompt_ids.repeat_interleave(args.group, dim=0), completion], dim=1)
    mask = torch.cat([prompt_mask.repeat_interleave(args.group, dim=0), torch.ones_like(completion)], dim=1)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-5)

    def sample(per_prompt_draws=True):
        return lambda: decode(
            model,
            prompt_ids,
            prompt_mask,
            group=args.group,
            new_tokens=args.new_tokens,
            per_prompt_draws=per_prompt_draws,
        )

    def reference(forward):
        def run():
            with torch.inference_mode():
                if args.lora:
                    with model.disable_adapter():
                        forward()
                else:
                    forward()

        return run

    def update(forward):
        def run():
            model.train()
            forward().mean().backward()
            torch.nn.utils.clip_grad_norm_(trainable, 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            model.eval()

        return run

    def merged(fn):
        def run():
            model.merge_adapter()
            try:
                fn()
            finally:
                model.unmerge_adapter()

        return run

    whole = lambda: whole_forward(model, ids, mask)  # noqa: E731
    shared = lambda: shared_prompt_forward(model, prompt_ids, prompt_mask, completion, group=args.group)  # noqa: E731
    comparisons = [
        ("sample: one multinomial per prompt (ours) -> one per step", sample(), sample(per_prompt_draws=False)),
        ("reference log-probs: whole rows -> prompt once per group", reference(whole), reference(shared)),
        ("update (fwd + bwd + clip + AdamW): whole rows -> prompt once per group", update(whole), update(shared)),
    ]
    if args.lora:
        comparisons.insert(
            1,
            (
                "sample: PEFT adapters -> adapters merged into the weights (merge + unmerge included)",
                sample(),
                merged(sample()),
            ),
        )
    print(
        f"{args.model} {'lora' if args.lora else 'full'}: B={args.prompts} G={args.group} T={args.new_tokens}, "
        f"prompt tokens {[len(r) for r in prompt_rows]}, torch threads {torch.get_num_threads()}\n"
    )
    print("| change | before s | after s | saved | clean pairs |\n|---|---|---|---|---|")
    for name, base, variant in comparisons:
        before, after, clean = compare(base, variant, args.repeats)
        print(f"| {name} | {before:.3f} | {after:.3f} | {1 - after / before:.0%} | {clean} |", flush=True)


if __name__ == "__main__":
    main()
