"""``rlaif-mlx doctor``: what it reports, what it never prints, and that nothing in it crashes."""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path

import pytest
import yaml

from rlaif_mlx.cli import doctor, main

KEY_ENV = "RLAIF_DOCTOR_TEST_KEY"
SECRET = "sk-test-4f9c2e71b0d3a8"


def write_config(folder: Path, model: str, **changes) -> Path:
    """A run config with an Anthropic teacher keyed by ``KEY_ENV``; ``changes`` replace whole sections."""
    tasks = folder / "tasks.jsonl"
    tasks.write_text(json.dumps({"id": "add", "prompt": "Write add(a, b)."}) + "\n")
    config = {
        "output_dir": str(folder / "run"),
        "model": {"base_model": model},
        "data": {"train_file": str(tasks)},
        "rewards": {"weights": {"tests": 0.6, "teacher": 0.4}},
        "teacher": {
            "provider": "anthropic",
            "model": "claude-sonnet-4-5",
            "api_key_env": KEY_ENV,
            "cache_path": str(folder / "cache" / "teacher.sqlite"),
        },
    } | changes
    path = folder / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def lines_of(out: str) -> dict[str, str]:
    """Check name -> its report line (plain output: ``status  name  detail``)."""
    found = {}
    for line in out.splitlines():
        status, _, rest = line.partition("  ")
        if status in ("ok", "warn", "fail"):
            name = rest.strip().split("  ")[0]
            found[name] = line
    return found


@pytest.fixture
def config_only(monkeypatch):
    """Skips the machine's checks, so a test sees only its config's (and runs fast)."""
    monkeypatch.setattr(doctor, "environment_checks", lambda: [])


def test_a_set_key_is_reported_but_never_printed(config_only, tmp_path, tiny_model_path, monkeypatch, capsys):
    monkeypatch.setenv(KEY_ENV, SECRET)
    assert main(["doctor", "--config", str(write_config(tmp_path, str(tiny_model_path)))]) == 0
    captured = capsys.readouterr()
    found = lines_of(captured.out)
    assert found["teacher key"].startswith("ok") and f"{KEY_ENV} is set" in found["teacher key"]
    assert SECRET not in captured.out + captured.err
    assert found["model"].startswith("ok") and f"{tiny_model_path} (local folder)" in found["model"]
    assert found["train file"].startswith("ok") and ": 1 task" in found["train file"]
    assert found["teacher cache"].startswith("ok") and found["output dir"].startswith("ok")
    assert not (tmp_path / "cache").exists() and not (tmp_path / "run").exists()  # checked, never written
    assert captured.out.rstrip().endswith("0 failed")


def test_an_unset_key_fails_with_the_export_fix(config_only, tmp_path, tiny_model_path, monkeypatch, capsys):
    monkeypatch.delenv(KEY_ENV, raising=False)
    assert main(["doctor", "--config", str(write_config(tmp_path, str(tiny_model_path)))]) == 1
    out = capsys.readouterr().out
    assert lines_of(out)["teacher key"].startswith("fail") and f"{KEY_ENV} is not set" in out
    assert f"fix: export {KEY_ENV}=..." in out


