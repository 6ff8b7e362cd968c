"""The Backend interface and the records that cross it.

Everything here is framework-free (numpy only), so the trainer, rewards and
tests speak one language whichever backend runs the model.

Conventions shared by every backend:
- Sequences are prompt + completion token ids, right-padded. Right padding keeps
  position ids contiguous for every row, so no position bookkeeping is needed.
- Log-prob arrays are ``[N, T-1]``: column ``t`` is ``log p(ids[t+1] | ids[:t+1])``
  at temperature 1 (the policy itself, not the sampling distribution).
- ``loss_mask [N, T-1]`` is 1 where the *target* is a completion token, 0 on
  prompt and padding targets, so neither ever reaches a loss or a denominator.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np


@dataclass(frozen=True)
class SamplingParams:
    """How to sample completions. Zero / one values switch a filter off.

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


@dataclass(frozen=True)
class Completion:
    """One sampled completion, kept as the tokens that were sampled.

    ``completion_ids`` holds exactly the sampled tokens (EOS included when the
    model emitted it; cut right after the token that completed a stop string).
    ``logprobs[i]`` is the policy log-prob (temperature 1) of ``completion_ids[i]``.
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
    """The objective's knobs, passed to ``Backend.train_step`` each step."""

    clip_eps_low: float = 0.2
    clip_eps_high: float = 0.2
    kl_coef: float = 0.0  # the KL term in the loss; 0 when KL is in the reward
    kl_estimator: str = "k3"


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


class DecodeBook:
    """Framework-free bookkeeping of one batched decode, shared by both backends.

    Rows are prompt-major (``row = prompt * n + sample``). Each step the backend
    hands in the token and temperature-1 log-prob it chose for every row; the
    book keeps them for live rows, decides EOS / stop-string finishes, and at the
    end assembles the ``Completion`` records.

    Args:
        prompts: the prompts' token ids.
        n: samples per prompt.
        eos_ids: tokens that end a completion (kept in its ids, not in its text).
        stop: stop strings (ids kept up to the completing token; text cut before it).
        decode: ids -> text, with special tokens kept.
    """

    def __init__(
        self, prompts: list[list[int]], n: int, *, eos_ids: tuple[int, ...], stop: tuple[str, ...], decode: Any
    ) -> None:
        self.prompts, self.n, self.eos, self.stop, self.decode = prompts, n, set(eos_ids), stop, decode
        rows = len(prompts) * n
        self.tokens: list[list[int]] = [[] for _ in range(rows)]
        self.logps: list[list[float]] = [[] for _ in range(rows)]
        self.reasons: list[str | None] = [None] * rows
        # A stop string first appears in text that ends with the newest token. Each token is at least one
        # byte and a character at most four, so the last 4 x (longest stop) + 8 tokens always hold it:
        # decoding only them keeps the check linear in the completion's length, not quadratic.
        self.stop_window = 4 * max((len(s) for s in stop), default=0) + 8

    def add(self, tokens: list[int], logps: list[float]) -> list[bool]:
        """Records one step for every row; returns which rows are still going."""
        for r, (tok, lp) in enumerate(zip(tokens, logps, strict=True)):
            if self.reasons[r] is not None:
                continue
            self.tokens[r].append(tok)
            self.logps[r].append(lp)
            if tok in self.eos:
                self.reasons[r] = "eos"
            elif self.stop and find_stop(self.decode(self.tokens[r][-self.stop_window :]), self.stop) >= 0:
                self.reasons[r] = "stop"  # a stop may span tokens, hence a window and not the last token
        return [reason is None for reason in self.reasons]

    @property
    def done(self) -> bool:
        return all(reason is not None for reason in self.reasons)

    def completions(self) -> list[Completion]:
        """The records, uid ``"{prompt}-{sample}"``; unfinished rows end with ``"length"``."""
        out = []
        for r, ids in enumerate(self.tokens):
            p, s = divmod(r, self.n)
            reason = self.reasons[r] or "length"
            text = self.decode(ids[:-1] if reason == "eos" else ids)
            if reason == "stop":
                text = text[: find_stop(text, self.stop)]
            prompt = tuple(int(t) for t in self.prompts[p])
            out.append(Completion(f"{p}-{s}", p, s, prompt, tuple(ids), tuple(self.logps[r]), text, reason))
        return out


