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
  ids) and shares its KV cache among its ``n`` samples; with LoRA it decodes
  with the adapters folded into the weights, restored exactly afterwards.
- Log-probs and the training forward score each distinct prompt of a
  micro-batch once and apply the LM head to the scored positions only, in
  chunks (``backends/torch_forward.py``).
- Under torchrun (``rlaif_mlx/distributed.py``) every process keeps a whole
  replica; ``_accumulate_gradients`` sums the gradients of all processes.
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
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise BackendUnavailable(
        f"The PyTorch backend needs torch, transformers and peft ({exc}). "
        "Install them with: pip install 'rlaif-mlx[torch]'"
    ) from None

from rlaif_mlx import objective
from rlaif_mlx.backends import portable
from rlaif_mlx.backends import torch_decode as decode
from rlaif_mlx.backends import torch_forward as fwd
from rlaif_mlx.backends import torch_ops as ops
from rlaif_mlx.config import ModelConfig, TrainingConfig, options_set
from rlaif_mlx.schedule import scheduled_learning_rate

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
            self._reference = copy.deepcopy(self._model).eval()
            self._reference.requires_grad_(False)

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
        with ops.lora_merged(self._model) if merged else contextlib.nullcontext():
            return self._generate(prompts, n, params)

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
        step = self._training.micro_batch_size
        for start in range(0, n, step):
            rows = batch.rows(slice(start, start + step))
            ids, attn = self._tensors(rows)
            if not reference:
                logp = fwd.sequence_logp(self._model, ids, attn, rows.loss_mask)
            elif self._reference is not None:
                logp = fwd.sequence_logp(self._reference, ids, attn, rows.loss_mask)
            else:
                with self._model.disable_adapter():
                    logp = fwd.sequence_logp(self._model, ids, attn, rows.loss_mask)
            out[start : start + len(rows), : logp.shape[1]] = logp.float().cpu().numpy()
        return out

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
        lr = learning_rate if learning_rate is not None else scheduled_learning_rate(self._step, self._training, total_steps=self._total_steps)
        torch.manual_seed(portable.draw_seed(self._rng))  # dropout masks
        stats = self._accumulate_gradients(batch, loss)
        norm = torch.nn.utils.clip_grad_norm_(self._trainable, self._training.max_grad_norm or math.inf)
        grad_norm = float(norm)
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
        n = len(batch.sequences)
        step = self._training.micro_batch_size
        combined = MicroBatchStats()
        for start in range(0, n, step):
            index = slice(start, start + step)
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
        """
        dist = torch.distributed
        if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return
        ops.all_reduce_gradients(self._trainable)
        means = MicroBatchStats.MEANS
        scalars = torch.tensor([combined.loss, combined.pg_loss, combined.weight, float(combined.micro_batches),
                                *(combined.weighted[k] for k in means)], dtype=torch.float64, device=self.device)
        dist.all_reduce(scalars)
        values = scalars.tolist()
        combined.loss, combined.pg_loss, combined.weight, micro_batches = values[:4]
        combined.micro_batches = int(micro_batches)
        combined.weighted = dict(zip(means, values[4:]))

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
        the current weights are copied into the reference model.
        """
        if self._reference is not None:
            self._reference.load_state_dict(self._model.state_dict())
        else:
            for module in ops.lora_layers(self._model).values():
                module.get_base_layer().weight += module.get_delta_weight(ops.ADAPTER)
                module.reset_lora_parameters(ops.ADAPTER, True)
        self._optimizer = self._new_optimizer()
        self._rebased = True

    # ------------------------------------------------------------- parameters

    def trainable_parameter_count(self) -> tuple[int, int]:
        """(trainable, total) parameter counts of the policy (shared weights counted once)."""
        total = sum(p.numel() for p in self._model.parameters())
        return sum(p.numel() for p in self._trainable), total

    # --------------------------------------------------------------- save/load

    def save(self, path: Path) -> None:
        """Writes the portable checkpoint layout (``backends/portable.py``), which MLX reads too.

        LoRA: PEFT's ``adapter_model.safetensors`` + ``adapter_config.json``;
        full fine-tune: ``model.safetensors`` + configs. Then AdamW's moments,
        the rebased reference's changed weights (if any) and ``backend_state.json``.
        """
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self._model.save_pretrained(str(path), safe_serialization=True)
        moments, optimizer_step = self._optimizer_moments()
        save_file(moments, str(path / portable.OPTIMIZER_FILE))
        if self._rebased:  # the reference is no longer the model on disk: keep what changed
            save_file({k: t.detach().cpu().contiguous() for k, t in self._reference_weights().items()},
                      str(path / portable.REFERENCE_FILE))
        portable.write_state(path, backend=self.name, model=self._model_config, step=self._step,
                             total_steps=self._total_steps, optimizer_step=optimizer_step,
                             rebased=self._rebased, rng=self._rng)

    @torch.no_grad()
    def load(self, path: Path) -> None:
        """Restores a checkpoint written by either backend, so training continues where it stopped.

        Raises:
            portable.IncompatibleCheckpoint: it does not fit this model or config.
        """
        path = Path(path)
        state = portable.read_state(path, self._model_config, rebased=self._rebased)
        if state["rebased"]:
            reference = load_file(str(path / portable.REFERENCE_FILE))
            ops.copy_into(self._reference_weights(), reference, path, "reference weights")
            self._rebased = True
        weights = {}
        for file in portable.weight_files(path, lora=self._use_lora):
            weights.update(load_file(str(file)))
        ops.copy_into(self._trainable_weights(), weights, path, "weights")
        self._load_optimizer(path, optimizer_step=int(state["optimizer_step"]))
        self._rng.bit_generator.state = state["rng"]
        self._step = int(state["step"])

    def _trainable_weights(self) -> dict[str, torch.Tensor]:
        """The trainable tensors under their portable names (PEFT's adapter keys, or HF names)."""
        return {name.replace(f".{ops.ADAPTER}.", "."): p for name, p in self._model.named_parameters() if p.requires_grad}

    def _reference_weights(self) -> dict[str, torch.Tensor]:
        """The frozen tensors a rebase changes, under Hugging Face names.

        Full fine-tune: every weight of the reference copy. LoRA: only the
        adapted layers' base weights (the rest still equals the base on disk).
        """
        if self._reference is not None:
            return dict(self._reference.named_parameters())
        return {f"{name.removeprefix(portable.PEFT_PREFIX)}.weight": module.get_base_layer().weight
                for name, module in ops.lora_layers(self._model).items()}

    def _optimizer_moments(self) -> tuple[dict[str, torch.Tensor], int]:
        """AdamW's moments under portable names, and its step count."""
        moments, step = {}, 0
        for key, param in self._trainable_weights().items():
            state = self._optimizer.state.get(param)
            if state:
                step = int(state["step"])
                for moment in portable.MOMENTS:
                    moments[portable.moment_key(key, moment)] = state[moment].detach().cpu().contiguous()
        return moments, step

    def _load_optimizer(self, path: Path, *, optimizer_step: int) -> None:
        self._optimizer = self._new_optimizer()
        moments = load_file(str(path / portable.OPTIMIZER_FILE))
        params = self._trainable_weights()
        if not moments:  # saved before the first optimizer step
            return
        expected = {portable.moment_key(k, m): p.shape for k, p in params.items() for m in portable.MOMENTS}
        portable.check_tensors(path, "optimizer moments", {k: t.shape for k, t in moments.items()}, expected)
        fused = bool(self._optimizer.defaults.get("fused"))
        for key, param in params.items():
            # the step count where AdamW keeps it: a float32 beside the param when fused, else on the CPU
            where = {"dtype": torch.float32, "device": param.device} if fused else {}
            step = torch.tensor(float(optimizer_step), **where)
            self._optimizer.state[param] = {
                "step": step,
                **{m: moments[portable.moment_key(key, m)].to(param.device, param.dtype) for m in portable.MOMENTS},
            }

    # ------------------------------------------------------------------ export

    def export(self, path: Path) -> None:
        """Writes the policy as a plain Hugging Face model (LoRA merged) + tokenizer.

        The merge happens on a fresh CPU copy of the base, so the live model
        keeps its adapters and no extra accelerator memory is used.
        """
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
