"""Preprocess raw recordings (the original toolkit's command line).

    python preprocess.py --dataset omega --stage both --args configs/local/preprocess.yaml

Same as ``ephys-gpt preprocess``; see ``docs/preprocessing.md``.
"""

from __future__ import annotations

import sys

from ephys_gpt.cli import main

_GLOBAL_FLAGS = ("-v", "-vv", "--verbose", "-q", "--quiet")

if __name__ == "__main__":
    argv = sys.argv[1:]
    global_flags = [a for a in argv if a in _GLOBAL_FLAGS]
    rest = [a for a in argv if a not in _GLOBAL_FLAGS]
    sys.exit(main([*global_flags, "preprocess", *rest]))
