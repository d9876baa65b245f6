"""Refuse training that would do nothing, and stop training whose loss is no longer a number.

- :func:`check_trains_something`: before the Trainer starts, a run that would make no
  optimizer step (an epoch with no batch because ``batch_size`` exceeds the training split
  with ``drop_last``; ``limit_train_batches``, ``max_steps`` or ``max_epochs`` leaving
  nothing; a checkpoint that already reached them) is refused, naming the numbers.
- :class:`NonFiniteLossGuard`: a NaN or infinite training loss stops the run with
  :class:`~ephys_gpt.training.errors.NonFiniteLossError`, naming the global step, the epoch
  and batch, and the logged loss parts that are not finite. On the CPU the loss is checked
  every step before ``backward`` (no cost: the value is already on the host), so the bad
  batch never updates the weights. On an accelerator checking every step would make each
  step wait for the device; the guard keeps one device-side flag per step and reads them all
  at once every ``trainer.log_every_n_steps`` steps (when Lightning synchronises to log
  anyway), before every validation and before every checkpoint is written, so a checkpoint
  never holds weights updated by a non-finite loss.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.callbacks import Callback

from ephys_gpt.training.errors import NonFiniteLossError

logger = logging.getLogger(__name__)


# ------------------------------------------------------------------------------ zero steps
def _fit_loop_epochs_done(ckpt: dict) -> int | None:
    try:
        return int(ckpt["loops"]["fit_loop"]["epoch_progress"]["current"]["processed"])
    except (KeyError, TypeError, ValueError):
        return None


def check_trains_something(trainer_cfg: dict, n_windows: int, n_batches: int, batch_size: int,
                           drop_last: bool, ckpt: dict | None = None,
                           ckpt_path: str | None = None) -> int:
    """Raise ValueError when the run would make no optimizer step; return the steps per epoch.

    ``n_batches`` is ``len(train_loader)``; the Trainer's limits (``limit_train_batches``,
    ``accumulate_grad_batches``, ``max_steps``, ``max_epochs``) are applied as Lightning does.
    ``ckpt`` is the checkpoint a resumed run continues from.
    """
    if n_batches == 0:
        why = (f"dataloader.batch_size is {batch_size} but the training split has only "
               f"{n_windows} window(s)")
        if drop_last:
            raise ValueError(f"{why} and dataloader.drop_last is true, so an epoch has no batch "
                             "and nothing would be trained; lower dataloader.batch_size to at "
                             f"most {n_windows} or set dataloader.drop_last: false")
        raise ValueError(f"the training split has no batch ({why}); nothing would be trained")
    limit = trainer_cfg.get("limit_train_batches")
    limit = 1.0 if limit is None else limit
    per_epoch = (min(n_batches, limit) if isinstance(limit, int) and not isinstance(limit, bool)
                 else int(n_batches * float(limit)))
    if per_epoch <= 0:
        raise ValueError(f"trainer.limit_train_batches={limit} of {n_batches} training batch(es) "
                         "leaves none: nothing would be trained")
    accumulate = trainer_cfg.get("accumulate_grad_batches") or 1
    steps_per_epoch = math.ceil(per_epoch / accumulate)
    max_steps = trainer_cfg.get("max_steps")
    max_steps = -1 if max_steps is None else int(max_steps)
    max_epochs = trainer_cfg.get("max_epochs")
    if max_epochs is None:
        max_epochs = 1000 if max_steps == -1 and trainer_cfg.get("max_time") is None else -1
    if max_steps == 0:
        raise ValueError("trainer.max_steps is 0: nothing would be trained")
    if max_epochs == 0:
        raise ValueError("trainer.max_epochs is 0: nothing would be trained")
    if ckpt is not None:
        step = int(ckpt.get("global_step", 0))
        if max_steps > 0 and step >= max_steps:
            raise ValueError(f"resume_from: {ckpt_path} is at global step {step}, which already "
                             f"reaches trainer.max_steps={max_steps}: nothing would be trained; "
                             "raise trainer.max_steps to continue the run")
        done = _fit_loop_epochs_done(ckpt)
        if max_epochs > 0 and done is not None and done >= max_epochs:
            raise ValueError(f"resume_from: {ckpt_path} finished {done} epoch(s), which already "
                             f"reaches trainer.max_epochs={max_epochs}: nothing would be trained; "
                             "raise trainer.max_epochs to continue the run")
    return steps_per_epoch


# ------------------------------------------------------------------------------ NaN / inf
def _logged_step_values(trainer) -> dict[str, torch.Tensor]:
    """This step's values logged by ``training_step`` (Lightning's result collection)."""
    results = getattr(getattr(trainer.fit_loop, "epoch_loop", None), "_results", None) or {}
    out = {}
    for rm in results.values():
        meta = getattr(rm, "meta", None)
        cache = getattr(rm, "_forward_cache", None)
        if meta is not None and rm.is_tensor and meta.fx == "training_step" \
                and isinstance(cache, torch.Tensor):
            out[meta.name] = cache
    return out


class NonFiniteLossGuard(Callback):
    """Stop training on a NaN/inf loss (see the module docstring for when it is checked).

    Parameters
    ----------
    check_every : int
        On accelerators: read the pending flags every this many optimizer steps.
    checkpoint_dir : path, optional
        Named in the message (where the last good checkpoints are).
    """

    #: Device types whose loss is checked at once (reading it costs no synchronisation).
    host_devices: tuple[str, ...] = ("cpu",)

    def __init__(self, check_every: int = 50, checkpoint_dir: str | Path | None = None):
        self.check_every = max(int(check_every), 1)
        self.checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir else None
        self._where: tuple[int, int] = (0, 0)
        self._pending: list[tuple[int, int, int, torch.Tensor]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        self._where = (int(trainer.current_epoch), int(batch_idx))

    def on_before_backward(self, trainer, pl_module, loss: torch.Tensor) -> None:
        epoch, batch_idx = self._where
        step = int(trainer.global_step)
        if loss.device.type in self.host_devices:
            if not bool(torch.isfinite(loss.detach()).all()):
                self._fail(trainer, step, epoch, batch_idx, _logged_step_values(trainer),
                           value=str(float(loss.detach().float().sum())))
        else:  # no host sync here: keep a device flag, read it later
            self._pending.append((step, epoch, batch_idx, ~torch.isfinite(loss.detach()).all()))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        if self._pending and trainer.global_step % self.check_every == 0:
            self.check(trainer)

    def on_validation_start(self, trainer, pl_module) -> None:
        self.check(trainer)

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        self.check(trainer)  # raising here means the checkpoint is not written

    def on_train_end(self, trainer, pl_module) -> None:
        self.check(trainer)

    def check(self, trainer) -> None:
        """Read the pending device flags (one synchronisation) and stop on the first bad step."""
        if not self._pending:
            return
        pending, self._pending = self._pending, []
        flags = torch.stack([p[3] for p in pending]).cpu()
        bad = torch.nonzero(flags).flatten()
        if len(bad):
            step, epoch, batch_idx, _ = pending[int(bad[0])]
            self._fail(trainer, step, epoch, batch_idx, _logged_step_values(trainer),
                       deferred=True)

    def _fail(self, trainer, step: int, epoch: int, batch_idx: int, logged: dict[str, Any],
              value: str = "not finite", deferred: bool = False) -> None:
        bad = {name: float(v.detach().float().cpu()) for name, v in logged.items()
               if v.numel() == 1 and not bool(torch.isfinite(v.detach()))}
        parts = ", ".join(f"{k}={v}" for k, v in sorted(bad.items()))
        when = " when the flags were read" if deferred else ""
        named = f"; not finite{when}: {parts}" if parts else ""
        kept = ""
        if self.checkpoint_dir is not None:
            ckpts = sorted(p.name for p in self.checkpoint_dir.glob("*.ckpt"))
            kept = (f"; the checkpoints written before it are kept in {self.checkpoint_dir} "
                    f"({', '.join(ckpts)})" if ckpts else "; no checkpoint had been written yet")
        raise NonFiniteLossError(
            f"training stopped: the training loss is {value} at global step {step} (epoch "
            f"{epoch}, batch {batch_idx}{named}){kept}. Check the data for values far outside "
            "the normalized range, lower lightning.lr, or use 32-bit precision", step, batch_idx)
