"""Mixup batches (Zhang et al., 2018, "mixup: Beyond Empirical Risk Minimization").

:class:`MixupDataLoader` is a :class:`torch.utils.data.DataLoader` whose collate function
mixes every batch with a shuffled copy of itself: for each example ``i`` a weight
``lam_i ~ Beta(alpha, alpha)`` and a partner ``j = perm[i]`` give
``x_i' = lam_i * x_i + (1 - lam_i) * x_j``. What happens to the targets depends on the data:

- labelled ``(x, y)`` with integer class labels ``y`` (B,): targets become soft labels
  ``lam_i * onehot(y_i) + (1 - lam_i) * onehot(y_j)``, float32 (B, K), which
  ``losses.basic.CrossEntropy`` accepts. ``K`` is ``num_classes`` (argument, or the dataset's
  ``num_classes`` attribute).
- continuous pairs ``(x, y)`` with float targets (forecasting/reconstruction): inputs and
  targets are mixed with the same weights and partners.
- inputs that are a tuple (``(x, pos_2d, ch_type)``): only the signal ``x`` is mixed; sensor
  metadata is the same for every example of a store.
- ``quantize_bits``: the mixed continuous signals are then mu-law quantized to int64 tokens
  (``mulaw_quantize(x, quantize_bits, quantize_scale)``): inputs, and float targets too, so a
  ``ChunkDatasetForecastCont`` feeds token models with ``(tokens[:, :-1], tokens[:, 1:])``
  computed from mixed signals. Token datasets themselves cannot be mixed (mixing token ids is
  meaningless): use a continuous dataset with ``quantize_bits`` instead.

Mixing happens in the collate function, i.e. in the DataLoader workers. The weights and
partners of a batch come from a numpy generator: keyed by the batch when
:meth:`MixupCollate.seed_batch` was called for it (training does this through
:class:`ephys_gpt.training.resume.ResumableLoader`, with the batch's run seed, epoch and
position, so a resumed run mixes exactly as an uninterrupted one, in any worker), otherwise
seeded from torch's RNG (seeded per worker by PyTorch, reproducible under
``torch.manual_seed``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, default_collate

from ephys_gpt.codec import mulaw_quantize


def _expand(lam: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(B,) weights broadcastable against ``like`` (B, ...)."""
    return lam.to(like.dtype).reshape(-1, *([1] * (like.ndim - 1)))


