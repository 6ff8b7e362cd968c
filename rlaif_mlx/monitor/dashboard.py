"""The live terminal dashboard shown by ``rlaif-mlx train`` on a terminal.

``Dashboard`` is a ``Reporter``: it sees each step's metrics record (the
``metrics.jsonl`` line) and the step's best and worst completions, and redraws
one ``rich`` frame: the run header with progress and ETA, reward and its trend,
KL and the update, the step's time split, the teacher's calls and spend, the
two completions, and the last log lines. The frame is laid out once per step;
the refreshes in between replay it and redraw only the ticking clock. Off a
terminal (CI, ``nohup``, pipes) ``make_reporter`` returns the plain one-line log.
"""

from __future__ import annotations

import functools
import io
import logging
import math
import time
from collections import deque
from collections.abc import Callable, Iterable
from typing import Any

from pygments.lexer import Lexer
from pygments.lexers import get_lexer_by_name
from pygments.util import ClassNotFound
from rich.console import Console, ConsoleOptions, Group, RenderableType, RenderResult
from rich.live import Live
from rich.logging import RichHandler
from rich.panel import Panel
from rich.progress_bar import ProgressBar
from rich.segment import Segment
from rich.syntax import Syntax
from rich.table import Table
from rich.text import Text

from .reporting import PlainReporter, Reporter, RunHeader, SampleView

SPARK_CHARS = "▁▂▃▄▅▆▇█"
TREND_STEPS = 40  # steps of reward history in the sparkline
MISSING = "–"  # shown for a value the record lacks, or NaN


