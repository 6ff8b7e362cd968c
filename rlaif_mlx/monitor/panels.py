"""The dashboard's parts, each drawn from plain data: the run header, the reward / policy / time panels,
the teacher's line, the best and worst completions (syntax-highlighted), the log, and the sparkline.

Every function here is pure: it takes the step record (a ``metrics.jsonl`` line),
the run header and what else it shows, and returns a ``rich`` renderable.
``dashboard.Dashboard`` keeps the state between steps and drives the live display.
A value the record lacks, or NaN, shows as ``MISSING``.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterable
from typing import Any

from pygments.lexer import Lexer
from pygments.lexers import get_lexer_by_name
from pygments.util import ClassNotFound
from rich.console import Group, RenderableType
from rich.panel import Panel
from rich.progress_bar import ProgressBar
from rich.syntax import Syntax
from rich.table import Table
from rich.text import Text

from .layout import pack
from .reporting import RunHeader, SampleView

SPARK_CHARS = "▁▂▃▄▅▆▇█"
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


def header_panel(
    header: RunHeader,
    record: dict[str, Any],
    *,
    elapsed: float,
    eta: float | None,
    width: int,
    warmup: tuple[int, int, float | None] | None = None,
) -> Panel:
    """The run header: model and folders, the warm-up's and RL's progress with elapsed time and ETA,
    and the batch's scoring state; lines wrap between items, so no value is cut.

    Args:
        header: the run header.
        record: the last step's record (empty before the first step).
        elapsed: seconds since the run began.
        eta: seconds left, or None while unknown.
        width: columns.
        warmup: ``(steps done, steps in all, last NLL per token)`` while the supervised warm-up runs.
    """
    h, r, inner = header, record, width - 4  # the panel's borders and padding
    step = int(as_float(r.get("step"), h.start_step, finite=True))
    top = pack(
        [
            _kv("model", h.model, "bold"),
            _kv("backend", h.backend),
            _kv("device", h.device),
            _kv("output", h.output_dir),
        ],
        inner,
    )
    rows: list[RenderableType] = [top]
    timing = [
        _kv("epoch", _fmt(r.get("epoch"), ".0f")),
        _kv("elapsed", _duration(elapsed).ljust(7)),  # a fixed width: the header keeps its height as the clock runs
        _kv("ETA", (_duration(eta) if eta is not None else MISSING).ljust(7), "bold"),
        Text(f"(resumed at step {h.start_step})", style="dim") if h.start_step else Text(""),
    ]
    bars = []
    if warmup is not None:  # its own progress, above RL's
        done, total, nll = warmup
        nll_text = _kv("nll/token", _fmt(nll, ".3f")) if nll is not None else Text("")
        bars.append((Text.assemble(("warm-up ", "dim"), (f"{done}/{total}", "bold")), done, total, [nll_text]))
    bars.append((Text.assemble(("step ", "dim"), (f"{step}/{h.total_steps}", "bold")), step, h.total_steps, timing))
    rows += progress_rows(bars, inner)
    errors = as_float(r.get("scoring_errors"), 0)
    batch = [
        Text.assemble(_kv("curriculum bucket", _fmt(r.get("curriculum_bucket"), ".0f")), ("  (0 = easiest)", "dim")),
        _kv("scoring errors", _fmt(r.get("scoring_errors"), ".0f"), "bold red" if errors > 0 else ""),
        _kv("unscored", _fmt(r.get("unscored"), ".0f")),
        _kv("zero-variance groups", _fmt(r.get("zero_variance_groups"), ".0f")),
        Text("update skipped: nothing scored", style="bold red") if as_float(r.get("update_skipped"), 0) > 0 else "",
    ]
    rows.append(pack(batch, inner))
    return Panel(Group(*rows), title="rlaif-mlx train", title_align="left")


def progress_rows(bars: list[tuple[Text, int, int, list[Text]]], inner: int) -> list[RenderableType]:
    """One ``label [bar] 42%`` row per ``(label, done, total, after)``, the bars aligned; each row's
    ``after`` items follow on its line when they fit, else on lines below the bars."""
    label_width = max(label.cell_len for label, *_ in bars)
    rests = [pack(after, inner) for *_, after in bars]
    fixed = label_width + 1 + 1 + 4  # label, bar, "100%"
    inline = ["\n" not in rest.plain and fixed + 12 + 3 + rest.cell_len <= inner for rest in rests]
    rooms = [inner - fixed - (3 + rest.cell_len if one else 0) for rest, one in zip(rests, inline, strict=True)]
    width = max(10, min(30, *rooms))
    grid = Table.grid(padding=(0, 1))
    grid.add_column(width=label_width)
    grid.add_column(width=width)
    grid.add_column()
    below = []
    for (label, done, total, _), rest, one in zip(bars, rests, inline, strict=True):
        share = Text(f"{done / max(total, 1):.0%}".rjust(4))
        bar = ProgressBar(total=max(total, 1), completed=done, width=width)
        grid.add_row(label, bar, Text.assemble(share, "   ", rest) if one else share)
        if not one and rest.plain:
            below.append(rest)
    return [grid, *below]


def _kv(label: str, value: str, style: str = "") -> Text:
    """``label value`` as one item: the label dim, the value whole."""
    return Text.assemble((f"{label} ", "dim"), (value, style))


def metrics_row(record: dict[str, Any], rewards: Iterable[float], width: int) -> RenderableType:
    """The reward panel (mean, trend, components), the policy panel and, 100 columns and up, the last
    step's time split; below 100 the time split is ``times_panel``'s, and below 64 the panels stack."""
    r, rewards = record, list(rewards)
    wide, stacked = width >= 100, width < 64
    reward_width = width if stacked else width // 2
    components = [(k.removeprefix("reward/"), _fmt(r[k], ".3f")) for k in sorted(r) if k.startswith("reward/")]
    if as_float(r.get("reward/suspect"), 0) > 0:  # a policy reaching for the grader: make it hard to miss
        components = [
            (name, Text(value, style="bold yellow") if name == "suspect" else value) for name, value in components
        ]
    finite = [v for v in rewards if math.isfinite(v)]
    trend = Text(MISSING, style="dim")
    if finite:
        span = f" {min(finite):.2f}–{max(finite):.2f}"
        label = max(len(name) for name, _ in [("trend", ""), *components])
        room = reward_width - 4 - label - 1 - len(span)  # the reward panel, less borders and labels
        trend = Text.assemble((sparkline(rewards, width=max(room, 1)), "cyan"), (span, "dim"), no_wrap=True)
    reward = kv_table(
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
    policy = kv_table(
        [
            ("KL", _fmt(r.get("kl"), ".4f")),
            ("β (KL coef)", _fmt(r.get("kl_coef"), ".3g")),
            ("loss", _fmt(r.get("loss"), "+.4f")),
            ("grad norm", _fmt(r.get("grad_norm"), ".3f")),
            ("LR", _fmt(r.get("lr"), ".2e")),
            ("clip frac", _fmt(r.get("clip_fraction"), ".3f")),
        ]
    )
    panels = [Panel(reward, title="reward", title_align="left"), Panel(policy, title="policy", title_align="left")]
    if stacked:
        return Group(*panels)
    if not wide:
        return side_by_side(width, [1, 1], panels)
    times = kv_table([(name, value) for name, value in _time_split(r)])
    panels.append(Panel(times, title="last step", title_align="left"))
    return side_by_side(width, [2, 1, 1], panels)  # the reward's trend gets the room


def times_panel(record: dict[str, Any], width: int) -> Panel:
    """The last step's time split on one or two lines, for a frame under 100 columns."""
    items = [_kv(name, value) for name, value in _time_split(record)]
    return Panel(pack(items, width - 4), title="last step", title_align="left")


