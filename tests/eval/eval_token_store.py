"""A small chunk store of mu-law tokens with a 10 Hz rhythm (3 channels, 100 Hz)."""

from __future__ import annotations

import numpy as np

from ephys_gpt.codec import mulaw_quantize, normalize_stats
from ephys_gpt.store import list_sessions, write_session

SFREQ = 100.0
CH_NAMES = ["MEG0111", "MEG0112", "MEG0113"]
CH_TYPES = ["mag", "grad", "grad"]
N_BITS = 4  # vocabulary 16, as GPT2MEG's tiny config


def alpha_signal(n_samples: int, n_channels: int, seed: int, sfreq: float = SFREQ) -> np.ndarray:
    """AR(2) resonance at 10 Hz plus white noise, mixed across channels (C, T)."""
    rng = np.random.default_rng(seed)
    r, f = 0.97, 10.0 / sfreq
    a1, a2 = 2 * r * np.cos(2 * np.pi * f), -r * r
    src = np.zeros((2, n_samples))
    e = rng.standard_normal((2, n_samples))
    for t in range(2, n_samples):
        src[:, t] = a1 * src[:, t - 1] + a2 * src[:, t - 2] + e[:, t]
    mix = rng.standard_normal((n_channels, 2))
    return mix @ src + 0.3 * rng.standard_normal((n_channels, n_samples))


def write_token_store(root, n_sessions: int = 4, seconds: float = 20.0, chunk_seconds=10.0, *,
                      sfreq: float = SFREQ, n_bits: int = N_BITS, seed: int = 0):
    """Sessions of mu-law tokens with recorded normalize + mulaw_quantize steps."""
    chunk = int(chunk_seconds * sfreq)
    for s in range(n_sessions):
        x = alpha_signal(int(seconds * sfreq), len(CH_NAMES), seed=seed + s,
                         sfreq=sfreq) * 1e-13  # tesla-ish
        center, scale = normalize_stats(x, "zscore")
        z = (x - center[:, None]) / scale[:, None]
        tokens = mulaw_quantize(z, n_bits, 4.0)
        steps = [{"name": "normalize", "method": "zscore", "center": center.tolist(),
                  "scale": scale.tolist()},
                 {"name": "mulaw_quantize", "n_bits": n_bits, "mu": 2**n_bits - 1, "scale": 4.0,
                  "scale_from": "config"}]
        meta = {"sfreq": sfreq, "ch_names": CH_NAMES, "ch_types": CH_TYPES,
                "pos_2d": [[0.0, 0.0], [0.1, 0.0], [0.0, 0.1]],
                "pos_3d": [[0.0, 0.05, 0.1], [0.01, 0.05, 0.1], [0.0, 0.06, 0.1]],
                "ori_3d": [[0.0, 0.0, 1.0]] * 3, "chunk_samples": chunk, "steps": steps,
                "provenance": {"subject": f"{s:02d}"}}
        write_session(root, f"sub-{s:02d}", (tokens[:, i:i + chunk]
                                             for i in range(0, tokens.shape[1], chunk)), meta)
    return list_sessions(root)