def sparkline(values: Iterable[float | None], *, width: int | None = None) -> str:
    """A one-line unicode chart of ``values``, scaled between their min and max.

    Args:
        values: the series, oldest first; NaN or None shows as a blank.
        width: keep only the last ``width`` values.

    Returns:
        One character per value; a flat series is a row of mid-height bars.
    """
    vals = [float("nan") if v is None else float(v) for v in values]
    if width is not None:
        vals = vals[-width:] if width > 0 else []
    finite = [v for v in vals if math.isfinite(v)]
    lo, hi = (min(finite), max(finite)) if finite else (0.0, 0.0)
    top = len(SPARK_CHARS) - 1

    def bar(v: float) -> str:
        if not math.isfinite(v):
            return " "
        return SPARK_CHARS[top // 2 if hi == lo else round((v - lo) / (hi - lo) * top)]

    return "".join(bar(v) for v in vals)


def make_reporter(*, dashboard: bool, log_every: int, console: Console | None = None) -> Reporter:
    """The dashboard on an interactive terminal, else one plain line per step.

    Args:
        dashboard: whether the dashboard is wanted (``logging.dashboard`` and not ``--no-dashboard``).
        log_every: plain mode prints every ``log_every`` steps.
        console: where the dashboard would draw (default: stdout).

    Returns:
        A ``Dashboard``; or a ``PlainReporter`` printing to stdout when the dashboard is
        off, or stdout is not a terminal (CI, ``nohup``, pipes) or is a dumb one.
    """
    console = console if console is not None else Console()
    # is_interactive: a terminal other than TERM=dumb, unless TTY_INTERACTIVE says otherwise.
    if dashboard and console.is_terminal and console.is_interactive:
        return Dashboard(console)
    return PlainReporter(print, log_every=log_every)


def render_frame(
    header: RunHeader,
    records: list[dict[str, Any]],
    best: SampleView | None,
    worst: SampleView | None,
    messages: list[str],
    width: int = 100,
) -> str:
    """One dashboard frame as plain text (for the README and tests).

    The clock advances by each record's ``step_seconds``, so elapsed time and
    ETA read as they would have during the run.

    Args:
        header: the run header.
        records: the step records so far, oldest first (the last one is shown).
        best: the last step's best completion.
        worst: the last step's worst completion.
        messages: log lines, oldest first.
        width: columns.

    Returns:
        The frame's text, without colour.
    """
    now = [0.0]
    console = Console(file=io.StringIO(), width=width, height=200, color_system=None, force_terminal=False)
    dash = Dashboard(console, clock=lambda: now[0])
    dash.begin(header)
    for text in messages:
        dash.message(text)
    for i, record in enumerate(records):
        now[0] += _float(record.get("step_seconds"), 0.0, finite=True)
        last = i == len(records) - 1
        dash._absorb(record, best if last else None, worst if last else None)
    dash._body = _Rendered(dash._build_body)
    console.print(dash.frame())
    return console.file.getvalue()


class Dashboard:
    """The live ``rich`` view of a run; a ``Reporter``.

    Args:
        console: where to draw (default: stdout).
        refresh_per_second: redraws per second between steps (the clock ticks); 0 draws only on
            a step or a message.
        max_code_lines: the most lines shown of each completion (fewer on a short terminal).
        log_lines: how many of the latest messages the log panel keeps.
        clock: seconds, for elapsed time and ETA.
    """

    def __init__(
        self,
        console: Console | None = None,
        *,
        refresh_per_second: float = 4.0,
        max_code_lines: int = 24,
        log_lines: int = 6,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.console = console if console is not None else Console()
        self.refresh_per_second = refresh_per_second
        self.max_code_lines = max_code_lines
        self.clock = clock
        self.header: RunHeader | None = None
        self.started_at: float | None = None
        self.first_step_began: float | None = None  # when this session's first RL step began
        self.last_step_at: float | None = None
        self.record: dict[str, Any] = {}
        self.rewards: deque[float] = deque(maxlen=TREND_STEPS)
        self.best: tuple[int, SampleView] | None = None  # (step, sample): kept until a step brings a new one
        self.worst: tuple[int, SampleView] | None = None
        self.messages: deque[str] = deque(maxlen=log_lines)
        self.live: Live | None = None
        self.closed = False
        self._body = _Rendered(lambda width: Text(""))
        self._log = _Rendered(lambda width: Text(""))

    # ---- Reporter -------------------------------------------------------

    def start(self, header: RunHeader) -> None:
        self.begin(header)
        self.live = Live(
            self.frame(),
            console=self.console,
            auto_refresh=self.refresh_per_second > 0,
            refresh_per_second=max(self.refresh_per_second, 0.1),
            transient=False,
        )
        self.live.start(refresh=True)
        # Warnings logged during the run go through the live console (above the frame), not
        # straight to stderr, where they would tear the frame.
        root = logging.getLogger()
        self._saved_handlers = root.handlers[:]
        root.handlers = [RichHandler(console=self.console, show_time=False, show_path=False)]

    def step(self, record: dict[str, Any], *, best: SampleView | None, worst: SampleView | None) -> None:
        self._absorb(record, best, worst)
        self._body = _Rendered(self._build_body)
        self._body.lay_out(self.console)  # the one layout per step; refreshes replay it
        self._show()

    def message(self, text: str) -> None:
        if self.closed:  # after the run: below the final frame
            self.console.print(text, markup=False, highlight=False)
            return
        self.messages.append(text)
        self._log = _Rendered(self._build_log)
        self._show()

    def close(self) -> None:
        self.closed = True
        if self.live is not None:
            self.live.update(self.frame())
            self.live.stop()  # draws the last frame in full and leaves it on screen
            self.live = None
            logging.getLogger().handlers = self._saved_handlers

    # ---- the frame ------------------------------------------------------

    def begin(self, header: RunHeader) -> None:
        """Takes the run's header and builds a first frame (``start`` without the live display)."""
        self.header = header
        self.started_at = self.clock()
        self._body = _Rendered(self._build_body)
        self._log = _Rendered(self._build_log)

    def _absorb(self, record: dict[str, Any], best: SampleView | None, worst: SampleView | None) -> None:
        now, step = self.clock(), int(_float(record.get("step"), 0, finite=True))
        if self.first_step_began is None:
            self.first_step_began = now - _float(record.get("step_seconds"), 0.0, finite=True)
        self.last_step_at, self.record = now, record
        self.rewards.append(_float(record.get("reward_mean")))
        self.best = (step, best) if best is not None else self.best
        self.worst = (step, worst) if worst is not None else self.worst

    def frame(self) -> RenderableType:
        """The whole view: the header (its clock read at each render), the step's panels, the log."""
        return Group(_ClockedHeader(self), self._body, self._log)

    def eta_seconds(self) -> float | None:
        """Seconds left at this session's mean step time, counting down between steps."""
        h, r = self.header, self.record
        if h is None or self.first_step_began is None or self.last_step_at is None or "step" not in r:
            return None
        step = int(_float(r["step"], 0, finite=True))
        done = step - h.start_step  # a resumed run's earlier steps were not timed here
        if done <= 0:
            return None
        mean = (self.last_step_at - self.first_step_began) / done
        return max(0.0, mean * (h.total_steps - step) - (self.clock() - self.last_step_at))

    def _show(self) -> None:
        if self.live is not None:  # without auto refresh, draw now
            self.live.update(self.frame(), refresh=not self.live.auto_refresh)

    def _build_body(self, width: int) -> RenderableType:
        parts = [self._build_metrics(width)]
        if self.header is not None and self.header.teacher:
            parts.append(self._build_teacher())
        parts.append(self._build_samples(width))
        return Group(*parts)

    def _build_metrics(self, width: int) -> RenderableType:
        r = self.record
        components = [(k.removeprefix("reward/"), _fmt(r[k], ".3f")) for k in sorted(r) if k.startswith("reward/")]
        finite = [v for v in self.rewards if math.isfinite(v)]
        trend = Text(MISSING, style="dim")
        if finite:
            span = f" {min(finite):.2f}–{max(finite):.2f}"
            label = max(len(name) for name, _ in [("trend", ""), *components])
            room = width // 2 - 4 - label - 1 - len(span)  # the reward panel's half, less borders and labels
            trend = Text.assemble((sparkline(self.rewards, width=max(room, 1)), "cyan"), (span, "dim"), no_wrap=True)
        reward = _kv_table(
            [
                (
                    "mean",
                    Text(
                        f"{_fmt(r.get('reward_mean'), '.3f')} ± {_fmt(r.get('reward_std'), '.3f')}",
                        style="bold",
                        no_wrap=True,
                    ),
                ),
                ("trend", trend),
                *components,
            ]
        )
        policy = _kv_table(
            [
                ("KL", _fmt(r.get("kl"), ".4f")),
                ("β (KL coef)", _fmt(r.get("kl_coef"), ".3g")),
                ("loss", _fmt(r.get("loss"), "+.4f")),
                ("grad norm", _fmt(r.get("grad_norm"), ".3f")),
                ("LR", _fmt(r.get("lr"), ".2e")),
                ("clip frac", _fmt(r.get("clip_fraction"), ".3f")),
            ]
        )
        total = _float(r.get("step_seconds"))
        split = []
        for name in ("sample", "score", "train"):
            secs = _float(r.get(f"{name}_seconds"))
            share = f" {secs / total:4.0%}" if math.isfinite(secs) and total > 0 else ""
            split.append((name, f"{_fmt(secs, '.1f')} s{share}"))
        times = _kv_table(
            [
                *split,
                ("step", f"{_fmt(total, '.1f')} s"),
                ("tokens/s", _fmt(r.get("tokens_per_second"), ",.0f")),
                ("mean len", f"{_fmt(r.get('completion_len_mean'), '.0f')} tokens"),
            ]
        )
        return _side_by_side(
            width,
            [2, 1, 1],
            [  # the reward's trend gets the room
                Panel(reward, title="reward", title_align="left"),
                Panel(policy, title="policy", title_align="left"),
                Panel(times, title="last step", title_align="left"),
            ],
        )

    def _build_teacher(self) -> RenderableType:
        r, h = self.record, self.header
        hit, failures = _float(r.get("teacher/cache_hit_rate")), _float(r.get("teacher/failures"))
        line = Text.assemble(
            "this step: calls ",
            (_fmt(r.get("teacher/calls"), ".0f"), "bold"),
            "  cache hits ",
            _fmt(hit, ".0%"),
            "  latency p50 ",
            _fmt(r.get("teacher/latency_p50_s"), ".2f"),
            " s",
            "  p95 ",
            _fmt(r.get("teacher/latency_p95_s"), ".2f"),
            " s",
            "  failures ",
            (_fmt(failures, ".0f"), "bold red" if failures > 0 else ""),
            "  cost $",
            _fmt(r.get("teacher/cost_usd"), ".4f"),
        )
        spent = _float(r.get("teacher/spent_usd"))
        spend = Table.grid(padding=(0, 1))
        if h.budget_usd:
            share = spent / h.budget_usd if math.isfinite(spent) else 0.0
            spend.add_row(
                f"run: spent ${_fmt(spent, '.2f')} of ${h.budget_usd:.2f} budget",
                ProgressBar(
                    total=1.0, completed=min(share, 1.0), width=24, complete_style="red" if share > 0.9 else "green"
                ),
                f"{share:.0%}",
            )
        else:
            spend.add_row(f"run: spent ${_fmt(spent, '.2f')} (no budget set)")
        return Panel(Group(line, spend), title=f"teacher {h.teacher}", title_align="left")

    def _build_samples(self, width: int) -> RenderableType:
        if self.best is None and self.worst is None:
            return Panel(Text("no scored completion yet", style="dim"), title="completions", title_align="left")
        lines, step = self._code_lines(), int(_float(self.record.get("step"), 0, finite=True))
        return _side_by_side(
            width,
            [1, 1],
            [
                _sample_panel("best", self.best, step, lines, "green"),
                _sample_panel("worst", self.worst, step, lines, "red"),
            ],
        )

    def _code_lines(self) -> int:
        """Code lines per completion that keep the frame within the terminal's height."""
        metrics = 2 + max(2 + sum(k.startswith("reward/") for k in self.record), 6)
        teacher = 4 if self.header is not None and self.header.teacher else 0
        log = 2 + max(1, len(self.messages))
        fixed = 5 + metrics + teacher + log + 5  # header ... log; sample borders, components, error, "more"
        return max(4, min(self.max_code_lines, self.console.size.height - fixed))

    def _build_log(self, width: int) -> RenderableType:
        text = Text(
            "\n".join(self.messages) or "nothing yet",
            style="" if self.messages else "dim",
            no_wrap=True,
            overflow="ellipsis",
        )
        return Panel(text, title="log", title_align="left")


class _ClockedHeader:
    """The run header; rendered on every refresh so elapsed time and ETA keep ticking."""

    def __init__(self, dash: Dashboard) -> None:
        self.dash = dash

    def __rich__(self) -> RenderableType:
        d, h, r = self.dash, self.dash.header, self.dash.record
        if h is None:
            return Text("")
        step = int(_float(r.get("step"), h.start_step, finite=True))
        elapsed = d.clock() - d.started_at if d.started_at is not None else 0.0
        eta = d.eta_seconds()
        top = Text.assemble(
            ("model ", "dim"),
            (h.model, "bold"),
            ("   backend ", "dim"),
            h.backend,
            ("   device ", "dim"),
            h.device,
            ("   output ", "dim"),
            h.output_dir,
            no_wrap=True,
            overflow="ellipsis",
        )
        progress = Table.grid(padding=(0, 1))
        progress.add_row(
            Text.assemble(("step ", "dim"), (f"{step}/{h.total_steps}", "bold")),
            ProgressBar(total=max(h.total_steps, 1), completed=step, width=30),
            Text.assemble(
                f"{step / max(h.total_steps, 1):.0%}",
                ("   epoch ", "dim"),
                _fmt(r.get("epoch"), ".0f"),
                ("   elapsed ", "dim"),
                _duration(elapsed),
                ("   ETA ", "dim"),
                (_duration(eta) if eta is not None else MISSING, "bold"),
                (f"   (resumed at step {h.start_step})" if h.start_step else "", "dim"),
                no_wrap=True,
                overflow="ellipsis",
            ),
        )
        errors = _float(r.get("scoring_errors"), 0)
        batch = Text.assemble(
            ("curriculum bucket ", "dim"),
            _fmt(r.get("curriculum_bucket"), ".0f"),
            ("  (0 = easiest)", "dim"),
            ("   scoring errors ", "dim"),
            (_fmt(r.get("scoring_errors"), ".0f"), "bold red" if errors > 0 else ""),
            ("   unscored ", "dim"),
            _fmt(r.get("unscored"), ".0f"),
            ("   zero-variance groups ", "dim"),
            _fmt(r.get("zero_variance_groups"), ".0f"),
            ("   update skipped: nothing scored", "bold red") if _float(r.get("update_skipped"), 0) > 0 else "",
            no_wrap=True,
            overflow="ellipsis",
        )
        return Panel(Group(top, progress, batch), title="rlaif-mlx train", title_align="left")


class _Rendered:
    """A part of the frame laid out once per width; later renders replay its lines.

    A refresh between steps then costs the small clocked header and the write,
    not a layout of tables, panels and highlighted code.
    """

    def __init__(self, build: Callable[[int], RenderableType]) -> None:
        self.build = build  # width -> renderable
        self.width: int | None = None
        self.lines: list[list[Segment]] = []

    def lay_out(self, console: Console, options: ConsoleOptions | None = None) -> None:
        options = options if options is not None else console.options
        self.lines = console.render_lines(self.build(options.max_width), options.update(height=None), pad=False)
        self.width = options.max_width

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        if options.max_width != self.width:  # the first render, or the terminal was resized
            self.lay_out(console, options)
        for line in self.lines:
            yield from line
            yield Segment.line()


def _sample_panel(
    kind: str, entry: tuple[int, SampleView] | None, current: int, max_lines: int, colour: str
) -> RenderableType:
    if entry is None:
        return Panel(Text("none", style="dim"), title=kind, title_align="left")
    step, s = entry
    lines = (s.text.rstrip() or "(empty completion)").splitlines()
    shown = "\n".join(lines[:max_lines])
    # A chat model fences its code: the markdown lexer highlights the block in its own language.
    lexer = _lexer("markdown" if any(line.lstrip().startswith("`" * 3) for line in lines) else s.language)
    body = Syntax(shown, lexer, theme="ansi_dark", background_color="default").highlight(shown)
    body.rstrip()
    body.no_wrap, body.overflow = True, "ellipsis"
    components = "  ".join(f"{k} {_fmt(v, '.2f')}" for k, v in sorted(s.components.items()))
    parts: list[RenderableType] = [Text(components, style="dim")] if components else []
    parts.append(body)
    if len(lines) > max_lines:
        parts.append(Text(f"… {len(lines) - max_lines} more lines", style="dim"))
    if s.error and s.error.strip():
        parts.append(Text(s.error.strip().splitlines()[0], style="red", no_wrap=True, overflow="ellipsis"))
    older = f" · step {step}" if step != current else ""  # this step scored nothing; an older sample
    title = Text.assemble((kind, f"bold {colour}"), f" reward {_fmt(s.reward, '.2f')} · task {s.task_id}{older}")
    return Panel(Group(*parts), title=title, title_align="left")


def _side_by_side(width: int, ratios: list[int], cells: list[RenderableType]) -> Table:
    """Cells in one row, ``width`` split by ``ratios``."""
    # Fixed column widths: rich then skips measuring every nested table and panel.
    widths = [width * r // sum(ratios) for r in ratios]
    widths[-1] += width - sum(widths)
    row = Table.grid(padding=0)
    for w in widths:
        row.add_column(width=w)
    row.add_row(*cells)
    return row


def _kv_table(rows: list[tuple[str, RenderableType]]) -> Table:
    """Label / value rows: the labels keep their width, the values are cropped."""
    table = Table.grid(padding=(0, 1))
    table.add_column(style="dim", no_wrap=True)
    table.add_column()  # wrappable, so it is the column rich narrows; its Texts crop rather than wrap
    for label, value in rows:
        table.add_row(label, Text(value, no_wrap=True, overflow="ellipsis") if isinstance(value, str) else value)
    return table


@functools.lru_cache(maxsize=16)
def _lexer(language: str) -> Lexer | str:
    """The pygments lexer for ``language``, looked up once (each lookup costs about a millisecond)."""
    try:
        return get_lexer_by_name(language or "text", stripnl=False, ensurenl=True)
    except ClassNotFound:
        return "text"


def _float(value: Any, default: float = float("nan"), *, finite: bool = False) -> float:
    """``value`` as a float; ``default`` when it is missing, not a number, or (``finite``) NaN or infinite."""
    try:
        v = float(value) if value is not None else default
    except (TypeError, ValueError):
        return default
    return default if finite and not math.isfinite(v) else v


def _fmt(value: Any, spec: str) -> str:
    v = _float(value)
    return format(v, spec) if math.isfinite(v) else MISSING


def _duration(seconds: float) -> str:
    s = int(max(0.0, seconds) + 0.5)
    if s < 3600:
        return f"{s // 60}m {s % 60:02d}s" if s >= 60 else f"{s}s"
    return f"{s // 3600}h {s % 3600 // 60:02d}m"
