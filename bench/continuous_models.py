"""Throughput of the continuous models at their example configs (configs/<name>/model.yaml).

Measures, on this machine's CPU or a CUDA device (``--device cpu|cuda``; default: CUDA when
present; on CUDA the peak allocated memory of each training run is reported too):

- training samples/s (forward + backward + AdamW step) for BENDRForecast, NTD and CNNLSTM,
  in fp32 and under bf16 autocast, at the batch size of each train.yaml;
- NTD sampling: wall seconds per second of generated signal (DDIM, the config's steps);
- BENDRForecast forecasting: steps/s with and without the cache (KV cache + windowed encoder
  vs a full forward pass per step), from a 4 s context.

Channel counts follow the demo data (102 magnetometers at 100 Hz) for BENDR/NTD and
LibriBrain (306 sensors, 125 samples) for CNNLSTM. Prints one JSON object as the last line.
Run: ``python bench/continuous_models.py`` (no arguments; ~1-2 minutes). ``--threads N``
sets torch's intra-op threads (default: torch's choice). On a CPU shared with other busy
processes, OpenMP threads that wait on each other make small elementwise ops orders of
magnitude slower; ``--threads 1`` gives stable numbers there.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import yaml

from ephys_gpt.losses.diffusion import DiffusionMSE
from ephys_gpt.models.registry import build_model

ROOT = Path(__file__).resolve().parents[1]
SFREQ = 100.0
MODELS = {  # name: (config folder, extra config, batch size, window samples)
    "BENDRForecast": ("bendr", {"num_channels": 102}, 4, 100),
    "NTD": ("ntd", {"num_channels": 102}, 8, 100),
    "CNNLSTM": ("cnnlstm", {}, 32, 125),
}


def _config(folder: str, extra: dict) -> dict:
    return {**(yaml.safe_load((ROOT / "configs" / folder / "model.yaml").read_text()) or {}),
            **extra}


def _batch(name: str, model, B: int, T: int, device):
    if name == "BENDRForecast":
        x, pos, typ = model.example_inputs(B, T + 1)
        x = x.to(device)
        return (x[..., :-1], pos.to(device), typ.to(device)), x[..., 1:]
    if name == "NTD":
        return (model.example_inputs(B, T).to(device),), None
    return (model.example_inputs(B, T).to(device),), torch.randint(
        0, model.config.num_classes, (B,), device=device)


def _loss(name: str, out, target):
    if name == "BENDRForecast":
        return torch.nn.functional.mse_loss(out.prediction.float(), target)
    if name == "NTD":
        return DiffusionMSE()(out)
    return torch.nn.functional.cross_entropy(out.prediction.float(), target)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def train_throughput(name: str, device, bf16: bool, warmup: int = 2, iters: int = 6) -> float:
    """Training samples/s (wall time); on CUDA the peak memory of the run is recorded in
    ``PEAK_MIB[(name, bf16)]``."""
    folder, extra, B, T = MODELS[name]
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    torch.manual_seed(0)
    model = build_model(name, _config(folder, extra)).to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    inputs, target = _batch(name, model, B, T, device)
    ctx = torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else nullcontext()
    for i in range(warmup + iters):
        if i == warmup:
            _sync(device)
            t0 = time.perf_counter()
        with ctx:
            out = model(*inputs)
        loss = _loss(name, out, target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    _sync(device)
    if device.type == "cuda":
        PEAK_MIB[(name, bf16)] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    return B * iters / (time.perf_counter() - t0)


PEAK_MIB: dict = {}


@torch.no_grad()
def ntd_sampling(device) -> dict:
    torch.manual_seed(0)
    model = build_model("NTD", _config("ntd", {"num_channels": 102})).to(device).eval()
    L = model.config.signal_length
    model.sample(1, L, progress=False, steps=2)  # warm up
    _sync(device)
    t0 = time.perf_counter()
    model.sample(1, L, progress=False)
    _sync(device)
    dt = time.perf_counter() - t0
    return {"seconds_per_generated_second": dt / (L / SFREQ),
            "sampling_steps": model.config.sampling_steps, "window_samples": L,
            "channels": 102, "sampler": model.config.sampler}


@torch.no_grad()
def bendr_forecast(device, horizon: int = 40, context: int = 400) -> dict:
    torch.manual_seed(0)
    model = build_model("BENDRForecast", _config("bendr", {"num_channels": 102}))
    model = model.to(device).eval()
    past = model.example_inputs(1, context)[0].to(device)
    out = {}
    for use_cache in (True, False):
        model.forecast(past, 2, use_cache=use_cache)  # warm up
        _sync(device)
        t0 = time.perf_counter()
        model.forecast(past, horizon, use_cache=use_cache)
        _sync(device)
        out["cached" if use_cache else "uncached"] = horizon / (time.perf_counter() - t0)
    return {"steps_per_s_cached": out["cached"], "steps_per_s_uncached": out["uncached"],
            "cache_speedup": out["cached"] / out["uncached"], "context_samples": context,
            "horizon": horizon, "channels": 102}


def main(device: str | None = None) -> dict:
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    result: dict = {"device": str(device), "torch": torch.__version__,
                    "threads": torch.get_num_threads(), "cpu": platform.processor() or
                    platform.machine(), "load_avg": os.getloadavg()[0] if hasattr(
                        os, "getloadavg") else None, "train_samples_per_s": {}}
    for name, (_, _, B, T) in MODELS.items():
        result["train_samples_per_s"][name] = {
            "fp32": train_throughput(name, device, bf16=False),
            "bf16_autocast": train_throughput(name, device, bf16=True),
            "batch_size": B, "window_samples": T}
        if device.type == "cuda":
            result["train_samples_per_s"][name]["peak_memory_mib"] = {
                "fp32": PEAK_MIB[(name, False)], "bf16_autocast": PEAK_MIB[(name, True)]}
    if device.type == "cuda":
        result["gpu"] = torch.cuda.get_device_name(device)
    result["ntd_sampling"] = ntd_sampling(device)
    result["bendr_forecast"] = bendr_forecast(device)
    return result


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    parser.add_argument("--device", default=None,
                        help="cpu or cuda (default: cuda when available)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device and args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available to torch here")
    print(json.dumps(main(args.device)))
