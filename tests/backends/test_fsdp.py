"""FSDP on the PyTorch backend: two CPU processes (gloo) with sharded weights do what one whole process does.

One ``torch.distributed.run --nproc_per_node 2`` launch of ``tests/fsdp_worker.py``
measures ``rlaif_mlx.backends.torch_fsdp`` against an unsharded copy of the
tiny model that sees the whole global batch; the tests below read what each
process measured.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("peft")
torch = pytest.importorskip("torch")
if not torch.distributed.is_available():  # pragma: no cover - depends on the build
    pytest.skip("this PyTorch build has no torch.distributed", allow_module_level=True)

TESTS = Path(__file__).parent
LR = {"full": 1e-3, "lora": 1e-2}  # as in fsdp_worker.py
# The sharded run sums the same float32 gradients in another order (~1e-7 relative). AdamW divides each
# element by its own running magnitude, which can turn that into up to a few 1e-7 of a weight; a missing or
# doubled shard would move weights by whole steps of about the learning rate.
CLOSE = 1e-6


@pytest.fixture(scope="module")
def ranks(tmp_path_factory, tiny_model_path) -> list[dict]:
    """What each of the two processes measured (``OUT/rank<R>.json``)."""
    out = tmp_path_factory.mktemp("fsdp")
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join([str(TESTS.parent), str(TESTS), os.environ.get("PYTHONPATH", "")]),
    }
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            "2",
            "--master_addr",
            "127.0.0.1",
            "--master_port",
            str(free_port()),
            str(TESTS / "fsdp_worker.py"),
            str(tiny_model_path),
            str(out),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=1800,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    return [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]


def test_each_process_holds_half_of_every_parameter(ranks):
    for name, rows in ranks[0]["inference"]["full_rows"].items():
        parts = [r["inference"]["shard_fractions"][name] for r in ranks]
        assert sum(parts) == pytest.approx(1.0), name  # the shards tile the tensor, nothing held twice
        assert max(parts) <= 0.5 + 1 / rows, (name, parts)  # dim 0 split in two (rounded up)


def test_decoding_inside_gathered_matches_the_whole_model(ranks):
    for r in ranks:
        got = r["inference"]
        assert got["gathered_is_whole"] and got["resharded_after"] and got["resharded_after_error"]
        # Rank 0 decoded 6 tokens and rank 1 only 3: no communication happens inside `gathered`.
        assert got["greedy_same_tokens"]
        assert got["greedy_logit_diff"] <= 1e-5 and got["forced_logit_diff"] <= 1e-5
        assert got["plain_forward_diff"] <= 1e-5  # outside `gathered`: FSDP gathers layer by layer
        assert got["gathered_edits_dropped"]  # the shards are the master copy


def test_gradients_are_summed_across_processes_not_averaged(ranks):
    for r in ranks:
        assert r["full"]["grad_rel_diff"] <= 1e-6  # an average would be half: 0.5
        for kind in ("full", "lora"):
            # clip_grad_norm_ over DTensors: per-shard float32 norms reduced, so ~1e-6 relative, not bitwise.
            assert r[kind]["norms_sharded"] == pytest.approx(r[kind]["norms_whole"], rel=1e-5), kind
            assert min(r[kind]["norms_whole"]) > 0.5  # MAX_NORM: every step was clipped


def test_full_finetune_steps_give_the_weights_of_one_process(ranks):
    got = ranks[0]["full"]
    assert got["weight_diff"] <= LR["full"] / 100
    assert got["weight_close_fraction"] >= 0.999
    assert got["weight_moved"] > 100 * CLOSE  # the weights really moved


def test_lora_steps_give_the_weights_of_one_process(ranks):
    got = ranks[0]["lora"]
    assert ranks[1]["lora"]["lora_sharded"] and got["lora_sharded"]
    assert got["state_names"] and got["weight_diff"] <= CLOSE
    assert got["adapter_moved"] > LR["lora"]  # B starts at 0
    assert got["adapter_off_diff"] <= 1e-5  # the reference: adapters switched off
    assert got["rebase_diff"] <= CLOSE  # folding the adapters into sharded base weights


def test_a_lora_merge_inside_gathered_leaves_the_shards_untouched(ranks):
    got = ranks[0]["lora"]
    assert got["merged_logit_diff"] <= 1e-5
    assert got["merge_left_no_trace"]  # bit for bit, although unmerging is not exact arithmetic


def test_the_whole_state_round_trips_through_rank_0(ranks):
    got = ranks[0]["full"]
    assert ranks[1]["full"]["others_get_nothing"]
    assert got["state_names"] and got["state_on_cpu_whole"]  # the unsharded model's names and shapes
    assert got["state_diff_step2"] <= LR["full"] / 100
    assert got["reload_exact"] and got["rebase_exact"]
    assert ranks[0]["lora"]["adapter_load_exact"]  # a partial load: the adapters alone


def test_the_optimizer_state_round_trips_and_training_continues_exactly(ranks):
    got = ranks[0]["full"]
    assert ranks[0]["full"]["empty_optimizer_state"]  # before the first step: nothing, and no step taken
    assert got["moment_names"] and got["moment_steps"] == [2.0]
    assert got["moment_diff"] <= CLOSE
    assert got["resume_exact"]  # step 3 after the reload == step 3 without it, bit for bit


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_layers_are_found_through_a_peft_wrapper(tiny_model_path):
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM

    from rlaif_mlx.backends.torch_fsdp import layers
    from rlaif_mlx.backends.torch_ops import with_lora

    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_path), dtype=torch.float32)
    assert layers(model) == list(model.model.layers)
    wrapped = with_lora(model, LoraConfig(r=4, target_modules=["q_proj"]))
    assert layers(wrapped) == list(model.model.layers)
    with pytest.raises(ValueError, match="no decoder layers"):
        layers(torch.nn.Linear(2, 2))
