"""Where preprocessing runs its sessions in parallel: a local Dask cluster of ``n_workers``
single-threaded processes, or an existing Dask cluster given by its scheduler address
(``dask_scheduler: tcp://host:8786`` in the preprocessing YAML).

On an existing cluster every worker must have ephys-gpt (with the ``[preprocess]`` extra)
installed and see the input and output folders under the same paths (a shared file system);
the osl-ephys import fix is installed on every worker as it joins.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager

from ephys_gpt._optional import import_osl_ephys, require

logger = logging.getLogger(__name__)


def _prepare_worker() -> None:
    """Runs in every Dask worker before tasks arrive: the osl-ephys import fix must be in
    place there too, or unpickling osl-ephys task functions fails."""
    import_osl_ephys()


@contextmanager
def dask_client(n_workers: int, scheduler: str | None = None) -> Iterator:
    """A ``distributed.Client`` on ``scheduler`` (an existing cluster, left running), or on a
    local cluster of ``n_workers`` single-threaded worker processes (shut down afterwards)."""
    require("distributed")
    from distributed import Client, LocalCluster
    from distributed.diagnostics.plugin import WorkerPlugin

    class _OslImportFix(WorkerPlugin):
        name = "ephys-gpt-osl-import-fix"

        def setup(self, worker):
            _prepare_worker()

    if scheduler:
        try:
            client = Client(scheduler, timeout="10s")
        except OSError as err:
            raise ValueError(f"dask_scheduler: cannot reach the Dask scheduler at {scheduler} "
                             f"({err}); start it (dask scheduler / dask worker) or remove "
                             "dask_scheduler to use a local cluster") from None
        with client:
            client.register_plugin(_OslImportFix())
            n = len(client.scheduler_info().get("workers", {}))
            logger.info("using the Dask cluster at %s (%d workers)", scheduler, n)
            yield client
        return
    with LocalCluster(n_workers=n_workers, threads_per_worker=1, processes=True,
                      dashboard_address=None) as cluster, Client(cluster) as client:
        client.register_plugin(_OslImportFix())
        yield client
