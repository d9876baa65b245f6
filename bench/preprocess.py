"""Benchmark stage 2: one hour of 306-channel 100 Hz MEG -> chunk store.

Writes a stage-1-like ``_preproc-raw.fif`` (the osl-ephys MEGIN template's channel info at
100 Hz, AR(1) noise at MEG amplitudes, two bad segments, two bad channels), runs stage 2 with
the template config's steps (robust normalize, clip, 8-bit mu-law) and prints one JSON object
as the last line (``stage2_seconds_per_hour``, the share of stage 2's CPU time that the chunk
checksums take, and details). No arguments needed:

    python bench/preprocess.py [--hours 1.0] [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np


def make_stage1_file(folder: Path, hours: float, sfreq: float = 100.0, seed: int = 0) -> Path:
    import mne
    from scipy.signal import lfilter

    from ephys_gpt._optional import require

    osl = require("osl_ephys")
    template = Path(osl.__file__).parent / "utils" / "simulation_config" / "megin_template_info.fif"
    info = mne.io.read_info(template, verbose="error")
    with info._unlock():
        info["sfreq"] = sfreq
        info["lowpass"] = 45.0
        info["highpass"] = 1.0
    n = int(hours * 3600 * sfreq)
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((len(info["ch_names"]), n), dtype=np.float32)
    x = lfilter([1.0], [1.0, -0.9], x, axis=1).astype(np.float64)  # 1/f-ish AR(1)
    scale = np.where(np.isin(info.get_channel_types(), ["mag"]), 1e-12, 1e-11)
    x *= scale[:, None]
    raw = mne.io.RawArray(x, info, verbose="error")
    del x
    raw.set_annotations(mne.Annotations([600.0, 1800.0], [4.0, 6.0],
                                        ["bad_segment_mag", "bad_segment_grad"],
                                        orig_time=raw.annotations.orig_time))
    raw.info["bads"] = [raw.ch_names[10], raw.ch_names[200]]
    name = "sub-bench_ses-01_task-rest"
    out = folder / "stage1" / name / f"{name}_preproc-raw.fif"
    out.parent.mkdir(parents=True)
    raw.save(out, fmt="single", verbose="error")
    return out


def _hash_seconds(session: Path, meta: dict) -> float:
    """CPU seconds to SHA-256 the session's chunk bytes held in memory: the work the store
    writer does on top of writing them (it hashes each chunk as it writes it)."""
    import hashlib

    blobs = [(session / f"{i}.npy").read_bytes() for i in range(meta["n_chunks"])]
    t0 = time.process_time()
    for blob in blobs:
        hashlib.sha256(blob).hexdigest()
    return time.process_time() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hours", type=float, default=1.0)
    ap.add_argument("--keep", default=None, help="work in this folder and keep it")
    args = ap.parse_args()

    from ephys_gpt.preprocessing.stage2 import Stage2Settings, process_session

    with tempfile.TemporaryDirectory() as tmpdir:
        work = Path(args.keep) if args.keep else Path(tmpdir)
        work.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        fif = make_stage1_file(work, args.hours)
        t_make = time.perf_counter() - t0
        fif_mb = round(fif.stat().st_size / 2**20, 1)
        results = {}
        for label, steps in {
            "tokens": {"normalize": {"method": "robust"}, "clip": {"std_factor": 6.0},
                       "mulaw_quantize": {"n_bits": 8}},
            "continuous": {"normalize": {"method": "robust"}, "clip": {"std_factor": 6.0}},
        }.items():
            settings = Stage2Settings(steps=steps, chunk_seconds=10.0)
            t0, c0 = time.perf_counter(), time.process_time()
            out = process_session(fif, work / f"chunks-{label}", settings)
            dt, cpu = time.perf_counter() - t0, time.process_time() - c0
            meta = json.loads((out / "meta.json").read_text())
            size = sum(f.stat().st_size for f in out.iterdir())
            results[label] = {"seconds": round(dt, 2), "cpu_seconds": round(cpu, 2),
                              "n_chunks": meta["n_chunks"],
                              "dtype": meta["dtype"], "store_mb": round(size / 2**20, 1),
                              "checksum_seconds": round(_hash_seconds(out, meta), 3)}
    print(json.dumps({
        "benchmark": "stage2",
        "stage2_seconds_per_hour": round(results["tokens"]["seconds"] / args.hours, 2),
        # process CPU time: what the wall time would be on an otherwise idle machine
        "stage2_cpu_seconds_per_hour": round(results["tokens"]["cpu_seconds"] / args.hours, 2),
        "stage2_continuous_seconds_per_hour": round(results["continuous"]["seconds"] / args.hours, 2),
        # share of stage 2's CPU time spent on chunk checksums (same run, same data)
        "checksum_cpu_share_tokens": round(results["tokens"]["checksum_seconds"]
                                           / results["tokens"]["cpu_seconds"], 4),
        "checksum_cpu_share_continuous": round(results["continuous"]["checksum_seconds"]
                                               / results["continuous"]["cpu_seconds"], 4),
        "hours": args.hours, "n_channels": 306, "sfreq": 100.0,
        "fif_mb": fif_mb,
        "make_input_seconds": round(t_make, 2),
        "details": results, "cpu_count": os.cpu_count(),
    }))


if __name__ == "__main__":
    main()
