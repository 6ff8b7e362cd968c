"""PyTorch / transformers implementation of the ``Backend`` interface.

Reads top to bottom like ``backends/mlx.py``: ``TorchBackend`` in the
interface's method order (load, sample, logprobs, train_step,
rebase_reference, parameter counts, save/load, export). Array-level helpers
live in ``backends/torch_ops.py``; checkpoints use the layout both backends
share (``backends/portable.py``).

- Models come from ``AutoModelForCausalLM`` (a local folder or a hub id); LoRA
  is PEFT's. With LoRA the frozen reference is the same model with its
  adapters switched off; a full fine-tune keeps a frozen copy made at load.
- Sampling prefills each prompt once (left-padded batch, explicit position
  ids) and shares its KV cache among its ``n`` samples, in buffers allocated once
  per call (``backends/torch_decode.py``); with LoRA it decodes with the
  adapters folded into the weights, restored exactly afterwards.
- Log-probs and the training forward score each distinct prompt of a
  micro-batch once and apply the LM head to the scored positions only, in
  chunks (``backends/torch_forward.py``).
- Under torchrun (``rlaif_mlx/distributed.py``) every process keeps a whole
  replica and ``_accumulate_gradients`` sums the gradients of all processes;
  with ``model.torch.fsdp`` each keeps a shard instead (``torch_fsdp``):
  sampling runs on the whole weights gathered once (``gathered``), every other
  forward and backward is collective, and checkpoints are gathered to rank 0
  (``torch_checkpoint``).
- Importing this module imports torch; ``import rlaif_mlx`` never does.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
from pathlib import Path
from typing import Any

import numpy as np

from rlaif_mlx.backends.base import (
    BackendUnavailable,
    Completion,
    DecodeBook,
    LossSettings,
    MicroBatchStats,
    SamplingParams,
    SequenceBatch,
    StepStats,
    TrainBatch,
)

try:
    import torch
    from peft import LoraConfig as PeftLoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise BackendUnavailable(
        f"The PyTorch backend needs torch, transformers and peft ({exc}). "
        "Install them with: pip install 'rlaif-mlx[torch]'"
    ) from None

from rlaif_mlx.backends import portable, torch_checkpoint
from rlaif_mlx.backends import torch_decode as decode
from rlaif_mlx.backends import torch_forward as fwd
from rlaif_mlx.backends import torch_ops as ops
from rlaif_mlx.config import ModelConfig, TrainingConfig, options_set
from rlaif_mlx.rl import objective
from rlaif_mlx.rl.schedule import scheduled_learning_rate

log = logging.getLogger(__name__)
hf_logging.disable_progress_bar()  # per-file progress bars would drown the one-line-per-step log

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class TorchBackend:
    """One transformers model (LoRA or full fine-tune), its tokenizer and its optimizer.

    Args:
        model: the ``model`` config section (path or hub id, dtype, LoRA, torch options).
        training: the ``training`` config section (micro-batch, AdamW, LR schedule, clipping).
        seed: seeds torch once here (LoRA initialisation depends on it).
        total_steps: planned optimizer steps, for the LR schedule.
    """

    name = "torch"
    merge_lora_for_sampling = True  # decode with the adapters folded into the weights (restored exactly after)

    def __init__(self, model: ModelConfig, training: TrainingConfig, *, seed: int, total_steps: int) -> None:
        self._model_config = model
        self._training = training
        self._total_steps = max(int(total_steps), 1)
        self._step = 0  # scheduled optimizer steps taken (the LR schedule position)
        torch.manual_seed(seed)  # LoRA's initialisation
        # Every later random draw (sampling generators, dropout) is seeded from this stream, whose
        # state a checkpoint stores exactly: saving never perturbs it, and either backend resumes it.
        self._rng = np.random.default_rng(seed)

        self.device = ops.resolve_device(model.torch.device)
        self._dtype = _DTYPES[model.dtype]
        ignored = options_set(model.mlx, "model.mlx")
        if ignored:
            log.warning("%s: MLX-only option(s); the PyTorch backend ignores them.", ", ".join(ignored))
        base = model.base_model
        ops.refuse_mlx_quantized(base)

        self.tokenizer = AutoTokenizer.from_pretrained(base)
        self._model = self._load_base(base, device=self.device)
        self._cache_arg = ops.cache_kwarg(self._model.forward)
        self.eos_ids = ops.eos_ids(self.tokenizer, self._model)
        pad = self.tokenizer.pad_token_id
        self.pad_id = int(pad if pad is not None else self.eos_ids[0])

        self._use_lora = model.use_lora
        self._fsdp = ops.sharding(model.torch.fsdp)  # the torch_fsdp module when the weights are sharded, else None
        self._gathered = False  # inside ``gathered``: the policy's weights are whole in this process
        self._reference = None  # full fine-tune only: a frozen copy of the starting weights
        if model.use_lora:
            lora = PeftLoraConfig(
                r=model.lora_r,
                lora_alpha=model.lora_alpha,
                lora_dropout=model.lora_dropout,
                target_modules=list(model.lora_target_modules),
                task_type="CAUSAL_LM",
            )
            self._model = ops.with_lora(self._model, lora)
        else:
            self._reference = copy.deepcopy(self._model).eval()  # copied whole, before sharding
            self._reference.requires_grad_(False)
        if self._fsdp is not None:  # after LoRA (adapters shard with their layer), before the optimizer
            self._model = self._fsdp.shard(self._model)
            if self._reference is not None:  # a whole copy in every process would undo what sharding saves
                self._reference = self._fsdp.shard(self._reference)

        self._trainable = [p for p in self._model.parameters() if p.requires_grad]
        self._optimizer = self._new_optimizer()
        self._rebased = False  # the reference no longer equals the weights on disk

    def _new_optimizer(self) -> torch.optim.Optimizer:
        t = self._training
        settings = {"lr": t.learning_rate, "betas": (t.adam_beta1, t.adam_beta2), "weight_decay": t.weight_decay}
        try:  # one fused kernel over all tensors, where this torch has it for the device and dtype
            return torch.optim.AdamW(self._trainable, fused=True, **settings)
        except RuntimeError:
            return torch.optim.AdamW(self._trainable, **settings)

    def _load_base(self, base: str, *, device: str):
        kwargs: dict[str, Any] = {"dtype": self._dtype}
        if self._model_config.torch.attn_implementation:
            kwargs["attn_implementation"] = self._model_config.torch.attn_implementation
        return AutoModelForCausalLM.from_pretrained(base, **kwargs).to(device)

    # ------------------------------------------------------------------ sample

    @torch.inference_mode()
    def sample(self, prompts: list[list[int]], *, n: int, params: SamplingParams) -> list[Completion]:
        """Samples ``n`` completions per prompt, prompt-major (uid ``"{prompt}-{sample}"``).

        Each prompt is prefilled once; its KV cache is repeated for its ``n``
        samples, which then decode together with every other prompt's.

        Args:
            prompts: token ids per prompt (each at least one token).
            n: samples per prompt.
            params: temperature, top-k/top-p/min-p, stops, length, seed.
                ``temperature == 0`` or ``top_k == 1`` is greedy decoding.

        Returns:
            ``len(prompts) * n`` completions with the sampled ids, their
            temperature-1 log-probs, the text and the finish reason.
        """
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}.")
        if not prompts:
            return []
        if any(len(p) == 0 for p in prompts):
            raise ValueError("Every prompt needs at least one token.")
        self._model.eval()
        merged = self._use_lora and self.merge_lora_for_sampling
        with self.gathered(), ops.lora_merged(self._model) if merged else contextlib.nullcontext():
            return self._generate(prompts, n, params)

    @contextlib.contextmanager
    def gathered(self):
        """The policy's whole weights in this process for the block (``Backend.gathered``).

        Under FSDP the outermost block gathers them (every process enters it together) and reshards after.
        """
        if self._fsdp is None or self._gathered:
            yield
            return
        self._gathered = True
        try:
            with self._fsdp.gathered(self._model):
                yield
        finally:
            self._gathered = False

    def _generate(self, prompts: list[list[int]], n: int, params: SamplingParams) -> list[Completion]:
        generators = self._generators(params.seed, len(prompts))

        ids, mask = ops.left_pad(prompts, pad_id=self.pad_id, device=self.device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        logits, cache = self._forward_step(ids, mask, positions, None)
        room = params.max_new_tokens - 1  # decode steps: the last token is chosen, never fed back
        cache = decode.repeated_cache(cache, n, room=room)  # in buffers sized for the call: no per-step copy
        logits = logits.repeat_interleave(n, dim=0)
        mask = mask.repeat_interleave(n, dim=0)
        next_pos = positions[:, -1].repeat_interleave(n, dim=0) + 1

        rows = len(prompts) * n
        book = DecodeBook(prompts, n, eos_ids=self.eos_ids, stop=params.stop, decode=self._decode)
        pad = torch.full((rows,), self.pad_id, dtype=torch.long, device=self.device)
        alive = torch.ones(rows, dtype=torch.bool, device=self.device)
        for step in range(params.max_new_tokens):
            logits = logits.float()
            chosen = torch.where(alive, ops.choose(logits, params, generators), pad)
            chosen_logp = ops.target_logp(logits, chosen)
            alive = torch.tensor(book.add(chosen.tolist(), chosen_logp.tolist()), device=self.device)
            if book.done or step == params.max_new_tokens - 1:
                break
            # Finished rows keep decoding pad tokens that nothing attends to.
            mask = torch.cat([mask, alive.long()[:, None]], dim=1)
            logits, cache = self._forward_step(chosen[:, None], mask, next_pos[:, None], cache)
            next_pos = next_pos + 1
        return book.completions()

    def _forward_step(self, ids, mask, positions, cache):
        """One cached forward; returns the last position's logits ``[R, V]`` and the cache."""
        out = self._model(
            input_ids=ids,
            attention_mask=mask,
            position_ids=positions,
            use_cache=True,
            logits_to_keep=1,
            **{self._cache_arg: cache},
        )
        return out.logits[:, -1, :], ops.returned_cache(out)

    def _generators(self, seed: int | tuple[int, ...] | None, prompts: int) -> list:
        """One generator for the call, or one per prompt when ``seed`` is a tuple."""
        seeds = seed if isinstance(seed, tuple) else (seed if seed is not None else portable.draw_seed(self._rng),)
        if isinstance(seed, tuple) and len(seed) != prompts:
            raise ValueError(f"params.seed holds {len(seed)} seeds for {prompts} prompts; give one per prompt.")
        return ops.generators(seeds, device=self.device)

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=False)

    # ---------------------------------------------------------------- logprobs

    @torch.inference_mode()
    def logprobs(self, batch: SequenceBatch, *, reference: bool = False) -> np.ndarray:
        """Per-token log-probs ``[N, T-1]`` (float32, 0 on padding targets).

        Args:
            batch: right-padded prompt + completion ids.
            reference: score under the frozen reference (LoRA: adapters off)
                instead of the policy.

        Returns:
            Column ``t`` is ``log p(ids[t+1] | ids[:t+1])`` at temperature 1.
        """
        self._model.eval()
        n, width = batch.input_ids.shape
        out = np.zeros((n, width - 1), dtype=np.float32)
        for index in self._micro_batches(n):
            rows = batch.rows(index) if index is not None else self._idle_rows()
            ids, attn = self._tensors(rows)
            logp = self._score(ids, attn, rows.loss_mask, reference=reference)
            if index is not None:
                out[index.start : index.start + len(rows), : logp.shape[1]] = logp.float().cpu().numpy()
        if self._fsdp is not None and reference and self._reference is not None:
            self._reference.reshard()  # its root (embeddings, head) stays gathered after a forward until resharded
        return out

    def _score(self, ids, attn, loss_mask, *, reference: bool):
        if not reference:
            return fwd.sequence_logp(self._model, ids, attn, loss_mask)
        if self._reference is not None:
            return fwd.sequence_logp(self._reference, ids, attn, loss_mask)
        with self._model.disable_adapter():
            return fwd.sequence_logp(self._model, ids, attn, loss_mask)

    def _micro_batches(self, n: int) -> list[slice | None]:
        """The micro-batches of ``n`` rows; under FSDP padded with None up to the most any process has.

        A sharded forward or backward is collective, so every process must run
        as many. The shares of a step are the same size; this does not rely on it.
        """
        step = self._training.micro_batch_size
        parts: list[slice | None] = [slice(start, start + step) for start in range(0, n, step)]
        if self._fsdp is not None:
            most = torch.tensor(len(parts), device=self.device)
            torch.distributed.all_reduce(most, op=torch.distributed.ReduceOp.MAX)
            parts += [None] * (int(most) - len(parts))
        return parts

    def _idle_rows(self) -> SequenceBatch:
        """One two-token row with no target: a forward that only keeps a sharded model's collectives in step."""
        ids = np.full((1, 2), self.pad_id, dtype=np.int64)
        return SequenceBatch(ids, np.ones_like(ids), np.zeros((1, 1), dtype=np.float32))

    def _tensors(self, rows: SequenceBatch):
        ids = torch.as_tensor(rows.input_ids, dtype=torch.long, device=self.device)
        attn = torch.as_tensor(rows.attention_mask, dtype=torch.long, device=self.device)
        return ids, attn

    # -------------------------------------------------------------- train_step

    def train_step(self, batch: TrainBatch, *, loss: LossSettings, learning_rate: float | None = None) -> StepStats:
        """One optimizer step over the batch: micro-batches, accumulation, clipping, AdamW.

        Under torchrun each process passes its share of the batch (token weights
        normalised over the whole batch); gradients and loss statistics are
        summed across processes before clipping, so all take the same step.

        Args:
            batch: sequences, advantages and whole-batch-normalised token weights.
            loss: clip ranges and the KL coefficient.
            learning_rate: use this rate for this step and leave the schedule
                where it is (a supervised warm-up); None follows the schedule.

        Returns:
            The step's loss, its parts, the pre-clip gradient norm and the rate
            used (over the whole batch, under torchrun too).
        """
        lr = (
            learning_rate
            if learning_rate is not None
            else scheduled_learning_rate(self._step, self._training, total_steps=self._total_steps)
        )
        torch.manual_seed(portable.draw_seed(self._rng))  # dropout masks
        stats = self._accumulate_gradients(batch, loss)
        if self._fsdp is not None:  # the global norm over every process's shards, the same in each
            grad_norm = self._fsdp.clip_grad_norm(self._trainable, self._training.max_grad_norm)
        else:
            grad_norm = float(torch.nn.utils.clip_grad_norm_(self._trainable, self._training.max_grad_norm or math.inf))
        if math.isfinite(grad_norm):
            for group in self._optimizer.param_groups:
                group["lr"] = lr
            self._optimizer.step()
        else:
            log.warning("Non-finite gradient norm (%s): this step's update was skipped.", grad_norm)
            stats["extra"]["skipped_nonfinite"] = 1.0
        self._optimizer.zero_grad(set_to_none=True)
        if learning_rate is None:
            self._step += 1
        return StepStats(grad_norm=grad_norm, lr=lr, **stats)

    def _accumulate_gradients(self, batch: TrainBatch, settings: LossSettings) -> dict[str, Any]:
        """Forward + backward per micro-batch; gradients add up to the full-batch gradient."""
        self._model.train()
        combined = MicroBatchStats()
        for index in self._micro_batches(len(batch.sequences)):
            if index is None:  # FSDP: another process has more micro-batches; a zero gradient joins their sums
                rows = self._idle_rows()
                ids, attn = self._tensors(rows)
                (fwd.sequence_logp(self._model, ids, attn, rows.loss_mask).sum() * 0.0).backward()
                continue
            rows = batch.sequences.rows(index)
            ids, attn = self._tensors(rows)
            width = ids.shape[1] - 1
            # inside the differentiated computation; the loss reads completion targets only
            logp = fwd.sequence_logp(self._model, ids, attn, rows.loss_mask, prompt_targets=False)
            value, stats = objective.policy_loss(
                ops.TorchOps,
                logp=logp,
                old_logp=self._slice(batch.old_logp, index, width),
                ref_logp=self._slice(batch.ref_logp, index, width),
                advantages=self._slice(batch.advantages, index, None),
                token_weights=self._slice(batch.token_weights, index, width),
                clip_eps_low=settings.clip_eps_low,
                clip_eps_high=settings.clip_eps_high,
                kl_coef=settings.kl_coef,
                kl_estimator=settings.kl_estimator,
            )
            value.backward()
            combined.add(value.detach(), stats)
        self._sum_across_processes(combined)
        return combined.result()

    @torch.no_grad()
    def _sum_across_processes(self, combined: MicroBatchStats) -> None:
        """Under torchrun: adds up every process's gradients and loss statistics, in place.

        Each process differentiated its share of the batch with token weights
        normalised over the whole batch, so the sum (not the mean) is the
        single-process gradient. Done before clipping: the clip sees the global
        norm, and every process takes the same step. A no-op in one process.
        Under FSDP the backward already summed each gradient into its shard.
        """
        if not ops.several_processes():
            return
        if self._fsdp is None:
            ops.all_reduce_gradients(self._trainable)
        means = MicroBatchStats.MEANS
        scalars = torch.tensor(
            [
                combined.loss,
                combined.pg_loss,
                combined.weight,
                float(combined.micro_batches),
                *(combined.weighted[k] for k in means),
            ],
            dtype=torch.float64,
            device=self.device,
        )
        torch.distributed.all_reduce(scalars)
        values = scalars.tolist()
        combined.loss, combined.pg_loss, combined.weight, micro_batches = values[:4]
        combined.micro_batches = int(micro_batches)
        combined.weighted = dict(zip(means, values[4:], strict=True))

    def _slice(self, array: np.ndarray | None, index: slice, width: int | None):
        if array is None:
            return None
        part = array[index] if width is None else array[index, :width]
        return torch.as_tensor(np.asarray(part, dtype=np.float32), device=self.device)

    # ------------------------------------------------------- rebase_reference

    @torch.no_grad()
    def rebase_reference(self) -> None:
        """Makes the current policy the frozen KL reference and restarts the optimizer.

        LoRA: the adapters are folded into the base weights and start afresh
        (B = 0), so "adapters off" is now the current policy. Full fine-tune:
        the current weights are copied into the reference model. Under FSDP
        every process calls it (both models are sharded alike: shards copy to shards).
        """
        if self._reference is not None:
            self._reference.load_state_dict(self._model.state_dict())
        else:
            fill = self._fsdp.fill if self._fsdp is not None else None
            for module in ops.lora_layers(self._model).values():
                module.get_base_layer().weight += module.get_delta_weight(ops.ADAPTER)
                ops.reset_adapter(module, fill=fill)
        self._optimizer = self._new_optimizer()
        self._rebased = True

    # ------------------------------------------------------------- parameters

    def trainable_parameter_count(self) -> tuple[int, int]:
        """(trainable, total) parameter counts of the policy (shared weights counted once)."""
        total = sum(p.numel() for p in self._model.parameters())
        return sum(p.numel() for p in self._trainable), total

    # --------------------------------------------------------------- save/load

    def save(self, path: Path | None) -> None:
        """Writes the portable checkpoint layout (``backends/portable.py``), which MLX reads too.

        LoRA: PEFT's ``adapter_model.safetensors`` + ``adapter_config.json``;
        full fine-tune: ``model.safetensors`` + configs. Then AdamW's moments,
        the rebased reference's changed weights (if any) and ``backend_state.json``.
        Under torchrun every process calls it, rank 0 with the folder and the
        others with None: under FSDP they send rank 0 their shards, else they
        have nothing to do (rank 0's replica is theirs).
        """
        if path is None and self._fsdp is None:
            return
        if path is not None:
            path = Path(path)
            path.mkdir(parents=True, exist_ok=True)
        optimizer_step = torch_checkpoint.save(
            path,
            model=self._model,
            optimizer=self._optimizer,
            reference=self._reference,
            rebased=self._rebased,
            fsdp=self._fsdp,
        )
        if path is not None:
            portable.write_state(
                path,
                backend=self.name,
                model=self._model_config,
                step=self._step,
                total_steps=self._total_steps,
                optimizer_step=optimizer_step,
                rebased=self._rebased,
                rng=self._rng,
            )

    def load(self, path: Path) -> None:
        """Restores a checkpoint written by either backend, so training continues where it stopped.

        Under torchrun every process calls it; under FSDP rank 0 alone reads the
        tensors and each process keeps its shard.

        Raises:
            portable.IncompatibleCheckpoint: it does not fit this model or config.
        """
        path = Path(path)
        state = portable.read_state(path, self._model_config, rebased=self._rebased)
        self._optimizer = self._new_optimizer()
        torch_checkpoint.load(
            path,
            model=self._model,
            optimizer=self._optimizer,
            reference=self._reference,
            rebased=state["rebased"],
            optimizer_step=int(state["optimizer_step"]),
            lora=self._use_lora,
            fsdp=self._fsdp,
        )
        self._rebased = self._rebased or state["rebased"]
        self._rng.bit_generator.state = state["rng"]
        self._step = int(state["step"])

    # ------------------------------------------------------------------ export

    def export(self, path: Path) -> None:
        """Writes the policy as a plain Hugging Face model (LoRA merged) + tokenizer.

        The merge happens on a fresh CPU copy of the base, so the live model
        keeps its adapters and no extra accelerator memory is used.
        """
        if self._fsdp is not None:
            raise RuntimeError(
                "export needs the whole weights in one process: export a checkpoint of this run with `rlaif-mlx export`"
            )
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        if not self._use_lora:
            self._model.save_pretrained(str(path), safe_serialization=True)
        else:
            merged = self._load_base(self._model_config.base_model, device="cpu")
            merged.load_state_dict(ops.merged_state_dict(self._model), strict=True)
            merged.save_pretrained(str(path), safe_serialization=True)
        portable.add_legacy_rope_keys(path / "config.json")  # so mlx-lm reads the same RoPE as transformers
        self.tokenizer.save_pretrained(str(path))


def create(model: ModelConfig, training: TrainingConfig, *, seed: int, total_steps: int) -> TorchBackend:
    """Builds the PyTorch backend (the factory ``backends`` calls by name)."""
    return TorchBackend(model, training, seed=seed, total_steps=total_steps)
