"""Named registries found without central lists (models, losses, eval runners, datasets,
augmentations).

A registry holds the objects that register themselves where they are defined (a decorator in
the defining module). It finds them by importing every module of its home package on first
use, so a new model family is one file under ``ephys_gpt/models/`` and nothing else to edit.
Code outside the package registers through plugins:

- the ``imports`` key of a run config (a list of module names imported before names are
  resolved), or :func:`import_plugins`;
- the entry-point group ``ephys_gpt.plugins`` of an installed package
  (``[project.entry-points."ephys_gpt.plugins"] mymodels = "mypkg.models"``).

An unknown name fails with the valid names listed and a close match suggested.

This module is the bottom layer of the package: it imports nothing from ``ephys_gpt``.
"""

from __future__ import annotations

import difflib
import importlib
import logging
import pkgutil
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Generic, TypeVar

logger = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "ephys_gpt.plugins"
T = TypeVar("T")

_plugins_loaded = False
_MISSING = object()


class Registry(Generic[T]):
    """Entries of one kind (``kind`` names them in messages: "model_name", "loss_name"...).

    Parameters
    ----------
    kind : str
        What a name of this registry is called in configs (used in error messages).
    packages : iterable of str
        Packages whose modules are imported (all of them, recursively) to fill the registry.
    """

    def __init__(self, kind: str, packages: Iterable[str]):
        self.kind = kind
        self.packages = tuple(packages)
        self._entries: dict[str, T] = {}
        self._discovered = False

    # -- filling -------------------------------------------------------------------------------
    def add(self, name: str, entry: T, owner: object = None) -> None:
        """Register ``entry`` under ``name``; the same name from another class is an error."""
        old = self._entries.get(name)
        if old is not None and owner is not None and _owner(old) is not owner \
                and _qualname(_owner(old)) != _qualname(owner):
            raise ValueError(f"{self.kind} {name!r} is registered twice "
                             f"({_qualname(_owner(old))} and {_qualname(owner)})")
        self._entries[name] = entry

    def discover(self) -> None:
        """Import every module of the home packages and the installed plugins (once)."""
        if self._discovered:
            return
        self._discovered = True
        for package in self.packages:
            for module in _walk(package):
                importlib.import_module(module)
        load_entry_point_plugins()

    # -- reading -------------------------------------------------------------------------------
    def get(self, name: str, default=_MISSING):
        """The entry called ``name``; unknown names raise ValueError listing the valid ones
        (or return ``default`` when one is given)."""
        self.discover()
        if name not in self._entries:
            if default is not _MISSING:
                return default
            raise ValueError(unknown_name_message(self.kind, name, self._entries))
        return self._entries[name]

    # mapping access (tests swap entries in and out with ``monkeypatch.setitem``)
    def __getitem__(self, name: str) -> T:
        return self.get(name)

    def __setitem__(self, name: str, entry: T) -> None:
        self.discover()
        self._entries[name] = entry

    def __delitem__(self, name: str) -> None:
        del self._entries[name]

    def __contains__(self, name: object) -> bool:
        self.discover()
        return name in self._entries

    def names(self) -> list[str]:
        self.discover()
        return sorted(self._entries)

    def values(self) -> list[T]:
        return [self._entries[n] for n in self.names()]

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self.names())


@dataclass(frozen=True)
class EvalSpec:
    """An eval runner (``eval_class``) and the pydantic model of its ``eval`` block."""

    name: str
    cls: type
    options: type


#: Eval runners, registered in their modules under ``ephys_gpt/eval/`` with
#: ``ephys_gpt.eval.registry.register_eval``. The registry lives here, at the bottom, so that
#: the run-config validator can check an ``eval`` block without importing the eval layer.
EVAL_RUNNERS: Registry[EvalSpec] = Registry("eval_class", ["ephys_gpt.eval"])


def unknown_name_message(kind: str, name: str, valid: Iterable[str]) -> str:
    """``unknown model_name 'GPT2'. Did you mean 'GPT2MEG'? Valid choices: ...``"""
    valid = sorted(valid)
    close = difflib.get_close_matches(str(name), valid, n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    return f"unknown {kind} {name!r}.{hint} Valid choices: {', '.join(valid)}"


def import_plugins(modules: Iterable[str], where: str = "imports") -> None:
    """Import user modules that register models, losses or runners (a config's ``imports``).

    A module that cannot be imported is one clear error naming it and ``where`` it came from.
    """
    for module in modules:
        try:
            importlib.import_module(module)
        except ImportError as err:
            raise ImportError(f"{where}: cannot import plugin module {module!r} ({err}); is its "
                              "folder on PYTHONPATH or its package installed?") from err


def load_entry_point_plugins() -> None:
    """Import the modules installed packages declare in the ``ephys_gpt.plugins`` group."""
    global _plugins_loaded
    if _plugins_loaded:
        return
    _plugins_loaded = True
    from importlib.metadata import entry_points

    for ep in entry_points(group=ENTRY_POINT_GROUP):
        try:
            ep.load()
        except Exception as err:  # a broken plugin must not hide the toolkit's own models
            logger.error("plugin %s (%s) failed to load: %s", ep.name, ep.value, err)


def _walk(package: str) -> list[str]:
    pkg = importlib.import_module(package)
    prefix = pkg.__name__ + "."
    return sorted(m.name for m in pkgutil.walk_packages(pkg.__path__, prefix)
                  if not m.name.rsplit(".", 1)[-1].startswith("_"))


def _owner(entry: object) -> object:
    return getattr(entry, "cls", entry)


def _qualname(obj: object) -> str:
    return f"{getattr(obj, '__module__', '?')}.{getattr(obj, '__qualname__', obj)}"


def decorator(registry: Registry, name: str, make: Callable[[type], T]) -> Callable[[type], type]:
    """A class decorator adding ``make(cls)`` to ``registry`` under ``name``."""

    def deco(cls: type) -> type:
        registry.add(name, make(cls), owner=cls)
        return cls

    return deco
