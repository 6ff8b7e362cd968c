"""MLX / mlx-lm implementation of the ``Backend`` interface.

Reads top to bottom like ``backends/torch.py``: ``MlxBackend`` in the
interface's method order (load, sample, logprobs, train_step and gradients,
rebase_reference, parameters, save/load, export). Each job's details live in a
helper module of the same name on both sides: ``mlx_load`` (model folder,
tokenizer, model, LoRA, reference), ``mlx_decode`` (the sampling loop),
``mlx_groups`` (teacher-forced log-probs, shared prompts once), ``mlx_train``
(gradients, AdamW), ``mlx_checkpoint`` (the layout both backends share,
``portable``) and ``mlx_ops`` (array-level pieces).

- Models come from mlx-lm (a local folder or a hub id, quantised ones
  included: LoRA then trains on the frozen quantised base); LoRA is mlx-lm's
  tuner. With LoRA the frozen reference is the same model with its adapters
  switched off (each ``LoRALinear``'s scale set to 0 for the call); a full
  fine-tune keeps a frozen second model instance holding the starting weights.
- Sampling prefills each prompt once and repeats its KV cache for its ``n``
  samples; float LoRA adapters are folded into the weights for the decode.
- Log-probs and the training forward run each prompt a micro-batch shares
  once, then only the completions on its repeated KV cache (``mlx_groups``).
- Random draws come from the backend's own seed stream: MLX's global random
  state is seeded only inside a block that restores it.
- Importing this module imports mlx; ``import rlaif_mlx`` never does.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
from pathlib import Path

import numpy as np

from rlaif_mlx.backends.base import (
    BackendUnavailable,
    Completion,
    LossSettings,
    SamplingParams,
    SequenceBatch,
    StepStats,
    TrainBatch,
    check_temperature,
)

try:
    import mlx.core as mx
    import mlx.nn as nn
    import mlx_lm  # noqa: F401 - used by the helper modules; a missing one is reported here, with the fix
    from mlx.utils import tree_flatten, tree_map
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise BackendUnavailable(
        f"The MLX backend needs mlx and mlx-lm ({exc}). "
        "Install them with: pip install 'rlaif-mlx[mlx]'  (on Linux: pip install 'mlx[cpu]' mlx-lm)"
    ) from None

from rlaif_mlx.backends import mlx_checkpoint, mlx_load, mlx_train, portable
from rlaif_mlx.backends import mlx_decode as decode
from rlaif_mlx.backends import mlx_groups as grouped
from rlaif_mlx.backends import mlx_ops as ops
from rlaif_mlx.backends.common import DecodeBook
from rlaif_mlx.config import ModelConfig, TrainingConfig, options_set
from rlaif_mlx.rl.schedule import scheduled_learning_rate

log = logging.getLogger(__name__)


class MlxBackend:
    """One mlx-lm model (LoRA or full fine-tune), its tokenizer and its optimizer.

    Args:
        model: the ``model`` config section (path or hub id, dtype, LoRA, mlx options).
        training: the ``training`` config section (micro-batch, AdamW, LR schedule, clipping).
        seed: seeds LoRA's initialisation and the stream every later random draw comes from.
        total_steps: planned optimizer steps, for the LR schedule.
    """

    name = "mlx"

    def __init__(self, model: ModelConfig, training: TrainingConfig, *, seed: int, total_steps: int) -> None:
        self._model_config = model
        self._training = training
        self._total_steps = max(int(total_steps), 1)
        self._step = 0  # scheduled optimizer steps taken (the LR schedule position)
        # Every later random draw (sampling keys, dropout, a fresh adapter) is seeded from this stream,
        # whose state a checkpoint stores exactly: saving never perturbs it, and either backend resumes it.
        self._rng = np.random.default_rng(seed)

        self.device = "gpu" if mx.default_device().type == mx.DeviceType.gpu else "cpu"
        ignored = options_set(model.torch, "model.torch")
        if ignored:
            log.warning("%s: PyTorch-only option(s); the MLX backend ignores them.", ", ".join(ignored))
        mlx_load.set_memory_limits(model.mlx, device=self.device)
        policy = mlx_load.load_policy(model, seed=seed, device=self.device)
        self.tokenizer, self.eos_ids, self.pad_id = policy.tokenizer, policy.eos_ids, policy.pad_id
        self._model, self._reference, self._path = policy.model, policy.reference, policy.path
        self._use_lora = model.use_lora
        self._optimizer = mlx_train.adamw(training)
        self._rebased = False  # the reference no longer equals the weights on disk

    # ------------------------------------------------------------------ sample

    def sample(self, prompts: list[list[int]], *, n: int, params: SamplingParams) -> list[Completion]:
        """``Backend.sample``: each prompt prefilled once, its KV cache repeated for its ``n`` samples.

        All rows then decode together (``mlx_decode.generate``); float LoRA
        adapters are folded into the weights meanwhile, one matmul per layer.
        """
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}.")
        if not prompts:
            return []
        if any(len(p) == 0 for p in prompts):
            raise ValueError("Every prompt needs at least one token.")
        self._model.eval()
        seed = params.seed if params.seed is not None else portable.draw_seed(self._rng)
        rows = len(prompts) * n
        uniforms = ops.sampling_uniforms(seed, prompts=len(prompts), steps=params.max_new_tokens, rows=rows)
        book = DecodeBook(prompts, n, eos_ids=self.eos_ids, stop=params.stop, decode=self._decode)
        with ops.lora_merged(self._model):
            completions = decode.generate(
                self._model, prompts, n, params, uniforms=uniforms, book=book, pad_id=self.pad_id
            )
        mx.clear_cache()  # the decode's freed buffers (KV cache, folded layers) fit nothing the update allocates
        return completions

    def gathered(self):
        """Nothing to gather: every MLX process holds the whole weights (see ``TorchBackend.gathered``)."""
        return contextlib.nullcontext()

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=False)

    # ---------------------------------------------------------------- logprobs

    def logprobs(
        self, batch: SequenceBatch, *, reference: bool = False, temperature: float = 1.0, prompt_targets: bool = True
    ) -> np.ndarray:
        """``Backend.logprobs``, per micro-batch, each shared prompt forwarded once (``mlx_groups``)."""
        temperature = check_temperature(temperature)
        self._model.eval()
        n, width = batch.input_ids.shape
        out = np.zeros((n, width - 1), dtype=np.float32)
        step = self._training.micro_batch_size
        model = self._reference if reference and self._reference is not None else self._model
        off = self._adapters_off() if reference and self._reference is None else contextlib.nullcontext()
        with off:
            for start in range(0, n, step):
                logp = self._score(model, batch.rows(slice(start, start + step)), temperature, prompt_targets)
                out[start : start + len(logp), : logp.shape[1]] = logp
        return out

    def _score(self, model, rows: SequenceBatch, temperature: float, prompts: bool) -> np.ndarray:
        """Row-layout log-probs of one micro-batch, each shared prompt forwarded once (``mlx_groups``)."""
        groups = grouped.find_groups(rows)
        if groups is None:
            logp = np.array(ops.token_logp(model, *mlx_train.arrays(rows), temperature))
            return logp if prompts else logp * rows.loss_mask
        prompt_logp, completion_logp = grouped.grouped_logp(
            model, groups, prompt_targets=prompts, temperature=temperature
        )
        prompt_logp = None if prompt_logp is None else np.array(prompt_logp)
        return groups.to_row_layout(prompt_logp, np.array(completion_logp), rows.loss_mask.shape[1])

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

    # -------------------------------------------------------------- train_step

    def train_step(self, batch: TrainBatch, *, loss: LossSettings, learning_rate: float | None = None) -> StepStats:
        """``Backend.train_step``: micro-batches, accumulated gradients, clipping, AdamW."""
        lr = self._learning_rate(learning_rate)
        grads, stats = self._accumulate_gradients(batch, loss, seed=portable.draw_seed(self._rng))
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
        mx.clear_cache()  # the backward pass's freed activations would otherwise stay held until the next one
        return StepStats(grad_norm=grad_norm, lr=lr, **stats)

    def gradients(self, batch: TrainBatch, *, loss: LossSettings) -> tuple[dict[str, np.ndarray], StepStats]:
        """``Backend.gradients``."""
        grads, stats = self._accumulate_gradients(batch, loss, seed=portable.draw_seed(copy.deepcopy(self._rng)))
        grad_norm = float(ops.clip_grad_norm(grads, math.inf)[1])
        names = mlx_checkpoint.trainable_names(self._model, lora=self._use_lora)
        arrays = {key: ops.to_numpy(g) for key, g in mlx_checkpoint.renamed(grads, names).items()}
        return arrays, StepStats(grad_norm=grad_norm, lr=self._learning_rate(None), **stats)

    def _learning_rate(self, override: float | None) -> float:
        if override is not None:
            return override
        return scheduled_learning_rate(self._step, self._training, total_steps=self._total_steps)

    def _accumulate_gradients(self, batch: TrainBatch, settings: LossSettings, *, seed: int) -> tuple[dict, dict]:
        """``mlx_train.accumulate``, its dropout masks drawn from ``seed``."""
        # With dropout a shared prompt would share its dropout mask, so rows stay whole then.
        dropout = self._use_lora and self._model_config.lora_dropout > 0
        with ops.seeded_rng(seed):
            return mlx_train.accumulate(
                self._model, batch, settings, micro_batch_size=self._training.micro_batch_size, whole_rows=dropout
            )

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
            key = mx.random.key(portable.draw_seed(self._rng))  # the fresh A matrices
            for module in ops.lora_layers(self._model).values():
                if isinstance(module.linear, nn.QuantizedLinear):
                    module.linear = module.fuse()  # dequantise, add the update, quantise again
                    module.linear.freeze()
                else:
                    weight = module.linear.weight
                    module.linear.weight = weight + ops.lora_delta(module).astype(weight.dtype)
                key, draw = mx.random.split(key)
                bound = 1 / math.sqrt(module.lora_a.shape[0])  # LoRALinear's own initialisation
                a = mx.random.uniform(-bound, bound, module.lora_a.shape, key=draw)
                module.lora_a = a.astype(module.lora_a.dtype)
                module.lora_b = mx.zeros_like(module.lora_b)
            mx.eval(self._model.parameters())
        self._optimizer = mlx_train.adamw(self._training)
        self._rebased = True

    # ------------------------------------------------------------- parameters

    def trainable_parameter_count(self) -> tuple[int, int]:
        """(trainable, total) parameter counts of the policy."""
        total = sum(v.size for _, v in tree_flatten(self._model.parameters()))
        return sum(v.size for _, v in tree_flatten(self._model.trainable_parameters())), total

    def parameters(self, *, which: str = "trainable") -> dict[str, np.ndarray]:
        """``Backend.parameters`` (``"trainable"``, ``"frozen"`` or ``"reference"``)."""
        module, names = mlx_checkpoint.named_part(self._model, self._reference, which, lora=self._use_lora)
        return {key: ops.to_numpy(v) for key, v in mlx_checkpoint.renamed(module.parameters(), names).items()}

    # --------------------------------------------------------------- save/load

    def save(self, path: Path | None) -> None:
        """Writes the portable checkpoint layout (``backends/portable.py``), which PyTorch reads too.

        LoRA: PEFT's ``adapter_model.safetensors`` + ``adapter_config.json``
        (mlx-lm's matrices transposed); full fine-tune: ``model.safetensors`` +
        configs. Then AdamW's moments, the rebased reference's changed weights
        (if any) and ``backend_state.json``.
        """
        if path is None:  # another process's share of a save under mlx.launch: rank 0 writes it, whole
            return
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        optimizer_step = mlx_checkpoint.save(
            path,
            model=self._model,
            optimizer=self._optimizer,
            reference=self._reference,
            rebased=self._rebased,
            config=self._model_config,
            source=self._path,
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
        self._optimizer = mlx_train.adamw(self._training)
        mlx_checkpoint.load(
            path,
            model=self._model,
            optimizer=self._optimizer,
            reference=self._reference,
            rebased=state["rebased"],
            optimizer_step=int(state["optimizer_step"]),
            lora=self._use_lora,
        )
        self._rebased = self._rebased or state["rebased"]
        self._rng.bit_generator.state = state["rng"]
        self._step = int(state["step"])

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
        mlx_checkpoint.copy_hf_config(self._path, path, dtype=self._model_config.dtype)
        self.tokenizer.save_pretrained(str(path))


def create(model: ModelConfig, training: TrainingConfig, *, seed: int, total_steps: int) -> MlxBackend:
    """Builds the MLX backend (the factory ``backends`` calls by name)."""
    return MlxBackend(model, training, seed=seed, total_steps=total_steps)
