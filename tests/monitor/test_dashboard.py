"""The live dashboard on a recording console: what it shows, what it survives, when it is chosen.

No model: the step records are built by hand with the keys ``Trainer.record``
and ``BatchStats.metrics`` write.
"""

from __future__ import annotations

import io

import pytest
from rich.console import Console

from rlaif_mlx.monitor.dashboard import Dashboard, make_reporter, render_frame
from rlaif_mlx.monitor.panels import sparkline
from rlaif_mlx.monitor.reporting import PlainReporter, RunHeader, SampleView

HEADER = RunHeader(
    model="models/tiny-qwen2", backend="torch", device="cpu", total_steps=60, output_dir="runs/quickstart"
)
TEACHER_HEADER = RunHeader(
    model="Qwen/Qwen2.5-Coder-1.5B-Instruct",
    backend="mlx",
    device="gpu",
    total_steps=500,
    output_dir="runs/laptop",
    teacher="anthropic/claude-sonnet-5-5",
    budget_usd=10.0,
)
BEST = SampleView(
    "clamp",
    "Write clamp(x, lo, hi).",
    "def clamp(x, lo, hi):\n    if x < lo:\n        return lo\n    return min(x, hi)\n",
    "python",
    1.0,
    {"has_code": 1.0, "parses": 1.0, "tests": 1.0},
)
WORST = SampleView(
    "is_palindrome",
    "Write is_palindrome(s).",
    "def is_palindrome(s):\n    return s == s[1:-1]\n",
    "python",
    0.1,
    {"has_code": 1.0, "parses": 1.0, "tests": 0.0},
    "AssertionError: assert is_palindrome('abba')",
)


def record(step: int, reward: float = 0.55, **overrides) -> dict:
    """One step's metrics line, as ``Trainer.record`` writes it."""
    rec = {
        "step": step,
        "epoch": 2,
        "reward_mean": reward,
        "reward_std": 0.44,
        "reward/has_code": 1.0,
        "reward/parses": 0.97,
        "reward/tests": reward - 0.08,
        "kl": 0.0712,
        "kl_coef": 0.025,
        "loss": -0.5444,
        "pg_loss": -0.55,
        "grad_norm": 0.064,
        "lr": 3.58e-4,
        "clip_fraction": 0.0,
        "completion_len_mean": 33.0,
        "scoring_errors": 0,
        "zero_variance_groups": 4,
        "unscored": 0,
        "advantage_abs_mean": 0.41,
        "update_skipped": 0,
        "curriculum_bucket": 1,
        "sample_seconds": 0.3,
        "score_seconds": 1.4,
        "train_seconds": 0.4,
        "step_seconds": 2.1,
        "tokens_per_second": 7040.0,
    }
    return rec | overrides


def teacher_keys(step: int) -> dict:
    """The ``teacher/*`` keys of ``BatchStats.metrics``."""
    return {
        "teacher/requests": 64.0,
        "teacher/calls": 41.0,
        "teacher/cache_hits": 23.0,
        "teacher/cache_hit_rate": 23 / 64,
        "teacher/failures": 2.0,
        "teacher/latency_p50_s": 1.84,
        "teacher/latency_p95_s": 3.9,
        "teacher/cost_usd": 0.1353,
        "teacher/spent_usd": 0.1353 * step,
    }


@pytest.fixture(autouse=True)
def plain_terminal_env(monkeypatch):
    """A capable terminal whatever the machine running the tests says (CI often sets TERM=dumb)."""
    monkeypatch.setenv("TERM", "xterm-256color")
    for name in ("TTY_INTERACTIVE", "TTY_COMPATIBLE", "FORCE_COLOR"):
        monkeypatch.delenv(name, raising=False)


def terminal() -> Console:
    return Console(file=io.StringIO(), force_terminal=True, width=120, height=60, record=True)


def screen(dash: Dashboard, width: int = 120) -> str:
    """The dashboard's current frame as plain text."""
    console = Console(file=io.StringIO(), width=width, height=60, color_system=None)
    console.print(dash.frame())
    return console.file.getvalue()


def trend_line(text: str) -> str:
    line = next(line for line in text.splitlines() if "│ trend" in line)
    return line.split("trend", 1)[1].split()[0]


def test_sparkline_scales_between_min_and_max():
    assert sparkline([0.0, 0.5, 1.0]) == "▁▅█"
    assert sparkline([3.0, 2.0, 1.0]) == "█▅▁"
    assert sparkline([0.2, 0.2]) == "▄▄"  # flat: mid-height, not empty
    assert sparkline([0.0, float("nan"), None, 1.0]) == "▁  █"
    assert sparkline(range(100), width=5) == "▁▃▅▆█"  # only the latest values
    assert sparkline([]) == "" and sparkline([float("nan")]) == " "


