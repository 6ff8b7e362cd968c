"""Measures a sharded model against an unsharded one (torchrun launches it, two CPU processes over gloo).

Usage: ``fsdp_worker.py MODEL_DIR OUT_DIR``. For ``tests/test_fsdp.py``.

Every process loads the tiny model twice: once sharded with
``rlaif_mlx.backends.torch_fsdp`` (the component under test) and once whole,
as a single process would hold it, which sees the whole global batch. Each
process writes what it measured to ``OUT_DIR/rank<R>.json``; the test asserts.
A sharded model's first forwards run under inference mode, as the backend's
scoring and sampling do, and training follows on the same model.
"""

from __future__ import annotations

import json
import sys
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from peft import LoraConfig
from safetensors.torch import load_file, save_file
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor
from transformers import AutoModelForCausalLM

from rlaif_mlx.backends import portable
from rlaif_mlx.backends import torch_fsdp as fsdp
from rlaif_mlx.backends.torch_ops import ADAPTER, lora_layers, token_logp, with_lora

ROWS, WIDTH, STEPS, MAX_NORM = 4, 12, 3, 0.5
LR = {"full": 1e-3, "lora": 1e-2}


def load(path: str, *, lora: bool = False):
    torch.manual_seed(0)  # LoRA's A matrices: the same in both copies
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    if lora:
        targets = ["q_proj", "k_proj", "v_proj", "o_proj"]
        model = with_lora(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=targets))
    return model


def global_batch(vocab: int):
    """Four right-padded rows and whole-batch-normalised token weights with advantages of both signs."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, vocab, (ROWS, WIDTH), generator=g)
    attn = torch.ones(ROWS, WIDTH, dtype=torch.long)
    attn[1, 8:] = 0
    attn[3, 5:] = 0
    valid = (attn[:, 1:] * attn[:, :-1]).float()
    advantage = torch.tensor([1.0, -0.5, 0.25, -2.0])[:, None]
    return ids, attn, valid * advantage / valid.sum()


def accumulate(model, ids, attn, weights) -> None:
    """Forward + backward one row at a time (micro-batches of 1): gradients add up."""
    for row in range(len(ids)):
        logp = token_logp(model, ids[row : row + 1], attn[row : row + 1])
        (-(logp * weights[row : row + 1]).sum()).backward()


def train(model, optimizer, batch, steps: int) -> list[float]:
    """``steps`` AdamW steps on ``batch`` with clipping; the pre-clip norms."""
    norms = []
    for _ in range(steps):
        accumulate(model, *batch)
        params = [p for p in model.parameters() if p.requires_grad]
        if isinstance(model, FSDPModule):
            norms.append(fsdp.clip_grad_norm(params, MAX_NORM))
        else:
            norms.append(float(torch.nn.utils.clip_grad_norm_(params, MAX_NORM)))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return norms


def adamw(model, kind: str):
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR[kind], weight_decay=0.01)


def forward(model, ids, attn, rows: slice):
    return model(input_ids=ids[rows], attention_mask=attn[rows]).logits


def max_diff(a: dict, b: dict) -> float:
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


def greedy(model, prompt, steps: int) -> tuple[list[int], torch.Tensor]:
    """Greedy decoding with a KV cache, no stop token: the tokens and each step's logits ``[steps, V]``."""
    out = model(input_ids=prompt, use_cache=True)
    tokens, logits = [], []
    for step in range(steps):
        last = out.logits[:, -1]
        logits.append(last[0])
        tokens.append(int(last.argmax()))
        if step < steps - 1:
            out = model(input_ids=torch.tensor([[tokens[-1]]]), cache=out.past_key_values, use_cache=True)
    return tokens, torch.stack(logits)


def inference_checks(path: str, rank: int, batch, mine: slice, folder: Path) -> dict:
    sharded, whole = fsdp.shard(load(path)), load(path)
    ids, attn, _ = batch
    out = {}
    with torch.inference_mode():  # as `TorchBackend.sample` decodes; the first use of a freshly sharded model
        # Inside `gathered` no forward communicates: the ranks decode different numbers of tokens.
        prompt = ids[rank : rank + 1, :6]
        steps = 6 if rank == 0 else 3
        with fsdp.gathered(sharded):
            out["gathered_is_whole"] = all(not isinstance(p, DTensor) for p in sharded.parameters())
            tokens, logits = greedy(sharded, prompt, steps)
            forced = forward(sharded, ids, attn, mine)
        out["resharded_after"] = all(isinstance(p, DTensor) for p in sharded.parameters())
        ref_tokens, ref_logits = greedy(whole, prompt, steps)
        out["greedy_same_tokens"] = tokens == ref_tokens
        out["greedy_logit_diff"] = float((logits - ref_logits).abs().max())
        out["forced_logit_diff"] = float((forced - forward(whole, ids, attn, mine)).abs().max())
    with torch.inference_mode():  # as `TorchBackend.logprobs` scores
        # The plain FSDP path (a collective per layer): both ranks forward the same number of times.
        plain = forward(sharded, ids, attn, mine)
        out["plain_forward_diff"] = float((plain - forward(whole, ids, attn, mine)).abs().max())
    try:  # an error inside the block still reshards
        with fsdp.gathered(sharded):
            raise KeyError("inside")
    except KeyError:
        out["resharded_after_error"] = all(isinstance(p, DTensor) for p in sharded.parameters())
    before = fsdp.full_state(sharded)
    with torch.no_grad(), fsdp.gathered(sharded):
        for param in sharded.parameters():
            param.add_(1.0)
    after = fsdp.full_state(sharded)
    out["gathered_edits_dropped"] = all(torch.equal(after[k], before[k]) for k in before)
    # Memory: each rank keeps its dim-0 half of every parameter (rounded up).
    out["shard_fractions"] = {n: p.to_local().numel() / p.numel() for n, p in sharded.named_parameters()}
    out["full_rows"] = {n: p.shape[0] for n, p in sharded.named_parameters()}
    return out


