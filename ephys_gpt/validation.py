"""Checks of user-given values with messages that teach (in the manner of MNE's
``_validate_type`` / ``_check_option``): each names the parameter, what is allowed and what
was received.

This module is the bottom layer of the package: it imports nothing from ``ephys_gpt``.
"""

from __future__ import annotations

import difflib
import math
import numbers
from collections.abc import Iterable
from typing import Any

_TYPE_NAMES = {
    "int": (numbers.Integral,),
    "numeric": (numbers.Real,),
    "str": (str,),
    "path-like": (str,),  # plus os.PathLike, added below
    "bool": (bool,),
}


def describe(value: Any, width: int = 80) -> str:
    """``repr(value)`` shortened to ``width`` characters, with its type: ``'abc' (str)``."""
    text = repr(value)
    if len(text) > width:
        text = text[: width - 3] + "..."
    return f"{text} ({type(value).__name__})"


def _resolve_types(types) -> tuple[tuple[type, ...], list[str]]:
    import os

    if not isinstance(types, (tuple, list)):
        types = (types,)
    out: list[type] = []
    names: list[str] = []
    for t in types:
        if t is None:
            out.append(type(None))
            names.append("None")
        elif isinstance(t, str):
            if t not in _TYPE_NAMES:
                raise ValueError(f"validate_type: unknown type name {t!r}")
            out.extend(_TYPE_NAMES[t])
            if t == "path-like":
                out.append(os.PathLike)
            names.append(t)
        else:
            out.append(t)
            names.append(t.__name__)
    return tuple(out), names


def first_line(err: BaseException) -> str:
    """The first line of an error's message (its type name when the message is empty), for
    one-line messages that wrap a library's error."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def validate_type(value: Any, types, name: str) -> Any:
    """Return ``value`` if it is one of ``types``, else raise TypeError naming ``name``.

    ``types`` is a type, ``None``, one of the names ``"int"``, ``"numeric"``, ``"str"``,
    ``"path-like"``, ``"bool"``, or a tuple of these. Booleans are not accepted as ``int`` or
    ``numeric`` (``True`` is rarely a number a user meant).
    """
    classes, names = _resolve_types(types)
    ok = isinstance(value, classes)
    if ok and isinstance(value, bool) and bool not in classes and \
            not any(n == "bool" for n in names):
        ok = False
    if not ok:
        allowed = names[0] if len(names) == 1 else ", ".join(names[:-1]) + " or " + names[-1]
        raise TypeError(f"{name} must be {allowed}, got {describe(value)}")
    return value


def check_option(value: Any, allowed: Iterable[Any], name: str) -> Any:
    """Return ``value`` if it is in ``allowed``, else raise ValueError listing the options
    (with a close-match hint for strings)."""
    allowed = list(allowed)
    if value in allowed:
        return value
    hint = ""
    if isinstance(value, str):
        close = difflib.get_close_matches(value, [str(a) for a in allowed], n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
    options = ", ".join(repr(a) for a in allowed)
    raise ValueError(f"{name} must be one of {options}; got {value!r}.{hint}")


def check_number(value: Any, name: str, *, low: float | None = None, high: float | None = None,
                 low_inclusive: bool = True, high_inclusive: bool = True,
                 integer: bool = False) -> Any:
    """Return ``value`` if it is a finite number (an integer if ``integer``) inside the given
    bounds, else raise TypeError/ValueError naming ``name`` and the bounds."""
    validate_type(value, "int" if integer else "numeric", name)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    too_low = low is not None and (value < low if low_inclusive else value <= low)
    too_high = high is not None and (value > high if high_inclusive else value >= high)
    if too_low or too_high:
        lo = "" if low is None else f"{'>=' if low_inclusive else '>'} {low:g}"
        hi = "" if high is None else f"{'<=' if high_inclusive else '<'} {high:g}"
        bounds = " and ".join(b for b in (lo, hi) if b)
        raise ValueError(f"{name} must be {bounds}, got {value!r}")
    return value
