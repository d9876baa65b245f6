"""Ctrl-C (SIGINT) and SIGTERM during training: save a resumable checkpoint, then stop.

While ``trainer.fit`` runs, :class:`SignalCheckpoint` owns both signals. A signal only sets a
flag; at the next point where the state is consistent (the end of a training step that
updated the weights, the end of a validation) the callback writes
``checkpoints/last.ckpt`` (atomically, like every checkpoint) and raises
:class:`~ephys_gpt.training.errors.TrainingInterrupted`; the command line then says where the
checkpoint is and how to resume, and exits 130 (SIGINT) or 143 (SIGTERM). Resuming from it is
exact (``ephys_gpt/training/resume.py``). A second signal stops at once without saving.

It subclasses Lightning's ``Checkpoint`` so that Lightning runs it after the
``ModelCheckpoint`` callbacks: a best/last checkpoint due at the same step is written first.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
from pathlib import Path

from lightning.pytorch.callbacks import Checkpoint

from ephys_gpt.training.errors import TrainingInterrupted
from ephys_gpt.training.resume import validation_follows

logger = logging.getLogger(__name__)

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class SignalCheckpoint(Checkpoint):
    """Turn SIGINT/SIGTERM during training into a resumable checkpoint and a clean stop.

    Parameters
    ----------
    path : path
        Where the checkpoint goes (``save_dir/checkpoints/last.ckpt``, which
        ``resume_from: last`` continues).
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    # -- signal handlers ------------------------------------------------------------------
    def _handler(self, signum, frame) -> None:
        if self.signum is not None:  # a second signal: stop now, without saving
            raise KeyboardInterrupt
        self.signum = signum
        logger.warning("received %s: stopping after the current training step with a "
                       "resumable checkpoint (send it again to stop at once without saving)",
                       signal.Signals(signum).name)

    @contextlib.contextmanager
    def catching_signals(self):
        """Own SIGINT and SIGTERM for the duration of the block (main thread only)."""
        if threading.current_thread() is not threading.main_thread():
            yield self
            return
        self.signum = None
        self._previous = {s: signal.getsignal(s) for s in SIGNALS}
        try:
            for s in SIGNALS:
                signal.signal(s, self._handler)
            yield self
        finally:
            for s, h in self._previous.items():
                signal.signal(s, h)
            self._previous = {}

    def _own_sigterm(self) -> None:
        # Lightning registers its own SIGTERM handler when fit starts (it would stop the run
        # at the next batch without our checkpoint): take the signal back.
        if self._previous and signal.getsignal(signal.SIGTERM) != self._handler:
            signal.signal(signal.SIGTERM, self._handler)

    # -- where the flag is acted on -------------------------------------------------------
    def on_sanity_check_start(self, trainer, pl_module) -> None:
        self._own_sigterm()

    def on_train_start(self, trainer, pl_module) -> None:
        self._own_sigterm()
        if self.signum is not None:
            self._stop(trainer, save=False)

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx,
                                dataloader_idx: int = 0) -> None:
        if self.signum is not None and trainer.sanity_checking:
            self._stop(trainer, save=False)

    def on_validation_end(self, trainer, pl_module) -> None:
        if self.signum is not None:
            self._stop(trainer, save=not trainer.sanity_checking)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        if self.signum is None:
            return
        should_accumulate = getattr(trainer.fit_loop.epoch_loop, "_should_accumulate", None)
        if callable(should_accumulate) and should_accumulate():
            return  # mid gradient accumulation: stop at the step that applies it
        if validation_follows(trainer):
            return  # stop at its end (a resumed run would skip it: see resume.py)
        self._stop(trainer, save=True)

    def _stop(self, trainer, save: bool) -> None:
        signum, name = self.signum, signal.Signals(self.signum).name
        step = int(trainer.global_step)
        if save and step > 0:
            trainer.save_checkpoint(str(self.path))
            where = (f"at global step {step} (epoch {trainer.current_epoch}): saved the "
                     f"resumable checkpoint {self.path}; continue with resume_from=last")
            logger.info("interrupted by %s; checkpoint %s", name, self.path)
            raise TrainingInterrupted(f"training interrupted by {name} {where}", signum,
                                      str(self.path), step)
        raise TrainingInterrupted(f"training interrupted by {name} before a training step "
                                  "finished: nothing new to save", signum, None, step)