class MicroBatchStats:
    """Combines ``objective.policy_loss`` stats over the micro-batches of one step.

    Losses add up (token weights are normalised over the whole batch); the
    per-token means are re-weighted by each micro-batch's ``weight_sum``.
    """

    MEANS = ("kl", "clip_fraction", "ratio_mean")

    def __init__(self) -> None:
        self.loss = self.pg_loss = self.weight = 0.0
        self.weighted = dict.fromkeys(self.MEANS, 0.0)
        self.micro_batches = 0

    def add(self, loss: float, stats: dict[str, Any]) -> None:
        """Adds one micro-batch's loss and stats (anything ``float()`` accepts)."""
        self.micro_batches += 1
        self.loss += float(loss)
        self.pg_loss += float(stats["pg_loss"])
        w = float(stats["weight_sum"])
        self.weight += w
        for key in self.MEANS:
            self.weighted[key] += float(stats[key]) * w

    def result(self) -> dict[str, Any]:
        """Keyword arguments for ``StepStats`` (all but ``grad_norm`` and ``lr``)."""
        means = {k: (v / self.weight if self.weight > 0 else 0.0) for k, v in self.weighted.items()}
        return {
            "loss": self.loss,
            "pg_loss": self.pg_loss,
            **means,
            "extra": {"micro_batches": float(self.micro_batches)},
        }


def merge_eos_ids(tokenizer_eos: int | None, generation_eos: int | list[int] | None) -> tuple[int, ...]:
    """The tokenizer's EOS plus the generation config's (Qwen stops on several), in that order.

    Raises:
        ValueError: neither names an EOS token.
    """
    listed = generation_eos if isinstance(generation_eos, list) else [generation_eos]
    found: list[int] = []
    for token in [tokenizer_eos, *listed]:
        if token is not None and int(token) not in found:
            found.append(int(token))
    if not found:
        raise ValueError("The tokenizer and generation config name no EOS token; cannot tell when to stop.")
    return tuple(found)


def prompt_owners(
    input_ids: np.ndarray, attention_mask: np.ndarray, loss_mask: np.ndarray
) -> tuple[np.ndarray, np.ndarray, int]:
    """Which rows of a right-padded batch share a prompt (both backends forward each prompt once).

    A row's prompt is its tokens up to its first completion target (``loss_mask``'s
    first 1, plus one, as ``SequenceBatch.from_completions`` writes it); a row with
    no completion target is all prompt. Rows need not be in groups.

    Returns:
        ``(prompt_len [R], owner [R], count)``: each row's prompt length, the index of
        its prompt among the distinct prompts (in first-seen order), and how many there are.
    """
    lengths = attention_mask.sum(axis=1)
    targets = loss_mask[:, : input_ids.shape[1] - 1] > 0
    prompt_len = np.where(targets.any(axis=1), targets.argmax(axis=1) + 1, lengths)
    index: dict[tuple[int, ...], int] = {}
    owner = np.array(
        [index.setdefault(tuple(row[:p].tolist()), len(index)) for row, p in zip(input_ids, prompt_len, strict=True)]
    )
    return prompt_len, owner, len(index)


def find_stop(text: str, stops: tuple[str, ...]) -> int:
    """Index of the earliest stop string in ``text``, or -1."""
    hits = [i for i in (text.find(s) for s in stops if s) if i >= 0]
    return min(hits) if hits else -1


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
        """Samples ``n`` completions per prompt, grouped by prompt (prompt-major order)."""
        ...

    def gathered(self) -> Any:
        """A context in which this process holds the policy's whole weights; every process enters it together.

        Under FSDP the weights are gathered once for the block, so sampling inside
        needs no other process (rank 0 may evaluate alone). Nested blocks are
        free. A no-op where the weights are always whole.
        """
        ...

    def logprobs(self, batch: SequenceBatch, *, reference: bool = False) -> np.ndarray:
        """Per-token log-probs ``[N, T-1]`` under the policy or the frozen reference."""
        ...

    def train_step(self, batch: TrainBatch, *, loss: LossSettings, learning_rate: float | None = None) -> StepStats:
        """One optimizer step over the batch (micro-batched, accumulated, clipped).

        With ``learning_rate`` the step uses it and the LR schedule does not advance
        (the supervised warm-up runs outside the RL schedule).
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