class MixupCollate:
    """Collate function that mixes a batch (picklable; see the module docstring)."""

    def __init__(self, alpha: float = 0.2, num_classes: int | None = None,
                 quantize_bits: int | None = None, quantize_scale: float = 1.0,
                 base_collate: Callable = default_collate):
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not alpha > 0:
            raise ValueError(f"mixup alpha must be a positive number, got {alpha!r}")
        if quantize_bits is not None and (isinstance(quantize_bits, bool)
                                          or not isinstance(quantize_bits, int)
                                          or not 1 <= quantize_bits <= 16):
            raise ValueError(f"quantize_bits must be None or an integer in [1, 16], "
                             f"got {quantize_bits!r}")
        if isinstance(quantize_scale, bool) or not isinstance(quantize_scale, (int, float)) \
                or not quantize_scale > 0:
            raise ValueError(f"quantize_scale must be a positive number, got {quantize_scale!r}")
        if num_classes is not None and (isinstance(num_classes, bool)
                                        or not isinstance(num_classes, int) or num_classes < 2):
            raise ValueError(f"num_classes must be an integer >= 2, got {num_classes!r}")
        self.alpha = float(alpha)
        self.num_classes = num_classes
        self.quantize_bits = quantize_bits
        self.quantize_scale = float(quantize_scale)
        self.base_collate = base_collate
        self._rng: np.random.Generator | None = None

    def seed_batch(self, *key: int) -> None:
        """Mix the next batch with draws that are a pure function of ``key`` (integers)."""
        self._rng = np.random.default_rng(np.random.SeedSequence([int(k) % 2**64 for k in key]))

    def _batch_rng(self) -> np.random.Generator:
        rng, self._rng = self._rng, None
        if rng is None:  # not keyed: follow torch's (per-worker) RNG
            rng = np.random.default_rng(int(torch.randint(0, 2**62, ())))
        return rng

    def _mix(self, t: torch.Tensor, lam: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
        lam = _expand(lam, t)
        return lam * t + (1.0 - lam) * t[perm]

    def _quantize(self, t: torch.Tensor) -> torch.Tensor:
        if self.quantize_bits is None:
            return t
        return mulaw_quantize(t, self.quantize_bits, self.quantize_scale)  # int64

    def __call__(self, batch: list) -> tuple[Any, torch.Tensor]:
        inputs, targets = self.base_collate(batch)
        x = inputs[0] if isinstance(inputs, (tuple, list)) else inputs
        if not torch.is_tensor(x) or not x.is_floating_point():
            raise TypeError(
                f"MixupDataLoader mixes continuous signals but the batch inputs are "
                f"{getattr(x, 'dtype', type(x).__name__)}; mixing token ids is meaningless. Use "
                "a continuous dataset (e.g. ChunkDatasetForecastCont) with quantize_bits to get "
                "tokens from mixed signals")
        b = x.shape[0]
        rng = self._batch_rng()
        lam = torch.from_numpy(rng.beta(self.alpha, self.alpha, size=b).astype(np.float32))  # (B,)
        perm = torch.from_numpy(rng.permutation(b))
        x_mix = self._quantize(self._mix(x, lam, perm))
        if isinstance(inputs, (tuple, list)):
            inputs = type(inputs)([x_mix, *inputs[1:]])
        else:
            inputs = x_mix

        if not torch.is_tensor(targets):
            raise TypeError(f"MixupDataLoader expects tensor targets, got {type(targets).__name__}")
        if targets.is_floating_point():  # continuous targets: mix like the inputs
            targets = self._quantize(self._mix(targets, lam, perm))
        elif targets.ndim == 1:  # class labels → soft one-hot (B, K)
            if self.num_classes is None:
                raise ValueError("MixupDataLoader got integer class labels but does not know the "
                                 "number of classes: pass num_classes=K or give the dataset a "
                                 "'num_classes' attribute")
            if targets.min() < 0 or targets.max() >= self.num_classes:
                raise ValueError(f"class labels must lie in [0, {self.num_classes}), found "
                                 f"{int(targets.min())}..{int(targets.max())}")
            onehot = torch.nn.functional.one_hot(targets.long(), self.num_classes).float()
            targets = self._mix(onehot, lam, perm)
        else:
            raise TypeError(f"MixupDataLoader cannot mix integer targets of shape "
                            f"{tuple(targets.shape)} (tokens); use a continuous dataset with "
                            "quantize_bits")
        return inputs, targets


class MixupDataLoader(DataLoader):
    """A DataLoader yielding mixup batches.

    Parameters
    ----------
    dataset : Dataset
        Items ``(inputs, targets)``: see the module docstring for what is mixed.
    alpha : float
        Beta(alpha, alpha) parameter of the mixing weights (0.2 keeps most weights near 0/1).
    quantize_bits : int, optional
        Mu-law quantize mixed signals to int64 tokens with this many bits.
    quantize_scale : float
        Signal value mapped to the top of the mu-law range.
    num_classes : int, optional
        Number of classes for soft labels (default: ``dataset.num_classes``).
    **kwargs
        Passed to :class:`torch.utils.data.DataLoader` (``batch_size``, ``num_workers``...);
        a ``collate_fn`` given here collates before mixing.
    """

    def __init__(self, dataset, alpha: float = 0.2, quantize_bits: int | None = None,
                 quantize_scale: float = 1.0, num_classes: int | None = None, **kwargs):
        if num_classes is None:
            num_classes = getattr(dataset, "num_classes", None)
        base = kwargs.pop("collate_fn", None) or default_collate
        self.mixup = MixupCollate(alpha, num_classes, quantize_bits, quantize_scale, base)
        super().__init__(dataset, collate_fn=self.mixup, **kwargs)