def test_dashboard_draws_the_run_on_a_terminal():
    console = terminal()
    dash = Dashboard(console)  # the default: auto refresh at 4 per second
    dash.message("warm-up 10/110  nll/token 4.187")  # before start: shown once the run starts
    dash.start(HEADER)
    try:
        for step in range(1, 6):
            dash.step(record(step, reward=0.3 + 0.05 * step), best=BEST, worst=WORST)
        dash.message("saved checkpoint runs/quickstart/checkpoints/step-000005")
        frame = screen(dash)
    finally:
        dash.close()
    for text in (frame, console.export_text()):  # the frame, and what reached the terminal
        assert "models/tiny-qwen2" in text and "backend torch" in text and "device cpu" in text
        assert "runs/quickstart" in text and "step 5/60" in text and "ETA" in text
        assert "0.550 ± 0.440" in text
        assert "warm-up 10/110" in text and "step-000005" in text
    assert "KL          0.0712" in frame and "β (KL coef) 0.025" in frame
    assert "loss" in frame and "-0.5444" in frame and "3.58e-04" in frame
    assert "sample   0.3 s  14%" in frame and "score    1.4 s  67%" in frame and "train    0.4 s  19%" in frame
    assert "tokens/s 7,040" in frame
    assert "has_code 1.000" in frame and "tests    0.470" in frame
    assert "curriculum bucket 1" in frame and "scoring errors 0" in frame
    assert "best reward 1.00 · task clamp" in frame and "def clamp(x, lo, hi):" in frame
    assert "worst reward 0.10 · task is_palindrome" in frame and "return s == s[1:-1]" in frame
    assert "AssertionError: assert is_palindrome('abba')" in frame and "tests 0.00" in frame
    assert "teacher" not in frame.replace("(teacher", "") and "budget" not in frame  # no teacher, no panel
    trend = trend_line(frame)
    assert len(trend) == 5 and trend[0] == "▁" and trend[-1] == "█"  # one bar per step, lowest to highest


def test_sparkline_follows_the_rewards():
    rising = render_frame(HEADER, [record(s, reward=0.1 * s) for s in range(1, 8)], BEST, WORST, [], width=120)
    falling = render_frame(HEADER, [record(s, reward=1 - 0.1 * s) for s in range(1, 8)], BEST, WORST, [], width=120)
    assert trend_line(rising)[0] == "▁" and trend_line(rising)[-1] == "█"
    assert trend_line(falling)[0] == "█" and trend_line(falling)[-1] == "▁"


def test_teacher_panel_shows_calls_cache_latency_and_spend_against_budget():
    records = [record(s) | teacher_keys(s) for s in range(1, 11)]
    text = render_frame(TEACHER_HEADER, records, BEST, WORST, [], width=120)
    assert "teacher anthropic/claude-sonnet-5-5" in text
    assert "calls 41" in text and "cache hits 36%" in text and "failures 2" in text
    assert "latency p50 1.84 s" in text and "p95 3.90 s" in text
    assert "spent $1.35 of $10.00 budget" in text and "14%" in text
    no_budget = RunHeader(**(TEACHER_HEADER.__dict__ | {"budget_usd": None}))
    assert "spent $1.35 (no budget set)" in render_frame(no_budget, records, BEST, WORST, [])


def test_survives_nan_missing_keys_and_no_samples():
    console = terminal()
    dash = Dashboard(console, refresh_per_second=0)  # draws on every step and message
    dash.close()  # before start: nothing to stop
    dash = Dashboard(console, refresh_per_second=0)
    dash.start(TEACHER_HEADER)  # a teacher, but the records lack its keys
    try:
        frame0 = screen(dash)
        dash.step(record(1, reward=float("nan"), reward_std=float("nan"), kl=float("nan")), best=None, worst=None)
        dash.step({"step": 2}, best=None, worst=None)  # nearly empty: every figure is missing
        dash.step(record(3, step_seconds=0.0, tokens_per_second=float("inf")), best=None, worst=None)
        frame = screen(dash)
    finally:
        dash.close()
    dash.close()  # twice is harmless
    assert "step 0/500" in frame0 and "ETA –" in frame0 and "no scored completion yet" in frame0
    assert "step 3/500" in frame and "no scored completion yet" in frame
    assert "calls –" in frame and "cache hits –" in frame and "spent $– of $10.00" in frame
    assert "step 2/500" in console.export_text()  # each step was drawn
    dash.message("after the run")  # printed below the final frame
    assert console.export_text().rstrip().endswith("after the run")


