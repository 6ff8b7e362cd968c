"""FSDP for the PyTorch backend: weights, gradients and AdamW state sharded over the torchrun processes.

Data parallelism (``rlaif_mlx/distributed.py``) keeps a whole replica of the
model, its gradients and its optimizer state in every process. Here each of N
processes keeps 1/N of every tensor instead, through PyTorch's own FSDP2
(``torch.distributed.fsdp.fully_shard``): parameters become ``DTensor`` s
sharded on dim 0, each decoder layer all-gathers its weights just before its
forward (and backward) and frees them after, and gradients are reduce-scattered
so each process keeps only the gradient of its own shard. AdamW then updates
shards only, so its moments are sharded too.

What this module adds on top of FSDP2, for our trainer:

- ``shard``: one FSDP unit per decoder layer plus the root, and gradients
  *summed* across processes (FSDP2 averages by default; our token weights are
  already normalised over the whole global batch, as in
  ``torch_train.sum_across_processes``).
- ``gathered``: the whole model unsharded once for a decode loop, so a decode
  step costs no communication (and processes may take different step counts).
- ``full_state`` / ``load_full_state`` and ``full_optimizer_state`` /
  ``load_full_optimizer_state``: whole tensors under the unsharded model's
  names on rank 0, for the portable checkpoint (``backends/portable.py``).
- ``clip_grad_norm``: the global norm over the sharded gradients.
- ``fill``: a sharded parameter initialised as one process would initialise it whole.

Every function here except ``layers`` and ``fill`` is collective: every
process calls it, in the same order. So is every forward and backward of a
sharded model outside ``gathered`` (each layer gathers its weights): all
processes run the same number of them, and no process runs one alone (rank 0's
periodic evaluation).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import replace

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.distributed.tensor import DTensor, distribute_tensor

# Whole tensors gathered to rank 0's CPU memory, and scattered from rank 0: no other process holds a whole copy.
_GATHER = StateDictOptions(full_state_dict=True, cpu_offload=True)
_SCATTER = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
# What each FSDP module reshards to after a forward outside ``gathered`` (see ``shard``).
_RESHARD_ATTR = "_rlaif_reshard_after_forward"


def layers(model: nn.Module) -> list[nn.Module]:
    """The decoder layers of a transformers causal LM, also inside a PEFT wrapper.

    The layers are the modules of the classes the model lists in
    ``_no_split_modules`` (transformers' own "keep this block on one device",
    e.g. ``Qwen2DecoderLayer``); a model that lists none falls back to its
    longest ``nn.ModuleList`` (``model.model.layers`` in the Qwen2/Llama layout).

    Raises:
        ValueError: neither is found.
    """
    names: set[str] = set()
    for module in model.modules():
        names.update(getattr(module, "_no_split_modules", None) or ())
    found = [m for m in model.modules() if type(m).__name__ in names]
    if found:
        return found
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList)]
    if not lists:
        raise ValueError(
            f"{type(model).__name__}: no decoder layers found to shard (no _no_split_modules, no nn.ModuleList)"
        )
    return list(max(lists, key=len))


def shard(model: nn.Module, *, reshard_after_forward: bool = True) -> nn.Module:
    """Shards ``model`` in place over all processes: one FSDP unit per decoder layer, then the root.

    Call it on every process once the process group is up
    (``distributed.init_from_env``), after LoRA adapters are added (they are
    sharded with their layer) and before the optimizer is built (it must see
    the sharded parameters). The parameters' device is the mesh's device:
    CPU parameters communicate over gloo even on a machine with CUDA.

    Gradients are summed over the processes, not averaged: each process's loss
    carries token weights normalised over the whole global batch, so the sum is
    the single-process gradient. The reduction uses plain SUM collectives
    (``set_force_sum_reduction_for_comms``): gloo has no PREMUL_SUM, which a
    divide factor of 1 would otherwise ask for.

    Args:
        model: a transformers causal LM, or a PEFT model around one.
        reshard_after_forward: decoder layers free their gathered weights after
            the forward and gather them again for the backward (least memory);
            False keeps them gathered from forward to backward (less
            communication). The root (embeddings, final norm, head) always
            stays gathered until its backward, as FSDP2 does by default.

    Returns:
        ``model`` itself, now an ``FSDPModule`` whose parameters are ``DTensor`` s.
    """
    device = next(model.parameters()).device
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    blocks = layers(model)
    for block in blocks:
        fully_shard(block, mesh=mesh, reshard_after_forward=reshard_after_forward)
    fully_shard(model, mesh=mesh, reshard_after_forward=False)
    for module in (*blocks, model):
        setattr(module, _RESHARD_ATTR, reshard_after_forward if module is not model else False)
        module.set_gradient_divide_factor(1.0)
        module.set_force_sum_reduction_for_comms(True)
    _allocate_gather_buffers(blocks + [model])
    return model


def _allocate_gather_buffers(modules: list[FSDPModule]) -> None:
    """Gathers and frees each unit once, outside inference mode, one unit at a time.

    FSDP2 allocates a unit's gathered-weight buffers at its first gather and
    reuses them ever after. Allocated under ``torch.inference_mode`` (a first
    forward from ``TorchBackend.logprobs``) they would be inference tensors,
    which a later training step may not write ("Inplace update to inference
    tensor outside InferenceMode").
    """
    with torch.inference_mode(False), torch.no_grad():
        for module in modules:
            module.unshard()
            module.reshard()


def _fsdp_modules(model: nn.Module) -> list[FSDPModule]:
    return [m for m in model.modules() if isinstance(m, FSDPModule)]


@contextlib.contextmanager
def gathered(model: nn.Module) -> Iterator[nn.Module]:
    """Every layer's whole weights in every process for the block, sharded again after it.

    For a decode loop: without it each decode step all-gathers every layer
    (a collective per layer per token, so every process must take the same
    number of steps); inside it a forward needs no communication. Costs the
    memory of one whole copy of the weights per process while it lasts.

    Changes made to the gathered weights inside the block (a LoRA merge) are
    dropped when it ends: the sharded weights are the master copy and are
    never written here.

    Args:
        model: the root that ``shard`` returned; every process enters together.

    Yields:
        ``model``, gathered. An exception inside the block still reshards
        (and resets FSDP's per-iteration state) before it propagates.
    """
    modules = _fsdp_modules(model)
    try:
        with torch.inference_mode(False), torch.no_grad():  # see _allocate_gather_buffers
            for module in modules:
                module.set_reshard_after_forward(False, recurse=False)  # forwards in the block keep them gathered
                module.unshard()
        yield model
    except BaseException:  # any exit by exception, an interrupt too: a forward stopped midway leaves FSDP mid-iteration
        model.reset_iter_state()
        raise
    finally:
        for module in modules:
            module.set_reshard_after_forward(getattr(module, _RESHARD_ATTR, True), recurse=False)
            module.reshard()


def full_state(model: nn.Module, *, trainable_only: bool = False) -> dict[str, torch.Tensor]:
    """The whole weights (frozen ones too) as CPU tensors on rank 0; ``{}`` on the other ranks.

    Names are the unsharded model's ``state_dict`` names (FSDP2 adds no
    prefixes): Hugging Face names, or PEFT's (``base_model.model.…``,
    ``lora_A.default.weight``, ``base_layer.weight``) under LoRA. Gathered one
    tensor at a time, so only rank 0 ever holds a whole copy, in CPU memory.
    ``trainable_only`` leaves out the frozen parameters (buffers stay): a LoRA
    checkpoint gathers its adapters, not the whole base model.
    """
    return get_model_state_dict(model, options=replace(_GATHER, ignore_frozen_params=trainable_only))


def load_full_state(model: nn.Module, state: dict[str, torch.Tensor], *, strict: bool = True) -> None:
    """Loads whole tensors held by rank 0 into the sharded model; each process keeps its shard.

    Rank 0's ``state`` is broadcast one tensor at a time; the other ranks'
    ``state`` is ignored (pass ``{}``), so only rank 0 needs to read the
    checkpoint files or hold a whole copy.

    Args:
        model: the root that ``shard`` returned.
        state: on rank 0, name -> whole tensor (``full_state``'s names); any device and dtype.
        strict: every tensor of the model must be in ``state``. False loads a
            part (the LoRA adapters alone) and leaves the rest as it is.

    Raises:
        RuntimeError: with ``strict``, a missing or unexpected name.
    """
    # A copy: PyTorch puts the sharded tensors into the dict it is given.
    set_model_state_dict(
        model,
        dict(state) if dist.get_rank() == 0 else {},
        options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True, strict=strict),
    )


def full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, dict[str, torch.Tensor]]:
    """The optimizer's per-parameter state, whole and on the CPU, on rank 0; ``{}`` elsewhere.

    For AdamW: ``{parameter name: {"step": 0-d tensor, "exp_avg": …, "exp_avg_sq": …}}``
    with ``model.named_parameters()`` names and the parameter's whole shape.
    The learning rate and betas are not included (the backend sets them).

    Returns ``{}`` on every rank while the optimizer has taken no step (PyTorch's
    getter would otherwise take a zero step to create the state, which moves
    AdamW's step count).
    """
    if not optimizer.state:  # the same on every rank: all took the same steps
        return {}
    return _own_scalars(get_optimizer_state_dict(model, optimizer, options=_GATHER).get("state", {}))


def load_full_optimizer_state(
    model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, dict[str, torch.Tensor]]
) -> None:
    """Loads ``full_optimizer_state``'s layout from rank 0 into every process's shard of the optimizer.

    Rank 0's ``state`` is broadcast (the other ranks' is ignored). Every
    trainable parameter needs an entry; the learning rate and other
    hyper-parameters stay the optimizer's own. An empty ``state`` on rank 0
    (saved before the first step) leaves the optimizer fresh on every rank.
    """
    flag = [bool(state) if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(flag, src=0)
    if not flag[0]:
        return
    names = {param: name for name, param in model.named_parameters()}
    groups = [
        {**{k: v for k, v in group.items() if k != "params"}, "params": [names[p] for p in group["params"]]}
        for group in optimizer.param_groups
    ]
    loaded = {"state": _own_scalars(state), "param_groups": groups} if dist.get_rank() == 0 else {}
    set_optimizer_state_dict(model, optimizer, loaded, options=_SCATTER)


def _own_scalars(state: dict[str, dict]) -> dict[str, dict]:
    """Per-parameter dicts of their own, with 0-d tensors copied.

    PyTorch hands CPU scalars (AdamW's ``step``) through as the same objects,
    so without the copy a saved and a loaded optimizer would share one step
    counter and each ``step()`` would advance both.
    """
    return {
        name: {k: v.detach().clone() if torch.is_tensor(v) and v.dim() == 0 else v for k, v in entry.items()}
        for name, entry in state.items()
    }


@torch.no_grad()
def fill(param: nn.Parameter, init: Callable[[torch.Tensor], object]) -> None:
    """Fills a sharded parameter with what ``init`` writes into the whole tensor in one process.

    A random initialiser applied to a sharded ``DTensor`` draws each shard on its
    own: on CPU every process would draw the same numbers for its shard (repeated
    rows). Here every process draws the whole tensor from the same generator state,
    as one process would, and keeps its shard; no communication.

    Args:
        param: a parameter of a model ``shard`` returned (every process calls this
            with the same generator state).
        init: writes into the tensor it is given, e.g. ``nn.init.zeros_``.
    """
    whole = torch.empty(param.shape, dtype=param.dtype, device=param.to_local().device)
    init(whole)
    param.copy_(distribute_tensor(whole, param.device_mesh, param.placements, src_data_rank=None))


def clip_grad_norm(parameters: Iterable[nn.Parameter], max_norm: float) -> float:
    """Scales the sharded gradients to a global 2-norm of at most ``max_norm``; returns the norm before.

    ``torch.nn.utils.clip_grad_norm_`` reduces the per-shard norms across
    processes for ``DTensor`` gradients, so the norm (and the skip decision
    on a non-finite one) is the same on every process. It equals the
    unsharded model's norm to float32 rounding (~1e-6 relative: the squares
    are summed per shard first). ``max_norm`` of 0 or ``inf`` only measures.
    """
    params = [p for p in parameters if p.grad is not None]
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm or math.inf)
    return float(norm.full_tensor() if isinstance(norm, DTensor) else norm)
