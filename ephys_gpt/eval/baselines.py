"""Naive baselines every eval runner reports beside the model: repeat-last-value, zero (the
normalized mean) and, for token models, the training-set unigram distribution.

Legend: B windows, C channels, N predicted steps, V vocabulary.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from ephys_gpt.eval.windows import full_window, spread_indices

REPEAT_LAST = "repeat-last"
ZERO = "zero (mean)"
UNIGRAM = "unigram"


def linear_distribution_name(name: str) -> str:
    """The report's name for a linear baseline's Gaussian forecast as a distribution over
    tokens (``LinearPredictor.token_scores``), beside its re-quantized mean ``name``."""
    return f"{name}, token distribution"


def repeat_last(context: torch.Tensor, steps: int) -> torch.Tensor:
    """The last value of ``context`` (B, C, T) repeated ``steps`` times → (B, C, steps)."""
    return context[..., -1:].expand(*context.shape[:-1], steps)


def unigram_distribution(dataset, vocab_size: int, *, max_windows: int = 2000,
                         seed: int = 0, progress: bool = False) -> np.ndarray:
    """Per-channel token distribution of the training data, (C, V), add-one smoothed.

    Counts whole token chunks from the store when they are stored as tokens; otherwise (the
    dataset quantizes on the fly) counts up to ``max_windows`` dataset windows.
    """
    metas = list(dataset.metas)
    counts = None
    if metas and all(m.is_tokens for m in metas):
        from ephys_gpt.store import load_chunk

        counts = np.zeros((metas[0].n_channels, vocab_size), dtype=np.float64)
        chunks = [(m, i) for m in metas for i in range(m.n_chunks)]
        for m, i in tqdm(chunks, desc="unigram counts", disable=not progress, leave=False):
            _add_counts(counts, np.asarray(load_chunk(m, i), dtype=np.int64), vocab_size)
    else:
        for idx in tqdm(spread_indices(len(dataset), max_windows, seed), desc="unigram counts",
                        disable=not progress, leave=False):
            arr = full_window(dataset, int(idx))[0].numpy()
            if counts is None:
                counts = np.zeros((arr.shape[0], vocab_size), dtype=np.float64)
            _add_counts(counts, arr, vocab_size)
    if counts is None:
        raise ValueError("the training split is empty: cannot fit the unigram baseline")
    counts += 1.0
    return counts / counts.sum(axis=1, keepdims=True)


def _add_counts(counts: np.ndarray, tokens: np.ndarray, vocab_size: int) -> None:
    if tokens.min() < 0 or tokens.max() >= vocab_size:
        raise ValueError(f"token values {tokens.min()}..{tokens.max()} fall outside the "
                         f"model's vocabulary [0, {vocab_size})")
    C = tokens.shape[0]
    flat = (np.arange(C)[:, None] * vocab_size + tokens).ravel()
    counts += np.bincount(flat, minlength=C * vocab_size).reshape(C, vocab_size)


def sample_unigram(probs: torch.Tensor, shape: Sequence[int],
                   generator: torch.Generator) -> torch.Tensor:
    """Tokens (B, C, N) drawn from per-channel probabilities ``probs`` (C, V)."""
    B, C, N = shape
    draws = torch.multinomial(probs, B * N, replacement=True, generator=generator)  # (C, B·N)
    return draws.view(C, B, N).permute(1, 0, 2).contiguous()
