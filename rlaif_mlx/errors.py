"""Errors a person can fix, shared by the library and the command line.

``SetupError`` is raised while a run, an evaluation or an export is being set up
(model, teacher, checkpoint); its message is one line that names the file or key
and the fix. The command line prints it without a traceback.
"""

from __future__ import annotations


class SetupError(Exception):
    """Something the user can fix before anything runs; the message is one line."""


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (its type name when it has none)."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
