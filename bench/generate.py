"""Generation speed with and without the KV cache / streaming conv state.

Measures, for GPT2MEG, STGPT2MEG and WavenetFullChannel at the example configs in
``configs/<model>/model.yaml`` (16 channels, 256 mu-law levels, batch 1, random weights,
fp32, sampling at temperature 1):

- cached generation: ``--steps`` (1000) new time steps after a ``--context`` (128) step
  context, timed end to end (priming included);
- uncached generation: ``--uncached-steps`` (100) steps, re-running the context window every
  step; the per-step time is extrapolated to ``--steps`` (``uncached_extrapolated: true``);
- ``cache_speedup`` = cached steps/s ÷ uncached steps/s per model, and
  ``min_cache_speedup`` the smallest; on the CPU also ``cache_speedup_cpu_time``, the same
  ratio in process CPU time, which other jobs on a shared machine distort much less;
- the time of one cached decode step of GPT2MEG at the SPEC size (272 channels, 8 layers,
  width 128, 400 positions, the example configs' activation) after a 300-step context, in
  fp32 and under bf16 autocast (bf16 KV cache), and ``spec_cache_speedup``: an uncached step
  at that size re-runs the 300-step window, which costs what priming does, so the ratio is
  prime time ÷ cached step time, and the memory floor of that step (``kv_read_floor_ms``: a
  plain read of as many bytes as its KV cache holds; ``step_over_read_floor`` the ratio).
  ``--spec-kv-heads`` (default 1) adds the same step with fewer key/value heads
  (grouped-query attention, ``kv_heads``; a smaller cache to read); ``--compile`` adds the
  same with the step compiled as one
  fixed-shape graph (``incremental_decoder(compile=True)``; CUDA graphs on CUDA);
- for reference, a WavenetFullChannel with the original WaveNet's receptive field (3 blocks
  of 10 layers, 3070 samples), where streaming pays off most (not part of
  ``min_cache_speedup``);
- VQGPT2MEG at ``configs/vqgpt2meg/model.yaml`` (the exported tokenizer when
  ``runs/videogpttokenizer/export`` exists, else a fresh one of the same config): seconds of
  computation per second of generated signal (16 x 16 images at 100 Hz: 800 codes per
  second), cached (``--vq-seconds``, default 1) and uncached (``--vq-uncached-seconds``,
  default 0.1, extrapolated), after a one-window context (0.64 s), batch 1, encoding and
  decoding included (not part of ``min_cache_speedup``: its own figure is
  ``vqgpt2meg.cache_speedup``).

``--device cuda`` runs everything on the GPU (bf16 there too) and adds the peak allocated
memory of the SPEC decode. Run: ``python bench/generate.py`` (~2 minutes on a 2-core CPU;
``--threads 1`` for stable numbers on a shared machine). The last line of output is one JSON
object.
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
STGPT_DEMO = _example_config("stgpt2meg")
WAVENET_DEMO = _example_config("wavenetfullchannel")
WAVENET_LONG_RF = dict(WAVENET_DEMO, layers_per_block=10, n_blocks=3)
GPT_SPEC = dict(num_channels=272, vocab_size=VOCAB, n_positions=400, d_model=128, n_layers=8,
                n_heads=4, **{k: GPT_DEMO[k] for k in ("activation",) if k in GPT_DEMO})


def vqgpt2meg_config() -> dict:
    """``configs/vqgpt2meg/model.yaml`` with its tokenizer: the export named there when it
    exists, else a fresh tokenizer of ``configs/videogpttokenizer/model.yaml`` (the cost of a
    step does not depend on the weights)."""
    cfg = _example_config("vqgpt2meg")
    path = (CONFIGS / "vqgpt2meg" / cfg["tokenizer_path"]).resolve()
    if (path / "model.safetensors").is_file():
        return {**cfg, "tokenizer_path": str(path)}
    del cfg["tokenizer_path"]
    return {**cfg, "tokenizer_config": {"model_name": "VideoGPTTokenizer",
                                        "model_config": _example_config("videogpttokenizer")}}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


class _Clock:
    """Wall and process CPU time of a block (CUDA synchronised)."""

    def __init__(self, device):
        self.device = device

    def __enter__(self):
        _sync(self.device)
        self.w, self.c = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc):
        _sync(self.device)
        self.wall, self.cpu = time.perf_counter() - self.w, time.process_time() - self.c


def _time_generate(model, context, steps: int, use_cache: bool) -> _Clock:
    gen = torch.Generator(device=context.device).manual_seed(0)
    model.generate(context, 2, use_cache=use_cache, generator=gen)  # warm-up
    with _Clock(context.device) as clock:
        model.generate(context, steps, use_cache=use_cache, generator=gen)
    return clock


def bench_model(name: str, config: dict, context_len: int, steps: int, uncached_steps: int,
                device: torch.device) -> dict:
    """Cached vs uncached generation of ``name`` at ``config`` (16 channels, batch 1, fp32,
    sampling at temperature 1)."""
    torch.manual_seed(0)
    model = build_model(name, {"num_channels": DEMO_CHANNELS, "vocab_size": VOCAB, **config})
    model.to(device).eval()
    context = torch.randint(0, VOCAB, (1, DEMO_CHANNELS, context_len), device=device)
    cached = _time_generate(model, context, steps, use_cache=True)
    uncached = _time_generate(model, context, uncached_steps, use_cache=False)
    out = {
        "config": config,
        "channels": DEMO_CHANNELS,
        "context_steps": context_len,
        "params": sum(p.numel() for p in model.parameters()),
        "cached": {"steps": steps, "seconds": round(cached.wall, 3),
                   "ms_per_step": round(cached.wall / steps * 1e3, 3),
                   "steps_per_s": round(steps / cached.wall, 1),
                   "tokens_per_s": round(steps / cached.wall * DEMO_CHANNELS, 1)},
        "uncached": {"steps_measured": uncached_steps, "extrapolated_to_steps": steps,
                     "uncached_extrapolated": uncached_steps < steps,
                     "seconds_measured": round(uncached.wall, 3),
                     "seconds_extrapolated": round(uncached.wall * steps / uncached_steps, 3),
                     "ms_per_step": round(uncached.wall / uncached_steps * 1e3, 3),
                     "steps_per_s": round(uncached_steps / uncached.wall, 1),
                     "tokens_per_s": round(uncached_steps / uncached.wall * DEMO_CHANNELS, 1)},
        "cache_speedup": round((steps / cached.wall) / (uncached_steps / uncached.wall), 2),
    }
    if device.type == "cpu":  # process CPU time: robust to other jobs on a shared machine
        out["cached"]["cpu_ms_per_step"] = round(cached.cpu / steps * 1e3, 3)
        out["uncached"]["cpu_ms_per_step"] = round(uncached.cpu / uncached_steps * 1e3, 3)
        out["cache_speedup_cpu_time"] = round(
            (uncached.cpu / uncached_steps) / (cached.cpu / steps), 2)
    return out


def bench_vqgpt2meg(seconds: float, uncached_seconds: float, device: torch.device,
                    sfreq: float = 100.0) -> dict:
    """Seconds of computation per second of signal generated by VQGPT2MEG, cached and not."""
    torch.manual_seed(0)
    cfg = vqgpt2meg_config()
    model = build_model("VQGPT2MEG", cfg).to(device).eval()
    dt = model.tokenizer.time_downsample
    context = model.example_inputs(batch_size=1, seq_len=cfg["n_frames"] * dt).to(device)
    n, n_unc = round(seconds * sfreq), max(dt, round(uncached_seconds * sfreq))
    cached = _time_generate(model, context, n, use_cache=True)
    uncached = _time_generate(model, context, n_unc, use_cache=False)
    codes_per_s = model.codes_per_frame * sfreq / dt
    out = {"tokenizer": "exported" if "tokenizer_path" in cfg else "fresh",
           "params": sum(p.numel() for p in model.parameters()),
           "context_samples": context.shape[-1], "codes_per_signal_second": codes_per_s,
           "cached": {"signal_seconds": seconds, "seconds": round(cached.wall, 3),
                      "seconds_per_signal_second": round(cached.wall / seconds, 3),
                      "ms_per_code": round(cached.wall / (seconds * codes_per_s) * 1e3, 3)},
           "uncached": {"signal_seconds_measured": n_unc / sfreq,
                        "seconds_measured": round(uncached.wall, 3),
                        "seconds_per_signal_second": round(uncached.wall * sfreq / n_unc, 3),
                        "ms_per_code": round(uncached.wall / (n_unc / sfreq * codes_per_s)
                                             * 1e3, 3)}}
    out["cache_speedup"] = round(out["uncached"]["seconds_per_signal_second"]
                                 / out["cached"]["seconds_per_signal_second"], 2)
    if device.type == "cpu":
        out["cache_speedup_cpu_time"] = round((uncached.cpu / n_unc) / (cached.cpu / n), 2)
    return out


@torch.no_grad()
def bench_spec_decode_step(context_len: int, steps: int, bf16: bool, compile: bool,
                           device: torch.device, kv_heads: int | None = None) -> dict:
    """Milliseconds per cached decode step of the SPEC-sized GPT2MEG (one step = all 272
    channels advance one sample, logits included, sampling excluded), timed on the decoder
    ``generate`` uses, after priming it on a ``context_len``-step context; ``kv_heads``: the
    same model with that many key/value heads (grouped-query attention)."""
    torch.manual_seed(0)
    model = build_model("GPT2MEG", {**GPT_SPEC, "kv_heads": kv_heads}).to(device).eval()
    context = torch.randint(0, VOCAB, (1, 272, context_len), device=device)
    amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    with amp:
        prime, step = (model.incremental_decoder(1, compile=True) if compile
                       else model.incremental_decoder(1))
        with _Clock(device) as p:
            logits = prime(context, True)
        with _Clock(device) as first:
            logits = step(logits.argmax(-1))  # warm-up (and the compilation)
        for _ in range(2):
            logits = step(logits.argmax(-1))
        with _Clock(device) as clock:
            for _ in range(steps):
                logits = step(logits.argmax(-1))
    per_step = clock.wall / steps
    kv = kv_heads or GPT_SPEC["n_heads"]
    floor = _kv_read_floor(context_len, torch.bfloat16 if bf16 else torch.float32, device,
                           kv / GPT_SPEC["n_heads"])
    out = {"context_steps": context_len, "decode_steps": steps,
           "dtype": "bf16-autocast" if bf16 else "fp32", "compiled": compile,
           "n_heads": GPT_SPEC["n_heads"], "kv_heads": kv,
           "kv_cache_dtype": "bf16" if bf16 else "fp32",
           "prime_seconds": round(p.wall, 3), "first_step_seconds": round(first.wall, 3),
           "ms_per_decode_step": round(per_step * 1e3, 2),
           "tokens_per_s": round(272 / per_step, 1),
           "spec_cache_speedup": round(p.wall / per_step, 1),
           **floor, "step_over_read_floor": round(per_step * 1e3 / floor["kv_read_floor_ms"], 2)}
    if device.type == "cpu":
        out["cpu_ms_per_decode_step"] = round(clock.cpu / steps * 1e3, 2)
    else:
        out["peak_memory_mib"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return out


@torch.no_grad()
def _kv_read_floor(context_len: int, dtype: torch.dtype, device: torch.device,
                   kv_fraction: float = 1.0) -> dict:
    """The memory floor of one SPEC decode step: the time to read, once, as many bytes as its
    KV cache holds (keys and values of every layer, ``context_len + 1`` steps; a fraction
    ``kv_fraction`` of the heads with grouped key/value heads), measured here as a plain fp32
    sum over those bytes (a bf16 cache is reinterpreted as fp32, so the reduction costs the
    same per byte whatever the cache dtype)."""
    d = round(GPT_SPEC["d_model"] * kv_fraction)
    cache = [torch.randn(272, context_len + 1, d, device=device).to(dtype)
             for _ in range(2 * GPT_SPEC["n_layers"])]
    nbytes = sum(t.numel() * t.element_size() for t in cache)

    def read():
        return [t.view(torch.float32).sum() for t in cache]

    read()
    with _Clock(device) as clock:
        for _ in range(5):
            read()
    ms = clock.wall / 5 * 1e3
    return {"kv_cache_mb": round(nbytes / 1e6, 1), "kv_read_floor_ms": round(ms, 2),
            "read_gb_per_s": round(nbytes / (ms / 1e3) / 1e9, 2)}


def _spec_key(r: dict) -> str:
    """``"bf16-autocast"``, ``"fp32 compiled"``, ``"bf16-autocast kv_heads=1"``..."""
    key = r["dtype"] + (" compiled" if r["compiled"] else "")
    return key if r["kv_heads"] == r["n_heads"] else f"{key} kv_heads={r['kv_heads']}"


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
    ap.add_argument("--spec-kv-heads", type=int, nargs="*", default=[1],
                    help="also time the SPEC decode step with these numbers of key/value "
                         "heads (grouped-query attention; n_heads is 4)")
    ap.add_argument("--compile", action="store_true",
                    help="also time the SPEC decode step compiled (torch.compile; CUDA graphs "
                         "on CUDA); the first step then includes the compilation")
    ap.add_argument("--no-long-rf", action="store_true",
                    help="skip the long-receptive-field WaveNet reference")
    ap.add_argument("--vq-seconds", type=float, default=1.0,
                    help="VQGPT2MEG: seconds of signal generated with the cache")
    ap.add_argument("--vq-uncached-seconds", type=float, default=0.1,
                    help="VQGPT2MEG: seconds generated without the cache (extrapolated)")
    ap.add_argument("--only-vq", action="store_true", help="only the VQGPT2MEG case")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        ap.error("--device cuda: no CUDA device is available to torch here")
    device = torch.device(args.device)
    t0 = time.perf_counter()
    result = {
        "benchmark": "generate",
        "torch": torch.__version__,
        "device": args.device,
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "machine": platform.machine(),
        "threads": torch.get_num_threads(),
        "loadavg_1min": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
        "vqgpt2meg": bench_vqgpt2meg(args.vq_seconds, args.vq_uncached_seconds, device),
    }
    if args.only_vq:
        result["wall_seconds"] = round(time.perf_counter() - t0, 1)
        print(json.dumps(result))
        return result
    demo = {name: bench_model(name, cfg, args.context, args.steps, args.uncached_steps, device)
            for name, cfg in (("GPT2MEG", GPT_DEMO), ("STGPT2MEG", STGPT_DEMO),
                              ("WavenetFullChannel", WAVENET_DEMO))}
    long_rf = None if args.no_long_rf else bench_model(
        "WavenetFullChannel", WAVENET_LONG_RF, 3070, args.steps // 4,
        max(1, args.uncached_steps // 4), device)
    spec = [bench_spec_decode_step(args.spec_context, args.spec_steps, bf16, comp, device)
            for comp in ((False, True) if args.compile else (False,))
            for bf16 in (False, True)]
    spec += [bench_spec_decode_step(args.spec_context, args.spec_steps, bf16, False, device, kv)
             for kv in args.spec_kv_heads for bf16 in (False, True)]
    result = {
        **result,
        **{f"{name}_demo": r for name, r in demo.items()},
        "min_cache_speedup": min(r["cache_speedup"] for r in demo.values()),
        "WavenetFullChannel_long_rf_reference": long_rf,
        "GPT2MEG_spec_decode": spec,
        "gpt2meg_spec_ms_per_decode_step": {_spec_key(r): r["ms_per_decode_step"] for r in spec},
        "wall_seconds": round(time.perf_counter() - t0, 1),
    }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
