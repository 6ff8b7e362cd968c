"""The teacher through the command line: secrets, the budget stop, ``rlaif-mlx score``, real configs,
and a real OpenAI-compatible server (``mlx_lm.server`` serving the tiny model).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from rlaif_mlx.cli import main
from rlaif_mlx.config import TeacherConfig, load_config
from rlaif_mlx.monitor.metrics import read_metrics

SECRET = "sk-ant-test-SECRET-7f3a9c0d"
ENV_CHECK = "import os\nassert not any('SECRET' in v for v in os.environ.values())\n"
TASKS = [
    {
        "id": "add",
        "prompt": "Write add(a, b).",
        "reference": "def add(a, b):\n    return a + b\n",
        "tests": ENV_CHECK + "assert add(1, 2) == 3\nassert add(2, 2) == 4",
    },
    {
        "id": "neg",
        "prompt": "Write neg(x).",
        "reference": "def neg(x):\n    return -x\n",
        "tests": ENV_CHECK + "assert neg(1) == -1",
    },
]


def write_run(tmp_path: Path, model: Path, server, **teacher) -> Path:
    tasks = tmp_path / "tasks.jsonl"
    tasks.write_text("".join(json.dumps(t) + "\n" for t in TASKS))
    config = {
        "seed": 0,
        "backend": "torch",
        "output_dir": str(tmp_path / "run"),
        "model": {"base_model": str(model), "lora_r": 4},
        "data": {"train_file": str(tasks)},
        "training": {"max_steps": 3, "batch_size": 2, "micro_batch_size": 4, "learning_rate": 1e-3, "save_steps": 1},
        "rlaif": {"num_samples_per_prompt": 2, "max_new_tokens": 8},
        "rewards": {"weights": {"parses": 0.2, "tests": 0.5, "teacher": 0.3}, "test_timeout_s": 5},
        "teacher": {
            "provider": "anthropic",
            "model": "claude-sonnet-5-5",
            "base_url": server.url,
            "api_key_env": "RLAIF_TEST_KEY",
            "max_retries": 0,
            "gate": "always",
            "cache_path": str(tmp_path / "cache.sqlite"),
        }
        | teacher,
    }
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_the_key_never_leaves_the_environment(llm_server, tiny_model_path, tmp_path, monkeypatch, capsys, caplog):
    monkeypatch.setenv("RLAIF_TEST_KEY", SECRET)
    config = write_run(tmp_path, tiny_model_path, llm_server)
    assert main(["train", "--config", str(config)]) == 0
    assert all(r.headers.get("authorization") == f"Bearer {SECRET}" for r in llm_server.requests)  # it was used
    records = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert sum(r["teacher/calls"] for r in records) == llm_server.count() == 3 * 2 * 2

    completions = tmp_path / "completions.jsonl"
    completions.write_text(json.dumps({"task_id": "add", "completion": "def add(a, b):\n    return a + b"}) + "\n")
    out = tmp_path / "scored.jsonl"
    assert main(["score", "--config", str(config), "--completions", str(completions), "--out", str(out)]) == 0
    scored = json.loads(out.read_text())
    assert scored["tests"] == 1.0  # the env check inside the sandbox passed: the key is not in its environment

    captured = capsys.readouterr()
    for text in (captured.out, captured.err, caplog.text):
        assert SECRET not in text
    written = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert any(p.name == "cache.sqlite" for p in written) and any(p.name == "trainer_state.json" for p in written)
    for path in written:
        assert SECRET.encode() not in path.read_bytes(), path


def test_a_missing_key_is_one_line_naming_the_variable(llm_server, tiny_model_path, tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("RLAIF_TEST_KEY", raising=False)
    config = write_run(tmp_path, tiny_model_path, llm_server)
    assert main(["train", "--config", str(config)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"error: {config}: teacher.api_key_env: environment variable RLAIF_TEST_KEY is not set"
    assert llm_server.count() == 0


def test_the_budget_stops_the_run_with_a_checkpoint_and_resume_continues(
    llm_server, tiny_model_path, tmp_path, monkeypatch, capsys
):
    monkeypatch.setenv("RLAIF_TEST_KEY", "k")
    # 600 + 150 tokens at $1000 / Mtok: $0.75 a judgement, $3.00 a step (4 samples): a 2nd step would pass $5
    llm_server.input_tokens, llm_server.output_tokens = 600, 150
    config = write_run(tmp_path, tiny_model_path, llm_server, prices={"input": 1000, "output": 1000}, budget_usd=5.0)
    assert main(["train", "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert "stopped at step 1: teacher budget reached: $3.00 spent of $5.00" in err and "--resume" in err
    state = json.loads((tmp_path / "run" / "checkpoints" / "step-000001" / "trainer_state.json").read_text())
    assert state["teacher"]["ledger"]["spent_usd"] == pytest.approx(3.0)
    assert llm_server.count() == 4

    raised = tmp_path / "raised.yaml"
    raw = yaml.safe_load(config.read_text())
    raw["teacher"]["budget_usd"] = 20.0
    raised.write_text(yaml.safe_dump(raw))
    assert main(["train", "--config", str(raised), "--resume"]) == 0
    records = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2, 3]
    assert llm_server.count() == 12
    assert records[-1]["teacher/spent_usd"] == pytest.approx(9.0)  # counted across the stop


def test_score_writes_one_line_per_completion(llm_server, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("RLAIF_TEST_KEY", "k")
    config = write_run(tmp_path, Path("unused-model"), llm_server, gate="parses")
    lines = [
        {"task_id": "add", "completion": "```python\ndef add(a, b):\n    return a + b\n```"},
        {"task_id": "neg", "completion": "def neg(x) return"},
        {"task_id": "add", "completion": "def add(a, b):\n    return a * b"},
    ]
    completions = tmp_path / "completions.jsonl"
    completions.write_text("".join(json.dumps(x) + "\n" for x in lines))
    assert main(["score", "--config", str(config), "--completions", str(completions)]) == 0
    captured = capsys.readouterr()
    rows = [json.loads(line) for line in captured.out.splitlines()]
    assert [r["task_id"] for r in rows] == ["add", "neg", "add"]
    assert rows[0]["tests"] == 1.0 and rows[0]["teacher"] > 0 and rows[0]["error"] is None
    assert rows[1]["parses"] == 0.0 and rows[1]["teacher"] == 0.0  # gated: no call
    assert rows[2]["tests"] == pytest.approx(2 / 3) and rows[2]["reward"] < rows[0]["reward"]  # env check + 1 of 2
    assert llm_server.count() == 2
    assert "scored 3 of 3 completions" in captured.err

    llm_server.answer = lambda request: "cannot say"
    lines.append({"task_id": "neg", "completion": "def neg(x):\n    return 0 - x"})
    completions.write_text("".join(json.dumps(x) + "\n" for x in lines))
    assert (
        main(
            ["score", "--config", str(config), "--completions", str(completions), "--out", str(tmp_path / "out.jsonl")]
        )
        == 0
    )
    again = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert llm_server.count() == 3  # only the new completion was asked: the others came from the cache
    assert [r["reward"] for r in again[:3]] == [r["reward"] for r in rows]
    assert again[3]["reward"] is None and "unparseable" in again[3]["error"]  # left unscored, not 0
    completions.write_text(json.dumps({"task_id": "nope", "completion": "x"}) + "\n")
    assert main(["score", "--config", str(config), "--completions", str(completions)]) == 2
    assert f"{completions}:1: task_id 'nope' is not in the task set" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["laptop", "cuda-server"])
def test_the_real_world_configs_load(name):
    config = load_config(Path("configs") / f"{name}.yaml")
    assert config.teacher.provider == "anthropic" and config.rewards.weights["teacher"] > 0
    assert config.backend == ("mlx" if name == "laptop" else "torch")
    assert config.model.base_model.startswith("Qwen/Qwen2.5-Coder-")


def test_both_real_world_configs_use_the_same_keys():
    def keys(tree, prefix=""):
        out = set()
        for k, v in tree.items():
            out |= keys(v, f"{prefix}{k}.") if isinstance(v, dict) else {prefix + k}
        return out

    laptop, server = (yaml.safe_load((Path("configs") / f"{n}.yaml").read_text()) for n in ("laptop", "cuda-server"))
    assert keys(laptop) == keys(server)


# ------------------------------------------------ a real OpenAI-compatible server


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def mlx_server(tiny_model_path):
    pytest.importorskip("mlx_lm")
    port = _free_port()
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mlx_lm.server",
            "--model",
            str(tiny_model_path),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env=os.environ | {"HF_HUB_OFFLINE": "1"},
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            urllib.request.urlopen(f"{url}/v1/models", timeout=1).read()
            break
        except OSError:
            if process.poll() is not None or time.monotonic() > deadline:
                process.kill()
                pytest.fail(f"mlx_lm.server did not start: {process.stderr.read().decode()[-2000:]}")
            time.sleep(0.3)
    yield f"{url}/v1"
    process.terminate()
    process.wait(timeout=10)


def test_a_local_mlx_lm_server_as_judge(mlx_server, tiny_model_path, tmp_path):
    """The tiny model's answers are nonsense: every judgement is unparseable, counted, and nothing crashes."""
    from rlaif_mlx.teachers.base import JudgeRequest
    from rlaif_mlx.teachers.judge import Teacher

    config = TeacherConfig(
        provider="openai_compatible",
        model=str(tiny_model_path),
        base_url=mlx_server,
        max_tokens=16,
        timeout_s=30,
        max_retries=0,
        cache_path=str(tmp_path / "c.sqlite"),
    )
    teacher = Teacher(config)
    requests = [
        JudgeRequest(uid=f"u{i}", prompt="Write add(a, b).", completion=f"def add(a, b): return a + {i}")
        for i in range(3)
    ]
    got = teacher.judge(requests)
    teacher.close()
    assert set(got) == {"u0", "u1", "u2"}
    assert all(j.score is None and j.error.startswith("unparseable answer") for j in got.values()), got
    assert teacher.last_batch.calls == 3 and teacher.last_batch.unparseable == 3
    assert teacher.ledger.input_tokens > 0  # mlx_lm.server reports usage, and it was counted
