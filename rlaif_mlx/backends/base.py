"""The Backend interface and the records that cross it.

Everything here is framework-free (numpy only), so the trainer, rewards and
tests speak one language whichever backend runs the model.

Conventions shared by every backend:
- Sequences are prompt + completion token ids, right-padded. Right padding keeps
  position ids contiguous for every row, so no position bookkeeping is needed.
- Log-prob arrays are ``[N, T-1]``: column ``t`` is ``log p(ids[t+1] | ids[:t+1])``
  under ``softmax(logits / T)``, the policy at the sampling temperature ``T``: the
  policy that samples is the one that is trained (as TRL and verl do). Sampling
  records its log-probs at ``SamplingParams.temperature``; ``logprobs`` and
  ``train_step`` take the same ``T`` (``temperature=``, ``LossSettings.temperature``).
  Top-k / top-p / min-p truncate the draw only: log-probs are of the tempered,
  untruncated distribution. Greedy decoding (temperature 0) records temperature-1
  log-probs: there is no tempered distribution to score, and nothing trains at 0.
- ``loss_mask [N, T-1]`` is 1 where the *target* is a completion token, 0 on
  prompt and padding targets, so neither ever reaches a loss or a denominator.

The framework-free helpers both implementations share (the decode loop's
bookkeeping, micro-batch statistics) are ``backends/common.py``'s.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np

GREEDY_TEMPERATURE = 1e-6
"""Sampling at or below this temperature takes the most likely token (no division by ~0)."""


def check_temperature(temperature: float) -> float:
    """``temperature`` when it can score a policy (``logits / T``), else ValueError naming the fix."""
    if not temperature > GREEDY_TEMPERATURE:
        raise ValueError(
            f"log-probs need a temperature > 0 (got {temperature}): greedy decoding has no distribution "
            "to score or train; pass the temperature the samples were drawn at"
        )
    return float(temperature)


@dataclass(frozen=True)
class SamplingParams:
    """How to sample completions. Zero / one values switch a filter off.

    ``temperature`` 0 (up to ``GREEDY_TEMPERATURE``) or ``top_k`` 1 is greedy decoding.
    ``seed``: an int seeds the whole call; a tuple holds one seed per prompt, so
    a prompt's samples do not depend on which other prompts share the call (a
    batch split over processes samples what one process would); None draws one.
    """

    max_new_tokens: int = 128
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    stop: tuple[str, ...] = ()
    seed: int | tuple[int, ...] | None = None

    @property
    def logprob_temperature(self) -> float:
        """The temperature of the log-probs sampling records: ``temperature``, or 1 for greedy (temperature 0)."""
        return self.temperature if self.temperature > GREEDY_TEMPERATURE else 1.0


@dataclass(frozen=True)
class Completion:
    """One sampled completion, kept as the tokens that were sampled.

    ``completion_ids`` holds exactly the sampled tokens (EOS included when the
    model emitted it; cut right after the token that completed a stop string).
    ``logprobs[i]`` is the log-prob of ``completion_ids[i]`` under the tempered, untruncated
    policy the call sampled from (``SamplingParams.logprob_temperature``): what the old and
    training log-probs of the same ``T`` reproduce.
    Training uses these ids directly: the text is for graders and people.
    """

    uid: str
    prompt_index: int
    sample_index: int
    prompt_ids: tuple[int, ...]
    completion_ids: tuple[int, ...]
    logprobs: tuple[float, ...]
    text: str
    finish_reason: str  # "eos" | "stop" | "length"


@dataclass
class SequenceBatch:
    """Prompt + completion ids as a right-padded batch.

    Attributes:
        input_ids: ``[N, T]`` int64.
        attention_mask: ``[N, T]`` int64, 1 on real tokens.
        loss_mask: ``[N, T-1]`` float32, 1 where the target is a completion token.
    """

    input_ids: np.ndarray
    attention_mask: np.ndarray
    loss_mask: np.ndarray

    @classmethod
    def from_completions(cls, completions: list[Completion], *, pad_id: int) -> SequenceBatch:
        """Builds the batch from sampled tokens (never from re-tokenised text)."""
        rows = [list(c.prompt_ids) + list(c.completion_ids) for c in completions]
        width = max(len(r) for r in rows)
        ids = np.full((len(rows), width), pad_id, dtype=np.int64)
        attention = np.zeros((len(rows), width), dtype=np.int64)
        loss_mask = np.zeros((len(rows), width - 1), dtype=np.float32)
        for i, (row, c) in enumerate(zip(rows, completions, strict=True)):
            ids[i, : len(row)] = row
            attention[i, : len(row)] = 1
            start = len(c.prompt_ids)
            # target index t predicts ids[t+1]; completion targets are ids[start:len(row)]
            loss_mask[i, start - 1 : len(row) - 1] = 1.0
        return cls(input_ids=ids, attention_mask=attention, loss_mask=loss_mask)

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    def rows(self, index: slice | np.ndarray) -> SequenceBatch:
        """A sub-batch, trimmed to its own longest row (no wasted padding)."""
        ids, attn, mask = self.input_ids[index], self.attention_mask[index], self.loss_mask[index]
        width = max(int(attn.sum(axis=1).max()), 2)
        return SequenceBatch(ids[:, :width], attn[:, :width], mask[:, : width - 1])


@dataclass
class TrainBatch:
    """What one optimizer step consumes.

    Attributes:
        sequences: the tokens.
        advantages: ``[N]`` float32, one per sequence.
        token_weights: ``[N, T-1]`` float32, ``loss_mask`` divided by the aggregation
            normaliser of the *whole* batch, so micro-batch losses add up exactly.
        old_logp: ``[N, T-1]`` behaviour-policy log-probs, or None for a single
            update per batch (then ``old = stop_gradient(logp)``).
        ref_logp: ``[N, T-1]`` frozen-reference log-probs, or None when the KL
            term is not in the loss.
    """

    sequences: SequenceBatch
    advantages: np.ndarray
    token_weights: np.ndarray
    old_logp: np.ndarray | None = None
    ref_logp: np.ndarray | None = None


@dataclass(frozen=True)
class LossSettings:
    """The objective's knobs, passed to ``Backend.train_step`` each step.

    ``temperature``: the policy trained is ``softmax(logits / temperature)``; RL passes
    the sampling temperature (``old_logp`` and ``ref_logp`` are at the same one), the
    supervised warm-up 1. Must be > 0.
    """

    clip_eps_low: float = 0.2
    clip_eps_high: float = 0.2
    kl_coef: float = 0.0  # the KL term in the loss; 0 when KL is in the reward
    kl_estimator: str = "k3"
    temperature: float = 1.0

    def __post_init__(self) -> None:
        check_temperature(self.temperature)


@dataclass
class StepStats:
    """What a train step reports (plain floats)."""

    loss: float
    pg_loss: float
    kl: float
    clip_fraction: float
    ratio_mean: float
    grad_norm: float
    lr: float
    extra: dict[str, float] = field(default_factory=dict)


@runtime_checkable
class Backend(Protocol):
    """One model, its tokenizer, its optimizer: everything framework-specific.

    Implementations: ``backends/torch.py`` and ``backends/mlx.py``. Both take the
    same config sections (``ModelConfig``, ``LoraConfig``, ``OptimConfig``) and
    keep the same method order and names.
    """

    name: str  # "torch" | "mlx"
    device: str  # e.g. "cpu", "cuda:0", "metal"
    tokenizer: Any  # a Hugging Face compatible tokenizer (encode/decode/apply_chat_template)
    pad_id: int
    eos_ids: tuple[int, ...]

    def sample(self, prompts: list[list[int]], *, n: int, params: SamplingParams) -> list[Completion]:
        """Samples ``n`` completions per prompt, prompt-major (uid ``"{prompt}-{sample}"``).

        Args:
            prompts: token ids per prompt (each at least one token).
            n: samples per prompt.
            params: temperature, top-k/top-p/min-p, stops, length, seed.
                ``temperature == 0`` or ``top_k == 1`` is greedy decoding.

        Returns:
            ``len(prompts) * n`` completions with the sampled ids, their log-probs
            at ``params.logprob_temperature`` (tempered, untruncated), the text and
            the finish reason.
        """
        ...

    def gathered(self) -> Any:
        """A context in which this process holds the policy's whole weights; every process enters it together.

        Under FSDP the weights are gathered once for the block, so sampling inside
        needs no other process (rank 0 may evaluate alone). Nested blocks are
        free. A no-op where the weights are always whole.
        """
        ...

    def logprobs(
        self, batch: SequenceBatch, *, reference: bool = False, temperature: float = 1.0, prompt_targets: bool = True
    ) -> np.ndarray:
        """Per-token log-probs ``[N, T-1]`` (float32, 0 on padding targets).

        Args:
            batch: right-padded prompt + completion ids.
            reference: score under the frozen reference (LoRA: adapters off) instead of the policy.
            temperature: score ``softmax(logits / temperature)``: the sampling temperature,
                so that these equal the log-probs recorded while sampling. Must be > 0.
            prompt_targets: also score the prompts' own tokens; False leaves them 0 (only the
                ``loss_mask`` targets are scored: the LM head skips the prompt positions).

        Returns:
            Column ``t`` is ``log p(ids[t+1] | ids[:t+1])`` at ``temperature``.

        Raises:
            ValueError: ``temperature <= 0``.
        """
        ...

    def train_step(self, batch: TrainBatch, *, loss: LossSettings, learning_rate: float | None = None) -> StepStats:
        """One optimizer step over the batch: micro-batches, accumulation, clipping, AdamW.

        Args:
            batch: sequences, advantages and whole-batch-normalised token weights.
            loss: clip ranges, the KL coefficient and the temperature of the trained policy.
            learning_rate: use this rate for this step and leave the LR schedule
                where it is (the supervised warm-up runs outside the RL schedule);
                None follows the schedule.

        Returns:
            The step's loss, its parts, the pre-clip gradient norm and the rate used.
            A non-finite gradient norm skips the update (``extra["skipped_nonfinite"]``).
        """
        ...

    def gradients(self, batch: TrainBatch, *, loss: LossSettings) -> tuple[dict[str, np.ndarray], StepStats]:
        """The gradient the next ``train_step`` on ``batch`` would apply (before clipping), without stepping.

        Weights, optimizer, LR schedule and seed stream stay as they are; with
        dropout, the masks are the ones that next step would draw. For checking
        what a step will do (gradients reach every adapter, padding changes
        nothing) and for debugging a run.

        Returns:
            ``{name: float32 gradient}`` under ``parameters()``'s names and layouts,
            and the statistics that step would report (``lr``: the schedule's next rate).
        """
        ...

    def rebase_reference(self) -> None:
        """Makes the current weights the frozen KL reference and restarts the optimizer.

        With LoRA: merge the adapters into the base weights and start fresh
        adapters (the reference stays "adapters off"). Full fine-tuning: copy the
        current weights into the reference model.
        """
        ...

    def trainable_parameter_count(self) -> tuple[int, int]:
        """(trainable, total) parameter counts."""
        ...

    def parameters(self, *, which: str = "trainable") -> dict[str, np.ndarray]:
        """A copy of one part of the weights as numpy arrays, named as in a checkpoint; the same on both backends.

        Args:
            which: ``"trainable"``: what a step updates (the LoRA adapters, or every
                weight), under the names and layouts of the checkpoint's weight file
                (PEFT's for adapters). ``"frozen"``: the policy's other weights, under
                Hugging Face names. ``"reference"``: a full fine-tune's frozen KL
                reference (Hugging Face names); empty under LoRA, whose reference is
                the policy with its adapters off.

        Returns:
            Float weights as float32; quantised (packed) weights as stored.

        Raises:
            ValueError: another ``which``.
        """
        ...

    def save(self, path: Path | None) -> None:
        """Writes trainable weights + optimizer + scheduler state into folder ``path``.

        Under torchrun every process calls it together, rank 0 with the folder and
        the others with None: under FSDP they send their shards; nothing else is written.
        """
        ...

    def load(self, path: Path) -> None:
        """Restores what ``save`` wrote."""
        ...

    def export(self, path: Path) -> None:
        """Writes a merged model (LoRA folded in) + tokenizer in Hugging Face layout."""
        ...


class BackendUnavailable(RuntimeError):
    """The chosen backend's framework is not installed; the message says how to fix it."""
