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


def header_panel(header: RunHeader, record: dict[str, Any], *, elapsed: float, eta: float | None) -> Panel:
    """The run header: model and folders, progress with elapsed time and ETA, and the batch's scoring state.

    Args:
        header: the run header.
        record: the last step's record (empty before the first step).
        elapsed: seconds since the run began.
        eta: seconds left, or None while unknown.
    """
    h, r = header, record
    step = int(as_float(r.get("step"), h.start_step, finite=True))
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
    errors = as_float(r.get("scoring_errors"), 0)
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
        ("   update skipped: nothing scored", "bold red") if as_float(r.get("update_skipped"), 0) > 0 else "",
        no_wrap=True,
        overflow="ellipsis",
    )
    return Panel(Group(top, progress, batch), title="rlaif-mlx train", title_align="left")


def metrics_row(record: dict[str, Any], rewards: Iterable[float], width: int) -> Table:
    """The reward panel (mean, trend, components), the policy panel and the last step's time split."""
    r, rewards = record, list(rewards)
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
        room = width // 2 - 4 - label - 1 - len(span)  # the reward panel's half, less borders and labels
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
    total = as_float(r.get("step_seconds"))
    split = []
    for name in ("sample", "score", "train"):
        secs = as_float(r.get(f"{name}_seconds"))
        share = f" {secs / total:4.0%}" if math.isfinite(secs) and total > 0 else ""
        split.append((name, f"{_fmt(secs, '.1f')} s{share}"))
    times = kv_table(
        [
            *split,
            ("step", f"{_fmt(total, '.1f')} s"),
            ("tokens/s", _fmt(r.get("tokens_per_second"), ",.0f")),
            ("mean len", f"{_fmt(r.get('completion_len_mean'), '.0f')} tokens"),
        ]
    )
    return side_by_side(
        width,
        [2, 1, 1],
        [  # the reward's trend gets the room
            Panel(reward, title="reward", title_align="left"),
            Panel(policy, title="policy", title_align="left"),
            Panel(times, title="last step", title_align="left"),
        ],
    )


def teacher_panel(record: dict[str, Any], header: RunHeader) -> Panel:
    """This step's teacher calls, cache hits, latency, failures and cost, and the run's spend of its budget."""
    r, h = record, header
    hit, failures = as_float(r.get("teacher/cache_hit_rate")), as_float(r.get("teacher/failures"))
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
    return side_by_side(
        width,
        [1, 1],
        [sample_panel("best", best, step, max_lines, "green"), sample_panel("worst", worst, step, max_lines, "red")],
    )


def log_panel(messages: Iterable[str]) -> Panel:
    """The latest log lines, oldest first, each cut to one line."""
    lines = list(messages)
    text = Text("\n".join(lines) or "nothing yet", style="" if lines else "dim", no_wrap=True, overflow="ellipsis")
    return Panel(text, title="log", title_align="left")


def sample_panel(
    kind: str, entry: tuple[int, SampleView] | None, current: int, max_lines: int, colour: str
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
