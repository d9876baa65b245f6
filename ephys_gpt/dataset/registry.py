"""The dataset layer's registries: chunk-store dataset classes (``datasplitter.dataset_class``),
split functions (``dataset_name``) and augmentations (``augmentations[].name``).

Each entry registers itself where it is defined (``@register_dataset``,
``@register_splitter(...)``, ``@register_augmentation``); the registries import every module
of ``ephys_gpt.dataset`` on first use (see :mod:`ephys_gpt.registry`), so there is no central
list to edit. Unknown names fail with the valid names listed.
"""

from __future__ import annotations

from collections import namedtuple
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from ephys_gpt.registry import Registry

DataSplits = namedtuple("DataSplits", ["train", "val", "test"])
DataSplits.__doc__ = "The train, val and test datasets of one split (any may hold 0 windows)."


@dataclass(frozen=True)
class SplitterSpec:
    """A split function and the input kind its datasets yield for a ``datasplitter`` block."""

    name: str
    fn: Callable[..., DataSplits]
    input_kind: Callable[[Mapping[str, Any]], str]


DATASETS: Registry[type] = Registry("dataset_class", ["ephys_gpt.dataset"])
SPLITTERS: Registry[SplitterSpec] = Registry("dataset_name", ["ephys_gpt.dataset"])
AUGMENTATIONS: Registry[type] = Registry("augmentation name", ["ephys_gpt.dataset"])


def register_dataset(cls: type) -> type:
    """Class decorator: a chunk-store dataset class, named by its class name."""
    DATASETS.add(cls.__name__, cls, owner=cls)
    return cls


def register_splitter(*names: str, input_kind: Callable[[Mapping[str, Any]], str]):
    """Function decorator: the split function of ``dataset_name`` ``names``;
    ``input_kind(datasplitter_cfg)`` names the kind its datasets yield (a key of
    ``ephys_gpt.models.registry.INPUT_KINDS``)."""

    def deco(fn: Callable[..., DataSplits]) -> Callable[..., DataSplits]:
        for name in names:
            SPLITTERS.add(name, SplitterSpec(name, fn, input_kind), owner=fn)
        return fn

    return deco


def register_augmentation(cls: type) -> type:
    """Class decorator: an augmentation, named by its ``name`` class attribute."""
    AUGMENTATIONS.add(cls.name, cls, owner=cls)
    return cls


def get_dataset_class(name: str) -> type:
    """The chunk dataset class called ``name`` (an error lists the valid names)."""
    return DATASETS.get(name)


def get_splitter(dataset_name: str) -> Callable[..., DataSplits]:
    """The split function of ``dataset_name`` (``omega``/``chunks``, ``libribrain``...)."""
    return SPLITTERS.get(dataset_name).fn


def dataset_input_kind(dataset_name: str, datasplitter_cfg: Mapping[str, Any] | None) -> str:
    """The input kind the configured datasets yield."""
    return SPLITTERS.get(dataset_name).input_kind(dict(datasplitter_cfg or {}))
