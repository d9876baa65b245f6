"""``ExperimentDL``: one training/testing run described by a validated run config.

Outputs (DESIGN.md, contract 5) under ``save_dir``::

    config.yaml                 the resolved config (paths absolute, model_config filled in)
    split.json                  the sessions of each split (resume, test and eval reuse it)
    checkpoints/best.ckpt       lowest val/loss (resumable Lightning checkpoint)
    checkpoints/last.ckpt       the latest resumable state (``resume_from: last``)
    export/                     model.safetensors + config.json (from_pretrained, eval)
    logs/csv/version_N/         metrics.csv (one version per start, written as it goes)
    logs/tensorboard/version_N/ TensorBoard events
    test_metrics.json           written by test()

Training refuses a ``save_dir`` holding another run (``run_folder.py``), refuses a run that
would make no optimizer step, stops on a non-finite loss (``guards.py``), turns SIGINT/SIGTERM
into a resumable checkpoint (``interrupt.py``) and resumes exactly (``resume.py``).
"""

from __future__ import annotations

import logging
import math
import os
import shutil
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader, DistributedSampler

from ephys_gpt.codec import mulaw_step
from ephys_gpt.compatibility import check_model_data
from ephys_gpt.fileio import to_jsonable, write_json_atomic, write_with
from ephys_gpt.models.capabilities import TokenGenerator
from ephys_gpt.models.loading import DATA_KEYS, load_model, read_checkpoint
from ephys_gpt.models.pretrained import save_pretrained
from ephys_gpt.models.registry import CHANNEL_KINDS, TOKEN_KINDS, get_model_spec
from ephys_gpt.training.checkpoint import SafeCheckpointIO, check_checkpoint_fits
from ephys_gpt.training.config import ConfigError, dump_config, load_config
from ephys_gpt.training.data_init import init_from_training_data
from ephys_gpt.training.distributed import launch_rank
from ephys_gpt.training.errors import TrainingInterrupted
from ephys_gpt.training.guards import NonFiniteLossGuard, check_trains_something
from ephys_gpt.training.interrupt import SignalCheckpoint
from ephys_gpt.training.lit_model import LitModel
from ephys_gpt.training.resume import ResumableLoader, ResumeState, StepCheckpoint
from ephys_gpt.training.run_folder import (
    claim_save_dir,
    record_split,
    replace_run,
    run_splits,
)

logger = logging.getLogger(__name__)


def dataset_info(dataset, dataset_name: str) -> dict[str, Any]:
    """The description of a dataset stored with checkpoints and exports (plain values)."""
    base = getattr(dataset, "dataset", dataset)  # unwrap torch Subset-like wrappers
    info: dict[str, Any] = {"dataset_name": dataset_name}
    for key in DATA_KEYS:
        if key == "dataset_name":
            continue
        value = getattr(dataset, key, getattr(base, key, None))
        info[key] = to_jsonable(value)
    return info


class QuantizeCollate:
    """Collate continuous ``(x, y)`` windows, then mu-law quantize both to int64 tokens.

    Evaluation counterpart of ``MixupDataLoader(quantize_bits=...)``: validation and test
    batches get the same tokens as training, without mixing.
    """

    def __init__(self, bits: int, scale: float = 1.0):
        self.bits, self.scale = int(bits), float(scale)

    def __call__(self, items):
        from torch.utils.data import default_collate

        from ephys_gpt.codec import mulaw_quantize

        def quantize(t: torch.Tensor) -> torch.Tensor:
            return mulaw_quantize(t, self.bits, self.scale) if t.is_floating_point() else t

        x, y = default_collate(items)
        if isinstance(x, (list, tuple)):  # (x, pos_2d, ch_type): only the signal
            x = (quantize(x[0]), *x[1:])
        else:
            x = quantize(x)
        return x, quantize(y)


