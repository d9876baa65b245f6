"""Is this data made like that data? One rule for the sessions of one dataset and for a
model's training data versus the data it is run on.

Two descriptions of data match when they have

- the same sampling rate (``sfreq``),
- the same channels: names in the same order (and the same types),
- the same stage-2 steps: step names in the same order, and the same *settings* of each step
  (:data:`STEP_SETTINGS`): the normalization ``method``, the clip ``std_factor``, the mu-law
  ``n_bits``/``mu`` and a *configured* mu-law ``scale``.

Per-session statistics are not compared: normalization ``center``/``scale``, clip
``low``/``high``, and a mu-law ``scale`` that stage 2 derived from the clip bounds or the data
(recorded with ``"scale_from": "clip"`` or ``"data"``) legitimately differ between sessions.
A mu-law scale is compared as a number only when both steps record ``"scale_from":
"config"`` (set in ``preproc_config`` or by on-the-fly quantization); a configured scale
against a derived one is a difference; a step without ``scale_from`` (stores written before
it was recorded) is not compared on its scale. A field missing from either description
(an older export) is not compared.

A description is a mapping or an object with the attributes ``sfreq``, ``ch_names``,
``ch_types`` and ``steps``: a :class:`~ephys_gpt.store.SessionMeta`, a dataset, or a
model's recorded data description (``info`` of
:func:`ephys_gpt.models.loading.load_model`).

:func:`differences` lists what differs; :func:`check_model_data` refuses to run a model on
data that differs from its training data; ``store.check_compatible`` refuses a dataset that
mixes sessions that differ.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

#: The settings of each stage-2 step that must match (everything else it records is a
#: per-session statistic). ``mulaw_quantize``'s ``scale`` is compared separately (see above).
STEP_SETTINGS: dict[str, tuple[str, ...]] = {
    "normalize": ("method",),
    "clip": ("std_factor",),
    "mulaw_quantize": ("n_bits", "mu"),
}


class _Note(str):
    """A description standing in for a value (shown without quotes)."""


#: How a derived mu-law scale (``scale_from`` of a recorded ``mulaw_quantize`` step) reads.
SCALE_FROM = {"clip": _Note("per session, from the clip bounds"),
              "data": _Note("per session, from the data's largest value")}


class DataMismatchError(ValueError):
    """A model is asked to run on data made differently from its training data."""


@dataclass(frozen=True)
class Difference:
    """One way two data descriptions differ; ``first``/``second`` are formatted values."""

    what: str  # e.g. "sampling rate", "channels", "stage-2 steps", "mulaw_quantize n_bits"
    first: str
    second: str
    detail: str = ""  # e.g. which channels are only on one side

    def __str__(self) -> str:
        text = f"{self.what}: {self.first} vs {self.second}"
        return f"{text} ({self.detail})" if self.detail else text


def _field(data: Any, key: str) -> Any:
    if isinstance(data, Mapping):
        return data.get(key)
    return getattr(data, key, None)


def _fmt(value: Any) -> str:
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    if isinstance(value, (list, tuple)) and len(value) > 4:
        return f"[{', '.join(_fmt(v) for v in value[:3])}, ... ({len(value)} values)]"
    return repr(value) if isinstance(value, str) and not isinstance(value, _Note) else str(value)


def _names(names: Sequence[str]) -> str:
    shown = ", ".join(repr(str(n)) for n in names[:3])
    return f"{len(names)} channels [{shown}{', ...' if len(names) > 3 else ''}]"


def step_settings(step: Mapping) -> dict[str, Any]:
    """The settings of one recorded stage-2 step that must match between data (no per-session
    statistics); a key the step does not record is left out."""
    if not isinstance(step, Mapping):
        return {}
    name = step.get("name")
    out = {k: step[k] for k in STEP_SETTINGS.get(name, ()) if k in step}
    if name == "mulaw_quantize":
        source = step.get("scale_from")
        if source == "config":
            out["scale"] = step.get("scale")
        elif source is not None:
            out["scale"] = SCALE_FROM.get(source, _Note(f"per session ({source})"))
    return out


def _step_names(steps: Sequence[Mapping]) -> list:
    return [s.get("name") if isinstance(s, Mapping) else s for s in steps]


def step_differences(first: Sequence[Mapping], second: Sequence[Mapping]) -> list[Difference]:
    """How two recorded stage-2 step lists differ (names and order, then each step's
    settings); empty when they match."""
    first, second = list(first), list(second)
    names_a, names_b = _step_names(first), _step_names(second)
    if names_a != names_b:
        return [Difference("stage-2 steps", " -> ".join(map(str, names_a)) or "none",
                           " -> ".join(map(str, names_b)) or "none")]
    out = []
    for a, b in zip(first, second):
        sa, sb = step_settings(a), step_settings(b)
        for key in sa:
            if key in sb and not _same(sa[key], sb[key]):
                out.append(Difference(f"{_step_names([a])[0]} {key}", _fmt(sa[key]),
                                      _fmt(sb[key])))
    return out


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) \
            and not isinstance(a, bool) and not isinstance(b, bool):
        return math.isclose(a, b, rel_tol=1e-9, abs_tol=0.0)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


def differences(first: Any, second: Any, labels: tuple[str, str] = ("the first", "the second")
                ) -> list[Difference]:
    """Every way two data descriptions differ (sampling rate, channels, stage-2 steps); empty
    when they match. Fields missing from either are not compared; ``labels`` name the two
    sides in the details (e.g. which channels only one of them has)."""
    out = []
    fa, fb = _field(first, "sfreq"), _field(second, "sfreq")
    if fa is not None and fb is not None and not _same(fa, fb):
        out.append(Difference("sampling rate", f"{_fmt(fa)} Hz", f"{_fmt(fb)} Hz"))
    ca, cb = _field(first, "ch_names"), _field(second, "ch_names")
    if ca is not None and cb is not None:
        ca, cb = [str(c) for c in ca], [str(c) for c in cb]
        if ca != cb:
            only_a = [c for c in ca if c not in set(cb)]
            only_b = [c for c in cb if c not in set(ca)]
            if only_a or only_b:
                detail = (f"only in {labels[0]}: {only_a[:5]}{' ...' if len(only_a) > 5 else ''}"
                          f"; only in {labels[1]}: {only_b[:5]}"
                          f"{' ...' if len(only_b) > 5 else ''}")
            else:
                i = next(i for i, (x, y) in enumerate(zip(ca, cb)) if x != y)
                detail = (f"the same channels in a different order: position {i} is {ca[i]!r} "
                          f"vs {cb[i]!r}")
            out.append(Difference("channels", _names(ca), _names(cb), detail))
        else:
            ta, tb = _field(first, "ch_types"), _field(second, "ch_types")
            if ta is not None and tb is not None and list(map(str, ta)) != list(map(str, tb)):
                i = next((i for i, (x, y) in enumerate(zip(ta, tb)) if str(x) != str(y)),
                         min(len(ta), len(tb)))
                what = (f"{ca[i]!r} is {str(ta[i])!r} vs {str(tb[i])!r}"
                        if i < min(len(ta), len(tb)) else "different lengths")
                out.append(Difference("channel types", f"{len(ta)} types", f"{len(tb)} types",
                                      what))
    sa, sb = _field(first, "steps"), _field(second, "steps")
    if sa is not None and sb is not None:
        out.extend(step_differences(sa, sb))
    return out


def check_model_data(trained: Any, data: Any, *, model: str = "the model",
                     data_label: str = "the data") -> None:
    """Refuse to run a model on data made differently from its training data.

    Parameters
    ----------
    trained : mapping or object
        The model's recorded data description (``info`` of
        :func:`ephys_gpt.models.loading.load_model`: an export's ``config.json`` or a
        checkpoint's ``hyper_parameters.data_info``).
    data : mapping or object
        The data it is about to run on (a dataset, a ``SessionMeta`` ...).
    model, data_label : str
        How to name each side in the message, e.g. the export folder and
        ``"datasplitter.dataset_root=/path"``.

    Raises
    ------
    DataMismatchError
        Naming every difference with both values.
    """
    diffs = differences(trained, data, ("the training data", data_label))
    if not diffs:
        return
    lines = []
    for d in diffs:
        line = f"{model} was trained on data with {d.what} {d.first}, but {data_label} has " \
               f"{d.second}"
        lines.append(f"{line} ({d.detail})" if d.detail else line)
    raise DataMismatchError(
        "; ".join(lines) + ". A model only runs on data made like its training data (same "
        "sampling rate, channels and stage-2 preproc_config); preprocess this data the same "
        "way, or train a model on it")
