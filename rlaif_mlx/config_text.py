"""A config file as a person wrote it: its YAML with the line of every key, and its validation
errors as lines a person reads, every one of them, in file order:
``configs/x.yaml:12: training.lerning_rate: unknown key; did you mean training.learning_rate?``

Plain functions; the schema is passed in, so this module never imports the config it describes.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError


class ConfigError(ValueError):
    """A config problem, already phrased for the user: one line per problem."""


def read_yaml(path: Path) -> tuple[dict[str, Any], dict[tuple, int]]:
    """The file's top-level mapping and each key path's 1-based line.

    Raises:
        ConfigError: the file cannot be read, is not YAML, or is not a mapping.
    """
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read config ({exc.strerror})") from None
    try:
        raw = yaml.safe_load(text)
        lines = key_lines(yaml.compose(text))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise ConfigError(f"{where}: not valid YAML ({getattr(exc, 'problem', exc)})") from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of keys, got {type(raw).__name__}")
    return raw, lines


def key_lines(node: yaml.Node | None, prefix: tuple = ()) -> dict[tuple, int]:
    """Maps each key path in the YAML document to its 1-based line number."""
    found: dict[tuple, int] = {}
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            key = (*prefix, key_node.value)
            found[key] = key_node.start_mark.line + 1
            found.update(key_lines(value_node, key))
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            found[(*prefix, i)] = item.start_mark.line + 1
            found.update(key_lines(item, (*prefix, i)))
    return found


def error_lines(
    exc: ValidationError,
    *,
    path: Path,
    lines: dict[tuple, int],
    origins: dict[tuple, str],
    schema: type[BaseModel],
    aliases: tuple[str, ...] = (),
) -> str:
    """Every error of the file, one line each (``file:line: key.path: problem``), in file order.

    Args:
        exc: pydantic's errors.
        path: the config file, named on every line.
        lines: key path -> its line in the file.
        origins: key path -> the original tool's name it was read from (named after the key).
        schema: the config model, for "did you mean".
        aliases: other names worth suggesting (the original tool's, which are read too).
    """
    found = []
    for err in exc.errors():
        loc = tuple(str(p) if not isinstance(p, int) else p for p in err["loc"])
        key = ".".join(str(p) for p in loc) or "(top level)"
        line = None
        for n in range(len(loc), 0, -1):  # the deepest key that exists in the file
            line = lines.get(loc[:n])
            if line is not None:
                break
        where = f"{path}:{line}" if line else str(path)
        kind = err["type"]
        if kind == "extra_forbidden":
            msg = "unknown key" + did_you_mean(loc, schema, aliases)
        elif kind == "missing":
            msg = "required key is missing"
        else:
            msg = err["msg"].removeprefix("Value error, ")
            if "input" in err and not isinstance(err["input"], (dict, list)):
                msg += f" (got {err['input']!r})"
        origin = next((origins[loc[:n]] for n in range(len(loc), 0, -1) if loc[:n] in origins), None)
        if origin is not None and origin != key:
            key += f" (from {origin})"
        found.append((line if line is not None else float("inf"), f"{where}: {key}: {msg}"))
    return "\n".join(text for _, text in sorted(found, key=lambda item: item[0]))


def did_you_mean(loc: tuple, schema: type[BaseModel], aliases: tuple[str, ...] = ()) -> str:
    """``"; did you mean training.learning_rate?"`` for an unknown key near a real one, else ``""``.

    A close spelling in the same section comes first; then the same name in another section
    (``training.kl_penalty`` -> ``rlaif.kl_penalty``); then a close spelling of the whole path,
    among our keys and then among ``aliases``.
    """
    known = known_keys(schema)
    dotted = ".".join(str(p) for p in loc)
    prefix = ".".join(str(p) for p in loc[:-1])
    siblings = [k for k in known if k.rpartition(".")[0] == prefix]
    close = difflib.get_close_matches(dotted, siblings, n=1, cutoff=0.75)
    if not close:
        close = [k for k in known if k.rpartition(".")[2] == str(loc[-1])][:1]
    if not close:
        close = difflib.get_close_matches(dotted, known, n=1, cutoff=0.75)
    if not close:
        close = difflib.get_close_matches(dotted, list(aliases), n=1, cutoff=0.6)
    return f"; did you mean {close[0]}?" if close else ""


def known_keys(schema: type[BaseModel], prefix: str = "") -> list[str]:
    """Every dotted key of ``schema``, sections and their keys (``"training"``, ``"training.batch_size"``)."""
    keys = []
    for name, field in schema.model_fields.items():
        dotted = f"{prefix}{name}"
        keys.append(dotted)
        annotation: Any = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            keys += known_keys(annotation, dotted + ".")
    return keys
