"""Sampling the next batch while the teacher scores this one (``rlaif.sample_ahead``).

With a slow teacher a step waits on scoring while the model sits idle. With
``sample_ahead`` on, step k samples step k+1's batch during step k's scoring,
so a step takes about max(sample, score) + train instead of their sum.

The price is one step of staleness: step k+1's samples come from the policy
before step k's update. The loss then takes its ratio against the log-probs of
the policy that sampled them (clipped, as PPO does), instead of against the
current policy. The curriculum also picks step k+1's prompts before it has
seen step k's rewards, so it moves one step later.

The sampled-ahead batch is part of the trainer's state: checkpoints store it,
so a resumed run trains on exactly the samples it would have trained on.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from ..backends.base import Completion
from .distributed import DistContext, renumbered


@dataclass
class PendingBatch:
    """A batch sampled during an earlier step, waiting to be trained on.

    Attributes:
        step: the step count when it is trained on (``Trainer.step`` before that step).
        task_ids: the whole batch's task ids, in batch order.
        completions: this process's share of the samples, prompt indices counting from 0 within the share.
        sample_seconds: how long sampling them took.
        sampled_at: the step count when they were sampled (below ``step``: by an older policy).
    """

    step: int
    task_ids: list[str]
    completions: list[Completion]
    sample_seconds: float
    sampled_at: int

    def state_dict(self, dist: DistContext) -> dict[str, Any]:
        """The whole batch as one process sampling every prompt would hold it (collective under torchrun)."""
        completions, offset = [], 0
        for prompts, part in dist.all_gather((len(dist.shard(self.task_ids)), self.completions)):
            completions += [renumbered(c, offset) for c in part]
            offset += prompts
        return {
            "step": self.step,
            "task_ids": list(self.task_ids),
            "completions": [asdict(c) for c in completions],
            "sample_seconds": self.sample_seconds,
            "sampled_at": self.sampled_at,
        }

    @classmethod
    def from_state_dict(cls, state: dict[str, Any], dist: DistContext) -> PendingBatch:
        """This process's share of a saved batch (the share a fresh ``dist.shard`` gives it)."""
        everything = [_completion(c) for c in state["completions"]]
        ids = list(state["task_ids"])
        mine = dist.shard(range(len(ids)))  # this process's prompt positions, contiguous
        share = [renumbered(c, -mine[0]) for c in everything if c.prompt_index in mine]
        return cls(int(state["step"]), ids, share, float(state["sample_seconds"]), int(state["sampled_at"]))


def _completion(record: dict[str, Any]) -> Completion:
    return Completion(**{k: tuple(v) if isinstance(v, list) else v for k, v in record.items()})