def _time_split(r: dict[str, Any]) -> list[tuple[str, str]]:
    total = as_float(r.get("step_seconds"))
    split = []
    for name in ("sample", "score", "train"):
        secs = as_float(r.get(f"{name}_seconds"))
        share = f" {secs / total:4.0%}" if math.isfinite(secs) and total > 0 else ""
        split.append((name, f"{_fmt(secs, '.1f')} s{share}"))
    return [
        *split,
        ("step", f"{_fmt(total, '.1f')} s"),
        ("tokens/s", _fmt(r.get("tokens_per_second"), ",.0f")),
        ("mean len", f"{_fmt(r.get('completion_len_mean'), '.0f')} tokens"),
    ]


def teacher_panel(record: dict[str, Any], header: RunHeader, width: int = 120) -> Panel:
    """This step's teacher calls, cache hits, latency, failures and cost, and the run's spend of its budget."""
    r, h = record, header
    hit, failures = as_float(r.get("teacher/cache_hit_rate")), as_float(r.get("teacher/failures"))
    items = [
        Text.assemble("this step: calls ", (_fmt(r.get("teacher/calls"), ".0f"), "bold")),
        f"cache hits {_fmt(hit, '.0%')}",
        f"latency p50 {_fmt(r.get('teacher/latency_p50_s'), '.2f')} s",
        f"p95 {_fmt(r.get('teacher/latency_p95_s'), '.2f')} s",
        Text.assemble("failures ", (_fmt(failures, ".0f"), "bold red" if failures > 0 else "")),
        f"cost ${_fmt(r.get('teacher/cost_usd'), '.4f')}",
    ]
    line = pack(items, width - 4, gap="  ")
    spent = as_float(r.get("teacher/spent_usd"))
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


