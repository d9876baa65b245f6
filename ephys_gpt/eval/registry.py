"""Registration of evaluation runners (``eval_class`` in eval YAML files).

An eval runner registers itself in its own module under ``ephys_gpt/eval/`` (found
automatically, see :mod:`ephys_gpt.registry`)::

    @register_eval("EvalQuant", options=EvalQuantOptions)   # options: a pydantic model
    class EvalQuant(EvalRunner):
        def __init__(self, config: dict, options: EvalQuantOptions): ...
        def run(self) -> dict: ...   # writes <save_dir>/evals/..., returns the summary

``config`` is the whole validated experiment config (a plain dict); ``options`` is the
validated ``eval`` block.
"""

from __future__ import annotations

from ephys_gpt.registry import EVAL_RUNNERS, EvalSpec

EVALS = EVAL_RUNNERS

__all__ = ["EVALS", "EvalSpec", "get_eval_spec", "register_eval"]


def register_eval(name: str, *, options: type):
    """Class decorator adding an eval runner with its options model."""

    def deco(cls):
        EVAL_RUNNERS.add(name, EvalSpec(name, cls, options), owner=cls)
        return cls

    return deco


def get_eval_spec(name: str) -> EvalSpec:
    return EVAL_RUNNERS.get(name)
