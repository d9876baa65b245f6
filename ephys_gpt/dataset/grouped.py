"""Label-grouped averaging datasets: average k examples of one class into one item.

Single MEG trials (one phoneme, one word) are dominated by noise; averaging k trials of the same
class shrinks the noise by about sqrt(k) while the evoked response stays. This is the standard
trick that lifts phoneme classification on LibriBrain, and the competition's grouped tracks
score exactly such averages (Landau et al., 2025, "The 2025 PNPL competition: speech
detection and phoneme classification in the LibriBrain dataset").

Two datasets, both over any map-style dataset of ``(x, label)`` examples:

- :class:`RandomLabelGroupedDataset`: training items drawn on the fly. Each item picks a class
  uniformly among the classes present, then ``group_size`` distinct examples of that class, and
  returns their mean. ``deterministic=True`` instead fixes the groups once (every example used
  exactly once, grouped within its class), for validation and test.
- :class:`GroupedDatasetAugmented`: the same, plus config-driven augmentations on training
  items and optional mu-law tokens.

Items are ``(x, label)``: ``x`` float32 ``(C, T)`` (int64 tokens with quantization), ``label`` an
int64 scalar tensor, so a default collate gives ``(B, C, T)`` and ``(B,)``; ``num_classes``
is exposed for one-hot targets (e.g. ``MixupDataLoader``).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, get_worker_info

from ephys_gpt.codec import mulaw_mu, mulaw_quantize, mulaw_step

logger = logging.getLogger(__name__)

Augment = Callable[[np.ndarray], np.ndarray]


def example_labels_of(dataset: Any) -> np.ndarray:
    """The class id of every example of ``dataset`` as an int64 array ``(N,)``.

    Read without loading any signal: from ``dataset.example_labels`` when the dataset has it
    (all datasets of this package do), else from a pnpl-style ``samples`` list and
    ``task.get_label``.
    """
    labels = getattr(dataset, "example_labels", None)
    if labels is None and hasattr(dataset, "samples") and hasattr(dataset, "task"):
        labels = [dataset.task.get_label(s) for s in dataset.samples]
    if labels is None:
        raise TypeError(
            f"cannot read the labels of a {type(dataset).__name__} without loading every item: "
            "give it an `example_labels` attribute (int array, one class id per example) or "
            "pass example_labels=... explicitly")
    labels = np.asarray(labels)
    if labels.ndim != 1 or len(labels) != len(dataset):
        raise ValueError(f"example_labels must have shape ({len(dataset)},), got {labels.shape}")
    if not np.issubdtype(labels.dtype, np.integer):
        raise TypeError(f"example_labels must be integer class ids, got dtype {labels.dtype}")
    return labels.astype(np.int64)


class RandomLabelGroupedDataset(Dataset):
    """Items that average ``group_size`` examples of one class.

    Parameters
    ----------
    dataset : Dataset
        Map-style dataset whose items are ``(x, label)`` with ``x`` float ``(C, T)`` (a tensor
        or array; all examples the same shape).
    group_size : int
        k, the number of examples averaged into one item. A class with fewer than k examples
        averages all it has.
    epoch_length : int | None
        Random mode: the number of items per epoch. Default: ``ceil(N / group_size)``, so one
        epoch reads about as many examples as the dataset holds. Not allowed in deterministic
        mode, whose length is the number of fixed groups.
    seed : int
        Seeds the group draws. In random mode the main process draws from
        ``default_rng(seed)`` (re-seeded per epoch by :meth:`set_epoch`); a DataLoader worker
        draws from ``default_rng([seed, worker_seed])`` where ``worker_seed`` is torch's
        per-worker seed, which differs by worker and by epoch and is fixed by seeding torch
        (``lightning.seed_everything``). So runs repeat exactly and no two workers share a stream.
    deterministic : bool
        Fixed groups for evaluation: the examples of each class are shuffled once with ``seed``
        and cut into consecutive groups of ``group_size``; item i is always the same group.
    drop_last : bool
        Deterministic mode: drop each class's trailing group when it has fewer than k examples.
    example_labels : array-like | None
        Class id per example; read from ``dataset`` when None (see :func:`example_labels_of`).
    num_classes : int | None
        Size of the label space; default ``dataset.num_classes`` or ``max(label) + 1``.
    label_names : Sequence[str] | None
        Class names by id; default ``dataset.label_names`` when present.

    Attributes
    ----------
    num_classes : int
    label_names : list[str] | None
    labels : list[int]
        The class ids present (the ones items are drawn from), sorted.
    groups : list[np.ndarray] | None
        Deterministic mode: the example indices of each item.
    input_kind : str
        ``"labelled"`` (DESIGN.md, contract 2).
    """

    input_kind = "labelled"

    def __init__(
        self,
        dataset: Dataset,
        *,
        group_size: int = 100,
        epoch_length: int | None = None,
        seed: int = 0,
        deterministic: bool = False,
        drop_last: bool = False,
        example_labels: Sequence[int] | np.ndarray | None = None,
        num_classes: int | None = None,
        label_names: Sequence[str] | None = None,
    ) -> None:
        if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
            raise ValueError(f"group_size must be a positive integer, got {group_size!r}")
        if epoch_length is not None:
            if isinstance(epoch_length, bool) or not isinstance(epoch_length, int) or epoch_length < 1:
                raise ValueError(f"epoch_length must be a positive integer or None, got {epoch_length!r}")
            if deterministic:
                raise ValueError("epoch_length applies to random groups only; a deterministic "
                                 "dataset has one item per fixed group")
        if len(dataset) == 0:
            raise ValueError(f"cannot group an empty {type(dataset).__name__}")
        self.dataset = dataset
        self.group_size = group_size
        self.seed = int(seed)
        self.deterministic = bool(deterministic)
        self.drop_last = bool(drop_last)

        if example_labels is None:
            self.example_labels = example_labels_of(dataset)
        else:
            self.example_labels = np.asarray(example_labels, dtype=np.int64)
            if self.example_labels.shape != (len(dataset),):
                raise ValueError(f"example_labels must have shape ({len(dataset)},), "
                                 f"got {self.example_labels.shape}")
        if self.example_labels.min() < 0:
            raise ValueError(f"class ids must be >= 0, found {int(self.example_labels.min())}")
        n_cls = num_classes if num_classes is not None else getattr(dataset, "num_classes", None)
        self.num_classes = int(n_cls) if n_cls is not None else int(self.example_labels.max()) + 1
        if self.example_labels.max() >= self.num_classes:
            raise ValueError(f"class id {int(self.example_labels.max())} is out of range for "
                             f"num_classes={self.num_classes}")
        names = label_names if label_names is not None else getattr(dataset, "label_names", None)
        self.label_names = list(names) if names is not None else None
        # The transforms that produced the examples (e.g. z-scoring), for invert_steps.
        self.steps: list[dict] = [dict(s) for s in getattr(dataset, "steps", [])]

        # Example indices of each class present: the pools groups are drawn from.
        order = np.argsort(self.example_labels, kind="stable")
        present, starts = np.unique(self.example_labels[order], return_index=True)
        self.labels: list[int] = present.tolist()
        self._pools: list[np.ndarray] = np.split(order, starts[1:])

        self.groups: list[np.ndarray] | None = None
        self._group_labels: np.ndarray | None = None
        if self.deterministic:
            self._build_fixed_groups()
            self.epoch_length = len(self.groups)
        else:
            self.epoch_length = epoch_length or -(-len(dataset) // group_size)
        self._rng: np.random.Generator | None = None
        self._rng_owner: tuple[int, int | None] | None = None
        self._epoch: int | None = None

    # ----------------------------------------------------------------------------- groups

    def _build_fixed_groups(self) -> None:
        rng = np.random.default_rng(self.seed)
        groups, labels = [], []
        for label, pool in zip(self.labels, self._pools):
            pool = rng.permutation(pool)
            for start in range(0, len(pool), self.group_size):
                group = pool[start:start + self.group_size]
                if self.drop_last and len(group) < self.group_size:
                    continue
                groups.append(np.sort(group))
                labels.append(label)
        if not groups:
            raise ValueError(f"no class has {self.group_size} examples, so drop_last=True "
                             "leaves no fixed group; lower group_size or set drop_last=False")
        self.groups = groups
        self._group_labels = np.asarray(labels, dtype=np.int64)

    def set_epoch(self, epoch: int) -> None:
        """Re-seed the random groups of the main process for ``epoch`` (reproducible epochs)."""
        self._epoch = int(epoch)
        self._rng = None

    def _generator(self) -> np.random.Generator:
        """The group RNG of this process (main process or DataLoader worker)."""
        info = get_worker_info()
        owner = (os.getpid(), None if info is None else info.id)
        if self._rng is None or self._rng_owner != owner:
            if info is not None:
                entropy = [self.seed, int(info.seed) % 2**63]
            elif self._epoch is not None:
                entropy = [self.seed, self._epoch]
            else:
                entropy = [self.seed]
            self._rng = np.random.default_rng(entropy)
            self._rng_owner = owner
        return self._rng

    def draw_group(self, rng: np.random.Generator | None = None) -> tuple[np.ndarray, int]:
        """Draw a class uniformly among those present, then up to k distinct examples of it.

        Returns ``(indices, label)``: the example indices (sorted) and the class id.
        """
        rng = rng or self._generator()
        which = int(rng.integers(len(self.labels)))
        pool = self._pools[which]
        k = min(self.group_size, len(pool))
        indices = np.sort(rng.choice(pool, size=k, replace=False))
        return indices, self.labels[which]

    def group_indices(self, index: int) -> tuple[np.ndarray, int]:
        """The examples and class of item ``index``: fixed in deterministic mode, else drawn."""
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {type(self).__name__} of length {len(self)}")
        if self.deterministic:
            return self.groups[index], int(self._group_labels[index])
        return self.draw_group()

    # ----------------------------------------------------------------------------- items

    def average(self, indices: Sequence[int]) -> torch.Tensor:
        """Mean of the examples ``indices`` as float32 ``(C, T)``.

        Uses the dataset's batched reader ``examples(indices) -> (k, C, T)`` when it has one
        (:class:`~ephys_gpt.dataset.libribrain.LibriBrainPhonemeDataset` does), else reads
        the items one by one.
        """
        if hasattr(self.dataset, "examples"):
            stack = np.asarray(self.dataset.examples(indices))
            return torch.from_numpy(stack.mean(axis=0, dtype=np.float64).astype(np.float32))
        total = None
        for i in indices:
            x = torch.as_tensor(self.dataset[int(i)][0], dtype=torch.float64)
            if total is None:
                total = x.clone()
            elif x.shape != total.shape:
                raise ValueError(f"example {int(i)} has shape {tuple(x.shape)}, the others "
                                 f"{tuple(total.shape)}: grouped examples must share (C, T)")
            else:
                total += x
        return (total / len(indices)).to(torch.float32)

    def __len__(self) -> int:
        return self.epoch_length

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(x, label)``: x float32 (C, T), the mean of the group; label int64 scalar."""
        indices, label = self.group_indices(index)
        return self.average(indices), torch.tensor(label, dtype=torch.int64)

    def __repr__(self) -> str:
        mode = "fixed groups" if self.deterministic else "random groups"
        return (f"{type(self).__name__}({mode}, group_size={self.group_size}, items={len(self)}, "
                f"examples={len(self.example_labels)}, classes present={len(self.labels)}"
                f"/{self.num_classes})")


