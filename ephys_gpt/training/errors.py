"""Why a training run stopped early (imports nothing heavy, so the command line can catch them).

:class:`RunStopped` carries the exit code the command line returns; its message is the one
line the user sees (what happened, what was kept, what to do next).
"""

from __future__ import annotations

import signal


class RunStopped(RuntimeError):
    """A run stopped before it finished; ``exit_code`` is what the command returns."""

    exit_code: int = 1


class TrainingInterrupted(RunStopped):
    """SIGINT or SIGTERM arrived during training.

    ``checkpoint`` is the resumable checkpoint written at the stop (None when nothing had been
    trained yet); the exit code is the shell convention ``128 + signal number`` (130 for
    SIGINT, 143 for SIGTERM).
    """

    def __init__(self, message: str, signum: int, checkpoint: str | None = None,
                 global_step: int | None = None):
        super().__init__(message)
        self.signum = int(signum)
        self.checkpoint = checkpoint
        self.global_step = global_step
        self.exit_code = 128 + self.signum

    @property
    def signal_name(self) -> str:
        try:
            return signal.Signals(self.signum).name
        except ValueError:
            return f"signal {self.signum}"


class NonFiniteLossError(RunStopped):
    """The training loss (or one of its named parts) became NaN or infinite."""

    def __init__(self, message: str, global_step: int, batch_idx: int | None = None):
        super().__init__(message)
        self.global_step = int(global_step)
        self.batch_idx = batch_idx
