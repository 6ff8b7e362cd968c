"""Configs written for the original mlx-rlaif tool: read into ours with one note, and rewritten by migrate-config.

The fixture is that tool's own shipped ``config.yaml`` (tests/fixtures/original_tool/config.yaml says
where it comes from); the flat form is the one its Rust port's README lists.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from rlaif_mlx.cli import main
from rlaif_mlx.config import ConfigError, load_config
from rlaif_mlx.config_legacy import RULES

SHIPPED = Path(__file__).parent / "fixtures" / "original_tool" / "config.yaml"
FLAT = """\
base_model: ./models/tiny-qwen2
teacher_provider: anthropic
teacher_model: claude-3-5-haiku-20241022
num_epochs: 2
batch_size: 2
learning_rate: 1e-5
kl_penalty: 0.1
num_samples_per_prompt: 2
train_file: ./data/train.jsonl
"""


def test_the_original_tools_shipped_config_is_read_into_ours_with_one_note():
    notes: list[str] = []
    cfg = load_config(SHIPPED, on_note=notes.append)
    assert cfg.model.base_model == "./models/tiny-qwen2" and cfg.model.dtype == "bfloat16"
    assert cfg.output_dir == "./checkpoints" and cfg.data.train_file == "./data/train.jsonl"
    assert (cfg.teacher.provider, cfg.teacher.model, cfg.teacher.api_key_env) == (
        "anthropic",
        "claude-3-5-haiku-20241022",
        "ANTHROPIC_API_KEY",
    )
    assert cfg.teacher.temperature == 0.0  # the old key set the teacher's writing temperature, not its judging
    assert cfg.training.batch_size == 64 and cfg.training.micro_batch_size == 12  # 2 x 32 accumulated; 2 x 6
    assert cfg.training.learning_rate == 1e-5  # "1e-5" is a string to YAML 1.1
    assert cfg.rlaif.num_samples_per_prompt == 6 and cfg.rlaif.kl_penalty == 0.05 and cfg.rlaif.top_k == 50
    assert cfg.curriculum.enabled and cfg.logging.tensorboard and cfg.logging.log_every == 50
    assert cfg.eval.every_steps == 250 and cfg.eval.max_tasks == 100
    assert cfg.rewards.weights == {"teacher": 1.0}
    assert not cfg.model.use_lora and cfg.model.lora_dropout == 0.05

    [note] = notes
    lines = note.splitlines()
    assert lines[0] == f"note: {SHIPPED} is written for the original mlx-rlaif tool; read as this project's config:"
    assert "  teacher.model_name -> teacher.model" in lines
    assert "  training.output_dir -> output_dir" in lines
    assert "  rlaif.curriculum_learning -> curriculum.enabled" in lines
    assert "  logging.tensorboard_dir: ignored (TensorBoard files go to <output_dir>/tensorboard)" in lines
    assert any(line.startswith("  model.use_4bit: ignored (nothing is quantised while loading") for line in lines)
    assert any(line.startswith("  huggingface.{upload_to_hub, repo_id, ") for line in lines)
    assert lines[-1].startswith(f"  (rlaif-mlx migrate-config {SHIPPED} > NEW.yaml")
    old_keys = [f"{section}.{key}" for section, keys in yaml.safe_load(SHIPPED.read_text()).items() for key in keys]
    for key in old_keys:  # every old key is named, with its new home or why it has none
        section, _, leaf = key.partition(".")
        assert any(
            line.startswith(f"  {key} ") or line.startswith(f"  {key}:") or f"{section}.{{" in line and leaf in line
            for line in lines
        ), key


def test_the_flat_names_of_the_rust_port_are_read_too(tmp_path):
    path = tmp_path / "flat.yaml"
    path.write_text(FLAT)
    notes: list[str] = []
    cfg = load_config(path, on_note=notes.append)
    assert cfg.model.base_model == "./models/tiny-qwen2" and cfg.data.train_file == "./data/train.jsonl"
    assert (cfg.teacher.provider, cfg.teacher.model) == ("anthropic", "claude-3-5-haiku-20241022")
    assert cfg.training.num_epochs == 2 and cfg.training.batch_size == 2 and cfg.training.learning_rate == 1e-5
    assert cfg.rlaif.kl_penalty == 0.1 and cfg.rlaif.num_samples_per_prompt == 2
    assert "  teacher_model -> teacher.model" in notes[0].splitlines()
    assert "  base_model -> model.base_model" in notes[0].splitlines()


def test_a_bad_value_in_an_old_config_names_the_old_key_and_its_line(tmp_path):
    path = tmp_path / "old.yaml"
    text = SHIPPED.read_text().replace('lr_scheduler_type: "cosine"', 'lr_scheduler_type: "cosine_with_restarts"')
    path.write_text(text.replace("  num_epochs: 7", "  num_epochs: 0"))
    with pytest.raises(ConfigError) as exc:
        load_config(path)
    lines = str(exc.value).splitlines()
    number = next(i for i, line in enumerate(text.splitlines(), 1) if line.startswith("  num_epochs: 7"))
    assert lines[0] == f"{path}:{number}: training.num_epochs: Input should be greater than or equal to 1 (got 0)"
    assert lines[1].startswith(f"{path}:{number + 10}: training.lr_scheduler_type: Input should be 'constant'")


def test_migrate_config_writes_our_form(tmp_path, capsys):
    assert main(["migrate-config", str(SHIPPED)]) == 0
    captured = capsys.readouterr()
    assert captured.err.startswith(f"migrated {SHIPPED}: ")
    new = tmp_path / "new.yaml"
    new.write_text(captured.out)
    assert captured.out.startswith(f"# {SHIPPED} is written for the original mlx-rlaif tool")
    assert "training:\n  num_epochs: 7\n  batch_size: 64\n" in captured.out
    notes: list[str] = []
    assert load_config(new, on_note=notes.append) == load_config(SHIPPED)
    assert notes == []  # our own form: nothing left to map

    assert main(["migrate-config", str(new)]) == 2
    assert capsys.readouterr().err == f"error: {new} already uses this project's keys: nothing to migrate\n"
    broken = tmp_path / "broken.yaml"
    broken.write_text(FLAT.replace("batch_size: 2", "batch_size: -2") + "num_sampels: 3\n")
    assert main(["migrate-config", str(broken)]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err == [
        f"error: {broken}:5: training.batch_size (from batch_size): Input should be greater than or equal to 1 "
        "(got -2)",
        f"error: {broken}:5: training.micro_batch_size (from batch_size): must be a whole number >= 1, or auto "
        "(the largest the memory plan fits) (got -4)",
        f"error: {broken}:10: num_sampels: unknown key; did you mean num_samples_per_prompt?",
    ]


def test_every_rule_names_a_key_of_ours_or_why_it_has_none():
    from rlaif_mlx.config import is_known_key

    for old, rule in RULES.items():
        moves, text = rule(1, {"training": {"batch_size": 1}, "data": {"eval_file": "e.jsonl"}})
        assert text.startswith(("->", "ignored (")), old
        for new, _ in moves:
            assert is_known_key(new), (old, new)
