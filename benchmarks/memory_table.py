"""Which Qwen2.5-Coder sizes fit which Mac, from the memory plan (``rlaif_mlx/training/memory_plan.py``).

    python benchmarks/memory_table.py [--batch 4 --samples 4 --prompt 512 --new 384]

Pure arithmetic, no model downloaded: the shapes are the models' published
``config.json`` numbers. A Mac's usable memory is taken as macOS's recommended
Metal working set: 2/3 of its RAM up to 32 GB, 3/4 above (``rlaif-mlx doctor``
prints your Mac's own). Each cell is the largest ``training.micro_batch_size``
whose plan fits (what ``micro_batch_size: auto`` picks), or ``-`` when even one
row does not fit.
"""

from __future__ import annotations

import argparse

from rlaif_mlx.training.memory_plan import GB, ModelShape, Workload, largest_micro_batch, plan

# (name, hidden, layers, heads, kv heads, intermediate, vocab, tied embeddings): the published config.json numbers
QWEN_CODER = [
    ("0.5B", 896, 24, 14, 2, 4864, 151936, True),
    ("1.5B", 1536, 28, 12, 2, 8960, 151936, True),
    ("3B", 2048, 36, 16, 2, 11008, 151936, True),
    ("7B", 3584, 28, 28, 4, 18944, 152064, False),
    ("14B", 5120, 48, 40, 8, 13824, 152064, False),
    ("32B", 5120, 64, 40, 8, 27648, 152064, False),
]
MACS_GB = (8, 16, 24, 32, 64, 128)
MODES = {  # name -> (quantisation bits, dtype, LoRA)
    "4-bit, LoRA": (4, "bfloat16", True),
    "bf16, LoRA": (None, "bfloat16", True),
    "bf16, full": (None, "bfloat16", False),
}
ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def working_set(ram_gb: int) -> int:
    """macOS's recommended Metal working set for a Mac with ``ram_gb`` of RAM."""
    return int(ram_gb * GB * (2 / 3 if ram_gb <= 32 else 3 / 4))


def shape(hidden, layers, heads, kv, inter, vocab, tied, bits) -> ModelShape:
    return ModelShape(hidden, layers, heads, kv, hidden // heads, inter, vocab, tied, True, bits)


def table(*, batch: int, samples: int, prompt: int, new: int) -> str:
    head = "| model | weights, training | " + " | ".join(f"{m} GB Mac" for m in MACS_GB) + " |"
    lines = [head, "| --- | --- |" + " --- |" * len(MACS_GB)]
    for name, *numbers in QWEN_CODER:
        for mode, (bits, dtype, lora) in MODES.items():
            work = Workload("mlx", dtype, lora, 16, ALL_LINEAR, batch, samples, prompt, new, 1)
            model = shape(*numbers, bits)
            peak = plan(model, work).peak.total
            cells = [str(largest_micro_batch(model, work, working_set(ram)) or "-") for ram in MACS_GB]
            lines.append(f"| {name} ({peak / GB:.1f} GB at 1) | {mode} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=4, help="prompts per step (training.batch_size)")
    parser.add_argument("--samples", type=int, default=4, help="rlaif.num_samples_per_prompt")
    parser.add_argument("--prompt", type=int, default=512, help="data.max_prompt_tokens")
    parser.add_argument("--new", type=int, default=384, help="rlaif.max_new_tokens")
    args = parser.parse_args()
    print(table(batch=args.batch, samples=args.samples, prompt=args.prompt, new=args.new))


if __name__ == "__main__":
    main()
