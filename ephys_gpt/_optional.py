"""Imports of optional dependencies that fail with the pip command that installs them."""

from __future__ import annotations

import importlib
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
            from ephys_gpt.preprocessing.osl_compat import import_osl_ephys

            import_osl_ephys()
        return importlib.import_module(module)
    except ImportError as err:
        extra = extra or _EXTRA_OF.get(module.split(".")[0])
        hint = f'pip install "ephys-gpt[{extra}]"' if extra else f"pip install {module}"
        raise ImportError(f"{module!r} is needed for this feature but is not installed: {err}. "
                          f"Install it with: {hint}") from err
