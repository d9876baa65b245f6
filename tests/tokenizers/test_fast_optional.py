"""Without the ``tokenizers`` library, FAST fails with the command that installs it."""

from __future__ import annotations

import sys

import numpy as np
import pytest

from ephys_gpt.tokenizers.fast import FASTTokenizer


def test_missing_tokenizers_library_says_how_to_install(monkeypatch):
    import builtins

    real = builtins.__import__

    def fake(name, *a, **k):
        if name == "tokenizers" or name.startswith("tokenizers."):
            raise ImportError("No module named 'tokenizers'")
        return real(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", fake)
    monkeypatch.delitem(sys.modules, "tokenizers", raising=False)
    with pytest.raises(ImportError, match="pip install tokenizers"):
        FASTTokenizer.fit(lambda: iter(np.zeros((2, 3, 8))), progress=False)
