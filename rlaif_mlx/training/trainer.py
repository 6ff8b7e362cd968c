"""The training recipe: one backend-agnostic loop that wires the components.

A step reads top to bottom: pick prompts, sample, score, reference log-probs,
advantages, update, KL control, record. The components: ``rollouts`` (samples
and the rollout), ``advantage_estimator`` (advantages, token weights, the KL
coefficient), ``policy_update``, ``stopping`` (signals, scoring that keeps
failing), ``checkpoint``; the math lives in ``rl/``, the framework in the
backend. Under torchrun each process samples, scores and trains its share of
the prompts and decides everything else on the gathered whole batch (``distributed``).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from ..backends.base import Backend, Completion
from ..config import RunConfig
from ..data.tasks import Task, TaskSet
from ..monitor.metrics import MetricsSinks
from ..monitor.reporting import PlainReporter, Reporter, RunHeader
from ..rewards.pipeline import RewardPipeline
from ..rl.schedule import scheduled_learning_rate
from ..teachers.cost import BudgetExceeded
from ..teachers.judge import TeacherUnavailable
from .advantage_estimator import AdvantageEstimator
from .checkpoint import check_resumable, load_trainer_state, save_checkpoint
from .curriculum import curriculum_from_config
from .distributed import DistContext
from .evaluation import evaluate, format_eval_line
from .policy_update import update_policy
from .records import Rollout, extreme_samples, step_record
from .rollouts import RolloutBuilder
from .sample_ahead import PendingBatch
from .settings import task_prompt_ids, total_optimizer_steps
from .stopping import ScoringFailed, StopRequested, StopSignals, UnscoredSteps
from .warmup import WarmupProgress, supervised_warmup

__all__ = ["ScoringFailed", "StopRequested", "Trainer", "total_optimizer_steps"]  # the stops, raised from ``run``


class Trainer:
    """Runs RL on one backend with one reward pipeline.

    Args:
        config: the validated run config.
        backend: the model, tokenizer and optimizer.
        train: the training tasks.
        rewards: scores completions.
        output_dir: where metrics and checkpoints go.
        log: prints one human line, when no ``reporter`` is given.
        reporter: shows the run (``reporting.PlainReporter`` lines, or the live dashboard).
        eval_tasks: the eval set for periodic evaluation (``eval.every_steps``).
        dist: this process's place in a torchrun job (default: a single process).
            Rank 0 alone writes metrics and checkpoints; others pass a silent reporter.
    """

    def __init__(
        self,
        config: RunConfig,
        *,
        backend: Backend,
        train: TaskSet,
        rewards: RewardPipeline,
        output_dir: Path,
        log: Callable[[str], None] = print,
        reporter: Reporter | None = None,
        eval_tasks: TaskSet | None = None,
        dist: DistContext | None = None,
    ) -> None:
        self.config = config
        self.dist = dist if dist is not None else DistContext()
        self.dist.check_batch_size(config.training.batch_size)
        self.eval_tasks = eval_tasks  # evaluated every ``eval.every_steps`` (None: no periodic eval)
        self.backend = backend
        self.tasks = train.by_id()
        self.rewards = rewards
        self.teacher = getattr(rewards, "teacher", None)  # the AI judge in the pipeline: budget, spend, metrics
        self.output_dir = Path(output_dir)
        self.reporter = reporter if reporter is not None else PlainReporter(log, log_every=config.logging.log_every)
        self.log = self.reporter.message
        self.total_steps = total_optimizer_steps(config, len(self.tasks))
        self.step = 0
        self.unscored = UnscoredSteps()
        self.restored_from: Path | None = None  # the checkpoint ``restore`` loaded
        self.run_id: str | None = None  # in every checkpoint: pruning removes only this run's (``setup`` sets it)
        self.base: dict | None = None  # the base model's fingerprint, in every checkpoint (``fingerprint``)
        self.warmup_progress: WarmupProgress | None = None  # while warming up, or restored from a warm-up checkpoint
        self.signals = StopSignals(log=self.log, current_step=lambda: self.step, doing=self._doing)
        self._pending: PendingBatch | None = None  # the next step's batch, sampled ahead (``rlaif.sample_ahead``)
        self.prompt_ids = task_prompt_ids(backend.tokenizer, train.tasks, config.data)
        self.curriculum = curriculum_from_config(config.curriculum, train.tasks, seed=config.seed)
        self.estimator = AdvantageEstimator(config.rlaif, config.training)  # the KL coefficient, the EMA baseline
        self.rollouts = RolloutBuilder(
            config, backend, self.prompt_ids, self.dist, needs_reference=lambda: self.estimator.needs_reference
        )
        # Opened by the first step, not here: a restored trainer must keep the
        # records up to its restored step, which is only known after ``restore``.
        self.metrics: MetricsSinks | None = None

    # ---- the loop -------------------------------------------------------

    def run(self, *, warmup: bool = True) -> list[dict[str, Any]]:
        """Warm-up (if configured and ``warmup``), then RL steps until the budget; returns the step records.

        A restored trainer skips the warm-up: its checkpoint already holds the
        warmed-up weights and the rebased reference (from a warm-up checkpoint,
        it finishes the warm-up first).
        """
        self.reporter.start(
            RunHeader(
                model=self.config.model.base_model,
                backend=self.backend.name,
                device=self.backend.device,
                total_steps=self.total_steps,
                output_dir=str(self.output_dir),
                teacher=self.teacher.name if self.teacher is not None else None,
                budget_usd=self.config.teacher.budget_usd if self.teacher is not None else None,
                start_step=self.step,
            )
        )
        records = []
        try:
            with self.signals:  # SIGINT / SIGTERM: finish the step, save, stop (``stopping``)
                if (
                    warmup
                    and self.config.training.sft_warmup_steps
                    and (self.restored_from is None or self.warmup_progress)
                ):
                    self.supervised_warmup()
                while self.step < self.total_steps:
                    records.append(self.train_step())
                    stopping = self.dist.any(self.signals.received is not None)  # all processes stop alike
                    if stopping or self.step % self.config.training.save_steps == 0 or self.step == self.total_steps:
                        self.save()
                    if stopping:
                        raise self.signals.stop(
                            f"after step {self.step}: checkpoint saved in {self.output_dir / 'checkpoints'}"
                        )
        except (ScoringFailed, BudgetExceeded, TeacherUnavailable):
            if self.step > 0:
                self.save()  # keep what was learned before the grader, teacher or budget gave out
            raise
        finally:
            if self.metrics is not None:
                self.metrics.close()
                self.metrics = None
            self.reporter.close()
        return records

    def close(self) -> None:
        """Releases the teacher's client and score cache (the run itself closes its metrics)."""
        if self.teacher is not None:
            self.teacher.close()

    def train_step(self) -> dict[str, Any]:
        """One RL step: sample, score, advantages, update, KL control, record."""
        t0 = time.perf_counter()
        self._open_metrics()
        if self.teacher is not None:  # before anything of this step is drawn: a budget stop resumes exactly here
            self.dist.check_budget(
                self.teacher, self.config.training.batch_size * self.config.rlaif.num_samples_per_prompt
            )
        pending, self._pending = self._pending, None
        if pending is None or pending.step != self.step:
            pending = self.sample_batch()
        stale = pending.sampled_at < pending.step  # sampled ahead, by the policy before the last update
        batch = [self.tasks[i] for i in pending.task_ids]
        tasks = self.dist.shard(batch)  # this process's prompts, each with its whole group (all of them in one process)
        completions = pending.completions
        t_sample = time.perf_counter()
        # Scoring (sandboxed tests, teacher calls) runs beside the work that does not depend on it: the
        # reference log-probs and, with ``sample_ahead``, the next batch. With a slow teacher the step
        # takes sample + max(score, reference) + train, or max(score, reference + sample) + train.
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="scoring") as pool:
            scoring = pool.submit(
                _timed, self.rewards.score, [(c.uid, tasks[c.prompt_index], c.text) for c in completions]
            )
            logps = self.rollouts.logprobs(completions)
            t_reference = time.perf_counter()
            if self.config.rlaif.sample_ahead and self.step + 1 < self.total_steps:
                self._pending = self.sample_batch(step=self.step + 1)  # the policy before this step's update
            t_ahead = time.perf_counter()
            results, score_s = self.dist.run_together(scoring.result)  # a failure anywhere stops every process
        t_score = time.perf_counter()
        rollout = self.rollouts.assemble(tasks, completions, results, logps=logps)
        full = self.rollouts.gather(batch, rollout)  # the whole batch: what every decision below is taken on
        self.unscored.check(full.rewards, [r.error for r in full.results.values()])  # ScoringFailed, in time
        advantages, weights, adv_stats = self.estimator.advantages(full)
        stats = self.update(rollout, advantages, weights, stale=stale)
        kl_token, kl_coef = self.estimator.observe_kl(full)
        for i, task in enumerate(batch):
            group = full.rewards[i]
            if np.isfinite(group).any():
                self.curriculum.record(task.id, float(np.nanmean(group)))
        self.step += 1
        t_end = time.perf_counter()
        record = self.record(
            full,
            stats,
            adv_stats,
            kl_token,
            kl_coef,
            times=(pending.sample_seconds, score_s, t_reference - t_sample, t_end - t_score, t_end - t0),
            ahead={"sampled_ahead": int(stale), "sample_ahead_seconds": t_ahead - t_reference},
        )  # the next batch, beside scoring
        return record

    # ---- the parts of a step ---------------------------------------------

    def sample_batch(self, *, step: int | None = None) -> PendingBatch:
        """Draws the prompts of ``step`` (default: this one) from the curriculum and samples this process's share."""
        started = time.perf_counter()
        ids = self.curriculum.next_batch(self.config.training.batch_size)
        completions = self.sample(self.dist.shard([self.tasks[i] for i in ids]), step=step)
        return PendingBatch(
            step=self.step if step is None else step,
            task_ids=list(ids),
            completions=completions,
            sample_seconds=time.perf_counter() - started,
            sampled_at=self.step,
        )

    def sample(self, tasks: list[Task], *, first_index: int | None = None, step: int | None = None) -> list[Completion]:
        """G completions per task for ``step`` (default: this one); see ``RolloutBuilder.sample``."""
        return self.rollouts.sample(tasks, step=self.step if step is None else step, first_index=first_index)

    def update(self, rollout: Rollout, advantages: np.ndarray, weights: np.ndarray, *, stale: bool = False):
        """The step's optimizer update(s) at the scheduled learning rate (``policy_update.update_policy``)."""
        return update_policy(
            self.backend,
            rollout,
            advantages,
            weights,
            training=self.config.training,
            rlaif=self.config.rlaif,
            kl_coef=self.estimator.kl_coef,
            learning_rate=scheduled_learning_rate(self.step, self.config.training, total_steps=self.total_steps),
            dist=self.dist,
            stale=stale,
        )

    def record(
        self,
        rollout: Rollout,
        stats,
        adv_stats: dict,
        kl_token: float,
        kl_coef: float,
        *,
        times,
        ahead: dict | None = None,
    ) -> dict:
        """The step's metrics record (``reporting.step_record``), plus a periodic evaluation; written and shown."""
        record = step_record(
            rollout,
            stats,
            adv_stats,
            step=self.step,
            epoch=self.curriculum.epoch,
            bucket=self.curriculum.bucket,
            kl_token=kl_token,
            kl_coef=kl_coef,
            times=times,
            ahead=ahead,
            teacher=self.dist.teacher_metrics(self.teacher) if self.teacher is not None else None,
        )
        every = self.config.eval.every_steps
        if self.eval_tasks is not None and every and (self.step % every == 0 or self.step == self.total_steps):
            # Rank 0 evaluates, the others wait. Every process gathers the weights first (under FSDP a collective):
            # rank 0 then samples on whole weights, needing no other process.
            with self.backend.gathered():
                if self.dist.is_main:
                    # After the record is built: evaluating re-scores, which replaces the teacher's last-batch numbers.
                    started = time.perf_counter()
                    record.update(evaluate(self.backend, self.eval_tasks.tasks, self.rewards, self.config))
                    record["eval_seconds"] = time.perf_counter() - started
                    self.log(format_eval_line(record, step=self.step))
        if self.metrics is not None:  # rank 0's
            self.metrics.write(record)
            self.metrics.write_samples(self.step, rollout.tasks, rollout.completions, rollout.results)
        best, worst = extreme_samples(rollout)
        self.reporter.step(record, best=best, worst=worst)
        return record

    # ---- warm-up and checkpoints -------------------------------------------

    def supervised_warmup(self) -> None:
        """Teaches the reference solutions first (``warmup.supervised_warmup``), from where a warm-up
        checkpoint left off; a stop signal saves a warm-up checkpoint and ends the run."""

        def after_step(progress: WarmupProgress) -> None:  # every process stops at the same warm-up step
            self.warmup_progress = progress
            if self.dist.any(self.signals.received is not None):
                raise self.signals.stop(
                    f"during the warm-up, after warm-up step {progress.done} of {progress.total}: "
                    f"checkpoint saved in {self.save().parent}"
                )

        self.warmup_progress = self.warmup_progress or WarmupProgress(0, self.config.training.sft_warmup_steps)
        supervised_warmup(
            self.backend,
            list(self.tasks.values()),
            self.prompt_ids,
            self.config,
            world_size=self.dist.world_size,
            log=self.log,
            report=self.reporter.warmup,
            after_step=after_step,
            start=self.warmup_progress,
        )
        self.warmup_progress = None  # done: checkpoints from here on are RL checkpoints

    def _doing(self) -> str:
        """The unit of work a stop signal lets finish: ``step 8``, or ``warm-up step 38 of 110``."""
        warmup = self.warmup_progress
        if warmup is not None:
            return f"warm-up step {min(warmup.done + 1, warmup.total)} of {warmup.total}"
        return f"step {self.step + 1}"

    def save(self) -> Path:
        """Writes a checkpoint of the current step, or of the warm-up (see ``checkpoint.save_checkpoint``).

        Under torchrun rank 0 writes it and every process returns once it is
        complete; every process takes part in the backend's part (under FSDP
        each sends rank 0 its shards).
        """
        estimator = self.estimator.state_dict()
        state = {
            "run_id": self.run_id,
            "base": self.base,  # the base model it was trained from (``fingerprint.check_base``)
            "warmup": self.warmup_progress.state_dict() if self.warmup_progress is not None else None,
            "step": self.step,
            "unscored_steps": self.unscored.count,
            "kl_controller": estimator["kl_controller"],
            "curriculum": self.curriculum.state_dict(),
            "ema": estimator["ema"],
            "teacher": self.dist.teacher_state(self.teacher),  # every process's spend
            # the next batch when it was sampled ahead: part of the state, so a resume trains on it
            "pending": self._pending.state_dict(self.dist) if self._pending is not None else None,
        }
        path = None
        if self.dist.is_main:
            path = save_checkpoint(
                self.output_dir,
                step=self.step,
                warmup_step=self.warmup_progress.done if self.warmup_progress is not None else None,
                state=state,
                config=self.config,
                save_backend=self.backend.save,
                keep=self.config.training.save_total_limit,
            )
        else:
            self.backend.save(None)  # this process's share of the backend's save, alongside rank 0's
        return self.dist.from_main(path)

    def restore(self, checkpoint: Path) -> None:
        """Continues from a checkpoint exactly where its run stopped.

        Loads the backend's weights, optimizer and RNG, then the step, KL
        coefficient, data order, EMA baseline and unscored-step count. The next
        ``run`` skips the warm-up (or, from a warm-up checkpoint, finishes it),
        and the metrics log keeps the records up to the restored step and drops later ones.

        Args:
            checkpoint: a ``checkpoints/step-NNNNNN`` (or ``warmup-NNNNNN``) folder.

        Raises:
            CheckpointError: the checkpoint's config differs in keys that change the run.
            ValueError: the checkpoint does not fit this backend or task list.
        """
        checkpoint = Path(checkpoint)
        check_resumable(checkpoint, self.config)
        state = load_trainer_state(checkpoint)
        self.curriculum.load_state_dict(state["curriculum"])  # first: a different task list fails fast
        self.backend.load(checkpoint)
        self.step = int(state["step"])
        self.unscored = UnscoredSteps(int(state.get("unscored_steps", 0)))  # absent before resuming existed
        self.estimator.load_state_dict(state)
        if self.teacher is not None and state.get("teacher") is not None:
            self.teacher.load_state_dict(self.dist.teacher_share(state["teacher"]))  # the spend so far counts
        pending = state.get("pending")
        self._pending = PendingBatch.from_state_dict(pending, self.dist) if pending else None
        self.warmup_progress = WarmupProgress.from_state_dict(state["warmup"]) if state.get("warmup") else None
        self.run_id = state.get("run_id") or self.run_id  # the same run, continued
        self.restored_from = checkpoint

    def _open_metrics(self) -> None:
        """Opens the metric sinks once (rank 0), appending; a resumed run first cuts them back to its step."""
        if self.metrics is None and self.dist.is_main:
            cfg = self.config.logging
            after = self.step if self.restored_from is not None else None  # a fresh run never cuts anything
            self.metrics = MetricsSinks.open(
                self.output_dir, after_step=after, tensorboard=cfg.tensorboard, samples=cfg.save_samples
            )


def _timed(fn, *args):
    """``(fn(*args), seconds)``: the scoring thread's own wall time."""
    started = time.perf_counter()
    return fn(*args), time.perf_counter() - started
