"""The ``ephys-gpt`` console script.

Each area of the package adds its own sub-commands through a ``register(subparsers)``
function; this file only assembles them and sets up logging.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
import warnings

import ephys_gpt

# Modules that contribute sub-commands (each defines register(subparsers); a sub-parser sets
# ``func`` to the callable that runs it and returns an exit code).
_COMMAND_MODULES = [
    "ephys_gpt.preprocessing.commands",  # simulate, preprocess, convert-legacy
    "ephys_gpt.training.commands",       # train, test, eval, list-models
    "ephys_gpt.tokenizers.commands",     # tokenizer
    "ephys_gpt.demo",                    # demo
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ephys-gpt",
        description="Preprocess MEG, train and evaluate generative/forecasting models.")
    parser.add_argument("--version", action="version", version=f"ephys-gpt {ephys_gpt.__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0,
                        help="more log output (-v: debug)")
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for mod in _COMMAND_MODULES:
        try:
            module = importlib.import_module(mod)
        except ModuleNotFoundError as err:
            if err.name == mod:
                continue
            raise
        module.register(sub)
    return parser


class _DropLightningTips(logging.Filter):
    """Lightning's rank-zero "💡 Tip" advertisements on every run."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("💡 Tip")


def quiet_third_party() -> None:
    """Silence known, harmless third-party chatter on the command line (not on import).

    - Lightning's "Tip: ... litlogger" line on every Trainer;
    - Lightning's own use of torch's deprecated ``LeafSpec`` (a warning per run);
    - at ``test``/``eval`` time, the note that the training-time checkpoint callback is not
      re-created (evaluation needs only the weights).
    """
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero",
                 "lightning_fabric.utilities.rank_zero"):
        log = logging.getLogger(name)
        if not any(isinstance(f, _DropLightningTips) for f in log.filters):
            log.addFilter(_DropLightningTips())
    warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated")
    warnings.filterwarnings("ignore", message=r"Be aware that when using `ckpt_path`")


def setup_logging(verbose: int = 0, quiet: bool = False) -> None:
    level = logging.WARNING if quiet else logging.DEBUG if verbose else logging.INFO
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s",
                                           datefmt="%H:%M:%S"))
    pkg = logging.getLogger("ephys_gpt")
    pkg.handlers[:] = [h for h in pkg.handlers if isinstance(h, logging.NullHandler)]
    pkg.addHandler(handler)
    pkg.setLevel(level)
    pkg.propagate = False


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    setup_logging(args.verbose, args.quiet)
    quiet_third_party()
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        logging.getLogger("ephys_gpt").error("interrupted; finished outputs are kept, "
                                             "unfinished ones were discarded")
        return 130
    except (ValueError, FileNotFoundError, ImportError) as err:
        if args.verbose:
            raise
        logging.getLogger("ephys_gpt").error("%s", err)
        return 1


if __name__ == "__main__":
    sys.exit(main())
