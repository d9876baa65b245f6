"""The ``tokenizer`` sub-command: fit a FAST tokenizer on a chunk store's training split.

    ephys-gpt tokenizer --args configs/fast/tokenizer.yaml [key.path=value ...]
    python run.py --mode tokenizer --args configs/fast/tokenizer.yaml

The YAML (relative paths resolve against its folder; overrides against the working
directory)::

    tokenizer: FAST
    dataset_name: omega
    datasplitter: {dataset_root: ..., dataset_class: ChunkDatasetReconstruction,
                   example_seconds: 1.0, ...}     # any continuous chunk dataset
    fast: {scale: 10.0, vocab_size: 1024, min_frequency: 2, word_rows: 1,
           max_fit_windows: 2000, eval_windows: 200}
    save_dir: ../../runs/fast                     # the tokenizer folder
    seed: 0

Training windows are streamed (``max_fit_windows`` of them, spread over the split); the
round trip is then measured on held-out windows (test, else val, else train split): RMSE in
the model's units and in signal units (fT for magnetometers; stage-2 steps inverted with each
window's session statistics), and tokens per second of signal. The figures go to the
tokenizer's ``fast_tokenizer.json`` (``info.fit``) and ``fit_summary.json`` beside it.
"""

from __future__ import annotations

import argparse
import inspect
import json
import logging
import os
import time
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError

logger = logging.getLogger(__name__)


class FASTOptions(BaseModel):
    """The ``fast`` block."""

    model_config = ConfigDict(extra="forbid", strict=True)

    scale: float = Field(10.0, gt=0, description="DCT coefficients are multiplied by this "
                         "before rounding: larger = finer, more distinct values, more tokens")
    vocab_size: int = Field(1024, ge=2, description="BPE vocabulary (at least the number of "
                            "distinct rounded coefficients)")
    min_frequency: int = Field(2, ge=1, description="least count of a pair that BPE merges")
    word_rows: int | None = Field(1, ge=1, description="DCT coefficient rows per BPE word "
                                  "(merges stay inside a word); null = whole window")
    max_fit_windows: int = Field(2000, ge=1, description="training windows streamed to the "
                                 "fit (spread over the split); bounds time and memory")
    eval_windows: int = Field(200, ge=1, description="held-out windows for the round trip")


class TokenizerRunConfig(BaseModel):
    """The tokenizer YAML."""

    model_config = ConfigDict(extra="forbid", strict=True)

    tokenizer: Literal["FAST"] = "FAST"
    dataset_name: str = "omega"
    datasplitter: dict = Field(default_factory=dict)
    fast: FASTOptions = Field(default_factory=FASTOptions)
    save_dir: str
    seed: int = 0
    progress: bool = True


def _set(cfg: dict, keys: list[str], value: Any) -> None:
    for k in keys[:-1]:
        cfg = cfg.setdefault(k, {})
        if not isinstance(cfg, dict):
            raise ValueError(f"override {'.'.join(keys)}: {k!r} is not a mapping")
    cfg[keys[-1]] = value


def load_tokenizer_config(path: str | os.PathLike, overrides=()) -> dict:
    """Read, override and validate a tokenizer YAML; paths made absolute."""
    from ephys_gpt.training.config import (
        ConfigError,
        format_validation_error,
        parse_override,
        read_yaml,
    )

    path = Path(path)
    raw = read_yaml(path, "tokenizer config") or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of keys, found {type(raw).__name__}")
    base = path.resolve().parent
    for keys in (("save_dir",), ("datasplitter", "dataset_root")):
        d = raw if len(keys) == 1 else raw.get(keys[0]) or {}
        if isinstance(d.get(keys[-1]), str):
            d[keys[-1]] = os.path.normpath(base / os.path.expanduser(d[keys[-1]]))
    for text in overrides:
        keys, value = parse_override(text)
        if keys[-1] in ("save_dir", "dataset_root") and isinstance(value, str):
            value = os.path.abspath(os.path.expanduser(value))
        _set(raw, keys, value)
    try:
        cfg = TokenizerRunConfig.model_validate(raw).model_dump()
    except ValidationError as err:
        raise ConfigError(f"{path}: {format_validation_error(err, '', TokenizerRunConfig)}"
                          ) from None
    _check_datasplitter(cfg, path)
    return cfg


def _check_datasplitter(cfg: dict, source: Path) -> None:
    from ephys_gpt.dataset.registry import get_splitter

    dcfg = cfg["datasplitter"]
    dcfg.setdefault("dataset_class", "ChunkDatasetReconstruction")
    splitter = get_splitter(cfg["dataset_name"])
    params = inspect.signature(splitter).parameters
    if not any(p.kind == p.VAR_KEYWORD for p in params.values()):
        unknown = sorted(set(dcfg) - set(params))
        if unknown:
            raise ValueError(f"{source}: unknown key(s) {unknown} in 'datasplitter'; allowed: "
                             f"{sorted(params)}")
    root = dcfg.get("dataset_root")
    if not isinstance(root, str) or not Path(root).exists():
        raise FileNotFoundError(f"{source}: key 'datasplitter.dataset_root' {root} does not "
                                "exist (run `ephys-gpt preprocess` first, or override it with "
                                "datasplitter.dataset_root=PATH)")


def _windows(ds, indices):
    def gen():
        for i in indices:
            yield ds.read_continuous(int(i))[:, :ds.window_samples]
    return gen


