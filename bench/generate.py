"""Generation speed with and without the KV cache / streaming conv state.

Measures, for GPT2MEG and WavenetFullChannel at the example configs in
``configs/<model>/model.yaml`` (16 channels, 256 mu-law levels, batch 1, random weights,
sampling at temperature 1):

- cached generation: ``--steps`` (1000) new time steps after a ``--context`` (128) step
  context, timed end to end (priming included);
- uncached generation: ``--uncached-steps`` (100) steps, re-running the context window every
  step; the per-step time is extrapolated to ``--steps`` (``uncached_extrapolated: true``);
- ``cache_speedup`` = cached steps/s ÷ uncached steps/s per model, and
  ``min_cache_speedup`` the smaller of the two;
- the time of one cached decode step of GPT2MEG at the SPEC size (272 channels, 8 layers,
  width 128, 400 positions) after a 300-step context, in fp32 and under bf16 autocast, and
  ``spec_cache_speedup``: an uncached step at that size re-runs the 300-step window, which
  costs what priming does, so the ratio is prime time ÷ cached step time;
- for reference, a WavenetFullChannel with the original WaveNet's receptive field (3 blocks
  of 10 layers, 3070 samples), where streaming pays off most (not part of
  ``min_cache_speedup``, which is over the two demo configs).

Run: ``python bench/generate.py`` (no arguments; ~1 minute on a 2-core CPU). The last line of
output is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch
import yaml

from ephys_gpt.models.registry import build_model

DEMO_CHANNELS = 16
VOCAB = 256
CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def _example_config(folder: str) -> dict:
    """The shipped ``configs/<folder>/model.yaml`` (so the bench never drifts from it)."""
    return yaml.safe_load((CONFIGS / folder / "model.yaml").read_text()) or {}


GPT_DEMO = _example_config("gpt2meg")
WAVENET_DEMO = _example_config("wavenetfullchannel")
WAVENET_LONG_RF = dict(WAVENET_DEMO, layers_per_block=10, n_blocks=3)
GPT_SPEC = dict(num_channels=272, vocab_size=VOCAB, n_positions=400, d_model=128, n_layers=8,
                n_heads=4)


def _time_generate(model, context, steps: int, use_cache: bool) -> float:
    """Seconds to generate ``steps`` steps (best of one warm run)."""
    gen = torch.Generator().manual_seed(0)
    model.generate(context, 2, use_cache=use_cache, generator=gen)  # warm-up
    t0 = time.perf_counter()
    model.generate(context, steps, use_cache=use_cache, generator=gen)
    return time.perf_counter() - t0


def bench_model(name: str, config: dict, context_len: int, steps: int,
                uncached_steps: int) -> dict:
    """Cached vs uncached generation of ``name`` at ``config`` (16 channels, batch 1)."""
    torch.manual_seed(0)
    model = build_model(name, {"num_channels": DEMO_CHANNELS, "vocab_size": VOCAB, **config})
    model.eval()
    context = torch.randint(0, VOCAB, (1, DEMO_CHANNELS, context_len))
    cached_s = _time_generate(model, context, steps, use_cache=True)
    uncached_s = _time_generate(model, context, uncached_steps, use_cache=False)
    cached_sps = steps / cached_s
    uncached_sps = uncached_steps / uncached_s
    return {
        "config": config,
        "channels": DEMO_CHANNELS,
        "context_steps": context_len,
        "params": sum(p.numel() for p in model.parameters()),
        "cached": {"steps": steps, "seconds": round(cached_s, 3),
                   "steps_per_s": round(cached_sps, 1),
                   "tokens_per_s": round(cached_sps * DEMO_CHANNELS, 1)},
        "uncached": {"steps_measured": uncached_steps, "extrapolated_to_steps": steps,
                     "uncached_extrapolated": uncached_steps < steps,
                     "seconds_measured": round(uncached_s, 3),
                     "seconds_extrapolated": round(uncached_s * steps / uncached_steps, 3),
                     "steps_per_s": round(uncached_sps, 1),
                     "tokens_per_s": round(uncached_sps * DEMO_CHANNELS, 1)},
        "cache_speedup": round(cached_sps / uncached_sps, 2),
    }


@torch.no_grad()
def bench_spec_decode_step(context_len: int, steps: int, bf16: bool) -> dict:
    """Milliseconds per cached decode step of the SPEC-sized GPT2MEG (one step = all 272
    channels advance one sample, logits included, sampling excluded), timed on the decoder
    ``generate`` uses, after priming it on a ``context_len``-step context."""
    torch.manual_seed(0)
    model = build_model("GPT2MEG", GPT_SPEC).eval()
    context = torch.randint(0, VOCAB, (1, 272, context_len))
    amp = torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16)
    with amp:
        prime, step = model.incremental_decoder(1)
        t0 = time.perf_counter()
        logits = prime(context, True)
        prime_s = time.perf_counter() - t0
        tok = logits.argmax(-1)
        logits = step(tok)  # warm-up
        t0 = time.perf_counter()
        for _ in range(steps):
            logits = step(logits.argmax(-1))
        per_step = (time.perf_counter() - t0) / steps
    return {"context_steps": context_len, "decode_steps": steps,
            "dtype": "bf16-autocast" if bf16 else "fp32",
            "prime_seconds": round(prime_s, 3), "ms_per_decode_step": round(per_step * 1e3, 2),
            "tokens_per_s": round(272 / per_step, 1),
            "spec_cache_speedup": round(prime_s / per_step, 1)}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=1000, help="cached generation steps")
    ap.add_argument("--uncached-steps", type=int, default=100,
                    help="uncached steps actually run (per-step time extrapolated)")
    # 128 >= GPT2MEG's n_positions (100; it slides over the last 100) and the demo WaveNet's
    # receptive field (127), so the uncached steps measured run at the window size a
    # 1000-step generation spends its time at
    ap.add_argument("--context", type=int, default=128, help="context steps (demo models)")
    ap.add_argument("--spec-context", type=int, default=300)
    ap.add_argument("--spec-steps", type=int, default=10)
    ap.add_argument("--no-long-rf", action="store_true",
                    help="skip the long-receptive-field WaveNet reference")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    gpt = bench_model("GPT2MEG", GPT_DEMO, args.context, args.steps, args.uncached_steps)
    wav = bench_model("WavenetFullChannel", WAVENET_DEMO, args.context, args.steps,
                      args.uncached_steps)
    long_rf = None if args.no_long_rf else bench_model(
        "WavenetFullChannel", WAVENET_LONG_RF, 3070, args.steps // 4,
        max(1, args.uncached_steps // 4))
    spec = [bench_spec_decode_step(args.spec_context, args.spec_steps, bf16)
            for bf16 in (False, True)]
    result = {
        "benchmark": "generate",
        "torch": torch.__version__,
        "device": "cpu",
        "machine": platform.machine(),
        "threads": torch.get_num_threads(),
        "loadavg_1min": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
        "GPT2MEG_demo": gpt,
        "WavenetFullChannel_demo": wav,
        "min_cache_speedup": min(gpt["cache_speedup"], wav["cache_speedup"]),
        "WavenetFullChannel_long_rf_reference": long_rf,
        "GPT2MEG_spec_decode": spec,
        "gpt2meg_spec_ms_per_decode_step": spec[0]["ms_per_decode_step"],
        "wall_seconds": round(time.perf_counter() - t0, 1),
    }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
