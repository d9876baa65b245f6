"""Data-loading throughput of the chunk-store datasets (single process, random windows).

Writes its own chunk store in a temporary folder (default: 10 sessions x 10 min, 306
channels, 100 Hz, float32, 10 s chunks; plus the same data as an 8-bit token store), then reads
random 2 s windows through ``ChunkDataset`` (quantizing on the fly from the continuous store,
and directly from the token store) and ``ChunkDatasetForecastCont`` (with and without the
per-window data check). Prints one JSON object as its last line: ``windows_per_s`` is the
headline (ChunkDataset, on-the-fly quantization), ``peak_rss_mb`` the peak resident memory of
the process (memory-mapped pages of the store count towards it once touched), ``data_check``
the cost of the per-window value check: the ``forecast_cont`` / ``forecast_cont_unchecked``
throughput ratio, and the time of the check itself on one window, as it is now (min/max
against a bound) and as it was (``isfinite`` of the sum, which missed huge finite values).

    python bench/dataload.py [--sessions 10] [--minutes 10] [--seconds-per-case 4]
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from ephys_gpt.codec import mulaw_quantize
from ephys_gpt.dataset.datasets import ChunkDataset, ChunkDatasetForecastCont
from ephys_gpt.store import write_session

N_CHANNELS, SFREQ, CHUNK_S, WINDOW_S = 306, 100.0, 10, 2.0


def make_stores(root: Path, sessions: int, minutes: float, seed: int = 0) -> tuple[Path, Path]:
    """A continuous and a token store holding the same random-walk-ish signals."""
    rng = np.random.default_rng(seed)
    chunk = int(CHUNK_S * SFREQ)
    n_chunks = int(round(minutes * 60 / CHUNK_S))
    names = [f"MEG{i:04d}" for i in range(N_CHANNELS)]
    base = {"sfreq": SFREQ, "ch_names": names, "ch_types": ["mag"] * N_CHANNELS,
            "pos_2d": rng.uniform(0, 1, (N_CHANNELS, 2)).tolist(), "chunk_samples": chunk}
    cont_steps = [{"name": "normalize", "method": "robust", "center": [0.0] * N_CHANNELS,
                   "scale": [1.0] * N_CHANNELS}]
    tok_steps = cont_steps + [{"name": "mulaw_quantize", "n_bits": 8, "mu": 255, "scale": 4.0}]
    for s in range(sessions):
        data = [(rng.standard_normal((N_CHANNELS, chunk), dtype=np.float32)) for _ in range(n_chunks)]
        write_session(root / "cont", f"ses-{s:02d}", data, {**base, "steps": cont_steps})
        write_session(root / "tok", f"ses-{s:02d}", (mulaw_quantize(d, 8, 4.0) for d in data),
                      {**base, "steps": tok_steps})
    return root / "cont", root / "tok"


def throughput(ds, seconds: float, seed: int = 0) -> dict:
    """Random-window reads per second over ``seconds`` (after a short warm-up)."""
    order = np.random.default_rng(seed).integers(0, len(ds), size=1_000_000)
    for i in order[:200]:
        ds[int(i)]
    n, t0, c0 = 0, time.perf_counter(), time.process_time()
    deadline = t0 + seconds
    while True:
        for i in order[n:n + 500]:
            ds[int(i)]
        n += 500
        now = time.perf_counter()
        if now >= deadline:
            break
    cpu = time.process_time() - c0
    # windows per CPU-second is the figure to compare on a shared machine: wall-clock
    # throughput drops when other processes take the cores.
    return {"windows": n, "seconds": round(now - t0, 3), "windows_per_s": round(n / (now - t0)),
            "windows_per_cpu_s": round(n / max(cpu, 1e-9)),
            "us_per_window": round((now - t0) / n * 1e6, 1)}


def check_cost(x: np.ndarray, repeats: int = 20000) -> dict:
    """CPU microseconds per window of the per-window value check as it is now and as it was,
    and of the window copy it follows (``np.array(view, dtype=float32)``), on one window."""
    bound = 1e4

    def now():
        return x.min() >= -bound and x.max() <= bound

    def before():
        return np.isfinite(x.sum())

    def copy():
        return np.array(x, dtype=np.float32)

    out = {}
    for name, fn in (("check_cpu_us", now), ("check_before_cpu_us", before),
                     ("window_copy_cpu_us", copy)):
        fn()
        c0 = time.process_time()
        for _ in range(repeats):
            fn()
        out[name] = round((time.process_time() - c0) / repeats * 1e6, 2)
    return out


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sessions", type=int, default=10)
    p.add_argument("--minutes", type=float, default=10.0)
    p.add_argument("--seconds-per-case", type=float, default=4.0)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(1)

    with tempfile.TemporaryDirectory(prefix="ephys-gpt-bench-") as tmp:
        t0 = time.perf_counter()
        cont, tok = make_stores(Path(tmp), args.sessions, args.minutes)
        write_s = time.perf_counter() - t0
        print(f"wrote stores in {write_s:.1f} s", file=sys.stderr)
        kw = {"example_seconds": WINDOW_S}
        cases = {  # built one at a time so their memory maps do not add up in peak RSS
            "chunkdataset_quantize_on_the_fly": lambda: ChunkDataset.from_root(
                cont, quantize={"n_bits": 8, "scale": 4.0}, **kw),
            "chunkdataset_token_store": lambda: ChunkDataset.from_root(tok, **kw),
            "forecast_cont": lambda: ChunkDatasetForecastCont.from_root(cont, **kw),
            "forecast_cont_unchecked": lambda: ChunkDatasetForecastCont.from_root(
                cont, check_finite=False, **kw),
        }
        results = {}
        for name, make in cases.items():
            ds = make()
            n_windows = len(ds)
            results[name] = throughput(ds, args.seconds_per_case)
            del ds
            print(f"{name}: {results[name]}", file=sys.stderr)
        window = ChunkDatasetForecastCont.from_root(cont, **kw).read_continuous(0)
        check = check_cost(window)

    peak_rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    out = {
        "bench": "dataload",
        "store": {"sessions": args.sessions, "minutes": args.minutes, "channels": N_CHANNELS,
                  "sfreq": SFREQ, "chunk_seconds": CHUNK_S, "window_seconds": WINDOW_S,
                  "windows": n_windows, "write_seconds": round(write_s, 1)},
        "cases": results,
        "windows_per_s": results["chunkdataset_quantize_on_the_fly"]["windows_per_s"],
        "data_check": {
            "checked_over_unchecked": round(results["forecast_cont"]["windows_per_cpu_s"]
                                            / results["forecast_cont_unchecked"]
                                            ["windows_per_cpu_s"], 3),
            **check},
        "peak_rss_mb": round(peak_rss_mb, 1),
        "machine": {"python": platform.python_version(), "torch": torch.__version__,
                    "cpu": platform.processor() or platform.machine()},
    }
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
