"""MLX / mlx-lm implementation of the ``Backend`` interface.

Reads top to bottom like ``backends/torch.py``: ``MlxBackend`` in the
interface's method order (load, sample, logprobs, train_step,
rebase_reference, parameter counts, save/load, export). Array-level helpers
live in ``backends/mlx_ops.py``; checkpoints use the layout both backends
share (``backends/portable.py``).

- Models come from ``mlx_lm.utils.load`` (a local folder or a hub id,
  quantised ones included: LoRA then trains on the frozen quantised base);
  LoRA is mlx-lm's tuner (``linear_to_lora_layers``). With LoRA the frozen reference is
  the same model with its adapters switched off (each ``LoRALinear``'s scale set
  to 0 for the call); a full fine-tune keeps a frozen second model instance
  holding the starting weights.
- Sampling prefills each prompt once (left-padded batch in mlx-lm's
  ``BatchKVCache``, which offsets RoPE and masks the padding per row; the LM
  head on the last position only) and repeats its KV cache for its ``n``
  samples. Float LoRA adapters are folded into the weights for the decode; one
  inverse-CDF pass gives each token and its log-prob (``mlx_ops.choose``).
- Log-probs and the training forward run each prompt a micro-batch shares
  once, then only the completions on its repeated KV cache (``mlx_groups``).
- Importing this module imports mlx; ``import rlaif_mlx`` never does.
"""

from __future__ import annotations

import contextlib
import json
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
    import mlx.core as mx
    import mlx.nn as nn
    import mlx.optimizers as optim
    from mlx.utils import tree_flatten, tree_map
    from mlx_lm.tuner.utils import linear_to_lora_layers
    from mlx_lm.utils import _download, load, load_model
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise BackendUnavailable(
        f"The MLX backend needs mlx and mlx-lm ({exc}). "
        "Install them with: pip install 'rlaif-mlx[mlx]'  (on Linux: pip install 'mlx[cpu]' mlx-lm)"
    ) from None

from rlaif_mlx.backends import mlx_groups as grouped
from rlaif_mlx.backends import mlx_ops as ops
from rlaif_mlx.backends import portable
from rlaif_mlx.config import ModelConfig, TrainingConfig, options_set
from rlaif_mlx.rl import objective
from rlaif_mlx.rl.schedule import scheduled_learning_rate

log = logging.getLogger(__name__)

_DTYPES = {"float32": mx.float32, "bfloat16": mx.bfloat16, "float16": mx.float16}


