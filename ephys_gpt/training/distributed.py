"""Which process of a distributed run this is, before Lightning sets anything up.

Lightning's DDP launcher on one machine (``trainer.strategy: ddp``) starts the other ranks by
re-running the same command with ``LOCAL_RANK`` set; ``torchrun`` sets ``RANK`` and SLURM
``SLURM_PROCID``. Rank 0 alone claims the run folder, records the split and writes the
config, checkpoints, export, logs and evals; other ranks read the split rank 0 recorded and
print only warnings and errors, so the user sees every message once.
"""

from __future__ import annotations

import os

# Lightning's own order (lightning.fabric.utilities.rank_zero): the first variable set wins.
_RANK_VARIABLES = ("RANK", "LOCAL_RANK", "SLURM_PROCID", "JSM_NAMESPACE_RANK")


def launch_rank() -> int:
    """The global rank the launcher gave this process (0 when the run is not distributed)."""
    for key in _RANK_VARIABLES:
        value = os.environ.get(key)
        if value is not None:
            try:
                return int(value)
            except ValueError:
                return 0
    return 0
