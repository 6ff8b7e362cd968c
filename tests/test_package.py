"""The package imports and helps without any framework; a missing backend says how to install it."""

import subprocess
import sys
import textwrap

from rlaif_mlx.cli import main

# Run Python with torch, mlx, transformers and peft made unimportable.
BLOCK = textwrap.dedent("""
    import sys, importlib.abc
    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in {"torch", "mlx", "mlx_lm", "transformers", "peft"}:
                raise ModuleNotFoundError(f"No module named {name!r}", name=name)
    sys.meta_path.insert(0, Block())
""")


def run_blocked(code: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", BLOCK + textwrap.dedent(code)], capture_output=True, text=True, timeout=600
    )


def test_import_and_help_without_frameworks():
    result = run_blocked("""
        import rlaif_mlx, rlaif_mlx.config, rlaif_mlx.rewards.pipeline
        import rlaif_mlx.training.setup, rlaif_mlx.training.trainer
        import rlaif_mlx.teachers.judge, rlaif_mlx.teachers.providers
        from rlaif_mlx.cli import main
        assert not any(m.split(".")[0] in {"torch", "mlx", "transformers"} for m in sys.modules)
        assert not any(m.split(".")[0] in {"anthropic", "openai"} for m in sys.modules)  # SDKs: when a client is built
        try:
            main(["--help"])
        except SystemExit as e:
            assert e.code == 0
    """)
    assert result.returncode == 0, result.stderr
    assert "train" in result.stdout and "init-model" in result.stdout


def test_missing_backend_names_the_pip_command():
    result = run_blocked("""
        from rlaif_mlx.backends import BackendUnavailable, create_backend
        import importlib.util
        real_find_spec = importlib.util.find_spec
        importlib.util.find_spec = lambda name, *a: real_find_spec(name, *a) if name.startswith("rlaif_mlx") else None
        for name in ("torch", "mlx", "auto"):
            try:
                create_backend(name, None, None, seed=0, total_steps=1)
            except BackendUnavailable as exc:
                print(exc)
    """)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert "pip install 'rlaif-mlx[torch]'" in lines[0]
    assert "pip install 'rlaif-mlx[mlx]'" in lines[1]
    assert "no backend is installed" in lines[2]


def test_init_model_command(tmp_path, capsys):
    target = tmp_path / "tiny"
    assert main(["init-model", str(target)]) == 0
    assert (target / "config.json").exists() and (target / "tokenizer.json").exists()
    assert main(["init-model", str(target)]) == 2  # refuses to overwrite without --force
    assert "already holds a model" in capsys.readouterr().err
