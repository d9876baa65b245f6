"""Writers for evaluation outputs: curves (``.npy`` + ``.json``), ``summary.json``, ``report.md``.

Everything is written atomically (temporary name in the same folder, then ``os.replace``), so
an interrupted evaluation never leaves a half-written file that looks finished.

A curve named ``nstep_accuracy`` becomes two files:

- ``nstep_accuracy.npy`` — float64 array (1 + K, N): row 0 is ``x``, row ``k`` the k-th curve
  in the order listed in the JSON's ``curves`` (readable with ``np.load(allow_pickle=False)``).
- ``nstep_accuracy.json`` — ``{"name", "x", "xlabel", "ylabel", "curves": {label: [...]},
  "rows": [...], ...meta}``.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ephys_gpt.fileio import write_json_atomic, write_npy_atomic, write_text_atomic


def write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    return write_text_atomic(path, text)


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    """Write ``obj`` (see :func:`~ephys_gpt.fileio.to_jsonable`) as indented JSON atomically."""
    return write_json_atomic(path, obj, indent=2)


write_npy = write_npy_atomic


def save_curve(out_dir: str | os.PathLike, name: str, x: np.ndarray,
               curves: Mapping[str, np.ndarray], *, xlabel: str, ylabel: str,
               **meta: Any) -> dict[str, Path]:
    """Write one set of curves over a shared ``x`` (N,) as ``<name>.npy`` and ``<name>.json``.

    ``curves`` maps a label (e.g. ``"GPT2MEG"``, ``"repeat-last"``) to an array (N,);
    ``meta`` (units, sampling mode, number of windows...) is stored in the JSON.
    """
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 1:
        raise ValueError(f"curve {name!r}: x should be 1-D, found shape {x.shape}")
    rows = [x]
    for label, y in curves.items():
        y = np.asarray(y, dtype=np.float64)
        if y.shape != x.shape:
            raise ValueError(f"curve {name!r}: {label!r} has shape {y.shape}, x has {x.shape}")
        rows.append(y)
    out = Path(out_dir)
    npy = write_npy(out / f"{name}.npy", np.stack(rows))
    js = write_json(out / f"{name}.json", {
        "name": name, "xlabel": xlabel, "ylabel": ylabel, "x": x,
        "curves": {k: np.asarray(v, dtype=np.float64) for k, v in curves.items()},
        "rows": ["x", *curves], **meta})
    return {"npy": npy, "json": js}


def load_curve(path: str | os.PathLike) -> dict[str, Any]:
    """Read a curve written by :func:`save_curve` (give the ``.json`` or ``.npy`` path)."""
    path = Path(path)
    js = path.with_suffix(".json")
    if not js.is_file():
        raise FileNotFoundError(f"{js} not found (curves are stored as <name>.json + .npy)")
    return json.loads(js.read_text())


class MarkdownReport:
    """A small builder for a human-readable ``report.md``.

    >>> rep = MarkdownReport("EvalQuant")
    >>> rep.section("Next-step accuracy").table(["model", "acc"], [["GPT2MEG", 0.41]])
    >>> rep.write("report.md")
    """

    def __init__(self, title: str):
        self._lines: list[str] = [f"# {title}", ""]

    def section(self, heading: str, level: int = 2) -> MarkdownReport:
        self._lines += [f"{'#' * level} {heading}", ""]
        return self

    def text(self, paragraph: str) -> MarkdownReport:
        self._lines += [paragraph.strip(), ""]
        return self

    def bullets(self, items: Sequence[str]) -> MarkdownReport:
        self._lines += [f"- {item}" for item in items] + [""]
        return self

    def table(self, headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> MarkdownReport:
        self._lines.append("| " + " | ".join(str(h) for h in headers) + " |")
        self._lines.append("|" + "|".join("---" for _ in headers) + "|")
        for row in rows:
            self._lines.append("| " + " | ".join(fmt_value(v) for v in row) + " |")
        self._lines.append("")
        return self

    def figure(self, path: str | os.PathLike, caption: str,
               relative_to: str | os.PathLike | None = None) -> MarkdownReport:
        """Embed a figure (link written relative to the report's folder when given)."""
        p = Path(path)
        if relative_to is not None:
            p = Path(os.path.relpath(p, relative_to))
        self._lines += [f"![{caption}]({p.as_posix()})", f"*{caption}*", ""]
        return self

    def render(self) -> str:
        return "\n".join(self._lines).rstrip() + "\n"

    def write(self, path: str | os.PathLike) -> Path:
        return write_text(path, self.render())


def fmt_value(v: Any, digits: int = 4) -> str:
    """Compact text for a table cell (floats to ``digits`` significant digits; None as —)."""
    if v is None:
        return "—"
    if isinstance(v, (float, np.floating)):
        if not math.isfinite(float(v)):
            return "—"
        return f"{float(v):.{digits}g}"
    return str(v)
