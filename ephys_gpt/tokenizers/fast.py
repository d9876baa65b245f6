"""FAST: frequency-space action sequence tokenization for multichannel signal windows.

After Pertsch et al. (2025), "FAST: efficient action tokenization for vision-language-action
models" (Physical Intelligence): a window ``x (C, T)`` is

1. transformed per channel by the orthonormal DCT-II along time (``scipy.fft.dct``),
2. scaled by ``scale`` and rounded to integers (the only lossy step: the error of each
   coefficient is at most ``0.5 / scale``, and the DCT is orthonormal, so the round-trip RMSE
   is about ``1 / (scale * sqrt(12))`` in the data's units),
3. flattened coefficient-major (coefficient 0 of every channel, then coefficient 1, ...), so
   the mostly-zero high frequencies form long runs, each integer written as one character,
4. compressed by byte-pair encoding (BPE) trained on the training windows with the
   HuggingFace ``tokenizers`` library; every coefficient value seen in training is in the
   initial alphabet, so any window encodes (values beyond the fitted range are clipped to it,
   and counted).

Decoding inverts BPE exactly, divides by ``scale`` and inverts the DCT.

Nothing is downloaded and nothing is pickled: a fitted tokenizer is a folder with
``bpe.json`` (the BPE model, the ``tokenizers`` library's own JSON) and
``fast_tokenizer.json`` (the settings, the data description needed to decode to signal
units, the fit's figures and the SHA-256 of ``bpe.json``), written atomically, the settings
file last (:meth:`FASTTokenizer.save`, :func:`load_tokenizer`).

Legend: C channels, T samples per window, V vocabulary size.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from ephys_gpt._optional import require
from ephys_gpt.fileio import read_json, write_json_atomic, write_text_atomic

logger = logging.getLogger(__name__)

FORMAT = "ephys-gpt FAST tokenizer"
FORMAT_VERSION = 1
CONFIG_NAME = "fast_tokenizer.json"
BPE_NAME = "bpe.json"
_BASE = 0xF0000  # Supplementary Private Use Area-A: no whitespace, no surrogates
_MAX_ALPHABET = 0xFFFFE - _BASE
_SEP = " "       # separates BPE words (rows of ``word_rows`` coefficients)


def dct_coefficients(x: np.ndarray) -> np.ndarray:
    """Orthonormal DCT-II of ``(..., C, T)`` along time."""
    from scipy.fft import dct

    return dct(np.asarray(x, dtype=np.float64), type=2, norm="ortho", axis=-1)


def inverse_dct(c: np.ndarray) -> np.ndarray:
    from scipy.fft import idct

    return idct(np.asarray(c, dtype=np.float64), type=2, norm="ortho", axis=-1)


def _check_args(scale: float, vocab_size: int, min_frequency: int, word_rows) -> None:
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not 0 < scale < 1e9:
        raise ValueError(f"FAST scale must be a positive number, got {scale!r}")
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < 2:
        raise ValueError(f"FAST vocab_size must be an integer >= 2, got {vocab_size!r}")
    if isinstance(min_frequency, bool) or not isinstance(min_frequency, int) or min_frequency < 1:
        raise ValueError(f"FAST min_frequency must be an integer >= 1, got {min_frequency!r}")
    if word_rows is not None and (isinstance(word_rows, bool) or not isinstance(word_rows, int)
                                  or word_rows < 1):
        raise ValueError(f"FAST word_rows must be null or an integer >= 1, got {word_rows!r}")


class FASTTokenizer:
    """A fitted FAST tokenizer (use :meth:`fit` or :func:`load_tokenizer`).

    Attributes
    ----------
    scale : float
        DCT coefficients are multiplied by this before rounding.
    lo, hi : int
        Range of the rounded coefficients seen in training (the character alphabet).
    n_channels, window_samples : int
        C and T of the windows it encodes.
    word_rows : int or None
        Coefficient rows (of C values) per BPE word: BPE merges never cross a word boundary.
        None: the whole window is one word (FAST's choice; longest merges, most memory).
    info : dict
        Data description kept with it (``sfreq``, ``ch_names``, ``ch_types``, ``steps``) and
        the fit's figures.
    """

    def __init__(self, bpe, *, scale: float, lo: int, hi: int, n_channels: int,
                 window_samples: int, word_rows: int | None = None,
                 info: dict[str, Any] | None = None):
        self.bpe, self.scale, self.lo, self.hi = bpe, float(scale), int(lo), int(hi)
        self.n_channels, self.window_samples = int(n_channels), int(window_samples)
        self.word_rows = word_rows
        self.info = dict(info or {})
        self.clipped = 0  # coefficients clipped to [lo, hi] by encode() so far

    @property
    def vocab_size(self) -> int:
        return int(self.bpe.get_vocab_size())

    # -- integers <-> text ----------------------------------------------------------------------
    def _check_window(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x)
        if x.shape[-2:] != (self.n_channels, self.window_samples):
            raise ValueError(f"FAST tokenizer was fitted on windows of ({self.n_channels}, "
                             f"{self.window_samples}) (channels, samples), got "
                             f"{tuple(x.shape[-2:])}")
        if not np.isfinite(x).all():
            raise ValueError("FAST: the window contains NaN or Inf values")
        return x

    def quantize(self, x: np.ndarray) -> np.ndarray:
        """Windows ``(..., C, T)`` → rounded, clipped coefficients ``(..., C, T)`` int64."""
        q = np.rint(dct_coefficients(self._check_window(x)) * self.scale).astype(np.int64)
        out = np.clip(q, self.lo, self.hi)
        self.clipped += int((out != q).sum())
        return out

    def _text(self, q: np.ndarray) -> str:
        rows = q.T - self.lo + _BASE  # (T, C): coefficient-major
        chars = ["".join(map(chr, r)) for r in rows]
        if self.word_rows is None:
            return "".join(chars)
        k = self.word_rows
        return _SEP.join("".join(chars[i:i + k]) for i in range(0, len(chars), k))

    # -- public API -----------------------------------------------------------------------------
    def encode(self, x: np.ndarray) -> list[int]:
        """One window ``(C, T)`` → token ids."""
        return list(self.bpe.encode(self._text(self.quantize(x))).ids)

    def encode_batch(self, x: np.ndarray) -> list[list[int]]:
        """Windows ``(B, C, T)`` → a list of token-id lists."""
        q = self.quantize(x)
        return [list(e.ids) for e in self.bpe.encode_batch([self._text(w) for w in q])]

    def decode(self, ids: Sequence[int]) -> np.ndarray:
        """Token ids → the window ``(C, T)`` (float64, the data's units)."""
        text = "".join(self.bpe.id_to_token(int(i)) or "" for i in ids).replace(_SEP, "")
        values = np.fromiter((ord(ch) for ch in text), dtype=np.int64, count=len(text))
        n = self.n_channels * self.window_samples
        if values.size != n or (values < _BASE).any():
            raise ValueError(f"FAST: the token ids decode to {values.size} coefficients, "
                             f"expected {n} ({self.n_channels} channels x "
                             f"{self.window_samples} samples); were they made by this "
                             "tokenizer?")
        q = (values - _BASE + self.lo).reshape(self.window_samples, self.n_channels).T
        return inverse_dct(q / self.scale)

    # -- fitting --------------------------------------------------------------------------------
    @classmethod
    def fit(cls, windows: Callable[[], Iterable[np.ndarray]], *, scale: float = 10.0,
            vocab_size: int = 1024, min_frequency: int = 2, word_rows: int | None = None,
            n_windows: int | None = None, progress: bool = True,
            info: dict[str, Any] | None = None) -> FASTTokenizer:
        """Fit on the windows ``windows()`` yields (called twice: a streaming pass for the
        coefficient range, then one that trains BPE; memory holds the BPE statistics, not
        the windows). ``n_windows`` sizes the progress bars."""
        _check_args(scale, vocab_size, min_frequency, word_rows)
        tk = require("tokenizers")
        lo, hi, shape = None, None, None
        for x in tqdm(windows(), total=n_windows, desc="FAST: coefficient range",
                      disable=not progress, unit="window"):
            x = np.asarray(x)
            shape = shape or x.shape
            if x.shape != shape:
                raise ValueError(f"FAST: windows must share one shape; got {x.shape} after "
                                 f"{shape}")
            q = np.rint(dct_coefficients(x) * scale)
            lo = int(q.min()) if lo is None else min(lo, int(q.min()))
            hi = int(q.max()) if hi is None else max(hi, int(q.max()))
        if shape is None:
            raise ValueError("FAST: no windows to fit on (the training split is empty)")
        cls._check_alphabet(lo, hi, scale, vocab_size)
        bpe = tk.Tokenizer(tk.models.BPE())
        bpe.pre_tokenizer = tk.pre_tokenizers.WhitespaceSplit()
        trainer = tk.trainers.BpeTrainer(
            vocab_size=vocab_size, min_frequency=min_frequency, show_progress=False,
            initial_alphabet=[chr(_BASE + k) for k in range(hi - lo + 1)], special_tokens=[])
        tok = cls(bpe, scale=scale, lo=lo, hi=hi, n_channels=shape[-2],
                  window_samples=shape[-1], word_rows=word_rows, info=info)
        texts = (tok._text(tok.quantize(x)) for x in tqdm(
            windows(), total=n_windows, desc="FAST: BPE", disable=not progress, unit="window"))
        bpe.train_from_iterator(texts, trainer=trainer, length=n_windows)
        tok.clipped = 0
        logger.info("FAST fitted: scale %g, %d coefficient values (%d..%d), vocabulary %d",
                    scale, hi - lo + 1, lo, hi, tok.vocab_size)
        return tok

    @staticmethod
    def _check_alphabet(lo: int, hi: int, scale: float, vocab_size: int) -> None:
        n = hi - lo + 1
        if n > _MAX_ALPHABET:
            raise ValueError(f"FAST: the rounded coefficients span {n} values ({lo}..{hi}) at "
                             f"scale {scale:g}, more than {_MAX_ALPHABET}; lower the scale")
        if n > vocab_size:
            raise ValueError(f"FAST: vocab_size {vocab_size} is smaller than the coefficient "
                             f"alphabet ({n} values from {lo} to {hi} at scale {scale:g}); raise "
                             "vocab_size above it or lower the scale")

    # -- files ----------------------------------------------------------------------------------
    def settings(self) -> dict[str, Any]:
        return {"format": FORMAT, "format_version": FORMAT_VERSION, "scale": self.scale,
                "lo": self.lo, "hi": self.hi, "n_channels": self.n_channels,
                "window_samples": self.window_samples, "word_rows": self.word_rows,
                "vocab_size": self.vocab_size, "info": self.info}

    def save(self, path: str | os.PathLike) -> Path:
        """Write the tokenizer folder ``path`` (``bpe.json``, then ``fast_tokenizer.json``).

        A folder that holds other files named like these, not written by this class, is
        refused rather than overwritten.
        """
        out = Path(path)
        cfg, bpe_path = out / CONFIG_NAME, out / BPE_NAME
        if bpe_path.exists() and not _is_ours(cfg):
            raise FileExistsError(f"{bpe_path} exists and {out} is not a FAST tokenizer folder "
                                  "written by ephys-gpt; choose another save_dir")
        if cfg.exists() and not _is_ours(cfg):
            raise FileExistsError(f"{cfg} exists and was not written by ephys-gpt; choose "
                                  "another save_dir")
        text = self.bpe.to_str()
        write_text_atomic(bpe_path, text)
        write_json_atomic(cfg, {**self.settings(), "bpe_file": BPE_NAME,
                                "bpe_sha256": hashlib.sha256(text.encode()).hexdigest()},
                          indent=2)
        return out


def _is_ours(cfg: Path) -> bool:
    if not cfg.is_file():
        return False
    try:
        return read_json(cfg, "FAST tokenizer settings").get("format") == FORMAT
    except (ValueError, OSError, AttributeError):
        return False


def load_tokenizer(path: str | os.PathLike) -> FASTTokenizer:
    """Load a tokenizer folder written by :meth:`FASTTokenizer.save` (no pickles)."""
    tk = require("tokenizers")
    folder = Path(path)
    cfg_path = folder / CONFIG_NAME
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{cfg_path} not found: {folder} is not a FAST tokenizer "
                                f"folder (expected {CONFIG_NAME} and {BPE_NAME})")
    cfg = read_json(cfg_path, "FAST tokenizer settings")
    if not isinstance(cfg, dict) or cfg.get("format") != FORMAT:
        raise ValueError(f"{cfg_path} is not a FAST tokenizer file (format "
                         f"{cfg.get('format') if isinstance(cfg, dict) else None!r})")
    if cfg.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{cfg_path}: format_version {cfg.get('format_version')!r} is not "
                         f"supported (this ephys-gpt reads {FORMAT_VERSION})")
    bpe_path = folder / str(cfg.get("bpe_file", BPE_NAME))
    if not bpe_path.is_file():
        raise FileNotFoundError(f"{bpe_path} not found (named by {cfg_path})")
    text = bpe_path.read_text(encoding="utf-8")
    if hashlib.sha256(text.encode()).hexdigest() != cfg.get("bpe_sha256"):
        raise ValueError(f"{bpe_path} does not match {cfg_path} (SHA-256 differs): the folder "
                         "holds files of two different fits; fit the tokenizer again")
    try:
        for key in ("scale", "lo", "hi", "n_channels", "window_samples"):
            if not isinstance(cfg.get(key), (int, float)) or isinstance(cfg.get(key), bool):
                raise ValueError(f"key {key!r} should be a number, found {cfg.get(key)!r}")
        return FASTTokenizer(tk.Tokenizer.from_str(text), scale=cfg["scale"], lo=cfg["lo"],
                             hi=cfg["hi"], n_channels=cfg["n_channels"],
                             window_samples=cfg["window_samples"],
                             word_rows=cfg.get("word_rows"), info=cfg.get("info") or {})
    except ValueError as err:
        raise ValueError(f"{cfg_path}: {err}") from None
