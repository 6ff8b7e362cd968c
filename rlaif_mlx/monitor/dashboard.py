"""The live terminal dashboard shown by ``rlaif-mlx train`` on a terminal.

``Dashboard`` is a ``Reporter``: it sees each step's metrics record (the
``metrics.jsonl`` line) and the step's best and worst completions, and redraws
one ``rich`` frame: the run header with the warm-up's and RL's progress and ETA,
reward and its trend, KL and the update, the step's time split, the teacher's
calls and spend, the two completions, and the last log lines. The frame fits
the terminal: values are never cut; narrower, panels stack; shorter, the
completions, then the time split and old log lines drop (``layout.fit``). It is
laid out once per step (or message); the refreshes in between replay it and
redraw only the ticking header. Off a terminal (CI, ``nohup``, pipes)
``make_reporter`` returns the plain one-line log. The frame's parts are drawn by
``panels``; this module keeps the run's state and drives ``rich``'s live display.
"""

from __future__ import annotations

import io
import logging
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from rich.console import Console, ConsoleOptions, Group, RenderableType, RenderResult
from rich.live import Live
from rich.logging import RichHandler
from rich.segment import Segment
from rich.text import Text

from .layout import Lines, Part, fit, render
from .panels import as_float, header_panel, log_panel, metrics_row, samples_row, teacher_panel, times_panel
from .reporting import PlainReporter, Reporter, RunHeader, SampleView, format_warmup_line

TREND_STEPS = 40  # steps of reward history in the sparkline


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
    height: int | None = None,
    warmup: tuple[int, int, float | None] | None = None,
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
        height: rows of the terminal to fit (None: room for everything).
        warmup: ``(done, total, NLL)`` to show the frame during the supervised warm-up.

    Returns:
        The frame's text, without colour.
    """
    now = [0.0]
    console = Console(file=io.StringIO(), width=width, height=height or 200, color_system=None, force_terminal=False)
    dash = Dashboard(console, clock=lambda: now[0])
    dash.begin(header)
    for text in messages:
        dash.message(text)
    dash.warmup_state = warmup
    for i, record in enumerate(records):
        now[0] += as_float(record.get("step_seconds"), 0.0, finite=True)
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
        self.warmup_state: tuple[int, int, float | None] | None = None  # (done, total, last NLL) while warming up
        self.live: Live | None = None
        self.closed = False
        self._body = _Rendered(lambda width: Text(""))

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
        self._body = _Rendered(self._build_body)  # the log is part of the body's fitting
        self._show()

    def warmup(self, done: int, total: int, nll: float | None) -> None:
        first = self.warmup_state is None
        last_nll = nll if nll is not None else (self.warmup_state[2] if self.warmup_state else None)
        self.warmup_state = (done, total, last_nll)
        if nll is not None:
            self.message(format_warmup_line(done, total, nll))  # the log keeps the NLL's history
        elif first:
            self._body = _Rendered(self._build_body)  # the header grew a line: fit the body again
            self._show()
        elif self.live is not None and not self.live.auto_refresh:
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

    def _absorb(self, record: dict[str, Any], best: SampleView | None, worst: SampleView | None) -> None:
        now, step = self.clock(), int(as_float(record.get("step"), 0, finite=True))
        if self.first_step_began is None:
            self.first_step_began = now - as_float(record.get("step_seconds"), 0.0, finite=True)
        self.last_step_at, self.record = now, record
        self.warmup_state = None  # RL has begun
        self.rewards.append(as_float(record.get("reward_mean")))
        self.best = (step, best) if best is not None else self.best
        self.worst = (step, worst) if worst is not None else self.worst

    def frame(self) -> RenderableType:
        """The whole view: the header (its clock read at each render), then the step's panels and the log."""
        return Group(_ClockedHeader(self), self._body)

    def eta_seconds(self) -> float | None:
        """Seconds left at this session's mean step time, counting down between steps."""
        h, r = self.header, self.record
        if h is None or self.first_step_began is None or self.last_step_at is None or "step" not in r:
            return None
        step = int(as_float(r["step"], 0, finite=True))
        done = step - h.start_step  # a resumed run's earlier steps were not timed here
        if done <= 0:
            return None
        mean = (self.last_step_at - self.first_step_began) / done
        return max(0.0, mean * (h.total_steps - step) - (self.clock() - self.last_step_at))

    def _show(self) -> None:
        if self.live is not None:  # without auto refresh, draw now
            self.live.update(self.frame(), refresh=not self.live.auto_refresh)

    def _build_body(self, width: int) -> RenderableType:
        """The panels under the header that fit the terminal, most important first (``layout.fit``).

        The metrics always; then the teacher, the latest log line, the time split (under 100
        columns), the completions with as many code lines as fit; then older log lines in what is left.
        """
        height = self.console.size.height - len(render(self.console, _ClockedHeader(self).panel(width), width))
        step = int(as_float(self.record.get("step"), 0, finite=True))
        messages = list(self.messages)
        log = Part(lambda n: log_panel(messages[-n:] if messages else []), order=4, sizes=(1,))
        parts = []
        if self.record:  # before the first RL step (the warm-up) there are no figures to show
            parts.append(Part(lambda n: metrics_row(self.record, self.rewards, width), order=0))
        if self.header is not None and self.header.teacher:
            parts.append(Part(lambda n: teacher_panel(self.record, self.header, width), order=2))
        parts.append(log)
        if width < 100 and self.record:
            parts.append(Part(lambda n: times_panel(self.record, width), order=1))
        code = tuple(range(self.max_code_lines, 1, -1))
        parts.append(
            Part(lambda n: samples_row(self.best, self.worst, step=step, max_lines=n, width=width), order=3, sizes=code)
        )
        rendered: dict = {}
        body, taken = fit(self.console, parts, width=width, height=height, cache=rendered)
        if len(messages) > 1 and 4 in taken and len(body) < height:  # older log lines in the room left
            log.sizes, log.most = tuple(range(len(messages), 0, -1)), taken[4] + height - len(body)
            body, _ = fit(self.console, parts, width=width, height=height, cache=rendered)
        return Lines(body)


class _ClockedHeader:
    """The run header; rendered on every refresh so elapsed time and ETA keep ticking."""

    def __init__(self, dash: Dashboard) -> None:
        self.dash = dash

    def panel(self, width: int) -> RenderableType:
        d = self.dash
        if d.header is None:
            return Text("")
        elapsed = d.clock() - d.started_at if d.started_at is not None else 0.0
        return header_panel(
            d.header, d.record, elapsed=elapsed, eta=d.eta_seconds(), width=width, warmup=d.warmup_state
        )

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        yield self.panel(options.max_width)


class _Rendered:
    """A part of the frame laid out once per terminal size; later renders replay its lines.

    A refresh between steps then costs the small clocked header and the write,
    not a layout of tables, panels and highlighted code.
    """

    def __init__(self, build: Callable[[int], RenderableType]) -> None:
        self.build = build  # width -> renderable (it reads the terminal's height itself)
        self.size: tuple[int, int] | None = None
        self.lines: list[list[Segment]] = []

    def lay_out(self, console: Console, options: ConsoleOptions | None = None) -> None:
        options = options if options is not None else console.options
        self.lines = console.render_lines(self.build(options.max_width), options.update(height=None), pad=False)
        self.size = (options.max_width, console.size.height)

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        if (options.max_width, console.size.height) != self.size:  # the first render, or the terminal was resized
            self.lay_out(console, options)
        for line in self.lines:
            yield from line
            yield Segment.line()