class MlxBackend:
    """One mlx-lm model (LoRA or full fine-tune), its tokenizer and its optimizer.

    Args:
        model: the ``model`` config section (path or hub id, dtype, LoRA, mlx options).
        training: the ``training`` config section (micro-batch, AdamW, LR schedule, clipping).
        seed: seeds MLX's global RNG once here (LoRA initialisation depends on it).
        total_steps: planned optimizer steps, for the LR schedule.
    """

    name = "mlx"

    def __init__(self, model: ModelConfig, training: TrainingConfig, *, seed: int, total_steps: int) -> None:
        self._model_config = model
        self._training = training
        self._total_steps = max(int(total_steps), 1)
        self._step = 0  # scheduled optimizer steps taken (the LR schedule position)
        mx.random.seed(seed)  # LoRA's initialisation
        # Every later random draw (sampling keys, dropout) is seeded from this stream, whose
        # state a checkpoint stores exactly: saving never perturbs it, and either backend resumes it.
        self._rng = np.random.default_rng(seed)

        self.device = "gpu" if mx.default_device().type == mx.DeviceType.gpu else "cpu"
        self._dtype = _DTYPES[model.dtype]
        ignored = options_set(model.torch, "model.torch")
        if ignored:
            log.warning("%s: PyTorch-only option(s); the MLX backend ignores them.", ", ".join(ignored))
        if model.mlx.memory_limit_gb is not None:
            limit = int(model.mlx.memory_limit_gb * 1024**3)
            mx.set_memory_limit(limit)
            if self.device == "gpu":
                with contextlib.suppress(Exception):  # wired memory exists on Metal only
                    mx.set_wired_limit(limit)
        if model.mlx.cache_limit_gb is not None:
            mx.set_cache_limit(int(model.mlx.cache_limit_gb * 1024**3))

        self._path = _download(model.base_model)  # a local folder, or the hub snapshot's
        self._model, wrapper = load(str(self._path))
        self._model.set_dtype(self._dtype)
        self._model.eval()
        try:
            ops.batch_cache(self._model, [0])  # an architecture batched sampling cannot serve fails here, not mid-run
        except ValueError as exc:
            raise ValueError(f"model.base_model {model.base_model!r}: {exc}") from None
        self.tokenizer = getattr(wrapper, "_tokenizer", wrapper)  # the Hugging Face tokenizer itself
        self.eos_ids = ops.eos_ids(self.tokenizer, self._path)
        pad = self.tokenizer.pad_token_id
        self.pad_id = int(pad if pad is not None else self.eos_ids[0])

        self._use_lora = model.use_lora
        self._reference = None  # full fine-tune only: a frozen copy of the starting weights
        if ops.is_quantized(self._model) and not model.use_lora:
            raise ValueError(
                f"model.base_model {model.base_model!r} is quantised and full fine-tuning needs float "
                "weights: set model.use_lora: true, or use the unquantised model"
            )
        if model.use_lora:
            self._model.freeze()
            lora = {
                "rank": model.lora_r,
                "scale": model.lora_alpha / model.lora_r,  # PEFT's alpha / r
                "dropout": model.lora_dropout,
                "keys": ops.lora_keys(self._model, model.lora_target_modules),
            }
            # Quantised layers stay quantised under their adapters (QLoRA).
            linear_to_lora_layers(self._model, len(self._model.layers), lora)
            mx.eval(self._model.parameters())
        else:
            self._reference = self._load_base()
            self._reference.update(tree_map(mx.array, self._model.parameters()))
            self._reference.freeze()
            self._reference.eval()

        self._optimizer = self._new_optimizer()
        self._rebased = False  # the reference no longer equals the weights on disk

    def _new_optimizer(self) -> optim.Optimizer:
        t = self._training
        # bias_correction: the textbook (and torch) AdamW; mlx's default omits it.
        return optim.AdamW(
            t.learning_rate, betas=[t.adam_beta1, t.adam_beta2], weight_decay=t.weight_decay, bias_correction=True
        )

    def _load_base(self) -> nn.Module:
        model, _ = load_model(self._path)
        model.set_dtype(self._dtype)
        model.eval()
        mx.eval(model.parameters())
        return model

    # ------------------------------------------------------------------ sample

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
        rows = len(prompts) * n
        seed = params.seed if params.seed is not None else portable.draw_seed(self._rng)
        uniforms = ops.sampling_uniforms(seed, prompts=len(prompts), steps=params.max_new_tokens, rows=rows)

        with ops.lora_merged(self._model):  # one matmul per adapted layer while decoding
            ids, padding = ops.left_pad(prompts, pad_id=self.pad_id)
            cache = ops.batch_cache(self._model, padding)
            logits = self._forward_step(ids, cache)
            ops.repeat_cache(cache, n)
            logits = mx.repeat(logits, n, axis=0)

            book = DecodeBook(prompts, n, eos_ids=self.eos_ids, stop=params.stop, decode=self._decode)
            pad = mx.full((rows,), self.pad_id, dtype=mx.int32)
            alive = mx.ones((rows,), dtype=mx.bool_)
            for step in range(params.max_new_tokens):
                chosen, chosen_logp = ops.choose(logits.astype(mx.float32), params, uniforms[step])
                chosen = mx.where(alive, chosen, pad)
                mx.eval(chosen, chosen_logp)
                alive = mx.array(book.add(chosen.tolist(), chosen_logp.tolist()))
                if book.done or step == params.max_new_tokens - 1:
                    break
                # Finished rows keep decoding pad tokens; no other row attends to them.
                logits = self._forward_step(chosen[:, None], cache)
        return book.completions()

    def gathered(self):
        """Nothing to gather: MLX runs in one process, whose weights are whole (see ``TorchBackend.gathered``)."""
        return contextlib.nullcontext()

    def _forward_step(self, ids, cache):
        """One cached forward; returns the last position's logits ``[R, V]`` (the cache updates in place)."""
        return ops.last_logits(self._model, ids, cache)

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=False)

    # ---------------------------------------------------------------- logprobs

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
        model = self._reference if reference and self._reference is not None else self._model
        off = self._adapters_off() if reference and self._reference is None else contextlib.nullcontext()
        with off:
            for start in range(0, n, step):
                logp = self._score(model, batch.rows(slice(start, start + step)))
                out[start : start + len(logp), : logp.shape[1]] = logp
        return out

    def _score(self, model, rows: SequenceBatch) -> np.ndarray:
        """Row-layout log-probs of one micro-batch, each shared prompt forwarded once (``mlx_groups``)."""
        groups = grouped.find_groups(rows)
        if groups is None:
            return np.array(ops.token_logp(model, *self._arrays(rows)))
        prompt_logp, completion_logp = grouped.grouped_logp(model, groups, prompt_targets=True)
        return groups.to_row_layout(np.array(prompt_logp), np.array(completion_logp), rows.loss_mask.shape[1])

    @contextlib.contextmanager
    def _adapters_off(self):
        """The policy with every LoRA update scaled by 0: exactly the base model, no second copy."""
        layers = list(ops.lora_layers(self._model).values())
        scales = [m.scale for m in layers]
        try:
            for m in layers:
                m.scale = 0.0
            yield
        finally:
            for m, s in zip(layers, scales, strict=True):
                m.scale = s

    def _arrays(self, rows: SequenceBatch):
        ids = mx.array(np.asarray(rows.input_ids, dtype=np.int32))
        attn = mx.array(np.asarray(rows.attention_mask, dtype=np.int32))
        return ids, attn

    # -------------------------------------------------------------- train_step

    def train_step(self, batch: TrainBatch, *, loss: LossSettings, learning_rate: float | None = None) -> StepStats:
        """One optimizer step over the batch: micro-batches, accumulation, clipping, AdamW.

        Args:
            batch: sequences, advantages and whole-batch-normalised token weights.
            loss: clip ranges and the KL coefficient.
            learning_rate: use this rate for this step and leave the schedule
                where it is (a supervised warm-up); None follows the schedule.

        Returns:
            The step's loss, its parts, the pre-clip gradient norm and the rate used.
        """
        lr = (
            learning_rate
            if learning_rate is not None
            else scheduled_learning_rate(self._step, self._training, total_steps=self._total_steps)
        )
        mx.random.seed(portable.draw_seed(self._rng))  # dropout masks
        grads, stats = self._accumulate_gradients(batch, loss)
        grads, norm = ops.clip_grad_norm(grads, self._training.max_grad_norm or math.inf)
        grad_norm = float(norm)
        if math.isfinite(grad_norm):
            self._optimizer.learning_rate = lr
            self._optimizer.update(self._model, grads)
            mx.eval(self._model.parameters(), self._optimizer.state)
        else:
            log.warning("Non-finite gradient norm (%s): this step's update was skipped.", grad_norm)
            stats["extra"]["skipped_nonfinite"] = 1.0
        if learning_rate is None:
            self._step += 1
        return StepStats(grad_norm=grad_norm, lr=lr, **stats)

    def _accumulate_gradients(self, batch: TrainBatch, settings: LossSettings) -> tuple[dict, dict[str, Any]]:
        """Forward + backward per micro-batch; gradients add up to the full-batch gradient."""
        self._model.train()
        n = len(batch.sequences)
        step = self._training.micro_batch_size
        combined = MicroBatchStats()
        total = None
        for start in range(0, n, step):
            index = slice(start, start + step)
            rows = batch.sequences.rows(index)
            # Shared prompts forward once; gradients through the repeated KV cache match the whole-row
            # forward's. With dropout a shared prompt would share its dropout mask, so rows stay whole then.
            dropout = self._use_lora and self._model_config.lora_dropout > 0
            groups = None if dropout else grouped.find_groups(rows)
            layout = None if groups is None else groups.to_completion_layout
            width = rows.loss_mask.shape[1]
            inputs = {
                "old_logp": self._slice(batch.old_logp, index, width, layout),
                "ref_logp": self._slice(batch.ref_logp, index, width, layout),
                "advantages": self._slice(batch.advantages, index, None),
                "token_weights": self._slice(batch.token_weights, index, width, layout),
            }
            arrays = self._arrays(rows) if groups is None else None

            def loss_fn(model, groups=groups, arrays=arrays, inputs=inputs):
                # inside the differentiated computation
                logp = (
                    ops.token_logp(model, *arrays)
                    if groups is None
                    else grouped.grouped_logp(model, groups, prompt_targets=False)[1]
                )
                return objective.policy_loss(
                    ops.MlxOps(),
                    logp=logp,
                    clip_eps_low=settings.clip_eps_low,
                    clip_eps_high=settings.clip_eps_high,
                    kl_coef=settings.kl_coef,
                    kl_estimator=settings.kl_estimator,
                    **inputs,
                )

            (value, stats), grads = nn.value_and_grad(self._model, loss_fn)(self._model)
            total = grads if total is None else tree_map(mx.add, total, grads)
            mx.eval(total, value, stats)
            combined.add(value, stats)
        self._model.eval()
        return total, combined.result()

    def _slice(self, array: np.ndarray | None, index: slice, width: int | None, layout=None):
        if array is None:
            return None
        part = np.asarray(array[index] if width is None else array[index, :width], dtype=np.float32)
        return mx.array(part if layout is None else layout(part))

    # ------------------------------------------------------- rebase_reference

    def rebase_reference(self) -> None:
        """Makes the current policy the frozen KL reference and restarts the optimizer.

        LoRA: the adapters are folded into the base weights and start afresh
        (new A, B = 0), so "adapters off" is now the current policy. Full
        fine-tune: the current weights are copied into the reference model.
        """
        if self._reference is not None:
            self._reference.update(tree_map(mx.array, self._model.parameters()))
            mx.eval(self._reference.parameters())
        else:
            for module in ops.lora_layers(self._model).values():
                if isinstance(module.linear, nn.QuantizedLinear):
                    module.linear = module.fuse()  # dequantise, add the update, quantise again
                    module.linear.freeze()
                else:
                    weight = module.linear.weight
                    module.linear.weight = weight + ops.lora_delta(module).astype(weight.dtype)
                bound = 1 / math.sqrt(module.lora_a.shape[0])  # LoRALinear's own initialisation
                module.lora_a = mx.random.uniform(-bound, bound, module.lora_a.shape).astype(module.lora_a.dtype)
                module.lora_b = mx.zeros_like(module.lora_b)
            mx.eval(self._model.parameters())
        self._optimizer = self._new_optimizer()
        self._rebased = True

    # ------------------------------------------------------------- parameters

    def trainable_parameter_count(self) -> tuple[int, int]:
        """(trainable, total) parameter counts of the policy."""
        total = sum(v.size for _, v in tree_flatten(self._model.parameters()))
        return sum(v.size for _, v in tree_flatten(self._model.trainable_parameters())), total

    # --------------------------------------------------------------- save/load

    def save(self, path: Path | None) -> None:
        """Writes the portable checkpoint layout (``backends/portable.py``), which PyTorch reads too.

        LoRA: PEFT's ``adapter_model.safetensors`` + ``adapter_config.json``
        (mlx-lm's matrices transposed); full fine-tune: ``model.safetensors`` +
        configs. Then AdamW's moments, the rebased reference's changed weights
        (if any) and ``backend_state.json``.
        """
        if path is None:  # another process's share of a save under torchrun: never, MLX runs in one process
            return
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        names = self._trainable_names()
        weights = ops.renamed(self._model.trainable_parameters(), names)
        if self._use_lora:
            mx.save_safetensors(str(path / portable.ADAPTER_FILE), weights, metadata={"format": "pt"})
            config = portable.peft_adapter_config(self._model_config)
            (path / portable.ADAPTER_CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
        else:
            mx.save_safetensors(str(path / portable.FULL_FILE), weights, metadata={"format": "pt"})
            self._copy_hf_files(path)
        moments, optimizer_step = self._optimizer_moments(names)
        mx.save_safetensors(str(path / portable.OPTIMIZER_FILE), moments)
        if self._rebased:  # the reference is no longer the model on disk: keep what changed
            frozen = self._reference if self._reference is not None else self._model
            mx.save_safetensors(
                str(path / portable.REFERENCE_FILE), ops.renamed(frozen.parameters(), self._reference_names())
            )
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

        Raises:
            portable.IncompatibleCheckpoint: it does not fit this model or config.
        """
        path = Path(path)
        state = portable.read_state(path, self._model_config, rebased=self._rebased)
        if state["rebased"]:
            frozen = self._reference if self._reference is not None else self._model
            reference = mx.load(str(path / portable.REFERENCE_FILE))
            ops.copy_into(frozen, self._reference_names(), reference, path, "reference weights")
            self._rebased = True
        weights = {}
        for file in portable.weight_files(path, lora=self._use_lora):
            weights.update(mx.load(str(file)))
        names = self._trainable_names()
        ops.copy_into(self._model, names, weights, path, "weights")
        self._load_optimizer(path, names, optimizer_step=int(state["optimizer_step"]))
        self._rng.bit_generator.state = state["rng"]
        self._step = int(state["step"])

    def _trainable_names(self) -> dict[str, tuple[str, bool]]:
        """mlx name -> (portable name, stored transposed) of each trainable tensor.

        LoRA: mlx-lm's ``lora_a [in, r]`` / ``lora_b [r, out]`` are PEFT's
        ``lora_A`` / ``lora_B`` transposed (same scale, alpha / r); full
        fine-tune: mlx-lm's names are the Hugging Face names.
        """
        if not self._use_lora:
            return {name: (name, False) for name, _ in tree_flatten(self._model.trainable_parameters())}
        names = {}
        for module in ops.lora_layers(self._model):
            names[f"{module}.lora_a"] = (portable.lora_key(module, "A"), True)
            names[f"{module}.lora_b"] = (portable.lora_key(module, "B"), True)
        return names

    def _reference_names(self) -> dict[str, tuple[str, bool]]:
        """mlx name -> (Hugging Face name, False) of the frozen tensors a rebase changes.

        Full fine-tune: every weight of the reference copy. LoRA: only the
        adapted layers' base weights (a quantised one with its scales and biases).
        """
        if self._reference is not None:
            return {name: (name, False) for name, _ in tree_flatten(self._reference.parameters())}
        names = {}
        for module, layer in ops.lora_layers(self._model).items():
            parts = ["weight"] + (["scales", "biases"] if isinstance(layer.linear, nn.QuantizedLinear) else [])
            for part in parts:
                if part in layer.linear:
                    names[f"{module}.linear.{part}"] = (f"{module}.{part}", False)
        return names

    def _optimizer_moments(self, names: dict[str, tuple[str, bool]]) -> tuple[dict[str, mx.array], int]:
        """AdamW's moments under portable names, and its step."""
        return ops.optimizer_moments(self._optimizer.state, names)

    def _load_optimizer(self, path: Path, names: dict[str, tuple[str, bool]], *, optimizer_step: int) -> None:
        self._optimizer = self._new_optimizer()
        moments = mx.load(str(path / portable.OPTIMIZER_FILE))
        if not moments:  # saved before the first optimizer step
            return
        params = dict(tree_flatten(self._model.trainable_parameters()))
        self._optimizer.state = {
            **self._optimizer.state,
            **ops.moments_state(path, moments, params, names),
            "step": mx.array(optimizer_step, dtype=mx.uint64),
        }
        mx.eval(self._optimizer.state)

    def _copy_hf_files(self, path: Path) -> None:
        ops.copy_hf_config(self._path, path, dtype=self._model_config.dtype)

    # ------------------------------------------------------------------ export

    def export(self, path: Path) -> None:
        """Writes the policy as a plain Hugging Face model (LoRA merged, dequantised) + tokenizer.

        The merge is computed into a new weight dict, so the live model keeps
        its adapters. mlx-lm's parameter names for these models are the Hugging
        Face names (with LoRA, ``<proj>.linear.weight`` -> ``<proj>.weight``).
        """
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        mx.save_safetensors(str(path / portable.FULL_FILE), ops.merged_weights(self._model), metadata={"format": "pt"})
        self._copy_hf_files(path)
        self.tokenizer.save_pretrained(str(path))


def create(model: ModelConfig, training: TrainingConfig, *, seed: int, total_steps: int) -> MlxBackend:
    """Builds the MLX backend (the factory ``backends`` calls by name)."""
    return MlxBackend(model, training, seed=seed, total_steps=total_steps)
