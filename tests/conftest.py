"""Shared fixtures: one tiny random model per test session, built locally (no network)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# The PyTorch backend's own tests (test_torch_backend, test_torch_speedups) run on this device:
# the CPU in CI; RLAIF_TEST_TORCH_DEVICE=cuda runs them on a GPU to check the CUDA path.
TORCH_DEVICE = os.environ.get("RLAIF_TEST_TORCH_DEVICE", "cpu")


@pytest.fixture(scope="session")
def tiny_model_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Qwen2-style model + tokenizer in the Hugging Face layout."""
    from rlaif_mlx.data.tiny_model import ensure_tiny_model

    return ensure_tiny_model(tmp_path_factory.mktemp("models") / "tiny")


@pytest.fixture
def llm_server():
    """A local server speaking the Anthropic and OpenAI wire formats (``tests/llm_server.py``), for one test."""
    from llm_server import LLMServer

    with LLMServer() as server:
        yield server
