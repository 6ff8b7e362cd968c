"""The MLX backend's checkpoint tensors: weights, AdamW moments and a rebased reference, in the portable layout.

``MlxBackend.save`` / ``load`` write and read through these the layout of
``backends/portable.py`` (PEFT's adapter file or the Hugging Face model file,
``optimizer.safetensors``, ``reference_model.safetensors``), so a checkpoint
moves to PyTorch and back. Its PyTorch twin is ``backends/torch_checkpoint.py``.

A part of the checkpoint is a parameter tree and ``{mlx name: (portable name,
stored transposed)}``: mlx-lm's names for these models are the Hugging Face
names, except that a LoRA layer keeps its base as ``<proj>.linear`` and its
matrices as ``lora_a [in, r]`` / ``lora_b [r, out]``, PEFT's ``lora_A`` /
``lora_B`` transposed (same scale, alpha / r).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
from mlx.utils import tree_flatten, tree_unflatten

from rlaif_mlx.backends import mlx_ops as ops
from rlaif_mlx.backends import portable
from rlaif_mlx.config import ModelConfig

MOMENT_NAMES = (("m", "exp_avg"), ("v", "exp_avg_sq"))  # mlx AdamW state -> portable names
Names = dict[str, tuple[str, bool]]


def trainable_names(model: nn.Module, *, lora: bool) -> Names:
    """The trainable tensors: PEFT's adapter keys (transposed), or every weight under its Hugging Face name."""
    if not lora:
        return {name: (name, False) for name, _ in tree_flatten(model.trainable_parameters())}
    names = {}
    for module in ops.lora_layers(model):
        names[f"{module}.lora_a"] = (portable.lora_key(module, "A"), True)
        names[f"{module}.lora_b"] = (portable.lora_key(module, "B"), True)
    return names


def reference_part(model: nn.Module, reference: nn.Module | None) -> tuple[nn.Module, Names]:
    """The frozen tensors a rebase changes: their module and names (Hugging Face names in the file).

    Full fine-tune: every weight of the reference copy. LoRA: only the adapted
    layers' base weights (a quantised one with its scales and biases).
    """
    if reference is not None:
        return reference, {name: (name, False) for name, _ in tree_flatten(reference.parameters())}
    names = {}
    for module, layer in ops.lora_layers(model).items():
        parts = ["weight"] + (["scales", "biases"] if isinstance(layer.linear, nn.QuantizedLinear) else [])
        for part in parts:
            if part in layer.linear:
                names[f"{module}.linear.{part}"] = (f"{module}.{part}", False)
    return model, names


def named_part(model: nn.Module, reference: nn.Module | None, which: str, *, lora: bool) -> tuple[nn.Module, Names]:
    """The module and names of one part of the weights (``Backend.parameters``), as ``torch_checkpoint``'s.

    Raises:
        ValueError: another ``which``.
    """
    if which == "trainable":
        return model, trainable_names(model, lora=lora)
    if which == "frozen":
        trainable, adapted = trainable_names(model, lora=lora), set(ops.lora_layers(model))
        names = {}
        for name, _ in tree_flatten(model.parameters()):
            layer, _, part = name.rpartition(".linear.")
            if name not in trainable:
                names[name] = (f"{layer}.{part}" if layer in adapted else name, False)
        return model, names
    if which == "reference":
        return reference_part(model, reference) if reference is not None else (model, {})
    raise ValueError(f"which must be 'trainable', 'frozen' or 'reference', not {which!r}")


def renamed(tree, names: Names) -> dict[str, mx.array]:
    """The tensors of a parameter tree named in ``names`` under their portable names and layouts."""
    flat = dict(tree_flatten(tree))
    return {key: flat[name].T if transposed else flat[name] for name, (key, transposed) in names.items()}


# ---------------------------------------------------------------------------- save


def save(
    path: Path,
    *,
    model: nn.Module,
    optimizer: optim.Optimizer,
    reference: nn.Module | None,
    rebased: bool,
    config: ModelConfig,
    source: Path,
) -> int:
    """Writes the weights, AdamW's moments and (after a rebase) the reference weights into ``path``.

    Args:
        path: the checkpoint folder (it exists).
        model / optimizer: the policy (with ``LoRALinear`` layers under LoRA) and its AdamW.
        reference: the full fine-tune's frozen copy; None under LoRA.
        rebased: the reference no longer equals the base weights on disk.
        config: the ``model`` config section (LoRA settings for PEFT's adapter config).
        source: the base model's folder (its configs describe the full weights).

    Returns:
        AdamW's step count (0 before the first step).
    """
    names = trainable_names(model, lora=config.use_lora)
    weights = renamed(model.trainable_parameters(), names)
    if config.use_lora:
        mx.save_safetensors(str(path / portable.ADAPTER_FILE), weights, metadata={"format": "pt"})
        adapter_config = portable.peft_adapter_config(config)
        (path / portable.ADAPTER_CONFIG_FILE).write_text(json.dumps(adapter_config, indent=2) + "\n")
    else:
        mx.save_safetensors(str(path / portable.FULL_FILE), weights, metadata={"format": "pt"})
        copy_hf_config(source, path, dtype=config.dtype)
    moments, step = _moments(optimizer.state, names)
    mx.save_safetensors(str(path / portable.OPTIMIZER_FILE), moments)
    if rebased:  # the reference is no longer the model on disk: keep what changed
        frozen, frozen_names = reference_part(model, reference)
        mx.save_safetensors(str(path / portable.REFERENCE_FILE), renamed(frozen.parameters(), frozen_names))
    return step


