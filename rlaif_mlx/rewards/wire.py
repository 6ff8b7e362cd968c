"""Plain data on the wire between the candidate's process and the trusted test driver.

Not imported by the package: ``grading`` prepends this file's text to the host
program (which encodes what the candidate's functions return) and to the driver
program (which decodes it), so both stay standard-library only.

A value is plain when it is built only of ``None``, ``bool``, ``int``, ``float``,
``complex``, ``str``, ``bytes``, ``list``, ``tuple``, ``dict``, ``set`` and
``frozenset``, each checked by exact type (``type(x) is int``), never by
``isinstance``: an ``int`` subclass with its own ``__eq__`` is not plain. JSON
arrays are lists; every other kind is a one-key object (``{"tuple": [...]}``).
The decoder rebuilds fresh built-in objects, so nothing the candidate made
survives the trip: a forged reply can only claim a value, never behave like one.
"""

import base64
import math

WIRE_MAX_DEPTH = 64
WIRE_MAX_ITEMS = 1_000_000
_SMALL_INT = 1 << 62


class NotPlain(Exception):
    """A value that is not built of plain data (or is too deep or too large to send)."""


def wire_encode(value, _depth=0, _budget=None, ref_of=None):
    """The JSON-ready form of a plain value; raises ``NotPlain`` for anything else.

    ``ref_of`` (the driver's) gives the number of a stand-in for the candidate's own object, or None.
    """
    budget = _budget if _budget is not None else [WIRE_MAX_ITEMS]
    budget[0] -= 1
    if _depth > WIRE_MAX_DEPTH or budget[0] < 0:
        raise NotPlain("nested too deep or too large")
    kind = type(value)
    if value is None or kind is bool or kind is str:
        return value
    if kind is int:
        return value if -_SMALL_INT < value < _SMALL_INT else {"int": hex(value)}
    if kind is float:
        return value if math.isfinite(value) else {"float": repr(value)}
    if kind is complex:
        return {
            "complex": [
                wire_encode(value.real, _depth + 1, budget, ref_of),
                wire_encode(value.imag, _depth + 1, budget, ref_of),
            ]
        }
    if kind is bytes:
        return {"bytes": base64.b64encode(value).decode("ascii")}
    if kind is list:
        return [wire_encode(v, _depth + 1, budget, ref_of) for v in value]
    if kind is tuple:
        return {"tuple": [wire_encode(v, _depth + 1, budget, ref_of) for v in value]}
    if kind is set or kind is frozenset:
        return {kind.__name__: [wire_encode(v, _depth + 1, budget, ref_of) for v in value]}
    if kind is dict:
        return {
            "dict": [
                [wire_encode(k, _depth + 1, budget, ref_of), wire_encode(v, _depth + 1, budget, ref_of)]
                for k, v in value.items()
            ]
        }
    ref = ref_of(value) if ref_of is not None else None
    if ref is not None:
        return {"ref": ref}
    raise NotPlain(kind.__name__)


def wire_decode(data, _depth=0, _refs=None):
    """Fresh built-in objects from ``wire_encode``'s form; raises ``NotPlain`` for anything malformed.

    ``_refs`` turns ``{"ref": n}`` into the driver's stand-in for the candidate's object ``n``.
    """
    if _depth > WIRE_MAX_DEPTH:
        raise NotPlain("nested too deep")
    kind = type(data)
    if data is None or kind is bool or kind is str or kind is int:
        return data
    if kind is float:
        if not math.isfinite(data):
            raise NotPlain("a bare non-finite float")
        return data
    if kind is list:
        return [wire_decode(v, _depth + 1, _refs) for v in data]
    if kind is not dict or len(data) != 1:
        raise NotPlain("malformed value")
    ((tag, body),) = data.items()
    if tag == "int" and type(body) is str:
        value = int(body, 16)
        if -_SMALL_INT < value < _SMALL_INT:
            raise NotPlain("a small int sent in long form")
        return value
    if tag == "float" and body in ("nan", "inf", "-inf"):
        return float(body)
    if tag == "bytes" and type(body) is str:
        return base64.b64decode(body.encode("ascii"), validate=True)
    if tag == "ref" and _refs is not None and type(body) is int:
        return _refs(body)
    if type(body) is not list:
        raise NotPlain("malformed value")
    items = [wire_decode(v, _depth + 1, _refs) for v in body]
    try:
        if tag == "tuple":
            return tuple(items)
        if tag == "set":
            return set(items)
        if tag == "frozenset":
            return frozenset(items)
        if tag == "complex" and len(items) == 2 and all(type(v) is float for v in items):
            return complex(items[0], items[1])
        if tag == "dict" and all(type(pair) is list and len(pair) == 2 for pair in items):
            return {k: v for k, v in items}
    except TypeError:  # an unhashable key or member
        raise NotPlain("malformed value") from None
    raise NotPlain("malformed value")
