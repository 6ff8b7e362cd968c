"""Config loading: every mistake is one line naming the file, the line and the key."""

from pathlib import Path

import pytest
import yaml

from rlaif_mlx.config import ConfigError, load_config, save_config

MINIMAL = """\
model:
  base_model: models/tiny
data:
  train_file: tasks.jsonl
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text(text)
    return path


def test_minimal_config_fills_defaults(tmp_path):
    cfg = load_config(write(tmp_path, MINIMAL))
    assert cfg.model.base_model == "models/tiny"
    assert cfg.rlaif.num_samples_per_prompt == 4
    assert cfg.backend == "auto"


def test_quickstart_config_is_valid():
    cfg = load_config(Path(__file__).parent.parent / "configs" / "quickstart.yaml")
    assert cfg.data.train_file.startswith("builtin:")


def test_unknown_key_names_file_line_and_path(tmp_path):
    path = write(tmp_path, MINIMAL + "training:\n  learning_rate: 1.0e-4\n  lerning_rate: 3\n")
    with pytest.raises(ConfigError) as exc:
        load_config(path)
    message = str(exc.value)
    assert message == f"{path}:7: training.lerning_rate: unknown key; did you mean training.learning_rate?"
    assert "\n" not in message


def test_every_error_is_listed_one_per_line_in_file_order(tmp_path):
    path = write(
        tmp_path,
        "trainig: {}\n"
        "model:\n  base_model: m\n  lora_rank: 4\n"
        "data:\n  train_file: t.jsonl\n"
        "training:\n  batch_size: 0\n  kl_penalty: 0.1\n"
        "rlaif:\n  num_samples_per_prompt: many\n"
        "zzz: 1\n",
    )
    with pytest.raises(ConfigError) as exc:
        load_config(path)
    assert str(exc.value).splitlines() == [
        f"{path}:1: trainig: unknown key; did you mean training?",
        f"{path}:4: model.lora_rank: unknown key; did you mean model.lora_r?",
        f"{path}:8: training.batch_size: Input should be greater than or equal to 1 (got 0)",
        f"{path}:9: training.kl_penalty: unknown key; did you mean rlaif.kl_penalty?",  # the same name elsewhere
        f"{path}:11: rlaif.num_samples_per_prompt: Input should be a valid integer, unable to parse string as an "
        "integer (got 'many')",
        f"{path}:12: zzz: unknown key",  # nothing close: no guess
    ]


def test_wrong_type_and_out_of_range(tmp_path):
    path = write(tmp_path, MINIMAL + "rlaif:\n  num_samples_per_prompt: many\n")
    with pytest.raises(ConfigError, match=r"run.yaml:6: rlaif.num_samples_per_prompt: .*integer.*'many'"):
        load_config(path)
    path = write(tmp_path, MINIMAL + "training:\n  learning_rate: -1\n")
    with pytest.raises(ConfigError, match=r"run.yaml:6: training.learning_rate: .*greater than 0.*-1"):
        load_config(path)


def test_missing_required_key(tmp_path):
    path = write(tmp_path, "model:\n  base_model: x\n")
    with pytest.raises(ConfigError, match=r"run.yaml: data: required key is missing"):
        load_config(path)


def test_unknown_reward_component(tmp_path):
    path = write(tmp_path, MINIMAL + "rewards:\n  weights: {tests: 1.0, vibes: 2}\n")
    with pytest.raises(ConfigError, match=r"rewards.weights: unknown reward component.*vibes"):
        load_config(path)


def test_invalid_yaml_names_line(tmp_path):
    path = write(tmp_path, MINIMAL + "training: [unclosed\n")
    with pytest.raises(ConfigError, match=r"run.yaml:\d+: not valid YAML"):
        load_config(path)


def test_cli_style_overrides_are_validated(tmp_path):
    cfg = load_config(write(tmp_path, MINIMAL), overrides={"training.max_steps": 7, "seed": None, "backend": "torch"})
    assert cfg.training.max_steps == 7 and cfg.seed == 0 and cfg.backend == "torch"
    with pytest.raises(ConfigError, match="training.max_steps"):
        load_config(write(tmp_path, MINIMAL), overrides={"training.max_steps": 0})


def test_saved_config_round_trips(tmp_path):
    cfg = load_config(write(tmp_path, MINIMAL + "rlaif:\n  kl_penalty: 0.2\n"))
    out = tmp_path / "resolved.yaml"
    save_config(cfg, out)
    again = load_config(out)
    assert again == cfg
    assert yaml.safe_load(out.read_text())["rlaif"]["kl_penalty"] == 0.2


def test_readme_config_tour_is_a_valid_config_with_the_real_defaults(tmp_path):
    """The README lists every key with its default; keep it true."""
    import re

    from rlaif_mlx.config import RunConfig

    readme = (Path(__file__).parent.parent / "README.md").read_text()
    tour = yaml.safe_load(re.search(r"```yaml\n(.*?)```", readme, re.S).group(1))
    assert tour["model"]["base_model"] is None and tour["data"]["train_file"] is None  # required: no default shown
    tour["model"]["base_model"], tour["data"]["train_file"] = "m", "t.jsonl"
    cfg = load_config(write(tmp_path, yaml.safe_dump(tour)))
    assert cfg == RunConfig(model={"base_model": "m"}, data={"train_file": "t.jsonl"})


def test_std_scaling_without_a_baseline_is_rejected(tmp_path):
    path = write(tmp_path, MINIMAL + "rlaif:\n  baseline: none\n  scale_by_std: true\n")
    with pytest.raises(ConfigError, match=r"run.yaml:5: rlaif: scale_by_std: true divides raw rewards"):
        load_config(path)


def test_teacher_group_mode_keys(tmp_path):
    teacher = "teacher:\n  provider: openai\n  model: gpt-5-mini\n"
    weights = "rewards:\n  weights: {tests: 0.6, teacher: 0.4}\n"
    cfg = load_config(write(tmp_path, MINIMAL + weights + teacher))
    assert (cfg.teacher.mode, cfg.teacher.max_group, cfg.teacher.prompt_cache) == ("pointwise", 8, True)
    cfg = load_config(write(tmp_path, MINIMAL + weights + teacher + "  mode: group\n  max_group: 16\n"))
    assert (cfg.teacher.mode, cfg.teacher.max_group) == ("group", 16)
    with pytest.raises(ConfigError, match=r"run.yaml:10: teacher.mode: .*'pointwise' or 'group'.*'pairwise'"):
        load_config(write(tmp_path, MINIMAL + weights + teacher + "  mode: pairwise\n"))
    with pytest.raises(ConfigError, match=r"run.yaml:10: teacher.max_group: .*less than or equal to 26.*40"):
        load_config(write(tmp_path, MINIMAL + weights + teacher + "  max_group: 40\n"))
    prices = "  prices: {input: 2, output: 10, cache_read: 0.1}\n"
    assert load_config(write(tmp_path, MINIMAL + weights + teacher + prices)).teacher.prices.cache_write is None


@pytest.mark.parametrize("temperature", [0, 0.001, -1])
def test_training_refuses_a_temperature_with_no_policy_to_train(tmp_path, temperature):
    path = write(tmp_path, MINIMAL + f"rlaif:\n  generation_temperature: {temperature}\n")
    with pytest.raises(ConfigError, match=r"run.yaml:6: rlaif.generation_temperature: must be at least 0.01"):
        load_config(path)
    cfg = load_config(write(tmp_path, MINIMAL + "rlaif:\n  generation_temperature: 0.7\neval:\n  temperature: 0\n"))
    assert (cfg.rlaif.generation_temperature, cfg.eval.temperature) == (0.7, 0.0)  # greedy evaluation stays
