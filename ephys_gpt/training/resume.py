"""Exact resume: the data order and every random draw of training belong to the checkpoint.

A run stopped after a checkpoint (SIGKILL, a crash, Ctrl-C) and resumed from it ends with the
same weights (bit-identical on CPU) and logs the same losses as a run that was never
interrupted, also when the checkpoint was written in the middle of an epoch. The pieces:

- :class:`ResumableLoader` (the training DataLoader): the order of each epoch is a pure
  function of ``(seed, epoch)`` (:class:`EpochSampler`); the loader counts the windows of the
  current epoch handed to training and, through ``state_dict``/``load_state_dict`` (which
  Lightning stores in the checkpoint's loop state), starts a resumed epoch right after them.
- Random draws made while loading data are keyed by the window's place in the epoch, not by
  the process that loads it: a window's augmentations draw from a generator seeded with
  ``(seed, epoch, position)``, a mixup batch from ``(seed, epoch, position of its first
  window)``. They are therefore the same in whichever DataLoader worker, with any number of
  workers, before and after a resume. Workers' own seeds come from the loader's generator,
  seeded per epoch.
- :class:`ResumeState` saves the process's generators (torch, numpy, python ``random``, CUDA
  when initialised) and the loader's position with every checkpoint and restores them when
  training restarts.
  Validation (and the sanity check) runs on a copy of them, so validating never shifts the
  training stream, whether or not a resumed run repeats a validation.
- The epoch means of the interrupted epoch (``train/loss_epoch``, token accuracy...) include
  the batches trained before the checkpoint, and the log row of the checkpoint's own step
  (which Lightning writes just after saving) is written again by the resumed run, so the CSV
  logs of the two starts together hold every step of the uninterrupted run.

Limits (also in ``docs/training.md``): bit-identical results need deterministic kernels (CPU;
on GPUs set ``trainer.deterministic: true`` and accept what cuDNN/cuBLAS guarantee) and, on
the CPU, the same number of threads (``torch.get_num_threads()``, saved with the checkpoint: a
resume with another count logs a warning, as sums are then split differently); with
several devices (DDP) Lightning's distributed sampler replaces the resumable order, so a
mid-epoch resume there is not exact (a warning says so); datasets that draw random numbers of
their own (LibriBrain's random label groups) are resumed in order but not in those draws.
"""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from torch.utils.data import DataLoader, Dataset, Sampler, default_collate

logger = logging.getLogger(__name__)

#: Where :class:`ResumeState` keeps its part of a checkpoint.
CHECKPOINT_KEY = "ephys_gpt_resume"

# Separate random streams derived from one seed (appended to the SeedSequence entropy).
_ORDER, _ITEM, _BATCH, _WORKERS = 0, 1, 2, 3


def _entropy(*values: int) -> list[int]:
    """Non-negative integers for :class:`numpy.random.SeedSequence` (any int seed works)."""
    return [int(v) % 2**64 for v in values]


def keyed_rng(*key: int) -> np.random.Generator:
    """A numpy generator that is a pure function of ``key`` (integers, any sign)."""
    return np.random.default_rng(np.random.SeedSequence(_entropy(*key)))


