"""The code in a completion: which fenced block to take, and whether it parses.

The first two tiers of grading, cheapest first: ``extract_code`` finds the code
(a completion without code never reaches the sandbox) and ``static_check``
compiles it (code that does not parse is not run).
"""

from __future__ import annotations

import ast
import re
import textwrap
import threading
import warnings
from dataclasses import dataclass

_LANGUAGE_ALIASES = {
    "py": "python",
    "python3": "python",
    "py3": "python",
    "python2": "python",
    "js": "javascript",
    "node": "javascript",
    "jsx": "javascript",
    "ts": "typescript",
    "tsx": "typescript",
    "c++": "cpp",
    "cxx": "cpp",
    "cc": "cpp",
    "rs": "rust",
    "golang": "go",
    "sh": "bash",
    "shell": "bash",
    "zsh": "bash",
    "c#": "csharp",
    "cs": "csharp",
    "kt": "kotlin",
    "rb": "ruby",
}
_QUIET = threading.Lock()  # warnings filters are process-wide: one grader thread at a time changes them
_FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,})(.*)$")


def normalize_language(name: str | None) -> str:
    """Canonical lower-case language name ("py" -> "python", "c++" -> "cpp").

    Args:
        name: a language name or fence info word; None or "" gives "".

    Returns:
        The canonical name.
    """
    word = (name or "").strip().lower().lstrip("{.").rstrip("}")
    return _LANGUAGE_ALIASES.get(word, word)


def extract_code(completion: str, *, language: str = "python") -> str | None:
    """The code in a model completion.

    Picks the first fenced block whose info string names ``language``, else
    the first block without an info string, else the first block. A fence
    that is never closed (the completion hit max tokens) runs to the end.
    Without any fence the whole completion is taken as code.

    Args:
        completion: the model's text.
        language: the language the task asks for.

    Returns:
        The code, dedented and stripped, or None when there is none.
    """
    want = normalize_language(language)
    blocks: list[tuple[str, list[str]]] = []
    open_fence: tuple[str, int] | None = None
    for line in (completion or "").splitlines():
        if open_fence is None:
            match = _FENCE.match(line)
            if match and not (match.group(1)[0] == "`" and "`" in match.group(2)):
                info = match.group(2).strip().split()
                blocks.append((normalize_language(info[0]) if info else "", []))
                open_fence = (match.group(1)[0], len(match.group(1)))
            continue
        match = _FENCE.match(line)
        char, size = open_fence
        if match and match.group(1)[0] == char and len(match.group(1)) >= size and not match.group(2).strip():
            open_fence = None
            continue
        blocks[-1][1].append(line)
    if not blocks:
        text = completion or ""
    else:
        chosen = (
            next((b for b in blocks if b[0] == want), None) or next((b for b in blocks if not b[0]), None) or blocks[0]
        )
        text = "\n".join(chosen[1])
    code = textwrap.dedent(text).strip()
    return code or None


@dataclass(frozen=True)
class StaticCheck:
    """Cheap checks on extracted code. ``reason`` says why ``ok`` is False."""

    ok: bool
    reason: str | None
    has_code: float
    parses: float


def static_check(code: str | None, *, language: str) -> StaticCheck:
    """Whether there is code at all and whether it parses.

    Python is compiled (which also catches ``return`` outside a function);
    other languages are not checked here: ``parses`` is 1 and only empty
    code fails.

    Args:
        code: output of ``extract_code``.
        language: the task's language.

    Returns:
        A ``StaticCheck``.
    """
    if not code or not code.strip():
        return StaticCheck(ok=False, reason="empty", has_code=0.0, parses=0.0)
    if normalize_language(language) != "python":
        return StaticCheck(ok=True, reason=None, has_code=1.0, parses=1.0)
    try:
        with _QUIET, warnings.catch_warnings():  # a SyntaxWarning about the student's code is not for the user
            warnings.simplefilter("ignore")
            compile(code, "<solution>", "exec", dont_inherit=True)
    except SyntaxError as exc:
        where = f" (line {exc.lineno})" if exc.lineno else ""
        return StaticCheck(ok=False, reason=f"syntax error: {exc.msg}{where}", has_code=1.0, parses=0.0)
    except (ValueError, RecursionError, MemoryError, OverflowError) as exc:
        return StaticCheck(ok=False, reason=f"syntax error: {type(exc).__name__}: {exc}", has_code=1.0, parses=0.0)
    return StaticCheck(ok=True, reason=None, has_code=1.0, parses=1.0)


def quiet_parse(source: str) -> ast.Module:
    """``ast.parse`` without the warnings it may print about ``source`` (an invalid escape such as
    ``"\\d"`` is a SyntaxWarning from Python 3.12): they are about the student's code, not for the user.

    Raises:
        SyntaxError, ValueError, RecursionError: as ``ast.parse`` does.
    """
    with _QUIET, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return ast.parse(source)
