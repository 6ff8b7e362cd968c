"""Why RL helps or hurts held-out tasks: which constant the model writes for a constant it never trained on.

For runs written by ``benchmarks/learning_curves.py``, grades one greedy completion per held-out task
(as its held-out pass@1 does) after the warm-up alone and after RL, and sorts the completions by the
constant their code uses: the task's own (read from the prompt), one of the template's training
constants (an answer remembered from training), or neither / no code.

    python benchmarks/learning_constants.py --runs /tmp/lc_mlx --backend mlx --seeds 0,1 --warmup-steps 250

Prints one JSON line per (seed, checkpoint) and writes ``constants.json`` into ``--runs``.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


class Recording:
    """The reward pipeline, keeping every completion it grades."""

    def __init__(self, pipeline) -> None:
        self.pipeline = pipeline
        self.texts: dict[str, str] = {}
        self.passed: dict[str, bool] = {}

    def score(self, items):
        results = self.pipeline.score(items)
        for uid, task, text in items:
            self.texts[task.id] = text
            self.passed[task.id] = results[uid].components.get("tests") == 1.0
        return results

    def __getattr__(self, name):
        return getattr(self.pipeline, name)


def constants_in(code: str, family_constants: tuple) -> set:
    """The template constants that appear as literals in the code (ints, or quoted letters)."""
    if isinstance(family_constants[0], str):
        return set(re.findall(r"['\"]([a-z])['\"]", code)) & set(family_constants)
    return {int(n) for n in re.findall(r"(?<![\w.])-?\d+", code)} & set(family_constants)


def classify(recording: Recording, heldout, training_constants: dict) -> dict:
    from rlaif_mlx.data.families import TEMPLATES

    templates = {t.family: t for t in TEMPLATES}
    counts = {"passed": 0, "own constant": 0, "a training constant only": 0, "neither": 0}
    for task in heldout:
        family, _, _, constant = task.id.split("-", 3)
        template = templates[family]
        skeleton = constants_in(template.code.replace("{k}", "K").format(name="f"), template.constants)
        found = constants_in(recording.texts.get(task.id, ""), template.constants) - skeleton  # `sum(1 for ...)`
        own = next(c for c in template.constants if str(c) == constant)
        counts["passed"] += recording.passed.get(task.id, False)
        if own in found:
            counts["own constant"] += 1
        elif found & training_constants[family]:
            counts["a training constant only"] += 1
        else:
            counts["neither"] += 1
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", required=True, help="a learning_curves.py --out folder")
    parser.add_argument("--backend", default="mlx")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--settings", default="grpo,drgrpo,quickstart")
    parser.add_argument("--warmup-steps", type=int, default=500)
    parser.add_argument("--step", type=int, default=40, help="the RL checkpoint to read")
    args = parser.parse_args()

    from rlaif_mlx.config import load_config
    from rlaif_mlx.data import load_task_set
    from rlaif_mlx.data.families import generate_tasks
    from rlaif_mlx.training.evaluation import evaluate
    from rlaif_mlx.training.setup import build_run

    runs = Path(args.runs)
    train, _ = generate_tasks(seed=0)
    training_constants: dict[str, set] = {}
    for task in train:
        family, _, _, constant = task.id.split("-", 3)
        training_constants.setdefault(family, set()).add(int(constant) if constant.lstrip("-").isdigit() else constant)
    rows = []
    for seed in map(int, args.seeds.split(",")):
        overrides = {
            "backend": args.backend,
            "seed": seed,
            "output_dir": str(runs / f"why-{args.backend}-{seed}"),
            "model.base_model": str(runs / "models" / "tiny"),
            "training.sft_warmup_steps": args.warmup_steps,
            "logging.dashboard": False,
        }
        config = load_config(ROOT / "configs" / "families.yaml", overrides=overrides)
        heldout = load_task_set(config.data.eval_file).tasks
        trainer = build_run(config, source="configs/families.yaml", overwrite=True, log=lambda line: None)
        try:
            checkpoints = {"warm-up": runs / f"{args.backend}-{seed}-warm"}
            for setting in args.settings.split(","):
                checkpoints[setting] = (
                    runs / f"{args.backend}-{seed}-{setting}" / "checkpoints" / f"step-{args.step:06d}"
                )
            for name, folder in checkpoints.items():
                trainer.backend.load(folder)
                recording = Recording(trainer.rewards)
                evaluate(trainer.backend, heldout, recording, config)
                row = {"seed": seed, "weights": name, **classify(recording, heldout, training_constants)}
                rows.append(row)
                print(json.dumps(row), flush=True)
        finally:
            trainer.close()
    (runs / "constants.json").write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    sys.exit(main())