def build_augment(spec: Any, seed: int | None = None) -> Augment | None:
    """Turn an augmentation spec into a callable ``(C, T) float32 array -> array``, or None.

    ``spec`` is a config for :mod:`ephys_gpt.dataset.augmentations` (a list of
    ``{name: ..., <params>}``, a mapping, a YAML path, an ``Augmentations``), any other
    callable taking and returning a numpy ``(C, T)`` array (used as is), or None.
    """
    if spec is None:
        return None
    from ephys_gpt.dataset.augmentations import Augmentations, as_augmentations

    if callable(spec) and not isinstance(spec, Augmentations):
        return spec
    return as_augmentations(spec, seed=seed)


class GroupedDatasetAugmented(RandomLabelGroupedDataset):
    """:class:`RandomLabelGroupedDataset` with augmentations and optional mu-law tokens.

    Parameters (beyond :class:`RandomLabelGroupedDataset`)
    ------------------------------------------------------
    augmentations : list | mapping | path | callable | None
        Applied to each averaged training item ``x`` (C, T), before quantization (see
        :func:`build_augment`; seeded with ``seed`` and the worker seed). Never applied in
        deterministic (evaluation) mode.
    quantize_bits : int | None
        When set, items are mu-law tokens: int64 ``(C, T)`` in ``[0, 2**bits - 1]``
        (:func:`ephys_gpt.codec.mulaw_quantize`).
    quantize_scale : float
        Signal value mapped to the top of the mu-law range (values beyond saturate). For
        z-scored LibriBrain data clipped to +-10 the splitter passes the clipping boundary.
    steps : list[dict] | None
        Stage-2 style steps that produced the examples (e.g. z-scoring); the quantize step is
        appended to form :attr:`steps`, so ``invert_steps`` maps tokens back to signal units.
    """

    def __init__(
        self,
        dataset: Dataset,
        *,
        augmentations: Any = None,
        quantize_bits: int | None = None,
        quantize_scale: float = 1.0,
        steps: Sequence[dict] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(dataset, **kwargs)
        self.augment = build_augment(augmentations, seed=self.seed)
        if quantize_bits is not None:
            mulaw_mu(quantize_bits)  # validates the bit depth
            if not quantize_scale or quantize_scale <= 0:
                raise ValueError(f"quantize_scale must be > 0, got {quantize_scale!r}")
        self.quantize_bits = quantize_bits
        self.quantize_scale = float(quantize_scale)
        if steps is not None:
            self.steps = [dict(s) for s in steps]
        if quantize_bits is not None:
            self.steps.append(mulaw_step(quantize_bits, self.quantize_scale))

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(x, label)``: x float32 (C, T), or int64 tokens (C, T); label int64 scalar."""
        indices, label = self.group_indices(index)
        x = self.average(indices)
        if self.augment is not None and not self.deterministic:
            out = self.augment(np.ascontiguousarray(x.numpy()))
            x = torch.as_tensor(np.asarray(out, dtype=np.float32))
        if self.quantize_bits is not None:
            x = mulaw_quantize(x, self.quantize_bits, self.quantize_scale)
        return x, torch.tensor(label, dtype=torch.int64)
