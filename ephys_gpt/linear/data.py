"""What the linear baselines are fitted on: contiguous segments of a chunk store, and the
token codec that moves token models' data into and out of the signal domain.

**Segments.** A lag never crosses from one piece of data to another that is not contiguous
with it in time. :class:`Segments` turns a dataset (any chunk dataset of
``ephys_gpt/dataset/datasets.py``) into the maximal runs of samples its windows cover inside
one chunk: windows of one chunk that touch or overlap are the same recording, so they are
merged (more lagged rows per sample read); different chunks, sessions and the cuts of
``split_by: time`` stay apart. ``contiguous=False`` keeps every window as its own segment
(exactly what a model sees, at the cost of ``order`` unusable samples per window).

**Domain.** Continuous stores are fitted in their own units (stage 2's normalized units).
Token stores are decoded through the trailing ``mulaw_quantize`` step recorded for each
window's own session (:func:`decode_tokens`), i.e. into the normalized units the tokens were
quantized from; the ``normalize`` step is *not* undone, because its statistics differ per
session and the token model itself sees normalized values. Predictions go back to tokens
with :func:`requantize`, which calls
:func:`ephys_gpt.codec.mulaw_quantize` with the recorded parameters, so
the tokens are exactly those the quantizer gives for the predicted values. Datasets that
quantize a continuous store on the fly are read as tokens too (quantized, then decoded), so
the baseline sees what the token model sees; training augmentations are not applied.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch

from ephys_gpt.codec import mulaw_bin_edges, mulaw_dequantize, mulaw_quantize

logger = logging.getLogger(__name__)

Array = Any  # np.ndarray | torch.Tensor


# -- the token codec ---------------------------------------------------------------------------


def mulaw_step(steps: Sequence[dict], what: str = "steps") -> dict:
    """The trailing ``mulaw_quantize`` step of recorded stage-2 ``steps`` (error otherwise)."""
    steps = list(steps)
    if not steps or not isinstance(steps[-1], dict) or steps[-1].get("name") != "mulaw_quantize":
        last = steps[-1].get("name") if steps and isinstance(steps[-1], dict) else None
        raise ValueError(f"{what}: token data must end with a recorded 'mulaw_quantize' step "
                         f"(n_bits, scale); the last step is {last!r}")
    step = steps[-1]
    if "n_bits" not in step:
        raise ValueError(f"{what}: the 'mulaw_quantize' step has no 'n_bits': {step}")
    return step


def _row_steps(steps: Sequence, n_rows: int) -> list[dict]:
    """One mulaw step per row: ``steps`` is one list of step dicts or ``n_rows`` lists."""
    steps = list(steps)
    if steps and all(isinstance(s, dict) for s in steps):
        return [mulaw_step(steps)] * n_rows
    if len(steps) != n_rows:
        raise ValueError(f"steps: expected one list of stage-2 steps, or one per row "
                         f"({n_rows}), got {len(steps)} lists")
    return [mulaw_step(s, f"steps[{i}]") for i, s in enumerate(steps)]


def _groups(row_steps: list[dict]) -> list[tuple[dict, list[int]]]:
    """Rows grouped by identical quantizer parameters (one transform call per group)."""
    out: dict[str, tuple[dict, list[int]]] = {}
    for i, st in enumerate(row_steps):
        key = repr((int(st["n_bits"]), st.get("scale", 1.0)))
        out.setdefault(key, (st, []))[1].append(i)
    return list(out.values())


def _apply_by_row(x: Array, steps: Sequence, fn) -> Array:
    if x.ndim < 2:
        raise ValueError(f"expected (C, T) or (B, C, T) data, got shape {tuple(x.shape)}")
    if x.ndim == 2:
        return _apply_by_row(x[None], [mulaw_step(steps)], fn)[0]
    groups = _groups(_row_steps(steps, x.shape[0]))
    if len(groups) == 1:
        return fn(x, groups[0][0])
    parts = [(rows, fn(x[rows], st)) for st, rows in groups]
    out = (torch.empty(x.shape, dtype=parts[0][1].dtype, device=parts[0][1].device)
           if isinstance(x, torch.Tensor) else np.empty(x.shape, dtype=parts[0][1].dtype))
    for rows, part in parts:
        out[rows] = part
    return out


def decode_tokens(tokens: Array, steps: Sequence) -> Array:
    """Tokens ``(C, T)`` or ``(B, C, T)`` → float32 values in normalized units.

    ``steps``: the recorded stage-2 steps (one list for all rows, or one list per row, e.g.
    each window's own session's); only the trailing ``mulaw_quantize`` step is inverted.
    """
    return _apply_by_row(tokens, steps, lambda t, st: mulaw_dequantize(
        t, int(st["n_bits"]), st.get("scale", 1.0)))


def token_bin_edges(steps: Sequence, n_rows: int, n_channels: int
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """The values each token stands for: lower and upper edges ``(n_rows, C, V)`` (float64,
    normalized units) of every token's bin under each row's recorded ``mulaw_quantize`` step
    (``steps`` as in :func:`decode_tokens`). A value between ``lo`` and ``hi`` quantizes to
    that token (a value exactly on an edge to either neighbour, as rounding decides); the end
    tokens also take everything beyond the range (``lo = -inf`` for token 0, ``hi = +inf``
    for the last)."""
    rows = _row_steps(steps, n_rows)
    bits = {int(st["n_bits"]) for st in rows}
    if len(bits) != 1:
        raise ValueError(f"steps: the rows' mu-law steps have different n_bits {sorted(bits)}; "
                         "token bins need one vocabulary")
    V = 2 ** bits.pop()
    edges = _apply_by_row(torch.empty(n_rows, n_channels, V + 1), steps, lambda t, st:
                          mulaw_bin_edges(int(st["n_bits"]), st.get("scale", 1.0)).expand_as(t))
    lo, hi = edges[..., :-1], edges[..., 1:]
    return lo, hi


def requantize(values: Array, steps: Sequence) -> Array:
    """Values ``(C, T)`` or ``(B, C, T)`` in normalized units → tokens, through the recorded
    ``mulaw_quantize`` step of each row (exactly :func:`mulaw_quantize` of the values; torch
    input gives int64, numpy the store's compact dtype)."""
    return _apply_by_row(values, steps, lambda v, st: mulaw_quantize(
        v, int(st["n_bits"]), st.get("scale", 1.0)))


# -- segments ----------------------------------------------------------------------------------


class Segments:
    """Contiguous float64 segments ``(C, L)`` of a dataset, for fitting (re-iterable).

    Parameters
    ----------
    dataset : chunk dataset
        Any dataset of ``ephys_gpt/dataset/datasets.py`` (``metas``, ``indices``,
        ``read_samples``, ``session_steps``); typically a split's ``train`` or ``val``.
    contiguous : bool
        Merge the windows of one chunk that touch or overlap into one segment (default);
        False: one segment per window.
    max_samples : int, optional
        Read at most about this many samples: whole segments spread evenly over the dataset
        (a deterministic choice), for a bounded fitting time on large stores.
    """

    def __init__(self, dataset: Any, *, contiguous: bool = True, max_samples: int | None = None):
        for attr in ("metas", "indices", "read_samples"):
            if not hasattr(dataset, attr):
                raise TypeError(f"Segments needs a chunk dataset (with .metas, .indices, "
                                f".read_samples; see ephys_gpt/dataset/datasets.py), got "
                                f"{type(dataset).__name__} without .{attr}")
        self.dataset = dataset
        idx = np.asarray(dataset.indices, dtype=np.int64).reshape(-1, 3)
        if not len(idx):
            raise ValueError(f"{type(dataset).__name__} has no windows: nothing to fit on")
        read = int(dataset.read_samples)
        runs: list[tuple[int, int, int, int]] = []  # (session, chunk, start, stop)
        order = np.lexsort((idx[:, 2], idx[:, 1], idx[:, 0]))
        for s, c, start in idx[order].tolist():
            stop = start + read
            if contiguous and runs and runs[-1][:2] == (s, c) and start <= runs[-1][3]:
                runs[-1] = (s, c, runs[-1][2], max(runs[-1][3], stop))
            else:
                runs.append((s, c, start, stop))
        if max_samples is not None:
            if isinstance(max_samples, bool) or not isinstance(max_samples, (int, np.integer)) \
                    or max_samples < 1:
                raise ValueError(f"max_samples must be a positive integer, got {max_samples!r}")
            total = sum(b - a for *_, a, b in runs)
            if total > max_samples:
                keep = max(1, int(len(runs) * max_samples / total))
                pick = np.linspace(0, len(runs) - 1, keep).round().astype(int)
                runs = [runs[i] for i in sorted(set(pick.tolist()))]
        self.runs = runs
        metas = dataset.metas
        self.n_channels = int(metas[0].n_channels)
        quantize = getattr(dataset, "quantize", None)
        self.tokens = bool(metas[0].is_tokens or quantize)
        self.domain = "normalized (decoded tokens)" if self.tokens else "store units"

    def __len__(self) -> int:
        return len(self.runs)

    @property
    def n_samples(self) -> int:
        return int(sum(b - a for *_, a, b in self.runs))

    def label(self, i: int) -> str:
        s, c, a, b = self.runs[i]
        meta = self.dataset.metas[s]
        return f"session {meta.name!r}, chunk file {meta.chunk_path(c)}, samples {a}..{b}"

    def read(self, i: int) -> np.ndarray:
        """Segment ``i`` as float64 (C, L), decoded for token data, checked finite."""
        from ephys_gpt.store import load_chunk

        s, c, a, b = self.runs[i]
        ds = self.dataset
        raw = np.asarray(load_chunk(ds.metas[s], c, mmap=True)[:, a:b])
        if self.tokens:
            steps = ds.session_steps(s)
            if getattr(ds, "quantize", None):  # continuous store quantized on the fly
                raw = requantize(raw.astype(np.float32), steps)
            x = decode_tokens(raw.astype(np.int64), steps)
        else:
            x = raw
        x = np.asarray(x, dtype=np.float64)
        if not np.isfinite(x).all():
            ch, t = (int(v[0]) for v in np.nonzero(~np.isfinite(x)))
            raise ValueError(f"non-finite value ({x[ch, t]}) in {self.label(i)}, channel "
                             f"{ds.metas[s].ch_names[ch]!r} at sample {a + t} of the chunk; "
                             "re-run stage 2 on this session")
        return x

    def __iter__(self) -> Iterator[np.ndarray]:
        for i in range(len(self)):
            yield self.read(i)

    def __repr__(self) -> str:
        return (f"Segments({len(self)} segments, {self.n_samples} samples, "
                f"{self.n_channels} channels, {self.domain})")


def as_segments(data: Any, what: str = "data") -> Any:
    """A dataset becomes :class:`Segments`; a re-iterable of arrays passes through.

    A one-shot iterator (a generator) is refused: fitting may need two passes.
    """
    if hasattr(data, "indices") and hasattr(data, "metas"):
        return Segments(data)
    if isinstance(data, (np.ndarray, torch.Tensor)):
        if data.ndim == 2:
            return [data]
        if data.ndim == 3:
            return list(data)
        raise ValueError(f"{what}: expected a (C, T) array, a (N, C, T) stack of segments, a "
                         f"list of (C, T) arrays or a chunk dataset; got an array of shape "
                         f"{tuple(data.shape)}")
    if isinstance(data, torch.utils.data.Dataset):
        raise TypeError(f"{what}: {type(data).__name__} is not a chunk dataset (no .metas / "
                        ".indices); pass a dataset of ephys_gpt/dataset/datasets.py or a list "
                        "of contiguous (C, T) arrays")
    if iter(data) is data:
        raise TypeError(f"{what}: pass a list of (C, T) arrays (or a dataset), not a one-shot "
                        "iterator: fitting may read the data twice")
    return data


def segment_array(x: Any, i: int, n_channels: int | None, what: str) -> np.ndarray:
    """Segment ``i`` of ``what`` as float64 (C, T), checked (shape, channels, finiteness)."""
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    x = np.asarray(x)
    if x.ndim != 2:
        raise ValueError(f"{what}[{i}]: a segment must be (C, T), got shape {x.shape}")
    if n_channels is not None and x.shape[0] != n_channels:
        raise ValueError(f"{what}[{i}] has {x.shape[0]} channels; the model / the first "
                         f"segment has {n_channels}")
    if not np.issubdtype(x.dtype, np.number) or np.issubdtype(x.dtype, np.complexfloating):
        raise ValueError(f"{what}[{i}]: expected real numbers, got dtype {x.dtype}")
    x = np.asarray(x, dtype=np.float64)
    if not np.isfinite(x).all():
        ch, t = (int(v[0]) for v in np.nonzero(~np.isfinite(x)))
        raise ValueError(f"{what}[{i}] holds a non-finite value ({x[ch, t]}) at channel {ch}, "
                         f"sample {t}; the linear baselines need finite data")
    return x
