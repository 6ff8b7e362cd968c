"""What the PyTorch decode loop could still gain: the levers of the speed issue, each measured on the same work.

The RL step's sampling is a decode loop: R rows, one token per row per step, a KV cache. On the CPU
our loop (``backends/torch_decode.py``) calls the transformers model for each step. This benchmark
runs the same greedy decode (R rows, a P-token prompt, T new tokens) several ways on the 30M model and
reports milliseconds per decode step (CPU time of this process, so other jobs on a shared machine
disturb it little, and wall time):

- ``transformers``: our decode loop's own forward (``torch_decode.forward_step``, preallocated cache);
- ``lean``: the same math written on the weights directly (RMSNorm, rotary, SDPA over cache views,
  SwiGLU), without transformers' modules, masks and cache classes: "fewer layers of indirection";
- ``lean-fused``: ``lean`` with q/k/v and gate/up each fused into one matrix product;
- ``static`` and ``static-compiled``: a static-shape step (a cache of the full length, an additive
  mask, positions as tensors) in eager mode and under ``torch.compile`` (compiled once, its cost shown);
- ``fused-static-compiled``: the static step with the fused products, compiled as one graph (``fullgraph``);
- ``matmul-only``: just the matrix products of one decode step (every linear layer and the LM head),
  the floor any of the above could reach without making the products themselves faster.

Every variant's greedy ids are checked against ``transformers``'s. Run by hand:

    python benchmarks/decode_levers.py --threads 1 --rounds 3 --out benchmarks/results/decode_levers.md
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def build(model, rows: int, prompt: int, new: int):
    """The decode variants as functions ``ids -> (greedy ids [rows, new], decode steps timed)``."""
    import torch
    import torch.nn.functional as F

    from rlaif_mlx.backends import torch_ops as ops
    from rlaif_mlx.backends.torch_decode import forward_step, repeated_cache

    cfg, layers = model.config, model.model.layers
    heads, kv, dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.hidden_size // cfg.num_attention_heads
    cache_arg = ops.cache_kwarg(model.forward)
    fused = [
        (
            torch.cat([layer.self_attn.q_proj.weight, layer.self_attn.k_proj.weight, layer.self_attn.v_proj.weight]),
            torch.cat([layer.self_attn.q_proj.bias, layer.self_attn.k_proj.bias, layer.self_attn.v_proj.bias]),
            torch.cat([layer.mlp.gate_proj.weight, layer.mlp.up_proj.weight]),
        )
        for layer in layers
    ]

    def rms(x, weight):
        return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + cfg.rms_norm_eps))

    def rope(x, cos, sin):
        half = x.shape[-1] // 2
        return x * cos + torch.cat([-x[..., half:], x[..., :half]], -1) * sin

    def layer_forward(i, layer, x, cos, sin, attend, fuse):
        attn, n = layer.self_attn, x.shape[1]
        h = rms(x, layer.input_layernorm.weight)
        if fuse:
            q, k, v = F.linear(h, fused[i][0], fused[i][1]).split([heads * dim, kv * dim, kv * dim], -1)
        else:
            q, k, v = attn.q_proj(h), attn.k_proj(h), attn.v_proj(h)
        q = rope(q.view(rows, n, heads, dim).transpose(1, 2), cos, sin)
        k = rope(k.view(rows, n, kv, dim).transpose(1, 2), cos, sin)
        o = attend(i, q, k, v.view(rows, n, kv, dim).transpose(1, 2))
        x = x + attn.o_proj(o.transpose(1, 2).reshape(rows, n, heads * dim))
        h = rms(x, layer.post_attention_layernorm.weight)
        gate, up = F.linear(h, fused[i][2]).chunk(2, -1) if fuse else (layer.mlp.gate_proj(h), layer.mlp.up_proj(h))
        return x + layer.mlp.down_proj(F.silu(gate) * up)

    def head(x):
        return model.lm_head(rms(x[:, -1], model.model.norm.weight))

    def transformers_path(ids):
        mask = torch.ones(rows, prompt, dtype=torch.long)
        positions = torch.arange(prompt)[None].expand(rows, prompt)
        logits, cache = forward_step(model, ids, mask, positions, None, cache_arg=cache_arg)
        cache = repeated_cache(cache, 1, room=new, preallocate=True)
        out, started = [logits.argmax(-1)], time.process_time()
        for t in range(new - 1):
            mask = torch.cat([mask, torch.ones(rows, 1, dtype=torch.long)], 1)
            position = torch.full((rows, 1), prompt + t)
            logits, cache = forward_step(model, out[-1][:, None], mask, position, cache, cache_arg=cache_arg)
            out.append(logits.argmax(-1))
        return torch.stack(out, 1), time.process_time() - started

    def lean(ids, fuse=False):
        keys = [torch.zeros(rows, kv, prompt + new, dim) for _ in layers]
        values = [torch.zeros(rows, kv, prompt + new, dim) for _ in layers]

        def forward(tokens, start):
            x = model.model.embed_tokens(tokens)
            n = tokens.shape[1]
            cos, sin = model.model.rotary_emb(x, torch.arange(start, start + n)[None].expand(rows, n))

            def attend(i, q, k, v):
                keys[i][:, :, start : start + n], values[i][:, :, start : start + n] = k, v
                kk, vv = keys[i][:, :, : start + n], values[i][:, :, : start + n]
                return F.scaled_dot_product_attention(q, kk, vv, is_causal=n > 1, enable_gqa=True)

            for i, layer in enumerate(layers):
                x = layer_forward(i, layer, x, cos[:, None], sin[:, None], attend, fuse)
            return head(x)

        out = [forward(ids, 0).argmax(-1)]
        started = time.process_time()
        for t in range(new - 1):
            out.append(forward(out[-1][:, None], prompt + t).argmax(-1))
        return torch.stack(out, 1), time.process_time() - started

    keys = [torch.zeros(rows, kv, prompt + new, dim) for _ in layers]
    values = [torch.zeros(rows, kv, prompt + new, dim) for _ in layers]

    rotary = model.model.rotary_emb
    scaling = getattr(rotary, "attention_scaling", 1.0)

    def static_step(tokens, position, bias, fuse=False):  # every shape fixed: the cache's full length, a mask
        x = model.model.embed_tokens(tokens[:, None])
        angles = position[:, None].float() * rotary.inv_freq[None]  # the rotary module's math, inline
        both = torch.cat([angles, angles], -1)
        cos, sin = (both.cos() * scaling)[:, None, None], (both.sin() * scaling)[:, None, None]
        index = position.view(rows, 1, 1, 1).expand(rows, kv, 1, dim)

        def attend(i, q, k, v):
            keys[i].scatter_(2, index, k)
            values[i].scatter_(2, index, v)
            return F.scaled_dot_product_attention(q, keys[i], values[i], attn_mask=bias, enable_gqa=True)

        for i, layer in enumerate(layers):
            x = layer_forward(i, layer, x, cos, sin, attend, fuse)
        return head(x)

    def static(ids, step=static_step):  # the prompt goes in token by token: only the decode steps are timed
        bias = torch.full((rows, 1, 1, prompt + new), float("-inf"))
        for t in range(prompt):
            bias[..., t] = 0
            logits = step(ids[:, t], torch.full((rows,), t), bias)
        out, started = [logits.argmax(-1)], time.process_time()
        for t in range(prompt, prompt + new - 1):
            bias[..., t] = 0
            out.append(step(out[-1], torch.full((rows,), t), bias).argmax(-1))
        return torch.stack(out, 1), time.process_time() - started

    compiled = {}  # variant -> (compiled step, CPU s to compile it and run its first call)

    def static_compiled(name, step, **options):
        def run(ids):
            if name not in compiled:
                started = time.process_time()
                fn = torch.compile(step, dynamic=False, **options)
                static(ids, fn)
                compiled[name] = (fn, time.process_time() - started)
            return static(ids, compiled[name][0])

        return run

    def matmul_only(ids):
        x, started = torch.randn(rows, 1, cfg.hidden_size), time.process_time()
        for _ in range(new - 1):
            for i, layer in enumerate(layers):
                F.linear(x, fused[i][0], fused[i][1])
                layer.self_attn.o_proj(x)
                gate = F.linear(x, fused[i][2])
                layer.mlp.down_proj(gate[..., : cfg.intermediate_size])
            model.lm_head(x[:, -1])
        return None, time.process_time() - started

    variants = {
        "transformers": transformers_path,
        "lean": lean,
        "lean-fused": lambda ids: lean(ids, fuse=True),
        "static": static,
        "static-compiled": static_compiled("static-compiled", static_step),
        "fused-static-compiled": static_compiled(
            "fused-static-compiled", lambda *a: static_step(*a, fuse=True), fullgraph=True
        ),
        "matmul-only": matmul_only,
    }
    return variants, compiled


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="30m", help="tiny, 30m or a local folder (default 30m)")
    parser.add_argument("--rows", type=int, default=16, help="R, rows decoded together (default 16: B=4 x G=4)")
    parser.add_argument("--prompt", type=int, default=32, help="P, prompt tokens (default 32)")
    parser.add_argument("--new", type=int, default=64, help="T, new tokens (default 64)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1: CPU time is then stable)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", help="write the markdown table here too")
    args = parser.parse_args()

    import torch
    from sampling_models import make_prompts, resolve_model
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(args.threads)
    path = resolve_model(args.model)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ids = torch.tensor(make_prompts(path, count=args.rows, length=args.prompt))
    with torch.inference_mode():
        variants, compiled = build(model, args.rows, args.prompt, args.new)
        reference, _ = variants["transformers"](ids)
        cpu = {name: [] for name in variants}
        wall = {name: [] for name in variants}
        same = {}
        for _ in range(args.rounds):  # interleaved: a slow minute hits every variant alike
            for name, run in variants.items():
                started = time.perf_counter()
                got, seconds = run(ids)
                wall[name].append(time.perf_counter() - started)
                cpu[name].append(seconds)
                same[name] = "-" if got is None else f"{(got == reference).float().mean().item():.3f}"
    steps = args.new - 1
    base = statistics.median(cpu["transformers"])
    lines = [
        f"`python benchmarks/decode_levers.py --model {args.model} --rows {args.rows} --prompt {args.prompt} "
        f"--new {args.new} --threads {args.threads} --rounds {args.rounds}`; {platform.machine()}, "
        f"torch {torch.__version__}, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}. "
        f"CPU ms per decode step is the median over rounds of this process's CPU time / {steps} steps; "
        "wall s is the whole call (prefill and, for static-compiled's first round, compiling included).",
        "",
        "| variant | CPU ms per decode step | vs transformers | wall s per call (median) | greedy ids equal |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for name in variants:
        ms = statistics.median(cpu[name]) / steps * 1000
        lines.append(
            f"| {name} | {ms:.2f} | {statistics.median(cpu[name]) / base:.2f}x | "
            f"{statistics.median(wall[name]):.2f} | {same[name]} |"
        )
    for name, (_, cost) in compiled.items():
        lines += ["", f"Compiling {name}'s step (and its first call) cost {cost:.1f} CPU s."]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        Path(args.out).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
