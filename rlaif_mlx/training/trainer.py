"""The training recipe: one backend-agnostic loop that wires the components.

A step reads top to bottom: pick prompts, sample, score, reference log-probs,
advantages, update, KL control, record. The math lives in ``advantages``,
``kl`` and ``objective``; the framework lives in the backend. Under torchrun
each process samples, scores and trains its share of the prompts and decides
everything else on the gathered whole batch (``distributed``).
"""

from __future__ import annotations

import math
import signal
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from ..backends.base import (
    Backend,
    Completion,
    LossSettings,
    SequenceBatch,
    StepStats,
    TrainBatch,
)
from ..config import RunConfig
from ..data.tasks import Task, TaskSet
from ..monitor.metrics import JsonlSink, MetricsSinks, SampleSink, TensorBoardSink
from ..monitor.reporting import PlainReporter, Reporter, RunHeader
from ..rewards.pipeline import RewardPipeline, RewardResult
from ..rl import advantages as adv
from ..rl import kl as klmod
from ..rl.objective import aggregation_weights
from ..rl.schedule import scheduled_learning_rate
from ..teachers.cost import BudgetExceeded
from ..teachers.judge import TeacherUnavailable
from .checkpoint import check_resumable, load_trainer_state, save_checkpoint
from .curriculum import Curriculum, estimate_difficulty
from .distributed import DistContext
from .evaluation import evaluate, format_eval_line
from .records import Rollout, extreme_samples, step_record
from .sample_ahead import PendingBatch
from .settings import sampling_params, task_prompt_ids
from .warmup import supervised_warmup

MAX_UNSCORED_STEPS = 3


class ScoringFailed(RuntimeError):
    """Every sample of several steps in a row could not be scored."""


class StopRequested(RuntimeError):
    """SIGINT or SIGTERM arrived; the step in progress finished and a checkpoint was saved."""

    def __init__(self, message: str, signum: int) -> None:
        super().__init__(message)
        self.signum = signum


