"""Settings that training, evaluation and ``rlaif-mlx sample`` must build the same way.

One place turns the config into the step budget, prompt token ids and sampling parameters,
so a sample printed by ``sample`` or scored by ``eval`` is drawn exactly as the
trainer draws it; ``prompt_seed`` gives each training prompt its own seed.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from ..backends.base import SamplingParams
from ..config import DataConfig, RlaifConfig, RunConfig
from ..data.tasks import Task, prompt_token_ids


def total_optimizer_steps(config: RunConfig, num_tasks: int) -> int:
    """``max_steps`` when set (it overrides ``num_epochs``), else ``num_epochs`` over the tasks."""
    if config.training.max_steps:
        return config.training.max_steps
    return math.ceil(num_tasks / config.training.batch_size) * config.training.num_epochs


def task_prompt_ids(tokenizer: Any, tasks: Sequence[Task], data: DataConfig) -> dict[str, list[int]]:
    """The prompt token ids of each task (chat template and system prompt as ``data`` says).

    Raises:
        DataError: a prompt is longer than ``data.max_prompt_tokens``.
    """
    return {
        t.id: prompt_token_ids(
            tokenizer,
            t,
            use_chat_template=data.use_chat_template,
            system_prompt=data.system_prompt,
            max_prompt_tokens=data.max_prompt_tokens,
        )
        for t in tasks
    }


def sampling_params(
    rlaif: RlaifConfig,
    *,
    seed: int | tuple[int, ...] | None = None,
    temperature: float | None = None,
    max_new_tokens: int | None = None,
) -> SamplingParams:
    """The training's sampling parameters: its filters, stop strings and, unless given, temperature and length.

    Args:
        rlaif: the config's ``rlaif`` section.
        seed: one seed, or one per prompt (None: unseeded).
        temperature: overrides ``rlaif.generation_temperature`` (0 is greedy).
        max_new_tokens: overrides ``rlaif.max_new_tokens``.
    """
    return SamplingParams(
        max_new_tokens=max_new_tokens or rlaif.max_new_tokens,
        temperature=rlaif.generation_temperature if temperature is None else temperature,
        top_k=rlaif.top_k,
        top_p=rlaif.top_p,
        min_p=rlaif.min_p,
        stop=tuple(rlaif.stop),
        seed=seed,
    )


def prompt_seed(seed: int, step: int, index: int) -> int:
    """The sampling seed of the prompt at ``index`` of step ``step``'s batch (63 bits, well mixed).

    Reproducible, different every step, and the same whichever process samples the prompt.
    """
    state = np.random.SeedSequence([seed % 2**63, step, index]).generate_state(1, np.uint64)[0]
    return int(state >> np.uint64(1))
