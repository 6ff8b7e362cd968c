"""The PyTorch backend's checkpoint tensors: weights, AdamW moments and a rebased reference, whole or sharded.

``TorchBackend.save`` / ``load`` write and read through these the layout of
``backends/portable.py`` (PEFT's adapter file or the Hugging Face model file,
``optimizer.safetensors``, ``reference_model.safetensors``), so a checkpoint
moves between one process, several (DDP or FSDP) and MLX.

With whole weights (one process, or DDP, where rank 0's replica is everyone's)
the tensors are the model's own. Under FSDP (``torch_fsdp``) each process holds
a shard: ``save`` gathers whole tensors to rank 0's CPU memory, which alone
writes, and ``load`` has rank 0 alone read the files and sends each process its
shard. Both are then collective: every process calls them, together.

A part of the checkpoint is a module and ``{portable name: state_dict name}``:
the names differ by PEFT's adapter name (``lora_A.default.weight`` in the
model, ``lora_A.weight`` in the file) and, for a rebased LoRA reference, by the
``base_layer`` of each adapted layer.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

from rlaif_mlx.backends import portable
from rlaif_mlx.backends import torch_ops as ops
from rlaif_mlx.backends.torch_load import quiet_loading


def trainable_names(model) -> dict[str, str]:
    """``{portable name: parameter name}`` of the trainable tensors (PEFT's adapter keys, or HF names)."""
    return {name.replace(f".{ops.ADAPTER}.", "."): name for name, p in model.named_parameters() if p.requires_grad}


def named_part(model, reference, which: str) -> tuple[torch.nn.Module, dict[str, str]]:
    """The module and ``{portable name: parameter name}`` of one part of the weights (``Backend.parameters``).

    ``"trainable"``: the checkpoint's weight-file names. ``"frozen"``: the policy's
    other weights under Hugging Face names (PEFT's prefix and ``base_layer`` dropped).
    ``"reference"``: the full fine-tune's frozen copy (Hugging Face names); nothing under LoRA.

    Raises:
        ValueError: another ``which``.
    """
    if which == "trainable":
        return model, trainable_names(model)
    if which == "frozen":
        frozen = [name for name, p in model.named_parameters() if not p.requires_grad]
        return model, {name.removeprefix(portable.PEFT_PREFIX).replace(".base_layer.", "."): name for name in frozen}
    if which == "reference":
        return (reference, {n: n for n, _ in reference.named_parameters()}) if reference is not None else (model, {})
    raise ValueError(f"which must be 'trainable', 'frozen' or 'reference', not {which!r}")


def reference_part(model, reference) -> tuple[torch.nn.Module, dict[str, str]]:
    """The frozen tensors a rebase changes: their module and ``{HF name: state_dict name}``.

    Full fine-tune: every weight of the reference copy. LoRA: only the adapted
    layers' base weights (the rest still equals the base on disk).
    """
    if reference is not None:
        return reference, {name: name for name, _ in reference.named_parameters()}
    return model, {
        f"{name.removeprefix(portable.PEFT_PREFIX)}.weight": f"{name}.base_layer.weight"
        for name in ops.lora_layers(model)
    }


# ---------------------------------------------------------------------------- save


def save(path: Path | None, *, model, optimizer, reference, rebased: bool, fsdp: ModuleType | None) -> int:
    """Writes the weights, AdamW's moments and (after a rebase) the reference weights into ``path``.

    Args:
        path: the checkpoint folder; None on a process that only sends its
            shards (under FSDP every process calls this, rank 0 with the path).
        model / optimizer: the policy (a PEFT model under LoRA) and its AdamW.
        reference: the full fine-tune's frozen copy; None under LoRA.
        rebased: the reference no longer equals the base weights on disk.
        fsdp: the ``torch_fsdp`` module when the models are sharded, else None.

    Returns:
        AdamW's step count (0 before the first step); meaningful where ``path`` is given.
    """
    state = None if fsdp is None else _tied(model, fsdp.full_state(model, trainable_only=True))
    moments, step = _moments(model, optimizer, fsdp)
    frozen = _gather(*reference_part(model, reference), fsdp) if rebased else None
    if path is None:
        return step
    # Hugging Face / PEFT write their usual files (configs, tied weights once); ``state`` None: the model's own.
    with quiet_loading():  # no "Writing model shards" bar through the run's log or dashboard
        model.save_pretrained(str(path), safe_serialization=True, state_dict=state)
    save_file(moments, str(path / portable.OPTIMIZER_FILE))
    if frozen is not None:
        save_file(frozen, str(path / portable.REFERENCE_FILE))
    return step


def _tied(model, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state`` with tied names (a head sharing the embedding) pointing at one tensor again.

    The gathered copies are separate tensors; shared again, ``save_pretrained``
    leaves the tied one out as it does for the unsharded model.
    """
    first: dict[int, str] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        owner = first.setdefault(id(param), name)
        if owner != name and owner in state and name in state:
            state[name] = state[owner]
    return state


def _moments(model, optimizer, fsdp: ModuleType | None) -> tuple[dict[str, torch.Tensor], int]:
    """AdamW's moments under portable names (on rank 0 under FSDP), and its step count."""
    names = trainable_names(model)
    if fsdp is None:
        entries = {name: optimizer.state.get(model.get_parameter(name)) for name in names.values()}
    else:
        entries = fsdp.full_optimizer_state(model, optimizer)
    moments, step = {}, 0
    for key, name in names.items():
        entry = entries.get(name)
        if entry:
            step = int(entry["step"])
            for moment in portable.MOMENTS:
                moments[portable.moment_key(key, moment)] = entry[moment].detach().cpu().contiguous()
    return moments, step


def _gather(module, names: dict[str, str], fsdp: ModuleType | None) -> dict[str, torch.Tensor]:
    """``{portable name: whole CPU tensor}`` of the named tensors; ``{}`` on ranks > 0 under FSDP."""
    state = module.state_dict() if fsdp is None else fsdp.full_state(module)
    return {key: state[name].detach().cpu().contiguous() for key, name in names.items()} if state else {}


# ---------------------------------------------------------------------------- load


@torch.no_grad()
def load(
    path: Path, *, model, optimizer, reference, rebased: bool, optimizer_step: int, lora: bool, fsdp: ModuleType | None
) -> None:
    """Restores what ``save`` (or the MLX backend) wrote into the models and a fresh ``optimizer``.

    Args:
        path: the checkpoint folder.
        rebased: the checkpoint holds rebased reference weights; load them too.
        optimizer_step: AdamW's step count from ``backend_state.json``.
        lora: the checkpoint holds PEFT's adapter file, not the whole model.
        fsdp: the ``torch_fsdp`` module when the models are sharded, else None.

    Raises:
        portable.IncompatibleCheckpoint: names or shapes that do not fit the
            model (under FSDP: on every process, rank 0 having read the files).
    """
    if rebased:
        _load_tensors(
            path, [path / portable.REFERENCE_FILE], *reference_part(model, reference), "reference weights", fsdp
        )
    _load_tensors(path, portable.weight_files(path, lora=lora), model, trainable_names(model), "weights", fsdp)
    _load_moments(path, model, optimizer, optimizer_step, fsdp)


def _load_tensors(
    path: Path, files: list[Path], module, names: dict[str, str], what: str, fsdp: ModuleType | None
) -> None:
    expected = {key: module.get_parameter(name).shape for key, name in names.items()}

    def read() -> dict[str, torch.Tensor]:
        tensors: dict[str, torch.Tensor] = {}
        for file in files:
            tensors.update(load_file(str(file)))
        portable.check_tensors(path, what, {k: t.shape for k, t in tensors.items()}, expected)
        return tensors

    if fsdp is None:
        tensors = read()
        for key, name in names.items():
            param = module.get_parameter(name)
            param.copy_(tensors[key].to(param.device, param.dtype))
        return
    tensors = _read_on_rank0(read)
    fsdp.load_full_state(module, {names[key]: t for key, t in tensors.items()}, strict=False)


def _load_moments(path: Path, model, optimizer, step: int, fsdp: ModuleType | None) -> None:
    names = trainable_names(model)
    expected = {
        portable.moment_key(key, m): model.get_parameter(name).shape
        for key, name in names.items()
        for m in portable.MOMENTS
    }

    def read() -> dict[str, torch.Tensor]:
        moments = load_file(str(path / portable.OPTIMIZER_FILE))
        if moments:  # empty: saved before the first optimizer step
            portable.check_tensors(path, "optimizer moments", {k: t.shape for k, t in moments.items()}, expected)
        return moments

    if fsdp is not None:
        moments = _read_on_rank0(read)
        state = (
            {
                name: {
                    "step": torch.tensor(float(step)),
                    **{m: moments[portable.moment_key(key, m)] for m in portable.MOMENTS},
                }
                for key, name in names.items()
            }
            if moments
            else {}
        )
        fsdp.load_full_optimizer_state(model, optimizer, state)
        return
    moments = read()
    if not moments:
        return
    fused = bool(optimizer.defaults.get("fused"))
    for key, name in names.items():
        param = model.get_parameter(name)
        # the step count where AdamW keeps it: a float32 beside the param when fused, else on the CPU
        where = {"dtype": torch.float32, "device": param.device} if fused else {}
        optimizer.state[param] = {
            "step": torch.tensor(float(step), **where),
            **{m: moments[portable.moment_key(key, m)].to(param.device, param.dtype) for m in portable.MOMENTS},
        }


def _read_on_rank0(read: Callable[[], dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """``read()`` on rank 0, ``{}`` on the others; an error there is raised on every process.

    The others would otherwise wait for rank 0's tensors until the collective
    timeout. The error arrives as ``IncompatibleCheckpoint`` with rank 0's message.
    """
    tensors, error = {}, None
    if dist.get_rank() == 0:
        try:
            tensors = read()
        except Exception as exc:  # noqa: BLE001 - any error: unsent, the others would wait out the collective timeout
            error = f"{exc}" if isinstance(exc, portable.IncompatibleCheckpoint) else f"{type(exc).__name__}: {exc}"
    box = [error]
    dist.broadcast_object_list(box, src=0)
    if box[0] is not None:
        raise portable.IncompatibleCheckpoint(box[0])
    return tensors