def samples_row(
    best: tuple[int, SampleView] | None,
    worst: tuple[int, SampleView] | None,
    *,
    step: int,
    max_lines: int,
    width: int,
) -> RenderableType:
    """The best and worst completions side by side, each kept from the last step that scored one.

    Args:
        best, worst: ``(step, sample)``, or None before any step scored one.
        step: the current step (an older sample says which step it is from).
        max_lines: the most code lines shown of each.
        width: columns.
    """
    if best is None and worst is None:
        return Panel(Text("no scored completion yet", style="dim"), title="completions", title_align="left")
    half = width // 2 if width >= 70 else width  # under 70 columns the two stack
    panels = [
        sample_panel("best", best, step, max_lines, "green", width=half),
        sample_panel("worst", worst, step, max_lines, "red", width=half),
    ]
    return side_by_side(width, [1, 1], panels) if width >= 70 else Group(*panels)


def log_panel(messages: Iterable[str]) -> Panel:
    """The latest log lines, oldest first; a long one wraps rather than losing its end."""
    lines = list(messages)
    text = Text("\n".join(lines) or "nothing yet", style="" if lines else "dim", overflow="fold")
    return Panel(text, title="log", title_align="left")


def sample_panel(
    kind: str, entry: tuple[int, SampleView] | None, current: int, max_lines: int, colour: str, *, width: int = 60
) -> RenderableType:
    """One completion: its reward components, its code highlighted in its language, and its error."""
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
    components = [Text(f"{k} {_fmt(v, '.2f')}", style="dim") for k, v in sorted(s.components.items())]
    parts: list[RenderableType] = [pack(components, width - 4, gap="  ")] if components else []
    parts.append(body)
    if len(lines) > max_lines:
        parts.append(Text(f"… {len(lines) - max_lines} more lines", style="dim"))
    if s.error and s.error.strip():
        parts.append(Text(s.error.strip().splitlines()[0], style="red", no_wrap=True, overflow="ellipsis"))
    older = f" · step {step}" if step != current else ""  # this step scored nothing; an older sample
    reward, task = (" reward ", " · task ") if width >= 50 else (" ", " · ")  # a narrow panel: the values first
    title = Text.assemble((kind, f"bold {colour}"), f"{reward}{_fmt(s.reward, '.2f')}{task}{s.task_id}{older}")
    return Panel(Group(*parts), title=title, title_align="left")


def side_by_side(width: int, ratios: list[int], cells: list[RenderableType]) -> Table:
    """Cells in one row, ``width`` split by ``ratios``."""
    # Fixed column widths: rich then skips measuring every nested table and panel.
    widths = [width * r // sum(ratios) for r in ratios]
    widths[-1] += width - sum(widths)
    row = Table.grid(padding=0)
    for w in widths:
        row.add_column(width=w)
    row.add_row(*cells)
    return row


def kv_table(rows: list[tuple[str, RenderableType]]) -> Table:
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


def as_float(value: Any, default: float = float("nan"), *, finite: bool = False) -> float:
    """``value`` as a float; ``default`` when it is missing, not a number, or (``finite``) NaN or infinite."""
    try:
        v = float(value) if value is not None else default
    except (TypeError, ValueError):
        return default
    return default if finite and not math.isfinite(v) else v


def _fmt(value: Any, spec: str) -> str:
    v = as_float(value)
    return format(v, spec) if math.isfinite(v) else MISSING


def _duration(seconds: float) -> str:
    s = int(max(0.0, seconds) + 0.5)
    if s < 3600:
        return f"{s // 60}m {s % 60:02d}s" if s >= 60 else f"{s}s"
    return f"{s // 3600}h {s % 3600 // 60:02d}m"
