"""The ``eval`` sub-command: run the eval runner a run YAML names (``eval_class``).

Registered into the ``ephys-gpt`` console script by :mod:`ephys_gpt.cli`; ``run.py --mode
eval`` maps onto it.
"""

from __future__ import annotations

import json
import logging

logger = logging.getLogger(__name__)


def run_eval(config: dict):
    """Run the eval runner named by ``config['eval_class']`` on a validated config."""
    from ephys_gpt.eval.registry import get_eval_spec

    spec = get_eval_spec(config.get("eval_class") or "EvalQuant")
    options = spec.options.model_validate(config["eval"])
    return spec.cls(config, options).run()


def cmd_eval(args) -> int:
    from ephys_gpt.training.config import load_config

    config = load_config(args.config, args.overrides, mode="eval")
    if args.resplit:
        config["resplit"] = True
    summary = run_eval(config)
    logger.info("evaluation %s finished", config.get("eval_class"))
    logger.debug("summary: %s", json.dumps(summary, default=str)[:2000])
    return 0


def register(subparsers) -> None:
    """Add ``eval`` to the ``ephys-gpt`` parser."""
    from ephys_gpt.training.commands import add_resplit, add_run_args

    p = subparsers.add_parser("eval", help="run the eval runner (eval_class) of a run YAML")
    add_run_args(p)
    add_resplit(p)
    p.set_defaults(func=cmd_eval)
