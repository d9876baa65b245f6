"""Held-out data access shared by every eval runner: whole windows of a dataset, the stage-2
steps of the session each comes from, evenly spread window indices, and decoding to signal
units.

Legend: B windows, C channels, T samples.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from ephys_gpt.codec import invert_steps


def full_window(dataset, index: int) -> tuple[torch.Tensor, tuple]:
    """Window ``index`` of ``dataset`` as one ``(C, T)`` tensor, and its extra inputs.

    Accepts the items of every chunk dataset: shifted pairs ``(x[:, :-1], x[:, 1:])``
    (tokens or continuous; the full window is recovered), ``((x, pos_2d, ch_type), target)``
    (the extra inputs are returned beside ``x``) and plain tensors.
    """
    item = dataset[index]
    inputs, target = item if isinstance(item, (tuple, list)) else (item, None)
    extra: tuple = ()
    if isinstance(inputs, (tuple, list)):
        inputs, extra = inputs[0], tuple(inputs[1:])
    x = torch.as_tensor(inputs)
    if x.dim() != 2:
        raise ValueError(f"evaluation needs (C, T) windows, got shape {tuple(x.shape)} from "
                         f"{type(dataset).__name__}")
    if target is not None and torch.is_tensor(target) and target.shape == x.shape and (
            x.shape[-1] > 1 and torch.equal(target[:, :-1], x[:, 1:])):
        x = torch.cat([x, target[:, -1:]], dim=-1)  # shifted pair: recover the full window
    return x, extra


def window_steps(dataset, index: int) -> list[dict]:
    """Stage-2 steps of the session window ``index`` comes from (normalization statistics
    are per session, so each window is decoded with its own session's steps)."""
    return list(dataset.session_steps(int(dataset.indices[index][0])))


def spread_indices(n_items: int, n: int, seed: int) -> np.ndarray:
    """``n`` indices spread evenly over ``range(n_items)`` (a seeded offset; no repeats)."""
    n = min(n, n_items)
    if n <= 0:
        return np.zeros(0, dtype=np.int64)
    offset = np.random.default_rng(seed).integers(0, max(1, n_items // n))
    return (offset + np.arange(n) * (n_items // n)).astype(np.int64) % n_items


def to_signal(x: torch.Tensor, steps: Sequence[Sequence[dict]],
              normalized: bool = False) -> torch.Tensor:
    """Model values (B, C, T) (tokens or continuous) → signal (B, C, T) float on the CPU, row
    ``b`` decoded with ``steps[b]``: stage-1 SI units, or ``normalized`` units (the
    ``normalize`` step is not undone, so channels and sessions are comparable)."""
    rows = []
    for row, st in zip(x, steps):
        if normalized:
            st = [s for s in st if s.get("name") != "normalize"]
        row = row.cpu()
        rows.append(invert_steps(row if not row.is_floating_point() else row.float(), st))
    return torch.stack(rows)
