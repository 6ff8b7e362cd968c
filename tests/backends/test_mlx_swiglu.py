"""SwiGLU through ``power`` on the CPU (``mlx_swiglu``): the same function, values and gradients, as mlx-lm's.

Real tiny model through the MLX backend's own loading, no mocks.
"""

from __future__ import annotations

import numpy as np
import pytest

mx = pytest.importorskip("mlx.core")
pytest.importorskip("mlx_lm")

import mlx.nn as nn  # noqa: E402
from backend_helpers import mlx_lora_model  # noqa: E402
from mlx.utils import tree_flatten  # noqa: E402
from mlx_lm.models import qwen2  # noqa: E402
from mlx_lm.models.activations import swiglu as mlx_lm_swiglu  # noqa: E402
from mlx_lm.tuner.lora import LoRALinear  # noqa: E402

from rlaif_mlx.backends import mlx_ops, mlx_swiglu  # noqa: E402


def test_swiglu_and_its_gradients_equal_mlx_lm_own():
    gate = mx.random.normal((4, 7, 300), key=mx.random.key(1)) * 6
    extremes = mx.array([-1e30, -200.0, -88.0, -20.0, -1e-3, 0.0, 1e-3, 20.0, 88.0, 200.0, 1e30])
    gate = mx.concatenate([gate, mx.broadcast_to(extremes, (4, 7, extremes.size))], axis=-1)
    up = mx.random.normal(gate.shape, key=mx.random.key(2))
    weights = mx.random.normal(gate.shape, key=mx.random.key(3))
    np.testing.assert_allclose(
        np.array(mlx_swiglu.swiglu(gate, up)), np.array(mlx_lm_swiglu(gate, up)), rtol=2e-6, atol=1e-30
    )
    ours = mx.grad(lambda g, u: (mlx_swiglu.swiglu(g, u) * weights).sum(), argnums=(0, 1))(gate, up)
    theirs = mx.grad(lambda g, u: (mlx_lm_swiglu(g, u) * weights).sum(), argnums=(0, 1))(gate, up)
    for mine, reference in zip(ours, theirs, strict=True):
        assert np.isfinite(np.array(mine)).all()
        np.testing.assert_allclose(np.array(mine), np.array(reference), rtol=1e-5, atol=1e-6)


def test_the_cpu_policy_computes_what_mlx_lm_does_with_the_same_parameters(tiny_model_path):
    swapped, kept = mlx_lora_model(tiny_model_path, device="cpu"), mlx_lora_model(tiny_model_path, device="gpu")
    assert all(isinstance(layer.mlp, mlx_swiglu.PowerSwiGLU) for layer in swapped.layers)
    assert all(type(layer.mlp) is qwen2.MLP for layer in kept.layers)  # on Metal the model stays as mlx-lm built it
    assert [name for name, _ in tree_flatten(swapped.parameters())] == [
        name for name, _ in tree_flatten(kept.parameters())
    ]
    ids = mx.random.randint(3, 500, (3, 24), key=mx.random.key(5))
    attn = mx.ones(ids.shape)
    np.testing.assert_allclose(np.array(swapped(ids)), np.array(kept(ids)), rtol=1e-4, atol=1e-5)

    def lora_grads(model):
        loss = nn.value_and_grad(model, lambda m: mlx_ops.token_logp(m, ids, attn).sum())
        return dict(tree_flatten(loss(model)[1]))

    ours, theirs = lora_grads(swapped), lora_grads(kept)
    assert ours.keys() == theirs.keys() and any("lora_a" in name for name in ours)
    for name, grad in ours.items():
        assert np.abs(np.array(theirs[name])).max() > 0, name
        np.testing.assert_allclose(np.array(grad), np.array(theirs[name]), rtol=1e-3, atol=1e-5, err_msg=name)


def test_lora_on_the_mlp_projections_adapts_and_merges_inside_the_swapped_block(tiny_model_path):
    targets = ["gate_proj", "up_proj", "down_proj"]
    swapped, kept = (mlx_lora_model(tiny_model_path, device=d, targets=targets) for d in ("cpu", "gpu"))
    mlp = swapped.layers[0].mlp
    assert isinstance(mlp, mlx_swiglu.PowerSwiGLU) and all(isinstance(mlp[name], LoRALinear) for name in targets)
    ids = mx.random.randint(3, 500, (2, 16), key=mx.random.key(6))
    adapted = np.array(swapped(ids))
    np.testing.assert_allclose(adapted, np.array(kept(ids)), rtol=1e-4, atol=1e-5)
    with mlx_ops.lora_merged(swapped):
        assert type(swapped.layers[0].mlp.gate_proj) is nn.Linear
        np.testing.assert_allclose(np.array(swapped(ids)), adapted, rtol=1e-4, atol=1e-5)
    assert swapped.layers[0].mlp is mlp and isinstance(mlp.gate_proj, LoRALinear)


def test_an_unknown_mlp_is_left_alone():
    class Layer(nn.Module):
        def __init__(self):
            super().__init__()
            self.mlp = nn.Linear(4, 4)

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = [Layer(), Layer()]

    model = Model()
    assert mlx_swiglu.swap_mlps(model) == 0
    assert all(isinstance(layer.mlp, nn.Linear) for layer in model.layers)