def test_missing_train_file_and_model_fail_naming_the_path(config_only, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv(KEY_ENV, SECRET)
    missing_model = tmp_path / "models" / "nothing-here"
    config = write_config(tmp_path, str(missing_model), data={"train_file": str(tmp_path / "gone.jsonl")})
    assert main(["doctor", "--config", str(config)]) == 1
    found = lines_of(capsys.readouterr().out)
    assert found["train file"].startswith("fail") and str(tmp_path / "gone.jsonl") in found["train file"]
    assert found["model"].startswith("fail") and f"{missing_model} does not exist" in found["model"]


def test_a_hub_id_outside_the_cache_warns_online_and_fails_offline(config_only, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv(KEY_ENV, SECRET)
    config = str(write_config(tmp_path, "nobody-here/no-such-model"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    assert main(["doctor", "--config", config]) == 0
    out = capsys.readouterr().out
    assert lines_of(out)["model"].startswith("warn") and "not in the local Hugging Face cache" in out
    assert "hf download nobody-here/no-such-model" in out
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert main(["doctor", "--config", config]) == 1
    assert lines_of(capsys.readouterr().out)["model"].startswith("fail")


def test_an_invalid_config_and_an_unwritable_output_dir_fail(config_only, tmp_path, tiny_model_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        yaml.safe_dump({"model": {"base_model": "x"}, "data": {"train_file": "t"}, "training": {"learning_rate": -1}})
    )
    assert main(["doctor", "--config", str(bad)]) == 1
    assert "training.learning_rate" in lines_of(capsys.readouterr().out)["config"]
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    config = write_config(
        tmp_path, str(tiny_model_path), output_dir=str(blocker / "run"), teacher={"provider": "none"}, rewards={}
    )
    assert main(["doctor", "--config", str(config)]) == 1
    found = lines_of(capsys.readouterr().out)
    assert found["output dir"].startswith("fail") and f"{blocker} is a file" in found["output dir"]
    assert found["teacher"].startswith("ok") and "teacher key" not in found


ISOLATED = {"mode": "namespaces", "network_isolated": True, "fs_readonly": True}


@pytest.fixture
def this_machine(monkeypatch):
    """The machine's probes answer fixed values: torch with one GPU, no MLX, a fully isolated sandbox."""
    from rlaif_mlx.backends import formats
    from rlaif_mlx.rewards import sandbox

    monkeypatch.setattr(doctor.backends, "frameworks_installed", lambda name: name == "torch")
    monkeypatch.setattr(formats, "torch_devices", lambda: ["cuda:0 NVIDIA H100"])
    monkeypatch.setattr(sandbox, "sandbox_capabilities", lambda: dict(ISOLATED))
    return sandbox


def test_machine_checks_report_backends_versions_and_sandbox(this_machine, capsys):
    assert main(["doctor"]) == 0  # MLX missing is a warning while torch can train
    found = lines_of(capsys.readouterr().out)
    assert {"python", "system", "backend torch", "devices torch", "backend mlx", "anthropic", "openai", "rich"} | {
        "sandbox"
    } == set(found)
    assert found["backend torch"].startswith("ok") and "transformers" in found["backend torch"]
    assert found["devices torch"].split() == ["ok", "devices", "torch", "cuda:0", "NVIDIA", "H100"]
    assert found["backend mlx"].startswith("warn") and "not installed" in found["backend mlx"]
    assert found["sandbox"].split("  ")[-1] == "namespaces (network isolated: True, read-only outside its folder: True)"


def test_a_sandbox_that_cannot_start_is_a_failed_check(this_machine, monkeypatch, capsys):
    def cannot_start():
        raise PermissionError("[Errno 13] Permission denied: 'unshare'")

    monkeypatch.setattr(this_machine, "sandbox_capabilities", cannot_start)
    assert main(["doctor"]) == 1
    line = lines_of(capsys.readouterr().out)["sandbox"]
    assert line.startswith("fail") and "cannot start the sandbox: [Errno 13] Permission denied" in line

    def broken():  # a bug in the probe is not "cannot start": it propagates
        raise TypeError("unexpected keyword")

    monkeypatch.setattr(this_machine, "sandbox_capabilities", broken)
    with pytest.raises(TypeError):
        doctor.environment_checks()


def test_a_missing_or_broken_framework_is_reported_not_raised(monkeypatch):
    real = doctor.backends.frameworks_installed
    monkeypatch.setattr(doctor.backends, "frameworks_installed", lambda name: name != "mlx" and real(name))
    checks = {c.name: c for c in doctor.environment_checks()}
    assert checks["backend mlx"].status == "warn" and checks["backend mlx"].detail == "not installed"
    assert "pip install 'rlaif-mlx[mlx]'" in checks["backend mlx"].fix
    assert "devices mlx" not in checks  # never imported

    monkeypatch.setattr(doctor.backends, "frameworks_installed", lambda name: True)
    monkeypatch.setitem(sys.modules, "mlx.core", None)  # any import of it now raises ImportError
    monkeypatch.setitem(sys.modules, "torch", None)
    checks = {c.name: c for c in doctor.environment_checks()}
    for name in ("torch", "mlx"):
        assert checks[f"devices {name}"].status == "fail"
        assert f"{name} does not import" in checks[f"devices {name}"].detail

    monkeypatch.setattr(doctor.backends, "frameworks_installed", lambda name: False)
    checks = {c.name: c for c in doctor.environment_checks()}
    assert checks["backend torch"].status == checks["backend mlx"].status == "fail"  # nothing to train with


def test_rich_table_on_a_terminal():
    stream = io.StringIO()
    checks = [doctor.Check("teacher key", "fail", f"{KEY_ENV} is not set", f"export {KEY_ENV}=...")]
    doctor.render(checks, stream=stream, table=True)
    out = stream.getvalue()
    assert "rlaif-mlx doctor" in out and "teacher key" in out and "fail" in out
    assert out.rstrip().endswith("0 ok, 0 warning(s), 1 failed")


def test_tasks_whose_tests_cannot_grade_are_reported(config_only, tmp_path, tiny_model_path, monkeypatch, capsys):
    monkeypatch.setenv(KEY_ENV, SECRET)
    config = write_config(tmp_path, str(tiny_model_path))
    tasks = tmp_path / "tasks.jsonl"
    good = {"id": "ok", "prompt": "Write f(x).", "entry_point": "f", "tests": "assert f(1) == 1"}
    tasks.write_text(json.dumps(good) + "\n" + json.dumps({"id": "bad", "prompt": "p", "tests": "x = 1"}) + "\n")
    assert main(["doctor", "--config", str(config)]) == 1
    line = lines_of(capsys.readouterr().out)["train file"]
    assert line.startswith("fail") and f"{tasks}:2: tests: tests contain no assert" in line

    data = yaml.safe_load(config.read_text())
    data["data"]["on_bad_line"] = "skip"
    config.write_text(yaml.safe_dump(data))
    assert main(["doctor", "--config", str(config)]) == 0
    line = lines_of(capsys.readouterr().out)["train file"]
    assert line.startswith("warn") and "1 bad line(s) skipped" in line and f"{tasks}:2:" in line
