"""The command line's log lines go to the stderr of the moment they are written."""

from __future__ import annotations

import io
import logging
import sys

from ephys_gpt.cli import setup_logging


def test_log_lines_follow_a_swapped_stderr(monkeypatch):
    first = io.StringIO()
    monkeypatch.setattr(sys, "stderr", first)
    setup_logging()
    first.close()  # e.g. a captured stream of a finished test or a closed notebook cell
    second = io.StringIO()
    monkeypatch.setattr(sys, "stderr", second)
    logging.getLogger("ephys_gpt.somewhere").info("written after the swap")
    assert "written after the swap" in second.getvalue()
    assert "Logging error" not in second.getvalue()