def round_trip(tok, ds, indices, batch: int = 32) -> dict[str, Any]:
    """Encode and decode held-out windows: token counts and errors (model and signal units)."""
    from ephys_gpt.codec import invert_steps
    from ephys_gpt.eval.eval_quant import window_steps
    from ephys_gpt.eval.runner import display_unit

    types = [str(t) for t in ds.ch_types]
    n_tok, sq, sq_si, ss = [], 0.0, {t: 0.0 for t in set(types)}, 0.0
    tok.clipped = 0
    for j in range(0, len(indices), batch):
        part = [int(i) for i in indices[j:j + batch]]
        x = np.stack([ds.read_continuous(i)[:, :ds.window_samples] for i in part])
        ids = tok.encode_batch(x)
        rec = np.stack([tok.decode(i) for i in ids])
        n_tok += [len(i) for i in ids]
        sq += float(((rec - x) ** 2).sum())
        ss += float(((x - x.mean(-1, keepdims=True)) ** 2).sum())
        for i, r, w in zip(part, rec, x):
            steps = window_steps(ds, i)
            err = np.asarray(invert_steps(r, steps)) - np.asarray(invert_steps(w.astype(
                np.float64), steps))
            for t in sq_si:
                sq_si[t] += float((err[[k for k, c in enumerate(types) if c == t]] ** 2).sum())
    n = len(indices) * ds.window_samples
    seconds = ds.window_samples / ds.sfreq
    counts = {t: types.count(t) for t in sq_si}
    return {"windows": len(indices), "tokens_per_window": float(np.mean(n_tok)),
            "tokens_per_second": float(np.mean(n_tok) / seconds),
            "values_per_token": float(len(types) * ds.window_samples / np.mean(n_tok)),
            "rmse_normalized": float(np.sqrt(sq / (n * len(types)))),
            "variance_explained": 1.0 - sq / max(ss, 1e-30),
            "clipped_fraction": tok.clipped / float(n * len(types)),
            "rmse_signal": {t: {"rmse": float(np.sqrt(v / (n * counts[t]))
                                              * display_unit(t)[0]),
                                "unit": display_unit(t)[1]} for t, v in sq_si.items()}}


def fit_fast(cfg: dict) -> dict[str, Any]:
    """Fit, evaluate and save a FAST tokenizer as a validated config describes."""
    from ephys_gpt.dataset.registry import get_splitter
    from ephys_gpt.eval.windows import spread_indices
    from ephys_gpt.fileio import to_jsonable, write_json_atomic
    from ephys_gpt.tokenizers.fast import FASTTokenizer

    f = cfg["fast"]
    splits = get_splitter(cfg["dataset_name"])(**cfg["datasplitter"])
    train = splits.train
    if train is None or len(train) == 0:
        raise ValueError("the training split is empty: FAST needs training windows")
    if getattr(train, "produces", "continuous") != "continuous":
        raise ValueError("FAST tokenizes continuous windows: use a continuous dataset_class "
                         "(e.g. ChunkDatasetReconstruction) on a store without mulaw_quantize")
    fit_idx = spread_indices(len(train), f["max_fit_windows"], cfg["seed"])
    info = {"sfreq": float(train.sfreq), "ch_names": list(train.ch_names),
            "ch_types": list(train.ch_types), "steps": train.steps,
            "dataset_root": cfg["datasplitter"].get("dataset_root")}
    t0 = time.perf_counter()
    tok = FASTTokenizer.fit(_windows(train, fit_idx), scale=f["scale"],
                            vocab_size=f["vocab_size"], min_frequency=f["min_frequency"],
                            word_rows=f["word_rows"], n_windows=len(fit_idx),
                            progress=cfg["progress"], info=info)
    fit_s = time.perf_counter() - t0
    held, split = next(((d, n) for n, d in (("test", splits.test), ("val", splits.val))
                        if d is not None and len(d)), (train, "train"))
    if split == "train":
        logger.warning("no held-out windows (val_ratio = test_ratio = 0): the round trip is "
                       "measured on training windows")
    rt = round_trip(tok, held, spread_indices(len(held), f["eval_windows"], cfg["seed"] + 1))
    summary = {"tokenizer": "FAST", **{k: f[k] for k in ("scale", "word_rows")},
               "vocab_size": tok.vocab_size, "coefficient_range": [tok.lo, tok.hi],
               "fit_windows": len(fit_idx), "fit_seconds": fit_s, "window_samples":
               tok.window_samples, "sfreq": info["sfreq"], "round_trip_split": split, **rt}
    tok.info["fit"] = to_jsonable(summary)
    out = tok.save(cfg["save_dir"])
    write_json_atomic(out / "fit_summary.json", summary, indent=2)
    return summary


def cmd_tokenizer(args) -> int:
    cfg = load_tokenizer_config(args.config, args.overrides)
    summary = fit_fast(cfg)
    logger.info("FAST tokenizer saved to %s: vocabulary %d, %.0f tokens per second of "
                "signal, round-trip RMSE %s (%.4g normalized)", cfg["save_dir"],
                summary["vocab_size"], summary["tokens_per_second"],
                ", ".join(f"{v['rmse']:.4g} {v['unit']} ({t})"
                          for t, v in summary["rmse_signal"].items()),
                summary["rmse_normalized"])
    logger.debug("summary: %s", json.dumps(summary, default=str))
    return 0


def register(subparsers) -> None:
    """Add ``tokenizer`` to the ``ephys-gpt`` parser."""
    p = subparsers.add_parser("tokenizer", help="fit a FAST tokenizer on a chunk store "
                              "(see configs/fast/tokenizer.yaml)",
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--args", required=True, metavar="YAML", dest="config",
                   help="tokenizer config (e.g. configs/fast/tokenizer.yaml)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="override config keys, e.g. fast.vocab_size=2048 save_dir=runs/fast2")
    p.set_defaults(func=cmd_tokenizer)