# ------------------------------------------------------------------------------ data order
class EpochSampler(Sampler):
    """Each epoch's order as a pure function of ``(seed, epoch)``; can start mid-epoch.

    Yields keys ``(index, epoch, position)``: ``index`` is the dataset item, ``position`` its
    place in this epoch's order (what keyed random draws are seeded with). ``start`` windows
    of the epoch are skipped by the next iteration (set when resuming); :meth:`set_epoch` to
    another epoch clears it.

    In a distributed run each of ``world`` ranks takes every ``world``-th window of the one
    order (``rank``, ``rank + world``, ...; the order is padded by repeating its start so every
    rank gets ``size`` windows), so the ranks together see exactly the global batches a single
    process would, and ``position`` (the place in the global order) keys the same random draws.
    """

    def __init__(self, size: int, seed: int, shuffle: bool = True, *, rank: int = 0,
                 world: int = 1):
        if not 0 <= rank < world:
            raise ValueError(f"rank must be in [0, world={world}), got {rank}")
        self.total, self.seed, self.shuffle = int(size), int(seed), bool(shuffle)
        self.rank, self.world = int(rank), int(world)
        self.size = -(-self.total // self.world)  # windows per rank
        self.epoch = 0
        self.start = 0

    def set_epoch(self, epoch: int) -> None:
        epoch = int(epoch)
        if epoch != self.epoch:
            self.epoch, self.start = epoch, 0

    def order(self, epoch: int | None = None) -> np.ndarray:
        """The dataset indices of ``epoch`` (default: the current one) in training order
        (all ranks, before padding)."""
        epoch = self.epoch if epoch is None else int(epoch)
        if not self.shuffle:
            return np.arange(self.total)
        return keyed_rng(self.seed, epoch, _ORDER).permutation(self.total)

    def __iter__(self):
        start, self.start = self.start, 0
        epoch, order = self.epoch, self.order()
        padded = np.resize(order, self.size * self.world)  # repeats the start to even out
        for k in range(start, self.size):
            position = self.rank + k * self.world
            yield int(padded[position]), epoch, position

    def __len__(self) -> int:
        return self.size


class KeyedItems(Dataset):
    """``dataset[index]`` for :class:`EpochSampler` keys, returned as ``(key, item)``.

    Before reading an item it reseeds the dataset's augmentations (any attribute
    ``augmentations``/``augment`` with a ``seed_item`` method, see
    :class:`ephys_gpt.dataset.augmentations.Augmentations`) from ``(seed, epoch, position)``.
    """

    def __init__(self, dataset: Dataset, seed: int):
        self.dataset, self.seed = dataset, int(seed)
        self._augs = [a for a in (getattr(dataset, n, None) for n in ("augmentations", "augment"))
                      if callable(getattr(a, "seed_item", None))]

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int, int]):
        index, epoch, position = key
        for augs in self._augs:
            augs.seed_item(self.seed, epoch, position, _ITEM)
        return key, self.dataset[index]


class KeyedCollate:
    """Collate ``(key, item)`` pairs with ``collate``; a collate function with a
    ``seed_batch`` method (mixup) first gets the key of the batch's first window."""

    def __init__(self, collate: Callable, seed: int):
        self.collate, self.seed = collate, int(seed)

    def __call__(self, pairs: list):
        keys = [k for k, _ in pairs]
        seed_batch = getattr(self.collate, "seed_batch", None)
        if callable(seed_batch):
            _, epoch, position = keys[0]
            seed_batch(self.seed, epoch, position, _BATCH)
        return self.collate([item for _, item in pairs])