def test_keeps_the_last_samples_when_a_step_scores_nothing():
    dash = Dashboard(terminal(), refresh_per_second=0)
    dash.begin(HEADER)
    dash.step(record(1), best=BEST, worst=WORST)
    dash.step(record(2), best=None, worst=None)
    frame = screen(dash)
    assert "best reward 1.00 · task clamp · step 1" in frame
    assert "worst reward 0.10 · task is_palindrome · step 1" in frame


def test_long_completions_are_truncated():
    long = SampleView("big", "p", "def f():\n" + "".join(f"    x{i} = {i}\n" for i in range(100)), "python", 0.5)
    odd = SampleView("odd", "p", "", "no-such-language", None, {}, "timed out")
    dash = Dashboard(terminal(), refresh_per_second=0, max_code_lines=10)
    dash.begin(HEADER)
    dash.step(record(1), best=long, worst=odd)
    frame = screen(dash)
    assert "x8 = 8" in frame and "x9 = 9" not in frame and "… 91 more lines" in frame
    assert "(empty completion)" in frame and "timed out" in frame and "worst reward –" in frame


def test_eta_counts_from_the_resumed_step():
    now = [100.0]
    dash = Dashboard(terminal(), clock=lambda: now[0])
    dash.begin(RunHeader(**(HEADER.__dict__ | {"start_step": 30})))
    now[0] = 110.0
    dash.step(record(31, step_seconds=2.0), best=None, worst=None)  # began at 108: 2 s per step
    assert dash.eta_seconds() == pytest.approx(29 * 2.0)
    now[0] = 112.0
    dash.step(record(32, step_seconds=2.0), best=None, worst=None)
    assert dash.eta_seconds() == pytest.approx(28 * 2.0)
    now[0] = 115.0  # counts down between steps
    assert dash.eta_seconds() == pytest.approx(28 * 2.0 - 3.0)
    frame = screen(dash)
    assert "step 32/60" in frame and "ETA 53s" in frame and "elapsed 15s" in frame and "resumed at step 30" in frame


def test_make_reporter_picks_the_dashboard_only_on_a_terminal(monkeypatch):
    assert isinstance(make_reporter(dashboard=True, log_every=5, console=terminal()), Dashboard)
    assert isinstance(make_reporter(dashboard=False, log_every=5, console=terminal()), PlainReporter)
    plain = make_reporter(dashboard=True, log_every=5, console=Console(file=io.StringIO()))  # a pipe or a file
    assert isinstance(plain, PlainReporter) and plain.log_every == 5
    assert isinstance(make_reporter(dashboard=True, log_every=1), PlainReporter)  # pytest's stdout is no TTY
    monkeypatch.setenv("TERM", "dumb")
    assert isinstance(make_reporter(dashboard=True, log_every=1, console=terminal()), PlainReporter)


def test_render_frame_is_plain_text_with_the_key_figures():
    records = [record(s, reward=0.25 + 0.0075 * s) for s in range(1, 43)]
    text = render_frame(HEADER, records, BEST, WORST, ["warm-up 110/110  nll/token 0.051"], width=100)
    assert "\x1b" not in text
    assert all(len(line) <= 100 for line in text.splitlines())
    assert "step 42/60" in text and "70%" in text
    assert "elapsed 1m 28s" in text and "ETA 38s" in text  # 42 and 18 steps of 2.1 s
    assert "0.565 ± 0.440" in text and "0.0712" in text and "0.025" in text
    assert "1.4 s" in text and "def clamp" in text and "warm-up 110/110" in text


def test_fenced_completions_are_highlighted_as_markdown():
    fence = "`" * 3
    text = f"{fence}python\ndef first(items):\n    return items[0]\n{fence}\n"
    fenced = SampleView("qs-009", "p", text, "python", 1.0)
    console = Console(file=io.StringIO(), force_terminal=True, width=120, height=60, color_system="256")
    dash = Dashboard(console, refresh_per_second=0)
    dash.begin(HEADER)
    dash.step(record(1), best=fenced, worst=fenced)
    console.print(dash.frame())
    out = console.file.getvalue()
    assert "\x1b[4;31" not in out  # the python lexer would mark the backticks as errors (red, underlined)
    assert "first" in out and "return" in out


def test_log_warnings_go_through_the_live_console_while_it_runs():
    import logging

    from rlaif_mlx.monitor.reporting import RunHeader

    console = Console(file=io.StringIO(), force_terminal=True, width=120, record=True)
    before = logging.getLogger().handlers[:]
    board = Dashboard(console, refresh_per_second=0)
    board.start(RunHeader(model="m", backend="torch", device="cpu", total_steps=2, output_dir="runs/x"))
    logging.getLogger("rlaif_mlx.test").warning("a warning during the run")
    board.close()
    assert "a warning during the run" in console.export_text()
    assert logging.getLogger().handlers == before


