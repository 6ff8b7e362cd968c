"""``rlaif-mlx doctor``: what is installed here and whether a run's config can start, each with its fix.

Every check is an ok / warn / fail line with a one-line fix. Frameworks are
imported one at a time inside ``try``, so a broken install is reported, not
raised. Nothing is written, nothing goes over the network, and a teacher key
is only ever reported as set or not set: never its value or length.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import os
import platform
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from .. import backends
from ..backends import INSTALL_COMMANDS  # the pip command per backend, as backend errors phrase it
from .common import first_line

OK, WARN, FAIL = "ok", "warn", "fail"
MIN_PYTHON = (3, 10)
_PACKAGES = {"torch": ("torch", "transformers", "peft"), "mlx": ("mlx", "mlx-lm")}
# Debian / Ubuntu's path, as in the README (x86_64 or aarch64).
_OPENBLAS = f"/usr/lib/{platform.machine()}-linux-gnu/openblas-pthread/libopenblas.so.0"


@dataclass(frozen=True)
class Check:
    """One line of the report.

    Attributes:
        name: what was checked, e.g. ``"backend torch"``.
        status: ``"ok"``, ``"warn"`` or ``"fail"``.
        detail: what was found.
        fix: what to do about it (empty when nothing needs doing).
    """

    name: str
    status: str
    detail: str
    fix: str = ""


def run_checks(config_path: str | None = None) -> list[Check]:
    """The machine's checks, then (with a config) the run's."""
    checks = environment_checks()
    if config_path is not None:
        checks += config_checks(config_path)
    return checks


def environment_checks() -> list[Check]:
    """Python, each backend with its versions and devices, the teacher SDKs, rich and the sandbox."""
    version = ".".join(map(str, sys.version_info[:3]))
    checks = [
        Check("python", OK, f"{version} ({sys.executable})")
        if sys.version_info >= MIN_PYTHON
        else Check("python", FAIL, f"{version} is too old", f"use Python {'.'.join(map(str, MIN_PYTHON))} or newer")
    ]
    checks.append(Check("system", OK, f"{platform.system()} {platform.machine()}, {os.cpu_count()} CPUs"))
    installed = {name: backends.frameworks_installed(name) for name in _PACKAGES}
    for name, present in installed.items():
        if not present:
            # Only a fail when neither backend is usable: one is enough to train.
            status = WARN if any(installed.values()) else FAIL
            checks.append(Check(f"backend {name}", status, "not installed", INSTALL_COMMANDS[name]))
            continue
        checks.append(Check(f"backend {name}", OK, _versions(_PACKAGES[name])))
        checks += _torch_devices() if name == "torch" else _mlx_devices()
    for package, needed_for in (
        ("anthropic", "teacher.provider anthropic"),
        ("openai", "teacher.provider openai / openai_compatible"),
        ("rich", "the live dashboard and this table"),
    ):
        found = _version(package)
        checks.append(
            Check(package, OK, found)
            if found
            else Check(package, WARN, f"not installed (needed for {needed_for})", f"pip install {package}")
        )
    checks.append(_sandbox())
    return checks


def config_checks(path: str) -> list[Check]:
    """The config validates; its model, data, teacher key and folders are usable here."""
    from ..config import ConfigError, load_config

    notes: list[str] = []
    try:
        config = load_config(path, on_note=notes.append)
    except ConfigError as exc:  # every problem of the file, one line each
        fix = "fix the key the message names (configs/ has working examples)"
        return [Check("config", FAIL, line, fix) for line in str(exc).splitlines()]
    checks = [Check("config", OK, f"{path} is valid")]
    if notes:
        checks.append(
            Check(
                "config layout",
                WARN,
                "written for the original mlx-rlaif tool; its keys are read under this project's names",
                f"rlaif-mlx migrate-config {path} > NEW.yaml (it lists each key's new home)",
            )
        )
    try:
        resolved = backends.resolve_backend_name(config.backend)
        checks.append(Check("config backend", OK, f"{config.backend} -> {resolved}"))
    except backends.BackendUnavailable as exc:
        checks.append(Check("config backend", FAIL, str(exc), "install it, or set backend: auto"))
    checks.append(_model(config.model))
    checks += _memory_plan(config)
    checks.append(_tasks("train file", config.data.train_file, config.data.on_bad_line))
    if config.data.eval_file:
        checks.append(_tasks("eval file", config.data.eval_file, config.data.on_bad_line))
    checks += _teacher(config.teacher)
    checks.append(_writable("output dir", Path(config.output_dir), "output_dir"))
    return checks


def render(checks: list[Check], *, stream: IO[str] | None = None, table: bool | None = None) -> None:
    """Prints the report: a rich table on a terminal, plain lines otherwise.

    Args:
        checks: the report's lines.
        stream: where to print (default stdout).
        table: force (True) or refuse (False) the rich table; None decides by ``isatty``.
    """
    stream = stream or sys.stdout
    if table is None:
        table = stream.isatty()
    counts = {s: sum(c.status == s for c in checks) for s in (OK, WARN, FAIL)}
    summary = f"{counts[OK]} ok, {counts[WARN]} warning(s), {counts[FAIL]} failed"
    if table:
        try:
            from rich.console import Console
            from rich.table import Table
        except ImportError:
            table = False  # no rich: fall back to plain lines
    if table:
        colours = {OK: "green", WARN: "yellow", FAIL: "bold red"}
        grid = Table(title="rlaif-mlx doctor", title_justify="left")
        grid.add_column("", no_wrap=True)
        grid.add_column("check", no_wrap=True)
        for column in ("found", "fix"):  # folded, never cut with an ellipsis: paths and commands stay whole
            grid.add_column(column, overflow="fold")
        for c in checks:
            grid.add_row(f"[{colours[c.status]}]{c.status}[/]", c.name, c.detail, c.fix, end_section=False)
        console = Console(file=stream, highlight=False)
        console.print(grid, markup=True)
        console.print(summary, markup=False)
        return
    width = max(len(c.name) for c in checks)
    for c in checks:
        print(f"{c.status:<4}  {c.name:<{width}}  {c.detail}", file=stream)
        if c.fix:
            print(f"{'':<4}  {'':<{width}}  fix: {c.fix}", file=stream)
    print(summary, file=stream)


def add_parser(sub: argparse._SubParsersAction) -> None:
    doctor = sub.add_parser(
        "doctor",
        help="check this machine (backends, devices, versions) and, with --config, a run's model, data, "
        "teacher key and folders",
    )
    doctor.add_argument("--config", help="a run config to check as well")
    doctor.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """Runs ``rlaif-mlx doctor``: 0 when no check failed, 1 otherwise."""
    checks = run_checks(args.config)
    render(checks)
    return 1 if any(c.status == FAIL for c in checks) else 0


# ---------------------------------------------------------------- the machine


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def _versions(packages: tuple[str, ...]) -> str:
    return ", ".join(f"{p} {_version(p) or '(missing)'}" for p in packages)


def _torch_devices() -> list[Check]:
    from ..backends.formats import torch_devices

    try:
        found = torch_devices()
    except (ImportError, OSError, RuntimeError) as exc:  # a broken wheel: a missing library, a bad build
        return [
            Check(
                "devices torch",
                FAIL,
                f"torch does not import: {first_line(exc)}",
                f"reinstall it: {INSTALL_COMMANDS['torch']}",
            )
        ]
    return [Check("devices torch", OK, ", ".join(found) or "cpu only (no CUDA, no MPS)")]


def _mlx_devices() -> list[Check]:
    from ..backends.formats import mlx_device

    try:
        device, metal = mlx_device()
    except (ImportError, OSError, RuntimeError) as exc:  # e.g. a missing shared library
        return [
            Check(
                "devices mlx",
                FAIL,
                f"mlx does not import: {first_line(exc)}",
                f"reinstall it: {INSTALL_COMMANDS['mlx']}",
            )
        ]
    metal_state = "available" if metal else "not available"
    checks = [Check("devices mlx", OK, f"default {device}; Metal {metal_state}")]
    if sys.platform.startswith("linux") and not metal and not _openblas_loaded():
        checks.append(
            Check(
                "mlx blas",
                WARN,
                "MLX on a Linux CPU with the wheel's bundled BLAS is several times slower",
                f"sudo apt-get install libopenblas0-pthread, then run with LD_PRELOAD={_OPENBLAS}",
            )
        )
    return checks


def _openblas_loaded() -> bool:
    """Whether OpenBLAS is preloaded (named in LD_PRELOAD, or mapped into this process)."""
    if "openblas" in os.environ.get("LD_PRELOAD", "").lower():
        return True
    try:
        return "libopenblas" in Path("/proc/self/maps").read_text()
    except OSError:
        return False


def _sandbox() -> Check:
    from ..rewards.sandbox import sandbox_capabilities

    try:
        caps = sandbox_capabilities()
    except (OSError, subprocess.SubprocessError) as exc:  # probing starts subprocesses in temp folders
        return Check(
            "sandbox",
            FAIL,
            f"cannot start the sandbox: {first_line(exc)}",
            "check that this Python can start subprocesses",
        )
    detail = (
        f"{caps['mode']} (network isolated: {caps['network_isolated']}, "
        f"read-only outside its folder: {caps['fs_readonly']})"
    )
    if caps["network_isolated"] and caps["fs_readonly"]:
        return Check("sandbox", OK, detail)
    if sys.platform.startswith("linux"):
        fix = "install util-linux's unshare and allow user namespaces (sysctl kernel.unprivileged_userns_clone=1)"
    else:
        fix = "run training inside a container or VM: generated code runs with limits only"
    return Check("sandbox", WARN, detail, fix)


# ---------------------------------------------------------------- the config


def _model(model) -> Check:
    from ..training.preflight import check_model_path

    return _check("model", check_model_path(model.base_model, build_tiny=model.build_tiny_if_missing))


def _check(name: str, found) -> Check:
    """A ``preflight.Finding`` as a line of the report."""
    return Check(name, WARN if found.warn else OK if found.ok else FAIL, found.detail, found.fix)


def _memory_plan(config) -> list[Check]:
    """The run's memory plan, phase by phase, against this machine's device (``training/memory_fit.py``)."""
    from ..training.memory_fit import report, size_run, task_prompts

    sizing = size_run(config, prompts=task_prompts(config))
    if isinstance(sizing, str):
        return [Check("memory plan", WARN, f"not made: {sizing}", "run doctor again once the model is downloaded")]
    return [Check(name, OK if fits else FAIL, found, fix) for name, fits, found, fix in report(sizing, config)]


def _tasks(name: str, file: str, on_bad_line: str) -> Check:
    from ..data.tasks import DataError, load_tasks, resolve_data_path

    key = f"data.{name.replace(' ', '_')}"
    try:
        tasks = load_tasks(file, on_bad_line=on_bad_line)
    except DataError as exc:
        if ": tests: " in str(exc) or ": entry_point" in str(exc):
            return Check(name, FAIL, str(exc), "fix that task's tests, or set data.on_bad_line: skip to leave it out")
        return Check(name, FAIL, str(exc), f"point {key} at a readable JSONL task file")
    count = len(tasks.tasks)
    found = f"{resolve_data_path(file)}: {count} task{'' if count == 1 else 's'}"
    if tasks.problems:
        more = f" (+{len(tasks.problems) - 1} more)" if len(tasks.problems) > 1 else ""
        return Check(
            name,
            WARN,
            f"{found}, {tasks.skipped_lines} bad line(s) skipped: {tasks.problems[0]}{more}",
            "fix those lines to train on them (data.on_bad_line: skip leaves them out)",
        )
    return Check(name, OK, found)


def _teacher(teacher) -> list[Check]:
    from ..teachers.providers import DEFAULT_KEY_ENV

    if teacher.provider == "none":
        return [Check("teacher", OK, "none (offline graders only)")]
    checks = [Check("teacher", OK, f"{teacher.provider} {teacher.model}")]
    env = teacher.api_key_env or DEFAULT_KEY_ENV[teacher.provider]
    # Whether the variable is set is all that is read: its value is never printed, logged or measured.
    if env is None:
        checks.append(Check("teacher key", OK, "none needed (local server, teacher.api_key_env not set)"))
    elif os.environ.get(env):
        checks.append(Check("teacher key", OK, f"{env} is set"))
    elif teacher.provider == "openai_compatible":
        checks.append(
            Check(
                "teacher key",
                WARN,
                f"{env} is not set; the server gets a placeholder key",
                f"export {env}=... if the server needs a key",
            )
        )
    else:
        checks.append(Check("teacher key", FAIL, f"{env} is not set", f"export {env}=... (your API key)"))
    if teacher.cache_path:
        checks.append(
            _writable("teacher cache", Path(teacher.cache_path).expanduser(), "teacher.cache_path", file=True)
        )
    return checks


def _writable(name: str, path: Path, key: str, *, file: bool = False) -> Check:
    """Whether ``path`` (a folder, or a file with ``file``) can be created or written, without writing."""
    from ..training.preflight import check_writable

    return _check(name, check_writable(path, key, file=file))
