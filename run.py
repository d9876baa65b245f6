#!/usr/bin/env python
"""Train, test or evaluate from a run YAML, or fit a tokenizer (the original command line).

    python run.py --mode train --args configs/gpt2meg/train.yaml [key.path=value ...]
    python run.py --mode test  --args configs/gpt2meg/train.yaml
    python run.py --mode eval  --args configs/gpt2meg/eval.yaml
    python run.py --mode tokenizer --args configs/fast/tokenizer.yaml

Equivalent to ``ephys-gpt train|test|eval|tokenizer --args ...``.
"""

from __future__ import annotations

import argparse
import sys

from ephys_gpt.cli import main as cli_main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", required=True, choices=["train", "test", "eval", "tokenizer"])
    parser.add_argument("--args", required=True, metavar="YAML", help="run config")
    parser.add_argument("-v", "--verbose", action="count", default=0)
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    ns = parser.parse_args(argv)
    return cli_main(["-v"] * ns.verbose + [ns.mode, "--args", ns.args, *ns.overrides])


if __name__ == "__main__":
    sys.exit(main())
