"""What the commands share: the user-error type and the library errors it stands for.

Every command raises ``UserError`` (or lets a library ``SetupError`` through)
for a problem the user can fix; ``main`` prints it as one line with no traceback.
Model and teacher construction live in the library (``training.setup``), so a
test or a benchmark builds a run exactly as ``train`` does.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from ..errors import SetupError, first_line

__all__ = ["UserError", "SetupError", "first_line", "one_line_errors"]


class UserError(Exception):
    """Something the user can fix; printed as one line, no traceback."""


@contextlib.contextmanager
def one_line_errors(*kinds: type[BaseException], prefix: str = "") -> Iterator[None]:
    """Turns the named library errors (each phrased as one line) into a ``UserError``.

    Args:
        kinds: the exception types to convert, e.g. ``ConfigError``, ``DataError``.
        prefix: put before the message, e.g. ``"stopped: "``.
    """
    try:
        yield
    except kinds as exc:
        raise UserError(f"{prefix}{exc}") from None
