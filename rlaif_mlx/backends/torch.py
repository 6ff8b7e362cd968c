"""PyTorch / transformers implementation of the ``Backend`` interface.

Reads top to bottom like ``backends/mlx.py``: ``TorchBackend`` in the
interface's method order (load, sample, logprobs, train_step and gradients,
rebase_reference, parameters, save/load, export). Each job's details live in a
helper module of the same name on both sides: ``torch_load`` (tokenizer, model,
LoRA, reference), ``torch_decode`` (the sampling loop), ``torch_forward``
(teacher-forced log-probs), ``torch_train`` (micro-batches, gradients, AdamW),
``torch_checkpoint`` (the layout both backends share, ``portable``) and
``torch_ops`` (array-level pieces).

- Models come from ``AutoModelForCausalLM`` (a local folder or a hub id); LoRA
  is PEFT's. With LoRA the frozen reference is the same model with its
  adapters switched off; a full fine-tune keeps a frozen copy made at load.
- Sampling prefills each prompt once and shares its KV cache among its ``n``
  samples; with LoRA it decodes with the adapters folded into the weights,
  restored exactly afterwards.
- Under torchrun every process keeps a whole replica and the gradients of all
  processes are summed; with ``model.torch.fsdp`` each keeps a shard instead
  (``torch_fsdp``): sampling runs on the whole weights gathered once
  (``gathered``), every other forward and backward is collective.
- Random draws come from the backend's own seed stream: torch's global
  generators are seeded only inside a block that restores them.
- Importing this module imports torch; ``import rlaif_mlx`` never does.
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
    import peft  # noqa: F401 - used by the helper modules; a missing one is reported here, with the fix
    import torch
    import transformers  # noqa: F401
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise BackendUnavailable(
        f"The PyTorch backend needs torch, transformers and peft ({exc}). "
        "Install them with: pip install 'rlaif-mlx[torch]'"
    ) from None

from rlaif_mlx.backends import portable, torch_checkpoint, torch_load, torch_train
from rlaif_mlx.backends import torch_decode as decode
from rlaif_mlx.backends import torch_forward as fwd
from rlaif_mlx.backends import torch_ops as ops
from rlaif_mlx.backends.common import DecodeBook
from rlaif_mlx.config import ModelConfig, TrainingConfig, options_set
from rlaif_mlx.rl.schedule import scheduled_learning_rate

log = logging.getLogger(__name__)


class TorchBackend:
    """One transformers model (LoRA or full fine-tune), its tokenizer and its optimizer.

    Args:
        model: the ``model`` config section (path or hub id, dtype, LoRA, torch options).
        training: the ``training`` config section (micro-batch, AdamW, LR schedule, clipping).
        seed: seeds LoRA's initialisation and the stream every later random draw comes from.
        total_steps: planned optimizer steps, for the LR schedule.

    Attributes:
        merge_lora_for_sampling: decode with the adapters folded into the weights (restored exactly after).
        preallocate_decode_cache: decode into KV-cache buffers sized for the call, instead of
            transformers' cache that grows by a copy each step (the same numbers either way).
    """

    name = "torch"
    merge_lora_for_sampling = True
    preallocate_decode_cache = True

    def __init__(self, model: ModelConfig, training: TrainingConfig, *, seed: int, total_steps: int) -> None:
        self._model_config = model
        self._training = training
        self._total_steps = max(int(total_steps), 1)
        self._step = 0  # scheduled optimizer steps taken (the LR schedule position)
        # Every later random draw (sampling generators, dropout, a fresh adapter) is seeded from this stream,
        # whose state a checkpoint stores exactly: saving never perturbs it, and either backend resumes it.
        self._rng = np.random.default_rng(seed)

        self.device = ops.resolve_device(model.torch.device)
        ignored = options_set(model.mlx, "model.mlx")
        if ignored:
            log.warning("%s: MLX-only option(s); the PyTorch backend ignores them.", ", ".join(ignored))
        policy = torch_load.load_policy(model, device=self.device, seed=seed)
        self.tokenizer, self.eos_ids, self.pad_id = policy.tokenizer, policy.eos_ids, policy.pad_id
        self._model, self._reference, self._fsdp = policy.model, policy.reference, policy.fsdp
        self._cache_arg = policy.cache_arg
        self._use_lora = model.use_lora
        self._gathered = False  # inside ``gathered``: the policy's weights are whole in this process
        self._trainable = [p for p in self._model.parameters() if p.requires_grad]
        self._optimizer = torch_train.adamw(self._trainable, training)
        self._rebased = False  # the reference no longer equals the weights on disk

    # ------------------------------------------------------------------ sample

    @torch.inference_mode()
    def sample(self, prompts: list[list[int]], *, n: int, params: SamplingParams) -> list[Completion]:
        """``Backend.sample``: each prompt prefilled once, its KV cache repeated for its ``n`` samples.

        All rows then decode together (``torch_decode.generate``); with LoRA the
        adapters are folded into the weights meanwhile (``merge_lora_for_sampling``).
        """
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}.")
        if not prompts:
            return []
        if any(len(p) == 0 for p in prompts):
            raise ValueError("Every prompt needs at least one token.")
        self._model.eval()
        seed = params.seed if params.seed is not None else portable.draw_seed(self._rng)
        generators = ops.generators(seed, prompts=len(prompts), device=self.device)
        book = DecodeBook(prompts, n, eos_ids=self.eos_ids, stop=params.stop, decode=self._decode)
        merged = self._use_lora and self.merge_lora_for_sampling
        with self.gathered(), ops.lora_merged(self._model) if merged else contextlib.nullcontext():
            return decode.generate(
                self._model,
                prompts,
                n,
                params,
                cache_arg=self._cache_arg,
                generators=generators,
                book=book,
                pad_id=self.pad_id,
                device=self.device,
                preallocate=self.preallocate_decode_cache,
            )

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

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=False)

    # ---------------------------------------------------------------- logprobs

    @torch.inference_mode()
    def logprobs(
        self, batch: SequenceBatch, *, reference: bool = False, temperature: float = 1.0, prompt_targets: bool = True
    ) -> np.ndarray:
        """``Backend.logprobs``, per micro-batch, each distinct prompt forwarded once (``torch_forward``)."""
        temperature = check_temperature(temperature)
        self._model.eval()
        n, width = batch.input_ids.shape
        out = np.zeros((n, width - 1), dtype=np.float32)
        size = self._training.micro_batch_size
        for index in torch_train.micro_batches(n, size, fsdp=self._fsdp, device=self.device):
            rows = batch.rows(index) if index is not None else torch_train.idle_rows(self.pad_id)
            ids, attn = torch_train.tensors(rows, device=self.device)
            logp = self._score(
                ids, attn, rows.loss_mask, reference=reference, temperature=temperature, prompts=prompt_targets
            )
            if index is not None:
                out[index.start : index.start + len(rows), : logp.shape[1]] = logp.float().cpu().numpy()
        if self._fsdp is not None and reference and self._reference is not None:
            self._reference.reshard()  # its root (embeddings, head) stays gathered after a forward until resharded
        return out

    def _score(self, ids, attn, loss_mask, *, reference: bool, temperature: float, prompts: bool):
        options = {"temperature": temperature, "prompt_targets": prompts}
        if not reference:
            return fwd.sequence_logp(self._model, ids, attn, loss_mask, **options)
        if self._reference is not None:
            return fwd.sequence_logp(self._reference, ids, attn, loss_mask, **options)
        with self._model.disable_adapter():
            return fwd.sequence_logp(self._model, ids, attn, loss_mask, **options)

    # -------------------------------------------------------------- train_step

    def train_step(self, batch: TrainBatch, *, loss: LossSettings, learning_rate: float | None = None) -> StepStats:
        """``Backend.train_step``; under torchrun each process passes its share of the batch.

        The token weights are normalised over the whole batch; gradients and loss
        statistics are summed across processes before clipping, so all take the
        same step and report the whole batch's numbers.
        """
        lr = self._learning_rate(learning_rate)
        stats = self._accumulate_gradients(batch, loss, seed=portable.draw_seed(self._rng))
        grad_norm = torch_train.clip(self._trainable, self._training.max_grad_norm, fsdp=self._fsdp)
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

    def gradients(self, batch: TrainBatch, *, loss: LossSettings) -> tuple[dict[str, np.ndarray], StepStats]:
        """``Backend.gradients`` (in one process: refused under FSDP, like ``parameters``)."""
        self._refuse_sharded("gradients")
        stats = self._accumulate_gradients(batch, loss, seed=portable.draw_seed(copy.deepcopy(self._rng)))
        model, names = torch_checkpoint.named_part(self._model, None, "trainable")
        grads = {}
        for key, name in names.items():
            param = model.get_parameter(name)
            grads[key] = ops.to_numpy(param.grad if param.grad is not None else torch.zeros_like(param))
        grad_norm = torch_train.clip(self._trainable, None, fsdp=None)  # None: measures only
        self._optimizer.zero_grad(set_to_none=True)
        return grads, StepStats(grad_norm=grad_norm, lr=self._learning_rate(None), **stats)

    def _learning_rate(self, override: float | None) -> float:
        if override is not None:
            return override
        return scheduled_learning_rate(self._step, self._training, total_steps=self._total_steps)

    def _accumulate_gradients(self, batch: TrainBatch, settings: LossSettings, *, seed: int) -> dict:
        """``torch_train.accumulate`` into the parameters' ``.grad``, its dropout masks drawn from ``seed``."""
        with ops.seeded_rng(seed, device=self.device):
            return torch_train.accumulate(
                self._model,
                batch,
                settings,
                trainable=self._trainable,
                micro_batch_size=self._training.micro_batch_size,
                pad_id=self.pad_id,
                device=self.device,
                fsdp=self._fsdp,
            )

    # ------------------------------------------------------- rebase_reference

    @torch.no_grad()
    def rebase_reference(self) -> None:
        """Makes the current policy the frozen KL reference and restarts the optimizer.

        LoRA: the adapters are folded into the base weights and start afresh
        (new A, B = 0), so "adapters off" is now the current policy. Full fine-tune:
        the current weights are copied into the reference model. Under FSDP
        every process calls it (both models are sharded alike: shards copy to shards).
        """
        if self._reference is not None:
            self._reference.load_state_dict(self._model.state_dict())
        else:
            fill = self._fsdp.fill if self._fsdp is not None else None
            with ops.seeded_rng(portable.draw_seed(self._rng), device=self.device):  # the fresh A matrices
                for module in ops.lora_layers(self._model).values():
                    module.get_base_layer().weight += module.get_delta_weight(ops.ADAPTER)
                    ops.reset_adapter(module, fill=fill)
        self._optimizer = torch_train.adamw(self._trainable, self._training)
        self._rebased = True

    # ------------------------------------------------------------- parameters

    def trainable_parameter_count(self) -> tuple[int, int]:
        """(trainable, total) parameter counts of the policy (shared weights counted once)."""
        total = sum(p.numel() for p in self._model.parameters())
        return sum(p.numel() for p in self._trainable), total

    def parameters(self, *, which: str = "trainable") -> dict[str, np.ndarray]:
        """``Backend.parameters`` (``"trainable"``, ``"frozen"`` or ``"reference"``); refused under FSDP."""
        self._refuse_sharded("parameters")
        module, names = torch_checkpoint.named_part(self._model, self._reference, which)
        return {key: ops.to_numpy(module.get_parameter(name)) for key, name in names.items()}

    def _refuse_sharded(self, what: str) -> None:
        if self._fsdp is not None:
            raise RuntimeError(
                f"{what} needs the whole weights in one process; under FSDP, save a checkpoint and read it instead"
            )

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
        self._optimizer = torch_train.adamw(self._trainable, self._training)
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
        model = self._model
        if self._use_lora:
            model = torch_load.load_base(self._model_config, device="cpu")
            model.load_state_dict(ops.merged_state_dict(self._model), strict=True)
        with torch_load.quiet_loading():  # no progress bar per shard
            model.save_pretrained(str(path), safe_serialization=True)
        portable.add_legacy_rope_keys(path / "config.json")  # so mlx-lm reads the same RoPE as transformers
        self.tokenizer.save_pretrained(str(path))


def create(model: ModelConfig, training: TrainingConfig, *, seed: int, total_steps: int) -> TorchBackend:
    """Builds the PyTorch backend (the factory ``backends`` calls by name)."""
    return TorchBackend(model, training, seed=seed, total_steps=total_steps)
