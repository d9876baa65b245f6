"""A small synthetic chunk store written with the real store writer (shared by the dataset
and tokenizer tests)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ephys_gpt.store import write_session


def write_store(root: Path, *, n_sessions: int = 3, n_channels: int = 4,
                chunk_lengths=(50, 50, 30), sfreq: float = 100.0, tokens: bool = False,
                subjects=None, seed: int = 0, ch_names=None, ch_types=None, pos_2d=None,
                names=None, n_bits: int = 8, steps=None) -> Path:
    """Write ``n_sessions`` sessions of random data under ``root``; returns ``root``.

    Continuous chunks are float32 N(0, 0.3); token chunks uint8 with a recorded ``n_bits``
    ``mulaw_quantize`` step. ``steps`` replaces the recorded stage-2 steps.
    """
    rng = np.random.default_rng(seed)
    ch_names = ch_names or [f"MEG{i:03d}" for i in range(n_channels)]
    ch_types = ch_types or ["mag"] * n_channels
    if pos_2d is None:
        pos_2d = rng.uniform(0, 1, size=(n_channels, 2))
    if steps is None:
        steps = [{"name": "normalize", "method": "robust", "center": [0.0] * n_channels,
                  "scale": [1.0] * n_channels}]
        if tokens:
            steps.append({"name": "mulaw_quantize", "n_bits": n_bits, "mu": 2**n_bits - 1,
                          "scale": 1.0, "scale_from": "config"})
    for s in range(n_sessions):
        if tokens:
            chunks = [rng.integers(0, 2**n_bits, size=(n_channels, n), dtype=np.uint8)
                      for n in chunk_lengths]
        else:
            chunks = [(rng.standard_normal((n_channels, n)) * 0.3).astype(np.float32)
                      for n in chunk_lengths]
        subject = subjects[s] if subjects else f"{s:02d}"
        meta = {"sfreq": sfreq, "ch_names": list(ch_names), "ch_types": list(ch_types),
                "pos_2d": np.asarray(pos_2d).tolist(), "chunk_samples": max(chunk_lengths),
                "steps": steps, "provenance": {"subject": subject, "session": str(s)}}
        write_session(root, names[s] if names else f"sub-{subject}_ses-{s}", chunks, meta)
    return root
