"""What the backend tests share: building a backend of either kind, real batches, and the frameworks' own models.

The backends are used through their public interface only (``rlaif_mlx/backends/base.py``);
where a test needs a reference number it loads the model folder with the framework itself
(transformers, or mlx-lm), never through a backend's internals.
"""

from __future__ import annotations

import importlib
from pathlib import Path

import numpy as np
from conftest import TORCH_DEVICE

from rlaif_mlx.backends.base import LossSettings, SamplingParams, SequenceBatch, TrainBatch
from rlaif_mlx.config import ModelConfig, TrainingConfig
from rlaif_mlx.rl.objective import aggregation_weights

PROMPTS = ["def add(a, b):", "import os\nprint(", "x"]  # different lengths on purpose
LOSS = LossSettings(kl_coef=0.1)


def make(kind: str, path, *, seed: int = 0, total_steps: int = 20, model: dict | None = None, **training):
    """A backend of ``kind`` (``torch`` on ``TORCH_DEVICE``, or ``mlx``) on the model folder ``path``."""
    training = {"learning_rate": 1e-3, "micro_batch_size": 4, "lr_scheduler_type": "constant"} | training
    options = {"torch": {"device": TORCH_DEVICE}} if kind == "torch" else {}
    config = ModelConfig(base_model=str(path), lora_r=4, **(options | (model or {})))
    module = importlib.import_module(f"rlaif_mlx.backends.{kind}")
    return module.create(config, TrainingConfig(**training), seed=seed, total_steps=total_steps)


def mlx_lora_model(path, *, device: str = "cpu", targets: list[str] | None = None, random_b: bool = True):
    """The MLX policy model as the backend loads it on ``device``, held by the test; with random B (it starts at 0)."""
    import mlx.core as mx

    from rlaif_mlx.backends import mlx_load, mlx_ops

    config = ModelConfig(base_model=str(path), lora_r=4, **({"lora_target_modules": targets} if targets else {}))
    model = mlx_load.load_policy(config, seed=0, device=device).model
    if random_b:
        for layer in mlx_ops.lora_layers(model).values():
            layer.lora_b = mx.random.normal(layer.lora_b.shape, key=mx.random.key(7)) * 0.2
    return model


def encode(backend, texts=PROMPTS) -> list[list[int]]:
    return [backend.tokenizer.encode(t, add_special_tokens=False) for t in texts]


def train_batch(backend, *, seed: int = 0, n: int = 3, max_new_tokens: int = 6) -> TrainBatch:
    """A fixed batch from real samples, with deterministic advantages and KL terms."""
    completions = backend.sample(encode(backend), n=n, params=SamplingParams(max_new_tokens=max_new_tokens, seed=seed))
    seqs = SequenceBatch.from_completions(completions, pad_id=backend.pad_id)
    return TrainBatch(
        sequences=seqs,
        advantages=np.random.default_rng(seed).standard_normal(len(seqs)).astype(np.float32),
        token_weights=aggregation_weights(seqs.loss_mask).astype(np.float32),
        ref_logp=backend.logprobs(seqs, reference=True),
    )


def with_random_adapters(backend, folder: Path, *, scale: float = 0.3, seed: int = 0):
    """The backend with every LoRA ``B`` random, set through a checkpoint (B starts at 0: merging would be a no-op)."""
    from safetensors.numpy import load_file, save_file

    backend.save(folder)
    file = folder / "adapter_model.safetensors"
    tensors = load_file(str(file))
    rng = np.random.default_rng(seed)
    for key, value in tensors.items():
        if "lora_B" in key:
            tensors[key] = (rng.standard_normal(value.shape) * scale).astype(value.dtype)
    save_file(tensors, str(file), metadata={"format": "pt"})
    backend.load(folder)
    return backend


# -------------------------------------------------------- the frameworks' own models


def plain_model(kind: str, folder):
    """The model in ``folder`` as its framework loads it, float32 (transformers on the CPU, or mlx-lm)."""
    if kind == "torch":
        import torch
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    import mlx.core as mx
    from mlx_lm.utils import load_model

    model = load_model(Path(folder))[0]
    model.set_dtype(mx.float32)
    return model


def plain_logp(kind: str, folder, seqs: SequenceBatch) -> np.ndarray:
    """Teacher-forced log-probs ``[N, T-1]`` of the model in ``folder``: one whole-row forward, full logits."""
    model = plain_model(kind, folder)
    if kind == "torch":
        import torch

        from rlaif_mlx.backends.torch_ops import token_logp

        with torch.inference_mode():
            ids, attn = (torch.as_tensor(a) for a in (seqs.input_ids, seqs.attention_mask))
            return token_logp(model, ids, attn).numpy()
    import mlx.core as mx

    from rlaif_mlx.backends.mlx_ops import token_logp

    ids, attn = (mx.array(a.astype(np.int32)) for a in (seqs.input_ids, seqs.attention_mask))
    return np.array(token_logp(model, ids, attn))


def plain_logits(kind: str, folder, ids: list[int]) -> np.ndarray:
    """Logits ``[T, V]`` of one sequence under the model in ``folder``."""
    model = plain_model(kind, folder)
    if kind == "torch":
        import torch

        with torch.inference_mode():
            return model(input_ids=torch.tensor([ids])).logits[0].float().numpy()
    import mlx.core as mx

    return np.array(model(mx.array([ids]))[0].astype(mx.float32))


def global_rng_state(kind: str):
    """The framework's process-wide random state, as plain data."""
    if kind == "torch":
        import torch

        cuda = [s.tolist() for s in torch.cuda.get_rng_state_all()] if torch.cuda.is_initialized() else []
        return torch.random.get_rng_state().tolist(), cuda
    import mlx.core as mx

    return np.array(mx.random.state[0]).tolist()


def draw_from_global_rng(kind: str) -> None:
    """Advances the framework's process-wide random state, as a caller's own random draws do."""
    if kind == "torch":
        import torch

        torch.rand(7)
    else:
        import mlx.core as mx

        mx.eval(mx.random.uniform(shape=(7,)))