def total_optimizer_steps(config: RunConfig, num_tasks: int) -> int:
    """``max_steps`` when set (it overrides ``num_epochs``), else ``num_epochs`` over the tasks."""
    if config.training.max_steps:
        return config.training.max_steps
    return math.ceil(num_tasks / config.training.batch_size) * config.training.num_epochs


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
        self._unscored_steps = 0
        self.restored_from: Path | None = None  # the checkpoint ``restore`` loaded
        self._stop_signal: int | None = None  # SIGINT / SIGTERM received: stop after this step
        self._pending: PendingBatch | None = None  # the next step's batch, sampled ahead (``rlaif.sample_ahead``)
        self.prompt_ids = task_prompt_ids(backend.tokenizer, train.tasks, config.data)
        cur = config.curriculum
        self.curriculum = Curriculum(
            [t.id for t in train.tasks],
            [t.difficulty for t in train.tasks],
            estimates=[estimate_difficulty(t.prompt, t.reference, t.tests) for t in train.tasks],
            enabled=cur.enabled,
            num_buckets=cur.num_buckets,
            advance_threshold=cur.advance_threshold,
            advance_after_steps=cur.advance_after_steps,
            window=cur.window,
            mix_previous=cur.mix_previous,
            seed=config.seed,
        )
        rl = config.rlaif
        if rl.adaptive_kl:
            self.kl_controller = klmod.AdaptiveKLController(rl.kl_penalty, rl.target_kl, rl.kl_horizon)
        else:
            self.kl_controller = klmod.FixedKLController(rl.kl_penalty)
        self.ema = adv.EmaBaseline(decay=rl.ema_decay) if rl.baseline == "ema" else None
        # Opened by the first step, not here: a restored trainer must keep the
        # records up to its restored step, which is only known after ``restore``.
        self.metrics: MetricsSinks | None = None

    # ---- the loop -------------------------------------------------------

    def run(self) -> list[dict[str, Any]]:
        """Warm-up (if configured), then RL steps until the budget; returns the step records.

        A restored trainer skips the warm-up: its checkpoint already holds the
        warmed-up weights and the rebased reference.
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
        previous_handlers = self._catch_stop_signals()
        try:
            if self.config.training.sft_warmup_steps and self.restored_from is None:
                self.supervised_warmup()
            while self.step < self.total_steps:
                records.append(self.train_step())
                stopping = self.dist.any(self._stop_signal is not None)  # every process stops after the same step
                if stopping or self.step % self.config.training.save_steps == 0 or self.step == self.total_steps:
                    self.save()
                if stopping:
                    signum = self._stop_signal or signal.SIGTERM
                    raise StopRequested(
                        f"{signal.Signals(signum).name} after step {self.step}: "
                        f"checkpoint saved in {self.output_dir / 'checkpoints'}",
                        signum,
                    )
        except (ScoringFailed, BudgetExceeded, TeacherUnavailable):
            if self.step > 0:
                self.save()  # keep what was learned before the grader, teacher or budget gave out
            raise
        finally:
            for signum, handler in previous_handlers.items():
                signal.signal(signum, handler)
            if self.metrics is not None:
                self.metrics.close()
                self.metrics = None
            self.reporter.close()
        return records

    def close(self) -> None:
        """Releases the teacher's client and score cache (the run itself closes its metrics)."""
        if self.teacher is not None:
            self.teacher.close()

    def _catch_stop_signals(self) -> dict:
        """SIGINT / SIGTERM finish the current step, save a checkpoint and stop; a second one stops at once.

        A step is the smallest unit that can be saved exactly (mid-step state is
        half-sampled, half-scored), so the first signal waits for its end.
        """
        self._stop_signal = None
        if threading.current_thread() is not threading.main_thread():
            return {}  # signal handlers can only be set from the main thread

        def request_stop(signum, frame):
            if self._stop_signal is not None:
                raise KeyboardInterrupt  # asked twice: stop now, without a checkpoint
            self._stop_signal = signum
            self.log(
                f"{signal.Signals(signum).name}: finishing step {self.step + 1}, then saving a checkpoint "
                "(send it again to stop at once)"
            )

        return {signum: signal.signal(signum, request_stop) for signum in (signal.SIGINT, signal.SIGTERM)}

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
            logps = self.logprob_batch(completions)
            t_reference = time.perf_counter()
            if self.config.rlaif.sample_ahead and self.step + 1 < self.total_steps:
                self._pending = self.sample_batch(step=self.step + 1)  # the policy before this step's update
            t_ahead = time.perf_counter()
            results, score_s = self.dist.run_together(scoring.result)  # a failure anywhere stops every process
        t_score = time.perf_counter()
        rollout = self.assemble(tasks, completions, results, logps=logps)
        full = self.gather(batch, rollout)  # the whole batch: what every decision below is taken on
        self._check_scoring(full)
        advantages, weights, adv_stats = self.advantages(full)
        stats = self.update(rollout, advantages, weights, stale=stale)
        kl_token = (
            klmod.masked_mean_kl(
                full.policy_logp, full.ref_logp, full.sequences.loss_mask, estimator=self.config.rlaif.kl_estimator
            ).token_mean
            if full.ref_logp is not None
            else float("nan")
        )
        kl_coef = self.kl_controller.value
        self.kl_controller.update(kl_token, len(full.completions))
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

    def _check_scoring(self, rollout: Rollout) -> None:
        """Stops the run when scoring keeps failing for every sample, instead of training on nothing."""
        if np.isfinite(rollout.rewards).any():
            self._unscored_steps = 0
            return
        self._unscored_steps += 1
        if self._unscored_steps >= MAX_UNSCORED_STEPS:
            errors = sorted({r.error for r in rollout.results.values() if r.error})
            raise ScoringFailed(
                f"no sample could be scored in {self._unscored_steps} consecutive steps; last error: "
                f"{errors[0] if errors else 'unknown'}"
            )

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
        """G completions per task; ``first_index``: the first task's place in the step's whole batch
        (default: where this process's share starts).

        Each prompt draws from its own seed (run seed, step, place in the batch): reproducible,
        different every step, and the same whichever process samples it.
        """
        first_index = self.dist.rank * len(tasks) if first_index is None else first_index
        rl = self.config.rlaif
        seeds = tuple(
            prompt_seed(self.config.seed, self.step if step is None else step, first_index + i)
            for i in range(len(tasks))
        )
        params = sampling_params(rl, seed=seeds)
        return self.backend.sample([self.prompt_ids[t.id] for t in tasks], n=rl.num_samples_per_prompt, params=params)

    def logprob_batch(self, completions: list[Completion]):
        """The token batch, the sampling-time policy log-probs and (when KL is on) the reference's."""
        sequences = SequenceBatch.from_completions(completions, pad_id=self.backend.pad_id)
        policy_logp = sampled_logprobs(completions, sequences)
        need_ref = self.kl_controller.value > 0 or self.config.rlaif.adaptive_kl
        ref_logp = self.backend.logprobs(sequences, reference=True) if need_ref else None
        return sequences, policy_logp, ref_logp

    def assemble(
        self, tasks: list[Task], completions: list[Completion], results: dict[str, RewardResult], *, logps=None
    ) -> Rollout:
        """Attaches rewards (by uid) and log-probs (``logprob_batch``'s, computed here when not given)."""
        G = self.config.rlaif.num_samples_per_prompt
        rewards = np.full((len(tasks), G), np.nan, dtype=np.float64)
        for c in completions:
            r = results[c.uid].reward
            rewards[c.prompt_index, c.sample_index] = np.nan if r is None else r
        sequences, policy_logp, ref_logp = logps if logps is not None else self.logprob_batch(completions)
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

    def advantages(self, rollout: Rollout) -> tuple[np.ndarray, np.ndarray, dict[str, float]]:
        """Per-sample advantages ``[B*G]`` and the token weights ``[B*G, T-1]`` of the loss."""
        rl = self.config.rlaif
        rewards = rollout.rewards
        if rl.kl_placement == "reward" and rollout.ref_logp is not None:
            flat = klmod.kl_penalised_rewards(
                rewards.reshape(-1),
                logp=rollout.policy_logp,
                ref_logp=rollout.ref_logp,
                mask=rollout.sequences.loss_mask,
                coef=self.kl_controller.value,
            )
            rewards = flat.reshape(rewards.shape)
        result = adv.compute_advantages(
            rewards,
            baseline=rl.baseline,
            scale_by_std=rl.scale_by_std,
            whiten=rl.whiten_advantages,
            ema_state=self.ema,
        )
        if self.ema is not None:
            self.ema.update(result.mean_reward)
        keep = result.valid_mask.copy()
        if rl.skip_zero_variance_groups:
            keep &= ~result.zero_variance_mask[:, None]
        mask = rollout.sequences.loss_mask * keep.reshape(-1, 1).astype(np.float32)
        weights = aggregation_weights(
            mask, aggregation=self.config.training.loss_aggregation, max_tokens=self.config.rlaif.max_new_tokens
        )
        stats = {
            "zero_variance_groups": int(result.zero_variance_groups),
            "unscored": int((~result.valid_mask).sum()),
            "advantage_abs_mean": float(np.abs(result.advantages[result.valid_mask]).mean())
            if result.valid_mask.any()
            else 0.0,
        }
        return np.nan_to_num(result.advantages).reshape(-1).astype(np.float32), weights.astype(np.float32), stats

    def update(self, rollout: Rollout, advantages: np.ndarray, weights: np.ndarray, *, stale: bool = False):
        """``updates_per_batch`` optimizer steps on the rollout; returns the last step's stats.

        ``advantages`` and ``weights`` cover the whole batch; this process trains on its rows of them.
        ``stale``: an older policy sampled the rollout (``sample_ahead``), so the ratio is taken against it.
        """
        rl = self.config.rlaif
        kl_in_loss = rl.kl_placement == "loss" and rollout.ref_logp is not None
        settings = LossSettings(
            clip_eps_low=self.config.training.clip_eps_low,
            clip_eps_high=self.config.training.clip_eps_high,
            kl_coef=self.kl_controller.value if kl_in_loss else 0.0,
            kl_estimator=rl.kl_estimator,
        )
        if not weights.any():  # over the whole batch: every process skips alike
            # Nothing scored (or every group skipped): an optimizer step on a zero
            # gradient would still move the weights through Adam's momentum.
            return StepStats(
                loss=0.0,
                pg_loss=0.0,
                kl=0.0,
                clip_fraction=0.0,
                ratio_mean=1.0,
                grad_norm=0.0,
                lr=0.0,
                extra={"update_skipped": 1.0},
            )
        rows, width = rollout.sequences.loss_mask.shape
        behaviour = self.config.training.updates_per_batch > 1 or stale
        batch = TrainBatch(
            sequences=rollout.sequences,
            advantages=self.dist.local_rows(advantages, rows),
            token_weights=self.dist.local_rows(weights, rows)[:, :width],
            # one update on fresh samples: the ratio is against the current policy exactly (stop-gradient);
            # several, or samples from before the last update: against the behaviour policy that sampled them
            old_logp=rollout.policy_logp if behaviour else None,
            ref_logp=rollout.ref_logp if kl_in_loss else None,
        )
        # The schedule follows RL steps (which the trainer owns and checkpoints),
        # so updates_per_batch > 1 does not run it faster.
        lr = scheduled_learning_rate(self.step, self.config.training, total_steps=self.total_steps)
        stats = None
        for _ in range(self.config.training.updates_per_batch):
            stats = self.backend.train_step(batch, loss=settings, learning_rate=lr)
        return stats

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
        """Teaches the reference solutions first (``warmup.supervised_warmup``); a stop signal ends it."""

        def check_stop() -> None:  # after each warm-up step; every process stops at the same one
            if self.dist.any(self._stop_signal is not None):  # nothing to checkpoint yet: the warm-up reruns next time
                signum = self._stop_signal or signal.SIGTERM
                raise StopRequested(f"{signal.Signals(signum).name} during the warm-up: nothing saved", signum)

        supervised_warmup(
            self.backend,
            list(self.tasks.values()),
            self.prompt_ids,
            self.config,
            world_size=self.dist.world_size,
            log=self.log,
            after_step=check_stop,
        )

    def save(self) -> Path:
        """Writes a checkpoint of the current step (see ``checkpoint.save_checkpoint``).

        Under torchrun rank 0 writes it and every process returns once it is
        complete; every process takes part in the backend's part (under FSDP
        each sends rank 0 its shards).
        """
        state = {
            "step": self.step,
            "unscored_steps": self._unscored_steps,
            "kl_controller": self.kl_controller.state_dict(),
            "curriculum": self.curriculum.state_dict(),
            "ema": self.ema.state_dict() if self.ema else None,
            "teacher": self.dist.teacher_state(self.teacher),  # every process's spend
            # the next batch when it was sampled ahead: part of the state, so a resume trains on it
            "pending": self._pending.state_dict(self.dist) if self._pending is not None else None,
        }
        path = None
        if self.dist.is_main:
            path = save_checkpoint(
                self.output_dir,
                step=self.step,
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
        ``run`` skips the warm-up, and the metrics log keeps the records up to
        the restored step and drops later ones.

        Args:
            checkpoint: a ``checkpoints/step-NNNNNN`` folder.

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
        self._unscored_steps = int(state.get("unscored_steps", 0))  # absent before resuming existed
        self.kl_controller.load_state_dict(state["kl_controller"])
        if self.ema is not None and state.get("ema") is not None:
            self.ema.load_state_dict(state["ema"])
        if self.teacher is not None and state.get("teacher") is not None:
            self.teacher.load_state_dict(self.dist.teacher_share(state["teacher"]))  # the spend so far counts
        pending = state.get("pending")
        self._pending = PendingBatch.from_state_dict(pending, self.dist) if pending else None
        self.restored_from = checkpoint

    def _open_metrics(self) -> None:
        """Opens the metric sinks once, dropping what they hold of steps after the current one.

        ``metrics.jsonl`` always; TensorBoard event files and ``samples.jsonl``
        when the ``logging`` section asks for them.
        """
        if self.metrics is not None or not self.dist.is_main:
            return
        out, cfg = self.output_dir, self.config.logging
        self.metrics = MetricsSinks(
            JsonlSink(out / "metrics.jsonl", truncate_after_step=self.step),
            # Purge from the first step this run writes, as metrics.jsonl is truncated: TensorBoard
            # then hides what an earlier run in this folder wrote from that step on.
            tensorboard=TensorBoardSink(out / "tensorboard", purge_step=self.step + 1) if cfg.tensorboard else None,
            samples=SampleSink(out / "samples.jsonl", truncate_after_step=self.step) if cfg.save_samples else None,
        )


def _timed(fn, *args):
    """``(fn(*args), seconds)``: the scoring thread's own wall time."""
    started = time.perf_counter()
    return fn(*args), time.perf_counter() - started


def prompt_seed(seed: int, step: int, index: int) -> int:
    """The sampling seed of the prompt at ``index`` of step ``step``'s batch (63 bits, well mixed)."""
    state = np.random.SeedSequence([seed % 2**63, step, index]).generate_state(1, np.uint64)[0]
    return int(state >> np.uint64(1))


def sampled_logprobs(completions: list[Completion], sequences: SequenceBatch) -> np.ndarray:
    """The log-probs recorded while sampling, laid out as ``[N, T-1]`` like ``Backend.logprobs``."""
    out = np.zeros(sequences.loss_mask.shape, dtype=np.float32)
    for i, c in enumerate(completions):
        start = len(c.prompt_ids) - 1
        out[i, start : start + len(c.logprobs)] = c.logprobs
    return out
