"""How the dashboard fits a terminal: values are never cut, so lines wrap between items and panels
stack or drop instead.

``pack`` lays ``label value`` items into lines, breaking only between items. ``fit`` takes the
frame's parts in order of importance and keeps those that fit the terminal's height: the
metrics always, then the teacher, the log, the time split and the completions, as room allows.
Parts are rendered once to be measured, and the same lines are drawn.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

from rich.console import Console, ConsoleOptions, RenderableType, RenderResult
from rich.segment import Segment
from rich.text import Text

GAP = "   "


def pack(items: Iterable[Text | str], width: int, *, gap: str = GAP) -> Text:
    """``items`` on as few lines of ``width`` cells as they fit, never broken inside an item.

    An item wider than a whole line gets lines of its own and folds (nothing is cut with ``…``).
    """
    out = Text(no_wrap=False, overflow="fold")
    used = 0
    for item in items:
        text = Text(item) if isinstance(item, str) else item
        if not text.plain:
            continue
        if used and used + len(gap) + text.cell_len > width:
            out.append("\n")
            used = 0
        elif used:
            out.append(gap)
            used += len(gap)
        out.append_text(text)
        used += text.cell_len
    return out


class Lines:
    """Lines already rendered, drawn as they are (what ``fit`` measured is what is shown)."""

    def __init__(self, lines: list[list[Segment]]) -> None:
        self.lines = lines

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        for line in self.lines:
            yield from line
            yield Segment.line()


def render(console: Console, renderable: RenderableType, width: int) -> list[list[Segment]]:
    """``renderable``'s lines at ``width`` (its whole height)."""
    return console.render_lines(renderable, console.options.update(width=width, height=None), pad=False)


@dataclass
class Part:
    """One part of the frame.

    Attributes:
        build: the part at a size: ``build(n)`` for ``n`` from ``sizes``, largest first (code
            lines of a completion, or log messages); parts without sizes get ``build(0)``.
        order: its place on screen, top to bottom.
        sizes: the sizes it can be shown at, largest first; empty for a part of fixed size.
        most: the most lines it may take (None: as many as are left).
    """

    build: Callable[[int], RenderableType | None]
    order: int
    sizes: tuple[int, ...] = ()
    most: int | None = None


def fit(
    console: Console,
    parts: list[Part],
    *,
    width: int,
    height: int,
    cache: dict[tuple[int, int], list[list[Segment]]] | None = None,
) -> tuple[list[list[Segment]], dict[int, int]]:
    """The frame's lines: ``parts`` taken in order of importance, each at the largest size that fits.

    A part that does not fit even at its smallest size is left out, and the parts after it are tried.

    Args:
        console: renders the parts.
        parts: most important first; the first is always shown.
        width: columns.
        height: rows left for these parts.
        cache: rendered parts by ``(order, size)``, kept between calls for the same frame.

    Returns:
        The lines, top to bottom, and the lines each part took (by its ``order``; absent: left out).
    """
    cache = {} if cache is None else cache

    def lines_of(part: Part, size: int) -> list[list[Segment]] | None:
        if (part.order, size) not in cache:
            renderable = part.build(size)
            cache[part.order, size] = render(console, renderable, width) if renderable is not None else None
        return cache[part.order, size]

    chosen: dict[int, list[list[Segment]]] = {}
    left = height
    for i, part in enumerate(parts):
        room = left if part.most is None else min(left, part.most)
        sizes = part.sizes or (0,)
        if len(sizes) > 1:  # sized by the smallest: each size step adds about a line
            smallest = lines_of(part, sizes[-1])
            if smallest is None or (len(smallest) > room and i > 0):
                continue
            sizes = tuple(s for s in sizes if s <= sizes[-1] + room - len(smallest)) or sizes[-1:]
        for size in sizes:
            lines = lines_of(part, size)
            if lines is None:
                break
            if len(lines) <= room or i == 0:
                chosen[part.order] = lines
                left -= len(lines)
                break
    ordered = [chosen[order] for order in sorted(chosen)]
    return [line for lines in ordered for line in lines], {order: len(lines) for order, lines in chosen.items()}