class ExperimentDL:
    """Train and test a registered model on a chunk-store (or LibriBrain) dataset.

    Parameters
    ----------
    config : dict | str | PathLike
        A run YAML path, or a config dict (validated again; a dict from :func:`load_config`
        passes unchanged).
    overrides : sequence of str
        ``a.b=value`` overrides (only when ``config`` is a path or raw dict).
    mode : str
        ``train`` or ``test`` (``eval`` goes through the eval runners).
    overwrite : bool
        Train even though ``save_dir`` holds another run, replacing it (only the files
        ephys-gpt wrote there are removed). Same as the config key ``overwrite``.
    resplit : bool
        Draw the split from ``datasplitter`` even though ``save_dir/split.json`` recorded
        one. Same as the config key ``resplit``.
    """

    def __init__(self, config, overrides=(), *, mode: str = "train", overwrite: bool = False,
                 resplit: bool = False):
        self.config = load_config(config, overrides, mode=mode)
        cfg = self.config
        self.mode = mode
        self.save_dir = Path(cfg["save_dir"])
        self.ckpt_dir = self.save_dir / "checkpoints"
        self._replace_run = False
        if mode == "train" and launch_rank() == 0:  # before any work: never over another run
            self._replace_run = claim_save_dir(self.save_dir, resume_from=cfg["resume_from"],
                                               overwrite=overwrite or cfg["overwrite"])
        L.seed_everything(cfg["seed"], workers=True, verbose=False)
        self.spec = get_model_spec(cfg["model_name"])
        self.splits, self.split_record = run_splits(cfg, resplit=resplit or cfg["resplit"])
        self.data_info = self.describe_data(self.splits.train)
        self._fit_model_config()
        self.lit = LitModel(cfg["model_name"], cfg["model_config"], cfg["loss_name"], cfg["loss"],
                            cfg["lightning"], data_info=self.data_info, run_config=cfg)
        self.trainer: L.Trainer | None = None

    # ------------------------------------------------------------------ set-up
    def describe_data(self, dataset) -> dict[str, Any]:
        """What the model sees of ``dataset`` (rate, channels, stage-2 steps), as stored with
        checkpoints and exports; tokens made on the fly by MixupDataLoader add their step."""
        info = dataset_info(dataset, self.config["dataset_name"])
        mix = self.config["dataloader"]["mixup"] or {}
        if mix.get("quantize_bits"):
            bits = int(mix["quantize_bits"])
            info["steps"] = list(info.get("steps") or []) + [
                mulaw_step(bits, float(mix.get("quantize_scale", 1.0)))]
        return info

    def _fit_model_config(self) -> None:
        """Fill ``num_channels``/``num_classes``/``vocab_size`` from the data when the model
        config omits them, and refuse a model config that contradicts the data."""
        cfg, info = self.config, self.data_info
        fields = self.spec.config_fields() or set()
        mcfg = cfg["model_config"]
        n_ch = len(info["ch_names"]) if info.get("ch_names") else None
        if "num_channels" in fields and n_ch and self.spec.input_kind in CHANNEL_KINDS:
            if "num_channels" not in mcfg:
                mcfg["num_channels"] = n_ch
                logger.info("model_config.num_channels = %d (from the dataset)", n_ch)
            elif mcfg["num_channels"] != n_ch:
                raise ConfigError(f"key 'model_config.num_channels' is {mcfg['num_channels']} but "
                                  f"the dataset has {n_ch} channels; remove the key to take it "
                                  "from the data")
        T = getattr(self.splits.train, "window_samples", None)
        if T and self.spec.can(TokenGenerator) and mcfg.get("n_positions", 0) > T:
            logger.warning(
                "model_config.n_positions is %d but training windows have %d samples: positions "
                "%d-%d are never trained, yet generation uses them before its context window "
                "slides (free-running output then drifts); set n_positions to %d or lengthen "
                "datasplitter.example_seconds", mcfg["n_positions"], T, T, mcfg["n_positions"] - 1, T)
        n_cls = getattr(self.splits.train, "num_classes", None)
        if "num_classes" in fields and n_cls:
            if "num_classes" not in mcfg:
                mcfg["num_classes"] = int(n_cls)
                logger.info("model_config.num_classes = %d (from the dataset's labels)", n_cls)
            elif mcfg["num_classes"] != n_cls:
                raise ConfigError(f"key 'model_config.num_classes' is {mcfg['num_classes']} but "
                                  f"the dataset has {n_cls} classes; remove the key to take it "
                                  "from the data")
        quant = next((s for s in info.get("steps") or [] if s.get("name") == "mulaw_quantize"), None)
        if "vocab_size" in fields and quant and self.spec.input_kind in TOKEN_KINDS:
            needed = 2 ** int(quant["n_bits"])
            if "vocab_size" not in mcfg:
                mcfg["vocab_size"] = needed
                logger.info("model_config.vocab_size = %d (from the dataset's mu-law bits)", needed)
            elif mcfg["vocab_size"] < needed:
                raise ConfigError(f"key 'model_config.vocab_size' is {mcfg['vocab_size']} but the "
                                  f"dataset's tokens take {needed} values ({quant['n_bits']}-bit "
                                  "mu-law)")

    def _loader(self, dataset, train: bool) -> DataLoader | None:
        """The DataLoader of a split (after the trainer exists: each rank of a distributed run
        reads its share). Training gets a :class:`ResumableLoader` (keyed order, exact resume);
        validation and test windows are split over the ranks in order."""
        if dataset is None or len(dataset) == 0:
            return None
        from ephys_gpt.dataset.mixup import MixupCollate

        d, seed = self.config["dataloader"], int(self.config["seed"])
        kw: dict[str, Any] = {
            "batch_size": d["batch_size"] if train else (d["eval_batch_size"] or d["batch_size"]),
            "num_workers": d["num_workers"], "pin_memory": d["pin_memory"],
            "drop_last": d["drop_last"] if train else False,
        }
        if d["num_workers"] > 0:
            kw["persistent_workers"] = d["persistent_workers"]
            if d["prefetch_factor"]:
                kw["prefetch_factor"] = d["prefetch_factor"]
        mix = d["mixup"]
        rank, world = ((self.trainer.global_rank, self.trainer.world_size)
                       if self.trainer is not None else (0, 1))
        if train:
            collate = None
            if mix:
                m = dict(mix)
                if m.get("num_classes") is None:
                    m["num_classes"] = getattr(dataset, "num_classes", None)
                collate = MixupCollate(**m)
            return ResumableLoader(dataset, seed=seed, shuffle=d["shuffle"], collate_fn=collate,
                                   rank=rank, world=world, **kw)
        if mix and mix.get("quantize_bits"):
            kw["collate_fn"] = QuantizeCollate(mix["quantize_bits"], mix.get("quantize_scale", 1.0))
        if world > 1:
            kw["sampler"] = DistributedSampler(dataset, num_replicas=world, rank=rank,
                                               shuffle=False)
        # its own generator: iterating never draws from the global RNG training uses
        return DataLoader(dataset, generator=torch.Generator().manual_seed(seed), **kw)

    def _make_trainer(self, with_val: bool, fitting: bool = True) -> L.Trainer:
        from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
        from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

        logs = self.save_dir / "logs"
        # the CSV file is written at every logged step, so a crash keeps the log up to it
        loggers = [CSVLogger(str(logs), name="csv", flush_logs_every_n_steps=1),
                   TensorBoardLogger(str(logs), name="tensorboard")]
        # the loaders shard the data over the ranks themselves (_loader)
        kwargs = {"log_every_n_steps": 10, **self.config["trainer"],
                  "use_distributed_sampler": False}
        self.checkpoint_io = SafeCheckpointIO()
        callbacks: list = []
        if fitting:
            self.interrupt = SignalCheckpoint(self.ckpt_dir / "last.ckpt")
            callbacks += [
                ResumeState(),
                NonFiniteLossGuard(kwargs["log_every_n_steps"], self.ckpt_dir),
                ModelCheckpoint(dirpath=str(self.ckpt_dir), filename="best",
                                monitor="val/loss" if with_val else None, mode="min",
                                save_top_k=1, save_last=True, enable_version_counter=False),
                LearningRateMonitor(logging_interval="step"),
            ]
            every = self.config["checkpoint"]["every_n_train_steps"]
            if every:
                callbacks.append(StepCheckpoint(str(self.ckpt_dir), every))
            callbacks.append(self.interrupt)  # after the ModelCheckpoints (see interrupt.py)
        return L.Trainer(default_root_dir=str(self.save_dir), logger=loggers,
                         callbacks=callbacks, plugins=[self.checkpoint_io], **kwargs)

    def resume_path(self) -> str | None:
        """The checkpoint ``train()`` continues from (``resume_from``; ``last`` if it exists)."""
        resume = self.config["resume_from"]
        if resume == "last":
            last = self.ckpt_dir / "last.ckpt"
            if last.is_file():
                return str(last)
            logger.info("resume_from: last, but %s does not exist yet; starting fresh", last)
            return None
        return resume

    # ------------------------------------------------------------------ runs
    def train(self) -> dict[str, Any]:
        """Fit (continuing from ``resume_from`` if set), then export the best model.

        Returns ``{"best": path, "last": path, "export": path, "global_step": int}``.
        Raises :class:`~ephys_gpt.training.errors.TrainingInterrupted` on SIGINT/SIGTERM
        (after saving ``checkpoints/last.ckpt``) and
        :class:`~ephys_gpt.training.errors.NonFiniteLossError` on a NaN/inf loss.
        """
        if self.mode != "train":
            raise ValueError("train() needs an ExperimentDL made with mode='train'")
        cfg = self.config
        with_val = bool(len(self.splits.val)) and \
            cfg["trainer"].get("limit_val_batches", 1) not in (0, 0.0)
        ckpt_path = self.resume_path()
        ckpt = None
        if ckpt_path:  # read and check it here: nothing starts if it cannot be resumed
            ckpt = read_checkpoint(ckpt_path)
            check_checkpoint_fits(ckpt, ckpt_path, self.lit, cfg["model_name"])
        n_windows, d = len(self.splits.train), cfg["dataloader"]
        n_batches = (n_windows // d["batch_size"] if d["drop_last"]
                     else math.ceil(n_windows / d["batch_size"]))
        check_trains_something(cfg["trainer"], n_windows, n_batches, d["batch_size"],
                               d["drop_last"], ckpt, ckpt_path)
        self.trainer = self._make_trainer(with_val=with_val)
        train_dl = self._loader(self.splits.train, train=True)
        val_dl = self._loader(self.splits.val, train=False) if with_val else None
        if train_dl is None:
            raise ValueError(f"the training split is empty (dataset_root="
                             f"{cfg['datasplitter'].get('dataset_root')})")
        if ckpt_path:
            self._warn_inexact_resume()
        if self.trainer.is_global_zero:
            if self._replace_run:
                replace_run(self.save_dir)
                self._replace_run = False
            dump_config(cfg, self.save_dir / "config.yaml")
            record_split(self.save_dir, self.splits, cfg)
        if ckpt_path:
            logger.info("resuming from %s (global step %s)", ckpt_path, ckpt.get("global_step"))
            self.checkpoint_io.remember(ckpt_path, ckpt)
        else:
            init_from_training_data(self.lit.model, self.splits.train, val=self.splits.val,
                                    progress=bool(cfg["trainer"].get("enable_progress_bar",
                                                                     True)))
        try:
            with self.interrupt.catching_signals():
                self.trainer.fit(self.lit, train_dataloaders=train_dl, val_dataloaders=val_dl,
                                 ckpt_path=ckpt_path)
        except (KeyboardInterrupt, SystemExit):
            if self.interrupt.signum is None:
                raise
            raise TrainingInterrupted("training interrupted twice: stopped at once without "
                                      "saving; the latest checkpoint on disk is kept",
                                      self.interrupt.signum) from None
        if self.trainer.is_global_zero and not self._ckpt("best") and self._ckpt("last"):
            # validation never ran (e.g. check_val_every_n_epoch > epochs): best = latest
            write_with(self.ckpt_dir / "best.ckpt",
                       lambda tmp: shutil.copyfile(self.ckpt_dir / "last.ckpt", tmp))
        out = {"best": self._ckpt("best"), "last": self._ckpt("last"),
               "global_step": int(self.trainer.global_step), "export": None}
        if self.trainer.is_global_zero:
            out["export"] = str(self.export())
        return out

    def _warn_inexact_resume(self) -> None:
        """Say when this resume cannot be bit-identical (docs/training.md, "Resume is exact")."""
        from ephys_gpt.dataset.datasets import ChunkWindowDataset

        ds = self.splits.train
        if not isinstance(ds, ChunkWindowDataset):
            logger.warning("%s may draw random numbers of its own: resuming from a mid-epoch "
                           "checkpoint restores the data order but not those draws",
                           type(ds).__name__)
        if self.trainer.world_size > 1:
            logger.warning("resuming a run over %d processes: the data order is restored, the "
                           "random generators of ranks other than 0 (dropout, augmentations "
                           "drawn outside the data loader) are not", self.trainer.world_size)
        device = self.trainer.strategy.root_device.type
        if device != "cpu" and not self.config["trainer"].get("deterministic"):
            logger.warning("resuming on %s without trainer.deterministic: true; the resumed run "
                           "is close to, not bit-identical with, an uninterrupted one", device)

    def _ckpt(self, which: str) -> str | None:
        p = self.ckpt_dir / f"{which}.ckpt"
        return str(p) if p.is_file() else None

    def export(self, ckpt: str | os.PathLike | None = None) -> Path:
        """Write ``save_dir/export/`` from ``ckpt`` (default: best, else last, else the
        in-memory model) with the dataset description, so eval needs no chunk store."""
        ckpt = ckpt or self._ckpt("best") or self._ckpt("last")
        if ckpt:
            model, _ = load_model(ckpt)
        else:
            model = self.lit.model
        extra = {**self.data_info, "config": self.config,
                 "source_checkpoint": str(ckpt) if ckpt else None}
        out = save_pretrained(model, self.save_dir / "export", extra=to_jsonable(extra))
        logger.info("exported %s to %s", self.config["model_name"], out)
        return out

    def test(self, ckpt_path: str | os.PathLike | None = None) -> dict[str, float]:
        """Evaluate ``ckpt_path`` (default: best, else last checkpoint) on the test split and
        write ``save_dir/test_metrics.json``."""
        if not len(self.splits.test):
            raise ValueError("the test split is empty; set datasplitter.test_ratio > 0")
        ckpt_path = ckpt_path or self._ckpt("best") or self._ckpt("last")
        if ckpt_path is None:
            raise FileNotFoundError(f"no checkpoint to test in {self.ckpt_dir} "
                                    "(train first, or pass a checkpoint path)")
        ckpt = read_checkpoint(ckpt_path)  # weights-only, checked before anything starts
        check_checkpoint_fits(ckpt, ckpt_path, self.lit, self.config["model_name"], resume=False)
        trained = (ckpt.get("hyper_parameters") or {}).get("data_info") or {}
        root = self.config["datasplitter"].get("dataset_root")
        check_model_data(trained, self.describe_data(self.splits.test),
                         model=f"the checkpoint {ckpt_path}",
                         data_label=f"datasplitter.dataset_root={root}")
        self.trainer = self._make_trainer(with_val=False, fitting=False)
        self.checkpoint_io.remember(ckpt_path, ckpt)
        test_dl = self._loader(self.splits.test, train=False)
        results = self.trainer.test(self.lit, dataloaders=test_dl, ckpt_path=str(ckpt_path))
        metrics = {k: float(v) for r in results for k, v in r.items()}
        if self.trainer.is_global_zero:
            write_json_atomic(self.save_dir / "test_metrics.json",
                               {"checkpoint": str(ckpt_path), "metrics": metrics})
        return metrics
