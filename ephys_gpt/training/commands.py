"""Command-line sub-commands ``train``, ``test`` and ``list-models``.

Registered into the ``ephys-gpt`` console script by :mod:`ephys_gpt.cli`; ``run.py`` at the
repository root maps ``--mode train|test`` onto the same functions (``eval`` lives in
:mod:`ephys_gpt.eval.commands`).
"""

from __future__ import annotations

import argparse
import json
import logging
import shlex
import sys

logger = logging.getLogger(__name__)


def add_run_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--args", required=True, metavar="YAML", dest="config",
                   help="run config (e.g. configs/gpt2meg/train.yaml)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="override config keys, e.g. trainer.max_epochs=3 "
                        "datasplitter.dataset_root=runs/demo/preprocessed/chunks")


def add_resplit(p: argparse.ArgumentParser) -> None:
    p.add_argument("--resplit", action="store_true",
                   help="draw the train/val/test split from datasplitter even though the run "
                        "recorded one in save_dir/split.json (results are then not comparable "
                        "with the run's earlier ones); same as resplit=true")


def resume_command(args) -> str:
    """The command line that continues an interrupted ``train`` from ``last.ckpt``."""
    keep = [o for o in args.overrides
            if o.split("=", 1)[0].strip() not in ("resume_from", "overwrite", "resplit")]
    words = ["ephys-gpt", "train", "--args", args.config, *keep, "resume_from=last"]
    return " ".join(shlex.quote(w) for w in words)


def cmd_train(args) -> int:
    from ephys_gpt.training.errors import TrainingInterrupted
    from ephys_gpt.training.experiment import ExperimentDL

    exp = ExperimentDL(args.config, args.overrides, mode="train",
                       overwrite=getattr(args, "overwrite", False),
                       resplit=getattr(args, "resplit", False))
    try:
        out = exp.train()
    except TrainingInterrupted as err:
        if err.checkpoint:
            err.args = (f"{err}. Resume with: {resume_command(args)}",)
        raise
    logger.info("training finished at step %d; best checkpoint %s; export %s",
                out["global_step"], out["best"], out["export"])
    return 0


def cmd_test(args) -> int:
    from ephys_gpt.training.experiment import ExperimentDL

    exp = ExperimentDL(args.config, args.overrides, mode="test",
                       resplit=getattr(args, "resplit", False))
    metrics = exp.test(getattr(args, "ckpt", None))
    logger.info("test metrics (%s): %s", exp.save_dir / "test_metrics.json",
                json.dumps(metrics, sort_keys=True))
    return 0


def models_table() -> str:
    """The registered models as an aligned text table."""
    from ephys_gpt.models.registry import list_models

    rows = [("name", "input kind", "causal", "capabilities", "description")]
    for s in list_models():
        rows.append((s.name, s.input_kind, "yes" if s.causal else "no",
                     ", ".join(s.capability_names) or "-", s.description))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = []
    for i, r in enumerate(rows):
        lines.append("  ".join(c.ljust(w) for c, w in zip(r[:4], widths)) + "  " + r[4])
        if i == 0:
            lines.append("  ".join("-" * w for w in widths) + "  " + "-" * 11)
    return "\n".join(lines)


def cmd_list_models(args) -> int:
    from ephys_gpt.models.registry import models_table_markdown

    sys.stdout.write((models_table_markdown() if args.markdown else models_table()) + "\n")
    return 0


def register(subparsers) -> None:
    """Add ``train``, ``test`` and ``list-models`` to the ``ephys-gpt`` parser."""
    p = subparsers.add_parser(
        "train", help="train a model from a run YAML",
        description="Train a model from a run YAML. A save_dir that already holds a run is "
                    "refused unless you continue it (resume_from=last) or replace it "
                    "(--overwrite). Ctrl-C / SIGTERM saves a resumable checkpoint and exits "
                    "130 / 143.")
    add_run_args(p)
    p.add_argument("--overwrite", action="store_true",
                   help="replace the run already in save_dir: deletes only the files ephys-gpt "
                        "wrote there (checkpoints, export, logs, config.yaml, split.json, "
                        "test_metrics.json, evals); same as overwrite=true")
    add_resplit(p)
    p.set_defaults(func=cmd_train)

    p = subparsers.add_parser("test", help="evaluate the best checkpoint on the test split")
    add_run_args(p)
    p.add_argument("--ckpt", default=None, help="checkpoint to test (default: save_dir's best)")
    add_resplit(p)
    p.set_defaults(func=cmd_test)

    p = subparsers.add_parser("list-models", help="list the registered models")
    p.add_argument("--markdown", action="store_true",
                   help="print the Markdown table of docs/models.md")
    p.set_defaults(func=cmd_list_models)