def full_finetune_checks(path: str, rank: int, batch, mine: slice, folder: Path) -> dict:
    sharded, whole = fsdp.shard(load(path)), load(path)
    opt_s, opt_w = adamw(sharded, "full"), adamw(whole, "full")
    ids, attn, weights = batch
    local = (ids[mine], attn[mine], weights[mine])
    out = {"empty_optimizer_state": fsdp.full_optimizer_state(sharded, opt_s) == {}}
    # Inference-mode forwards first (scoring, then sampling inside `gathered`): training then reuses the
    # buffers FSDP gathers weights into.
    with torch.inference_mode():
        forward(sharded, ids, attn, mine)
        with fsdp.gathered(sharded):
            greedy(sharded, ids[rank : rank + 1, :6], 2)
    # Summed, not averaged: each rank's half of the batch adds up to the whole batch's gradient.
    accumulate(sharded, *local)
    accumulate(whole, *batch)
    whole_grads = {n: p.grad for n, p in whole.named_parameters()}
    out["grad_rel_diff"] = max(
        float((p.grad.full_tensor() - whole_grads[n]).abs().max() / whole_grads[n].abs().max())
        for n, p in sharded.named_parameters()
    )
    sharded.zero_grad(set_to_none=True)
    whole.zero_grad(set_to_none=True)
    norms_s = train(sharded, opt_s, local, STEPS - 1)
    norms_w = train(whole, opt_w, batch, STEPS - 1)

    # A checkpoint after step 2 in the portable layout: rank 0 gathers and writes it, then reads it back.
    state, moments = fsdp.full_state(sharded), fsdp.full_optimizer_state(sharded, opt_s)
    out["others_get_nothing"] = rank == 0 or (state == {} and moments == {})
    if rank == 0:
        save_checkpoint(folder, state, moments)
        state_read, moments_read = read_checkpoint(folder)
    reloaded = fsdp.shard(load(path))
    opt_r = adamw(reloaded, "full")
    fsdp.load_full_state(reloaded, state_read if rank == 0 else {})
    fsdp.load_full_optimizer_state(reloaded, opt_r, moments_read if rank == 0 else {})
    again = fsdp.full_state(reloaded)
    if rank == 0:
        reference = whole.state_dict()
        out["state_names"] = sorted(state) == sorted(reference)
        out["state_on_cpu_whole"] = all(
            t.device.type == "cpu" and t.shape == reference[k].shape for k, t in state.items()
        )
        out["state_diff_step2"] = max_diff(state, reference)
        out["reload_exact"] = all(torch.equal(again[k], state[k]) for k in state)
        names = {p: n for n, p in whole.named_parameters()}
        ref_moments = {names[p]: s for p, s in opt_w.state.items()}
        out["moment_names"] = sorted(moments) == sorted(ref_moments)
        out["moment_steps"] = sorted({float(s["step"]) for s in moments.values()})
        out["moment_diff"] = max(
            float((moments[n][m] - ref_moments[n][m]).abs().max()) for n in moments for m in portable.MOMENTS
        )

    # Step 3 with and without the reload: the same weights, bit for bit.
    norms_s += train(sharded, opt_s, local, 1)
    train(reloaded, opt_r, local, 1)
    norms_w += train(whole, opt_w, batch, 1)
    final, final_reloaded = fsdp.full_state(sharded), fsdp.full_state(reloaded)
    out["norms_sharded"], out["norms_whole"] = norms_s, norms_w
    # A rebase of the full fine-tune's reference: both sharded alike, so plain load_state_dict copies shards.
    reference_model = fsdp.shard(load(path))
    reference_model.load_state_dict(sharded.state_dict())
    rebased = fsdp.full_state(reference_model)
    if rank == 0:
        reference = whole.state_dict()
        out["weight_diff"] = max_diff(final, reference)
        out["weight_close_fraction"] = float(
            torch.cat([(final[k] - reference[k]).abs().flatten() for k in final]).le(1e-6).float().mean()
        )
        out["weight_moved"] = max_diff(reference, load(path).state_dict())
        out["resume_exact"] = all(torch.equal(final_reloaded[k], final[k]) for k in final)
        out["rebase_exact"] = all(torch.equal(rebased[k], final[k]) for k in final)
    return out


