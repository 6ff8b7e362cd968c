"""From a step's prompts to its ``Rollout``: sampling, log-probs, rewards attached by uid, and the whole batch.

Each prompt draws from its own seed (``settings.prompt_seed``: run seed, step,
place in the batch), so a step's samples are reproducible, different every
step, and the same whichever process samples the prompt. The policy log-probs
are those recorded while sampling (never recomputed); the reference's come
from one forward when the KL term needs them. Both are at the sampling
temperature (``rlaif.generation_temperature``), which the update trains at too.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from ..backends.base import Backend, Completion, SequenceBatch
from ..config import RunConfig
from ..data.tasks import Task
from ..rewards.pipeline import RewardResult
from .distributed import DistContext
from .records import Rollout, sampled_logprobs
from .settings import prompt_seed, sampling_params

LogProbs = tuple[SequenceBatch, np.ndarray, "np.ndarray | None"]
"""The ``[B*G, T]`` token batch, the sampling-time policy log-probs and the reference's (or None), ``[B*G, T-1]``."""


class RolloutBuilder:
    """Samples this process's share of a step and builds the step's rollout from it.

    Args:
        config: the run config (``seed``, ``rlaif``).
        backend: the model that samples and scores the reference.
        prompt_ids: task id -> prompt token ids.
        dist: this process's place in the job.
        needs_reference: whether this step's KL term needs the reference's log-probs.
    """

    def __init__(
        self,
        config: RunConfig,
        backend: Backend,
        prompt_ids: dict[str, list[int]],
        dist: DistContext,
        *,
        needs_reference: Callable[[], bool],
    ) -> None:
        self.config = config
        self.backend = backend
        self.prompt_ids = prompt_ids
        self.dist = dist
        self.needs_reference = needs_reference

    def sample(self, tasks: list[Task], *, step: int, first_index: int | None = None) -> list[Completion]:
        """G completions per task, prompt-major.

        Args:
            tasks: the prompts to sample.
            step: the step the samples are for (part of each prompt's seed).
            first_index: the first task's place in the step's whole batch (default:
                where this process's share starts).
        """
        first_index = self.dist.rank * len(tasks) if first_index is None else first_index
        rl = self.config.rlaif
        seeds = tuple(prompt_seed(self.config.seed, step, first_index + i) for i in range(len(tasks)))
        params = sampling_params(rl, seed=seeds)
        return self.backend.sample([self.prompt_ids[t.id] for t in tasks], n=rl.num_samples_per_prompt, params=params)

    def logprobs(self, completions: list[Completion]) -> LogProbs:
        """The token batch, the sampling-time policy log-probs and (when KL is on) the reference's."""
        sequences = SequenceBatch.from_completions(completions, pad_id=self.backend.pad_id)
        policy_logp = sampled_logprobs(completions, sequences)
        temperature = self.config.rlaif.generation_temperature  # the policy that sampled them: one T throughout
        ref_logp = (
            self.backend.logprobs(sequences, reference=True, temperature=temperature, prompt_targets=False)
            if self.needs_reference()
            else None
        )
        return sequences, policy_logp, ref_logp

    def assemble(
        self,
        tasks: list[Task],
        completions: list[Completion],
        results: dict[str, RewardResult],
        *,
        logps: LogProbs | None = None,
    ) -> Rollout:
        """Attaches rewards (by uid, NaN where unscored) and log-probs (``logprobs``', computed when not given)."""
        G = self.config.rlaif.num_samples_per_prompt
        rewards = np.full((len(tasks), G), np.nan, dtype=np.float64)
        for c in completions:
            r = results[c.uid].reward
            rewards[c.prompt_index, c.sample_index] = np.nan if r is None else r
        sequences, policy_logp, ref_logp = logps if logps is not None else self.logprobs(completions)
        return Rollout(tasks, completions, results, rewards, sequences, policy_logp, ref_logp)

    def gather(self, tasks: list[Task], rollout: Rollout) -> Rollout:
        """The whole batch's rollout from every process's share (``rollout`` itself in one process).

        Rebuilt from the gathered samples as one process would build it; only the
        reference log-probs travel as arrays.
        """
        if not self.dist.enabled:
            return rollout
        completions, results = self.dist.gather_samples(
            rollout.completions, rollout.results, prompts=len(rollout.tasks)
        )
        ref_logp = self.dist.gather_rows(rollout.ref_logp) if rollout.ref_logp is not None else None
        sequences = SequenceBatch.from_completions(completions, pad_id=self.backend.pad_id)
        return self.assemble(
            tasks, completions, results, logps=(sequences, sampled_logprobs(completions, sequences), ref_logp)
        )
