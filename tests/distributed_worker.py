"""Runs ``rlaif-mlx`` commands one after another with a toy reward (torchrun launches it).

Usage: ``distributed_worker.py train --config A.yaml --- train --config B.yaml --resume``.

For ``tests/test_distributed.py``. The reward is the fraction of a
completion's characters that are letters: a pure function of the text, so a
sharded run and a single process score the same samples the same, and the
tiny random model's groups have spread to learn from (the offline graders
would score all of its output 0). Each process also notes
which completions it scored in ``scored-rank<R>.txt`` beside the run, so the
test can see the prompts were split.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from rlaif_mlx import rewards
from rlaif_mlx.cli import main


class LetterRewards:
    """Stands in for ``rewards.RewardPipeline`` (same constructor, same ``score``)."""

    def __init__(self, config, *, teacher=None) -> None:
        self.teacher = None
        self.log = Path(os.environ["SCORED_LOG_DIR"]) / f"scored-rank{os.environ.get('RANK', '0')}.txt"

    def score(self, items):
        with self.log.open("a") as f:
            f.write("".join(f"{task.id}\n" for _, task, _ in items))
        out = {}
        for uid, _, text in items:
            value = sum(ch.isalpha() for ch in text) / max(len(text), 1)
            out[uid] = rewards.RewardResult(value, {"letters": value})
        return out


def run(argv: list[str]) -> int:
    """Each ``---``-separated command in turn, ``LetterRewards`` in place of the graders.

    Under torchrun the process group is started here, once: the runs share it
    (``train`` leaves a group it did not start), which spares a launch per run.
    """
    import torch.distributed as dist

    original = rewards.RewardPipeline
    rewards.RewardPipeline = LetterRewards
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        dist.init_process_group("gloo")
    try:
        commands = " ".join(argv).split(" --- ")
        return max(main(command.split() + ["--no-dashboard"]) for command in commands)
    finally:
        rewards.RewardPipeline = original
        if dist.is_initialized():
            dist.barrier()  # gloo aborts a process that leaves while a peer still talks to it
            dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(run(sys.argv[1:]))