def save_checkpoint(folder: Path, state: dict, moments: dict) -> None:
    """What rank 0 writes: the weights and ``optimizer.safetensors`` (``<name>.exp_avg`` …) of ``portable``."""
    tied = {"lm_head.weight"}  # shares the embedding's storage; Hugging Face checkpoints leave it out too
    save_file({k: t for k, t in state.items() if k not in tied}, str(folder / portable.FULL_FILE))
    save_file(
        {portable.moment_key(name, m): entry[m] for name, entry in moments.items() for m in portable.MOMENTS},
        str(folder / portable.OPTIMIZER_FILE),
    )
    steps = {float(entry["step"]) for entry in moments.values()}  # one count, as backend_state.json keeps it
    (folder / "optimizer_step.json").write_text(json.dumps(int(steps.pop())))


def read_checkpoint(folder: Path) -> tuple[dict, dict]:
    """``save_checkpoint``'s files as ``load_full_state`` / ``load_full_optimizer_state`` take them."""
    state = load_file(str(folder / portable.FULL_FILE))
    state["lm_head.weight"] = state["model.embed_tokens.weight"]
    flat = load_file(str(folder / portable.OPTIMIZER_FILE))
    step = torch.tensor(float(json.loads((folder / "optimizer_step.json").read_text())))
    names = {key.rsplit(".", 1)[0] for key in flat}
    moments = {
        name: {"step": step.clone(), **{m: flat[portable.moment_key(name, m)] for m in portable.MOMENTS}}
        for name in names
    }
    return state, moments


def lora_checks(path: str, rank: int, batch, mine: slice, folder: Path) -> dict:
    sharded, whole = fsdp.shard(load(path, lora=True)), load(path, lora=True)
    opt_s, opt_w = adamw(sharded, "lora"), adamw(whole, "lora")
    ids, attn, weights = batch
    out = {"lora_sharded": all(isinstance(p, DTensor) for n, p in sharded.named_parameters() if "lora_" in n)}
    out["norms_sharded"] = train(sharded, opt_s, (ids[mine], attn[mine], weights[mine]), STEPS)
    out["norms_whole"] = train(whole, opt_w, batch, STEPS)
    before = fsdp.full_state(sharded)
    with torch.no_grad():
        # The reference (adapters off) through the sharded model.
        with sharded.disable_adapter():
            off = forward(sharded, ids, attn, mine)
        with whole.disable_adapter():
            out["adapter_off_diff"] = float((off - forward(whole, ids, attn, mine)).abs().max())
        # Merged-weight decoding inside `gathered`: merge, decode, unmerge; the shards never change.
        with fsdp.gathered(sharded):
            sharded.merge_adapter()
            merged = forward(sharded, ids, attn, mine)
            sharded.unmerge_adapter()
        out["merged_logit_diff"] = float((merged - forward(whole, ids, attn, mine)).abs().max())
    after = fsdp.full_state(sharded)
    if rank == 0:
        reference = whole.state_dict()
        out["state_names"] = sorted(before) == sorted(reference)
        out["weight_diff"] = max_diff(before, reference)
        out["adapter_moved"] = max(float(t.abs().max()) for k, t in reference.items() if "lora_B" in k)
        out["merge_left_no_trace"] = all(torch.equal(after[k], before[k]) for k in before)
    # A LoRA rebase as TorchBackend.rebase_reference does it, on the sharded weights (DTensor arithmetic).
    with torch.no_grad():
        for model in (sharded, whole):
            for module in lora_layers(model).values():
                module.get_base_layer().weight += module.get_delta_weight(ADAPTER)
    folded = fsdp.full_state(sharded)
    if rank == 0:
        out["rebase_diff"] = max_diff(folded, whole.state_dict())
    # A partial load (the adapters alone, as a LoRA checkpoint holds them) into a fresh sharded model.
    fresh = fsdp.shard(load(path, lora=True))
    adapters = {k: t for k, t in before.items() if "lora_" in k} if rank == 0 else {}
    fsdp.load_full_state(fresh, adapters, strict=False)
    loaded = fsdp.full_state(fresh)
    if rank == 0:
        out["adapter_load_exact"] = all(torch.equal(loaded[k], before[k]) for k in before)
    return out


def main(path: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=timedelta(seconds=60))  # a hang fails here, not in the test's timeout
    rank = dist.get_rank()
    share = ROWS // dist.get_world_size()
    mine = slice(rank * share, (rank + 1) * share)
    batch = global_batch(load(path).config.vocab_size)
    results = {}
    for name, check in (("inference", inference_checks), ("full", full_finetune_checks), ("lora", lora_checks)):
        start = time.perf_counter()
        results[name] = check(path, rank, batch, mine, Path(out_dir))
        results[name]["seconds"] = time.perf_counter() - start
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(results, indent=1))
    # Only on success: a rank that raised exits at once, and torchrun stops its peer.
    dist.barrier()  # gloo aborts a process that leaves while a peer still talks to it
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
