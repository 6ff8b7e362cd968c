"""Framework-free pieces both backends share: the decode loop's bookkeeping, micro-batch statistics,
EOS ids and which rows share a prompt.

The interface itself and the records that cross it are ``backends/base.py``'s.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from rlaif_mlx.backends.base import Completion


class DecodeBook:
    """Framework-free bookkeeping of one batched decode, shared by both backends.

    Rows are prompt-major (``row = prompt * n + sample``). Each step the backend
    hands in the token and log-prob (``SamplingParams.logprob_temperature``) it chose for every row; the
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