def test_the_share_of_suspect_samples_is_shown_with_the_rewards():
    plain = render_frame(HEADER, [record(1, **{"reward/suspect": 0.0})], BEST, WORST, [], width=100)
    flagged = render_frame(HEADER, [record(1, **{"reward/suspect": 0.25})], BEST, WORST, [], width=100)
    assert "suspect" in plain and "0.000" in plain.split("suspect", 1)[1].splitlines()[0]
    assert "0.250" in flagged.split("suspect", 1)[1].splitlines()[0]


MESSAGES = ["warm-up 110/110  nll/token 0.051", "saved checkpoint runs/quickstart/checkpoints/step-000040"]
VALUES = [  # every figure of a step-42 frame, each of which must show whole at any width
    "step 42/60",
    "70%",
    "epoch 2",
    "elapsed 1m 28s",
    "ETA 38s",
    "0.565 ± 0.440",
    "0.0712",
    "0.025",
    "-0.5444",
    "0.064",
    "3.58e-04",
    "has_code 1.000",
    "tests    0.485",
    "0.3 s  14%",
    "1.4 s  67%",
    "7,040",
    "33 tokens",
    "zero-variance groups 4",
    "runs/quickstart",
    "models/tiny-qwen2",
]


@pytest.mark.parametrize("width", [80, 100, 120])
def test_no_value_is_cut_at_80_100_or_120_columns(width):
    records = [record(s, reward=0.25 + 0.0075 * s) for s in range(1, 43)]
    text = render_frame(HEADER, records, BEST, WORST, MESSAGES, width=width)
    assert all(len(line) <= width for line in text.splitlines())
    for value in VALUES:
        assert value in text, (width, value)
    for line in text.splitlines():  # an ellipsis only where code or an error message is cut, never a figure
        assert "…" not in line or "AssertionError" in line or "more lines" in line, line
    assert ("last step" in text) and ("def clamp" in text) and MESSAGES[-1] in text


@pytest.mark.parametrize("height", [24, 30])
def test_at_80_columns_the_frame_fits_the_terminal_dropping_completions_first(height):
    records = [record(s, reward=0.25 + 0.0075 * s) | teacher_keys(s) for s in range(1, 43)]
    for header in (HEADER, TEACHER_HEADER):
        text = render_frame(header, records, BEST, WORST, MESSAGES, width=80, height=height)
        lines = text.splitlines()
        assert len(lines) <= height, (header.teacher, height)
        for value in ("step 42/", "0.565 ± 0.440", "0.0712", "3.58e-04", MESSAGES[-1]):  # always there, whole
            assert value in text, (header.teacher, height, value)
        if header.teacher:
            assert "calls 41" in text and "spent $" in text
    plain24 = render_frame(HEADER, records, BEST, WORST, MESSAGES, width=80, height=24)
    plain30 = render_frame(HEADER, records, BEST, WORST, MESSAGES, width=80, height=30)
    assert "def clamp" not in plain24 and "1.4 s  67%" in plain24  # the completions went first
    assert "def clamp" in plain30  # with six more rows they are back, cut to the room


def test_the_warm_up_shows_as_its_own_progress():
    text = render_frame(
        HEADER, [], None, None, ["warm-up 30/110  nll/token 1.412"], width=80, height=24, warmup=(38, 110, 1.305)
    )
    assert "warm-up 38/110" in text and "35%" in text and "nll/token 1.305" in text
    assert "step 0/60" in text and "0.0712" not in text  # no RL figures yet: none are shown
    dash = Dashboard(terminal(), refresh_per_second=0)
    dash.begin(HEADER)
    for done in range(1, 11):
        dash.warmup(done, 20, 2.5 if done == 10 else None)
    frame = screen(dash)
    assert "warm-up 10/20" in frame and "50%" in frame and "nll/token 2.500" in frame
    assert "warm-up 10/20  nll/token 2.500" in frame  # the log keeps the NLL's history
    dash.step(record(1), best=BEST, worst=WORST)
    assert "warm-up 10/20 " not in screen(dash).split("╭─ log")[0]  # RL has begun: the header drops the warm-up


def test_the_plain_log_prints_the_warm_up_every_ten_steps():
    lines: list[str] = []
    reporter = PlainReporter(lines.append)
    for done in range(1, 13):
        reporter.warmup(done, 12, 1.0 / done if done % 10 == 0 or done == 12 else None)
    assert lines == ["warm-up 10/12  nll/token 0.100", "warm-up 12/12  nll/token 0.083"]
