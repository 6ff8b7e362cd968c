"""The supervised warm-up before RL: a few steps of next-token loss on the tasks' reference solutions.

RL needs some successes to reinforce; a random or weak model gets none. The
warm-up teaches the reference solutions briefly, then the warmed-up weights
become the frozen KL reference, so the penalty keeps RL near them rather than
pulling back to the raw base. A stop signal between two warm-up steps saves a
warm-up checkpoint (weights, AdamW, the steps done and the data order), and a
resumed run continues the warm-up from there exactly.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..backends.base import Backend, Completion, LossSettings, SequenceBatch, TrainBatch
from ..config import RunConfig
from ..data.tasks import Task, reference_completion_text
from ..rl.objective import aggregation_weights


@dataclass(frozen=True)
class WarmupProgress:
    """How far the warm-up got, as a warm-up checkpoint keeps it (the weights and AdamW are the backend's).

    Attributes:
        done: warm-up steps taken.
        total: ``training.sft_warmup_steps``.
        rng: the state of the generator that picks each step's tasks (the data order), after ``done`` steps.
    """

    done: int
    total: int
    rng: dict[str, Any] | None = None

    def state_dict(self) -> dict[str, Any]:
        return {"done": self.done, "total": self.total, "rng": self.rng}

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> WarmupProgress:
        return cls(int(state["done"]), int(state["total"]), state.get("rng"))


def supervised_warmup(
    backend: Backend,
    tasks: list[Task],
    prompt_ids: dict[str, list[int]],
    config: RunConfig,
    *,
    world_size: int,
    log: Callable[[str], None],
    report: Callable[[int, int, float | None], None],
    after_step: Callable[[WarmupProgress], None],
    start: WarmupProgress | None = None,
) -> None:
    """Runs ``training.sft_warmup_steps`` steps on the reference solutions, then rebases the reference.

    Args:
        backend: the policy; trained in place, and its reference rebased at the end.
        tasks: the training tasks; those without a reference solution are left out.
        prompt_ids: each task's prompt token ids, as RL samples them.
        config: the run config (``training.sft_*`` and the seed).
        world_size: processes under torchrun; each takes the whole (small) batch at 1/world_size.
        log: one human line (a warm-up that has nothing to learn from).
        report: ``(steps done, steps in all, NLL per token or None)`` after each step; the NLL is
            measured every 10 steps and at the last.
        after_step: called with the progress after each step; raises to stop (a signal arrived).
        start: where a warm-up checkpoint left off (None: from the beginning). The backend
            already holds that checkpoint's weights and optimizer.
    """
    cfg = config.training
    with_ref = [t for t in tasks if t.reference]
    if not with_ref:
        log("supervised warm-up skipped: no task has a reference solution")
        return
    rng = np.random.default_rng(config.seed)
    if start is not None and start.rng is not None:
        rng.bit_generator.state = start.rng  # the data order continues where it stopped
    lr = cfg.sft_learning_rate or cfg.learning_rate
    for i in range(start.done if start is not None else 0, cfg.sft_warmup_steps):
        picks = rng.choice(len(with_ref), size=min(cfg.sft_batch_size, len(with_ref)), replace=False)
        seqs = reference_sequences(backend, [with_ref[k] for k in picks], prompt_ids)
        weights = aggregation_weights(seqs.loss_mask, aggregation="token_mean")
        # At ratio 1 the clipped surrogate's gradient with advantage 1 is the NLL gradient (of the model
        # itself, temperature 1: the reference solutions are data, not samples). Under
        # torchrun every process takes the whole batch at 1/world_size: the summed gradient is one's.
        backend.train_step(
            TrainBatch(seqs, np.ones(len(seqs), np.float32), (weights / world_size).astype(np.float32)),
            loss=LossSettings(kl_coef=0.0),
            learning_rate=lr,
        )
        measured = (i + 1) % 10 == 0 or i + 1 == cfg.sft_warmup_steps
        report(i + 1, cfg.sft_warmup_steps, -float((backend.logprobs(seqs) * weights).sum()) if measured else None)
        after_step(WarmupProgress(i + 1, cfg.sft_warmup_steps, rng.bit_generator.state))
    backend.rebase_reference()


def reference_sequences(backend: Backend, tasks: list[Task], prompt_ids: dict[str, list[int]]) -> SequenceBatch:
    """Each task's prompt followed by its reference solution and EOS, as one padded batch."""
    eos = backend.eos_ids[0]
    completions = []
    for j, task in enumerate(tasks):
        target = backend.tokenizer.encode(reference_completion_text(task), add_special_tokens=False) + [eos]
        completions.append(
            Completion(
                f"sft-{j}", j, 0, tuple(prompt_ids[task.id]), tuple(target), tuple([0.0] * len(target)), "", "eos"
            )
        )
    return SequenceBatch.from_completions(completions, pad_id=backend.pad_id)