class ResumableLoader(DataLoader):
    """The training DataLoader: keyed order and draws, and its position in the epoch.

    Parameters
    ----------
    dataset : Dataset
        The training dataset (map-style).
    seed : int
        The run's seed: order, augmentations, mixup and worker seeds derive from it.
    shuffle : bool
        Shuffle each epoch (else the dataset's order).
    collate_fn : callable, optional
        Batches the items (e.g. :class:`ephys_gpt.dataset.mixup.MixupCollate`).
    rank, world : int
        This process's rank and the number of ranks of a distributed run (each rank reads its
        share of the one order, see :class:`EpochSampler`).
    **kwargs
        Other :class:`torch.utils.data.DataLoader` arguments (not ``sampler``,
        ``batch_sampler`` or ``generator``, which this loader owns).

    ``state_dict()`` is ``{epoch, position, size, seed, shuffle, batch_size, drop_last}``;
    ``position`` counts the windows of ``epoch`` already handed to training.
    """

    def __init__(self, dataset: Dataset, *, seed: int, shuffle: bool = True,
                 collate_fn: Callable | None = None, rank: int = 0, world: int = 1, **kwargs):
        for key in ("sampler", "batch_sampler", "generator"):
            if kwargs.get(key) is not None:
                raise TypeError(f"ResumableLoader sets {key} itself")
            kwargs.pop(key, None)
        self.seed = int(seed)
        self._position = 0
        sampler = EpochSampler(len(dataset), seed, shuffle, rank=rank, world=world)
        super().__init__(KeyedItems(dataset, seed), sampler=sampler,
                         collate_fn=KeyedCollate(collate_fn or default_collate, seed),
                         generator=torch.Generator(), **kwargs)

    def __iter__(self):
        return self._batches()

    def _batches(self):
        # A generator: nothing runs until the first batch is asked for, i.e. after Lightning
        # has called set_epoch (worker processes would otherwise draw indices of a stale epoch).
        sampler = self.sampler
        self._position = sampler.start
        seed = int(np.random.SeedSequence(_entropy(self.seed, sampler.epoch, _WORKERS))
                   .generate_state(1, np.uint64)[0]) % 2**63
        self.generator.manual_seed(seed)  # worker seeds: a function of (seed, epoch)
        for batch in super().__iter__():
            self._position = min(self._position + self.batch_size, sampler.size)
            yield batch

    def state_dict(self) -> dict[str, Any]:
        s = self.sampler
        return {"epoch": s.epoch, "position": self._position, "size": s.size, "seed": s.seed,
                "shuffle": s.shuffle, "batch_size": self.batch_size, "drop_last": self.drop_last,
                "world": s.world}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        s = self.sampler
        now = {"world": s.world, "size": s.size, "seed": s.seed, "shuffle": s.shuffle,
               "batch_size": self.batch_size, "drop_last": self.drop_last}
        names = {"world": "processes (devices x nodes)", "size": "training windows per process",
                 "seed": "seed", "shuffle": "dataloader.shuffle",
                 "batch_size": "dataloader.batch_size", "drop_last": "dataloader.drop_last"}
        diff = [f"{names[k]}: {state.get(k)!r} in the checkpoint, {v!r} now"
                for k, v in now.items() if k in state and state[k] != v]
        if diff:
            raise ValueError("cannot continue the checkpoint's epoch where it stopped, the "
                             "training data changed (" + "; ".join(diff) + "). Restore those "
                             "settings, or resume from an end-of-epoch checkpoint")
        s.epoch, s.start = int(state["epoch"]), int(state["position"])
        self._position = s.start


# ------------------------------------------------------------------------------ generators
def capture_rng() -> dict[str, Any]:
    """The process's random generators as plain values (weights-only loadable)."""
    name, key, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {"name": str(name), "key": torch.from_numpy(key.astype(np.int64)),
                  "pos": int(pos), "has_gauss": int(has_gauss), "cached": float(cached)},
        "python": {"version": int(version), "internal": list(internal),
                   "gauss_next": gauss_next},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    """Set the process's random generators to ``state`` (from :func:`capture_rng`)."""
    torch.set_rng_state(state["torch"].cpu())
    n = state["numpy"]
    np.random.set_state((n["name"], n["key"].cpu().numpy().astype(np.uint32), n["pos"],
                         n["has_gauss"], n["cached"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["internal"]), p["gauss_next"]))
    cuda = state.get("cuda")
    if cuda is not None and torch.cuda.is_available():
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all([s.cpu() for s in cuda])
        else:
            logger.warning("the checkpoint holds CUDA random states of %d device(s), this machine "
                           "has %d: CUDA draws after the resume differ from the original run",
                           len(cuda), torch.cuda.device_count())


# ------------------------------------------------------------------------------ checkpoints
def validation_follows(trainer) -> bool:
    """Whether Lightning validates right after the training batch that just ended.

    A checkpoint written at that point would make a resumed run skip that validation
    (Lightning fast-forwards past it), so its log and best checkpoint would differ: such a
    save waits for the end of the validation instead.
    """
    try:
        return bool(trainer.fit_loop.epoch_loop._should_check_val_fx(
            trainer.fit_loop._data_fetcher))
    except Exception:  # another Lightning version: save now
        return False


