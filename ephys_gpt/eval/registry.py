"""Registry of evaluation runners (``eval_class`` in eval YAML files).

An eval runner is a class registered with::

    @register_eval("EvalQuant", options=EvalQuantOptions)   # options: a pydantic model
    class EvalQuant:
        def __init__(self, config: dict, options: EvalQuantOptions): ...
        def run(self) -> dict: ...   # writes <save_dir>/evals/..., returns the summary

``config`` is the whole validated experiment config (a plain dict); ``options`` is the
validated ``eval`` block.
"""

from __future__ import annotations

import difflib
import importlib
from dataclasses import dataclass

_EVAL_MODULES = [
    "ephys_gpt.eval.eval_quant",
    "ephys_gpt.eval.eval_bendr",
    "ephys_gpt.eval.eval_diffusion",
]


@dataclass(frozen=True)
class EvalSpec:
    name: str
    cls: type
    options: type  # pydantic BaseModel validating the `eval` block


EVALS: dict[str, EvalSpec] = {}
_loaded = False


def register_eval(name: str, *, options: type):
    def deco(cls):
        EVALS[name] = EvalSpec(name, cls, options)
        return cls

    return deco


def load_all() -> None:
    global _loaded
    if _loaded:
        return
    for mod in _EVAL_MODULES:
        try:
            importlib.import_module(mod)
        except ModuleNotFoundError as err:
            if err.name == mod:
                continue
            raise
    _loaded = True


def get_eval_spec(name: str) -> EvalSpec:
    load_all()
    if name not in EVALS:
        close = difflib.get_close_matches(name, list(EVALS), n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"unknown eval_class {name!r}.{hint} "
                         f"Valid eval classes: {', '.join(sorted(EVALS))}")
    return EVALS[name]
