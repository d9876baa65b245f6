"""The record every batch step over sessions returns (stage 1, stage 2, legacy conversion)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class RunResult:
    """What a run over many sessions did.

    ``written``: outputs produced by this run; ``skipped``: names already complete from an
    earlier run (left as they are); ``failed``: name -> reason (the run went on without them);
    ``repaired``: names among ``written`` that replaced a damaged earlier output.
    """

    written: list[Path] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    repaired: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.failed

    def counts(self) -> str:
        """``"N new, M already done, K failed"`` (``"N new (of which R repaired)"`` when some
        replaced damaged outputs)."""
        repaired = f" (of which {len(self.repaired)} repaired)" if self.repaired else ""
        return (f"{len(self.written)} new{repaired}, {len(self.skipped)} already done, "
                f"{len(self.failed)} failed")