def _moments(state, names: Names) -> tuple[dict[str, mx.array], int]:
    """AdamW's moments under portable names (mlx ``m``/``v`` are ``exp_avg``/``exp_avg_sq``), and its step."""
    state = dict(tree_flatten(state))
    moments = {}
    for name, (key, transposed) in names.items():
        for ours, theirs in MOMENT_NAMES:
            if f"{name}.{ours}" in state:
                value = state[f"{name}.{ours}"]
                moments[portable.moment_key(key, theirs)] = value.T if transposed else value
    return moments, int(state["step"].item())


def copy_hf_config(source: Path, path: Path, *, dtype: str) -> None:
    """The base folder's config and generation config, describing the plain float weights we write.

    The dtype becomes the weights' and any quantisation entry is dropped
    (checkpoints and exports hold dequantised weights).
    """
    for name in portable.HF_CONFIG_FILES:
        if (source / name).exists():
            shutil.copy(source / name, path / name)
    config = path / "config.json"
    if config.exists():
        data = json.loads(config.read_text())
        for key in ("quantization", "quantization_config"):
            data.pop(key, None)
        for key in ("torch_dtype", "dtype"):
            if key in data or key == "dtype":
                data[key] = dtype
        config.write_text(json.dumps(data, indent=2) + "\n")


# ---------------------------------------------------------------------------- load


def load(
    path: Path,
    *,
    model: nn.Module,
    optimizer: optim.Optimizer,
    reference: nn.Module | None,
    rebased: bool,
    optimizer_step: int,
    lora: bool,
) -> None:
    """Restores what ``save`` (or the PyTorch backend) wrote into the models and a fresh ``optimizer``.

    Args:
        path: the checkpoint folder.
        rebased: the checkpoint holds rebased reference weights; load them too.
        optimizer_step: AdamW's step count from ``backend_state.json``.
        lora: the checkpoint holds PEFT's adapter file, not the whole model.

    Raises:
        portable.IncompatibleCheckpoint: names or shapes that do not fit the model.
    """
    if rebased:
        frozen, frozen_names = reference_part(model, reference)
        _copy_into(frozen, frozen_names, mx.load(str(path / portable.REFERENCE_FILE)), path, "reference weights")
    weights = {}
    for file in portable.weight_files(path, lora=lora):
        weights.update(mx.load(str(file)))
    names = trainable_names(model, lora=lora)
    _copy_into(model, names, weights, path, "weights")
    moments = mx.load(str(path / portable.OPTIMIZER_FILE))
    if not moments:  # saved before the first optimizer step
        return
    params = dict(tree_flatten(model.trainable_parameters()))
    optimizer.state = {
        **optimizer.state,
        **_moments_state(path, moments, params, names),
        "step": mx.array(optimizer_step, dtype=mx.uint64),
    }
    mx.eval(optimizer.state)


def _copy_into(module: nn.Module, names: Names, weights: dict, path: Path, what: str) -> None:
    """Sets a checkpoint's tensors (portable names and layouts) into ``module``, after checking them."""
    current = dict(tree_flatten(module.parameters()))
    expected = {key: tuple(current[name].shape[::-1] if t else current[name].shape) for name, (key, t) in names.items()}
    portable.check_tensors(path, what, {k: v.shape for k, v in weights.items()}, expected)
    update = [
        (name, (weights[key].T if t else weights[key]).astype(current[name].dtype)) for name, (key, t) in names.items()
    ]
    module.update(tree_unflatten(update))
    mx.eval(module.parameters())


def _moments_state(path: Path, moments: dict, params: dict, names: Names) -> dict:
    """A checkpoint's portable AdamW moments as mlx optimizer state, after checking their shapes."""
    expected = {
        portable.moment_key(key, theirs): tuple(params[name].shape[::-1] if t else params[name].shape)
        for name, (key, t) in names.items()
        for _, theirs in MOMENT_NAMES
    }
    portable.check_tensors(path, "optimizer moments", {k: v.shape for k, v in moments.items()}, expected)
    state = []
    for name, (key, transposed) in names.items():
        for ours, theirs in MOMENT_NAMES:
            value = moments[portable.moment_key(key, theirs)]
            state.append((f"{name}.{ours}", (value.T if transposed else value).astype(params[name].dtype)))
    return tree_unflatten(state)
