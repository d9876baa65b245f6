"""Imports of optional dependencies that fail with the pip command that installs them, and
the osl-ephys 2.4.0 import fix.

The osl-ephys 2.4.0 wheel ships both ``source_recon/parcellation.py`` and an old
``source_recon/parcellation/`` package. Python prefers the package, which lacks
``plot_source_topo``, so ``import osl_ephys`` fails (upstream issue #431).
:func:`import_osl_ephys` installs a meta-path finder that resolves
``osl_ephys.source_recon.parcellation`` to the module file when both exist. Nothing in
site-packages is modified, and fixed releases are unaffected (the finder only acts when the
stale folder is present). :func:`require` applies it to every ``osl_ephys`` import.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import os
import sys
from types import ModuleType

_EXTRA_OF = {
    "osl_ephys": "preprocess",
    "mne_bids": "preprocess",
    "dask": "preprocess",
    "distributed": "preprocess",
    "pnpl": "libribrain",
    "h5py": "libribrain",
}


def require(module: str, extra: str | None = None) -> ModuleType:
    """Import ``module`` or raise an ImportError naming the extra that provides it.

    Parameters
    ----------
    module : str
        Dotted module name, e.g. ``"mne_bids"``.
    extra : str | None
        The ``ephys-gpt`` extra that installs it; looked up from the top-level module if None.
    """
    try:
        if module.split(".")[0] == "osl_ephys":
            import_osl_ephys()
        return importlib.import_module(module)
    except ImportError as err:
        extra = extra or _EXTRA_OF.get(module.split(".")[0])
        hint = f'pip install "ephys-gpt[{extra}]"' if extra else f"pip install {module}"
        raise ImportError(f"{module!r} is needed for this feature but is not installed: {err}. "
                          f"Install it with: {hint}") from err


_TARGET = "osl_ephys.source_recon.parcellation"


class _ParcellationModuleFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path, target=None):
        if fullname != _TARGET or not path:
            return None
        for folder in path:
            module_file = os.path.join(folder, "parcellation.py")
            stale_pkg = os.path.join(folder, "parcellation")
            if os.path.isfile(module_file) and os.path.isdir(stale_pkg):
                return importlib.util.spec_from_file_location(fullname, module_file)
        return None


def install_finder() -> None:
    """Put the finder first on ``sys.meta_path`` (idempotent)."""
    if not any(isinstance(f, _ParcellationModuleFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, _ParcellationModuleFinder())


def import_osl_ephys() -> ModuleType:
    """Return the ``osl_ephys`` module, importing it with the workaround in place."""
    install_finder()
    # osl-ephys sets matplotlib's backend chatter and may pick an interactive backend;
    # we never show windows.
    import matplotlib

    matplotlib.use("Agg", force=False)
    return importlib.import_module("osl_ephys")