class StepCheckpoint(ModelCheckpoint):
    """``checkpoints/last.ckpt`` every ``every_n_train_steps`` optimizer steps, mid-epoch
    included; a save due right before a validation is left to the validation-end save."""

    def __init__(self, dirpath: str, every_n_train_steps: int):
        super().__init__(dirpath=dirpath, filename="last", every_n_train_steps=every_n_train_steps,
                         save_top_k=1, monitor=None, enable_version_counter=False)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        if validation_follows(trainer):
            return
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)


# ------------------------------------------------------------------------------ callback
def _train_loader(trainer) -> ResumableLoader | None:
    loader = getattr(trainer.fit_loop, "_combined_loader", None)
    for dl in getattr(loader, "flattened", None) or []:
        if isinstance(dl, ResumableLoader):
            return dl
    return None


def _clone(value):
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().clone()
    if isinstance(value, list):
        return [_clone(v) for v in value]
    return value


def _to(value, device):
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, list):
        return [_to(v, device) for v in value]
    return value


class ResumeState(Callback):
    """Save the random generators and the running epoch means with every checkpoint; restore
    them when training restarts; run validation on a copy of the generators."""

    def __init__(self):
        self._loaded: dict[str, Any] | None = None
        self._pending_results: dict[str, dict] | None = None
        self._train_rng: dict[str, Any] | None = None
        self._row_unlogged = False

    # -- saving ---------------------------------------------------------------------------
    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        rng = self._train_rng if self._train_rng is not None else capture_rng()
        state: dict[str, Any] = {"rng": rng, "cpu_threads": torch.get_num_threads()}
        loader = _train_loader(trainer)
        if loader is not None:
            state["loader"] = loader.state_dict()
        means = self._epoch_means(trainer)
        if means is not None:
            state["epoch_means"] = means
        if self._row_unlogged:
            state["step_row"] = self._step_row(trainer)
        checkpoint[CHECKPOINT_KEY] = state

    @staticmethod
    def _step_row(trainer) -> dict[str, Any] | None:
        """The log row of the step just trained, which Lightning writes only after the
        ``on_train_batch_end`` hooks that save checkpoints: a resumed run writes it again."""
        lc = trainer._logger_connector
        if not getattr(lc, "should_update_logs", False):
            return None
        row = {k: float(v) for k, v in lc.metrics["log"].items()}
        if not row:
            return None
        row.setdefault("epoch", trainer.current_epoch)
        return {"step": int(trainer.fit_loop.epoch_loop._batches_that_stepped), "metrics": row}

    def _epoch_means(self, trainer) -> dict[str, Any] | None:
        """The running sums of the epoch-level training logs, for a mid-epoch checkpoint."""
        loader = _train_loader(trainer)
        if loader is None or trainer.state.fn != "fit":
            return None
        done = math.ceil(loader._position / max(loader.batch_size, 1))
        if done == 0 or done >= trainer.num_training_batches:
            return None  # at an epoch boundary nothing of the epoch is pending
        results = getattr(trainer.fit_loop.epoch_loop, "_results", None)
        sums: dict[str, dict] = {}
        metrics: dict[str, dict] = {}
        for key, rm in (results or {}).items():
            meta = getattr(rm, "meta", None)
            if meta is None or not meta.on_epoch:
                continue
            if rm.is_tensor:
                sums[key] = {"value": _clone(rm.value)}
                if hasattr(rm, "cumulated_batch_size"):
                    sums[key]["cumulated_batch_size"] = _clone(rm.cumulated_batch_size)
            elif meta.metric_attribute:  # a torchmetrics Metric of the LightningModule
                m = rm.value
                metrics[meta.metric_attribute] = {
                    "states": {n: _clone(getattr(m, n)) for n in m._defaults},
                    "update_count": int(getattr(m, "_update_count", 0))}
        return {"epoch": int(loader.sampler.epoch), "sums": sums, "metrics": metrics}

    # -- restoring ------------------------------------------------------------------------
    def on_load_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        self._loaded = checkpoint.get(CHECKPOINT_KEY)
        if self._loaded is None and trainer.state.fn == "fit":
            logger.warning("the checkpoint holds no random-generator state (written by an older "
                           "ephys-gpt): training continues, but not bit-identically to an "
                           "uninterrupted run")

    def on_train_start(self, trainer, pl_module) -> None:
        state, self._loaded = self._loaded, None
        if state is None:
            return
        restore_rng(state["rng"])
        row = state.get("step_row")
        if row:
            for lg in trainer.loggers:
                lg.log_metrics(row["metrics"], step=row["step"])
        threads = state.get("cpu_threads")
        if threads is not None and threads != torch.get_num_threads():
            logger.warning("the checkpoint was written by a process using %d CPU threads, this "
                           "one uses %d: sums are then split differently, so the resumed run "
                           "is close to, not bit-identical with, an uninterrupted one (set "
                           "OMP_NUM_THREADS=%d for an exact resume)", threads,
                           torch.get_num_threads(), threads)
        loader = _train_loader(trainer)
        if loader is not None and state.get("loader") is not None:
            # Lightning restores a stateful loader only when it sets up the data after the
            # loops' state is loaded, which the schedule's step estimate can pre-empt: do it
            # here, before the first batch is drawn (set_epoch then moves on if that epoch
            # was finished).
            loader.load_state_dict(state["loader"])
        means = state.get("epoch_means")
        if not means or means["epoch"] != trainer.fit_loop.epoch_progress.current.processed:
            return
        for attr, saved in means["metrics"].items():
            try:
                metric = pl_module.get_submodule(attr)
            except AttributeError:
                logger.warning("cannot restore the running epoch metric %s (no such module)", attr)
                continue
            device = pl_module.device
            for name, value in saved["states"].items():
                setattr(metric, name, _to(value, device))
            metric._update_count = saved["update_count"]
        self._pending_results = means["sums"]

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        self._row_unlogged = False

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self._row_unlogged = False

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        self._row_unlogged = True  # until Lightning logs it, after the checkpoint callbacks
        # The logged values of the interrupted epoch exist again only once the first resumed
        # batch has logged; adding the saved sums now is the same addition the uninterrupted
        # run made (saved + this batch), so the epoch means come out bit-identical.
        pending, self._pending_results = self._pending_results, None
        if not pending:
            return
        results = trainer.fit_loop.epoch_loop._results
        for key, saved in pending.items():
            rm = results.get(key)
            if rm is None:
                continue
            value = saved["value"].to(rm.value.device, rm.value.dtype)
            if rm.meta.is_max_reduction:
                rm.value = torch.maximum(value, rm.value)
            elif rm.meta.is_min_reduction:
                rm.value = torch.minimum(value, rm.value)
            elif rm.meta.is_mean_reduction or rm.meta.is_sum_reduction:
                rm.value = value + rm.value
            else:
                logger.warning("%s uses a custom reduction: its epoch value after the resume "
                               "covers the resumed batches only", key)
                continue
            if "cumulated_batch_size" in saved and hasattr(rm, "cumulated_batch_size"):
                rm.cumulated_batch_size = (saved["cumulated_batch_size"].to(
                    rm.cumulated_batch_size.device) + rm.cumulated_batch_size)

    # -- validation (and the sanity check) on a copy of the generators --------------------
    def on_validation_start(self, trainer, pl_module) -> None:
        self._row_unlogged = False
        self._train_rng = capture_rng()

    def on_validation_end(self, trainer, pl_module) -> None:
        if self._train_rng is not None:
            restore_rng(self._train_rng)
            self._train_rng = None
