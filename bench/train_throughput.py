"""Training throughput: forward + backward + AdamW step, tokens/s and the fraction of matmul peak.

Cases:

- ``GPT2MEG`` and ``STGPT2MEG`` at the **demo** configuration (``configs/<name>/model.yaml``,
  306 channels, 8-bit tokens, 100-sample windows, the train.yaml batch size) and at the
  **SPEC** size (8 layers, width 128, 400 positions, batch 1). The SPEC model has 272
  channels; to keep the default run short it is timed with 16 (``--spec-channels 272`` for
  the full width). GPT2MEG's cost per token does not depend on the channel count (channels
  are independent sequences); STGPT2MEG's channel attention adds 12·L·C·d FLOPs per token,
  so its per-token cost at 272 channels is higher (the analytic figure shows by how much);
- every other registered model with an example config (the ``configs/*/`` folder whose
  ``train.yaml`` names it; samples/s for
  models that do not predict tokens, e.g. the VQ tokenizers and VQGPT2MEG, whose FLOPs are
  not counted: their quantizer reads values, which the meta device cannot). VQGPT2MEG's
  step includes encoding the batch with its frozen tokenizer (the exported one when
  ``runs/videogpttokenizer/export`` exists, else a fresh one of the same config).

Each case runs in fp32 and under bf16 autocast (``torch.autocast``, Lightning's
``bf16-mixed``; the loss in fp32). The precisions' steps are interleaved (fp32, bf16, fp32,
...) so both see the same machine load, and ``bf16_speedup`` is their ratio in this run. On
the CPU each result also has ``cpu_step_s``: the process CPU time of a step, which other jobs
on a shared machine distort much less than wall time (with ``--threads 1`` it is the compute
time itself). On CUDA (``--device cuda``) each result has ``peak_memory_mib``: the peak
allocated memory of one step (activations, plus the weights and optimizer states of the
fp32 and bf16 models).

The SPEC-sized cases use ``--spec-activation`` (default ``gelu``, as the example configs;
``gelu_tanh`` is GPT-2's approximation and the models' default, about 3x slower on CPUs).

FLOPs per token (one token = one channel at one time step), counted two ways:

- ``flops_per_token_analytic`` = 6·N + 6·L·T·d [+ 12·L·C·d for STGPT2MEG], where N is the
  number of weights used in matrix multiplies (every ``nn.Linear``/conv weight, the output
  head included even when tied to the embedding; embedding look-ups are free), L layers,
  d width, T the window: the forward pass costs 2 FLOPs per weight and 4·d per attended
  position and layer (QKᵀ and AV; causal time attention sees T/2 positions on average,
  channel attention all C), and backward costs twice the forward.
- ``flops_per_token_counted``: ``torch.utils.flop_counter.FlopCounterMode`` over one
  forward + backward on the meta device (matmuls, convolutions and attention kernels). It is
  higher than the analytic figure mainly because the counter charges causal attention for
  all T positions (the masked half included): 6·L·(T/2)·d more.

The machine's matmul peak is measured here (square fp32 and bf16 matmuls); ``mfu`` is
achieved FLOP/s (counted FLOPs) over the peak of the same precision.

Run ``python bench/train_throughput.py`` (about 5 minutes on an idle 2-core CPU); options:
``--steps``, ``--device cpu|cuda``, ``--threads``, ``--only NAME``, ``--no-spec``,
``--spec-channels``, ``--spec-activation``, ``--fused-adamw``. The last line printed is one
JSON object with every figure.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import yaml
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ephys_gpt.models.registry import build_loss, build_model, get_model_spec, list_models  # noqa: E402
from ephys_gpt.training.lit_model import param_groups  # noqa: E402

logger = logging.getLogger("bench.train_throughput")

DEMO_CHANNELS = 306  # the simulated MEGIN template (ephys-gpt simulate / demo)
DEMO_VOCAB = 256     # 8-bit mu-law (configs/local/preprocess.yaml)
SPEC = {"num_channels": 272, "vocab_size": 256, "n_positions": 400, "d_model": 128,
        "n_layers": 8, "n_heads": 4}


def matmul_peak(dtype: torch.dtype, device: str, n: int = 2048, seconds: float = 1.5) -> float:
    """Sustained FLOP/s of square ``n × n`` matmuls in ``dtype``."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(2):
        a @ b
    _sync(device)
    reps, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        a @ b
        reps += 1
        _sync(device) if reps % 4 == 0 else None
    _sync(device)
    return 2 * n**3 * reps / (time.perf_counter() - t0)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _config_folder(name: str) -> Path | None:
    """The example config folder of model ``name``: the one whose train.yaml names it."""
    for train_yaml in sorted((ROOT / "configs").glob("*/train.yaml")):
        run = yaml.safe_load(train_yaml.read_text()) or {}
        if run.get("model_name") == name:
            return train_yaml.parent
    return None


def with_tokenizer(cfg: dict, folder: Path) -> dict:
    """A model over a tokenizer's codes (``tokenizer_path``, relative to its model YAML): the
    exported tokenizer when it is there, else a fresh one of the same kind and config (its
    export's config.json) or of ``configs/videogpttokenizer/model.yaml``: the cost of a step
    does not depend on the weights."""
    if "tokenizer_path" not in cfg:
        return cfg
    path = (folder / cfg["tokenizer_path"]).resolve()
    if (path / "model.safetensors").is_file():
        return {**cfg, "tokenizer_path": str(path)}
    spec = {"model_name": "VideoGPTTokenizer", "model_config": yaml.safe_load(
        (ROOT / "configs" / "videogpttokenizer" / "model.yaml").read_text())}
    if (path / "config.json").is_file():
        exported = json.loads((path / "config.json").read_text())
        spec = {k: exported[k] for k in ("model_name", "model_config")}
    return {**{k: v for k, v in cfg.items() if k != "tokenizer_path"}, "tokenizer_config": spec}


def _demo_case(name: str) -> dict | None:
    folder = _config_folder(name)
    if folder is None:
        return None
    model_yaml = folder / "model.yaml"
    if not model_yaml.is_file():
        return None
    cfg = with_tokenizer(yaml.safe_load(model_yaml.read_text()) or {}, folder)
    spec = get_model_spec(name)
    fields = spec.config_fields() or set()
    batch, seconds, sfreq = 4, 1.0, 100.0
    train_yaml = folder / "train.yaml"
    if train_yaml.is_file():
        run = yaml.safe_load(train_yaml.read_text()) or {}
        batch = int((run.get("dataloader") or {}).get("batch_size", batch))
        seconds = float((run.get("datasplitter") or {}).get("example_seconds", seconds))
    if "num_channels" in fields:
        cfg.setdefault("num_channels", DEMO_CHANNELS)
    if "vocab_size" in fields and spec.input_kind in ("tokens", "image_tokens"):
        cfg.setdefault("vocab_size", DEMO_VOCAB)
    return {"model": name, "size": "demo", "config": cfg, "batch": batch,
            "seq_len": int(round(seconds * sfreq))}


def cases(args) -> list[dict]:
    out = []
    for spec in list_models():
        if args.only and spec.name not in args.only:
            continue
        demo = _demo_case(spec.name)
        if demo is not None:
            out.append(demo)
        if spec.name in ("GPT2MEG", "STGPT2MEG") and not args.no_spec:
            config = {**SPEC, "num_channels": args.spec_channels}
            if "activation" in (spec.config_fields() or ()):
                config["activation"] = args.spec_activation
            out.append({"model": spec.name, "size": "spec", "config": config, "batch": 1,
                        "seq_len": SPEC["n_positions"]})
    return out


def _targets(spec, out, inputs):
    """Synthetic targets of the right kind for the model's default loss."""
    main = out.prediction
    if spec.input_kind in ("tokens", "image_tokens"):
        return torch.randint(0, main.shape[-1], main.shape[:-1], device=main.device)
    if spec.input_kind == "labelled":
        return torch.randint(0, main.shape[-1], main.shape[:1], device=main.device)
    return torch.randn_like(main.float())


def _call(model, inputs):
    return model(*inputs) if isinstance(inputs, tuple) else model(inputs)


def _matmul_weights(model: nn.Module, cfg: dict) -> int:
    n = 0
    for mod in model.modules():
        if isinstance(mod, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            n += mod.weight.numel()
    head = getattr(model, "lm_head", None) or getattr(model, "head", None)
    if head is None and {"vocab_size", "d_model"} <= set(cfg):  # head as F.linear(emb.weight)
        n += cfg["vocab_size"] * cfg["d_model"]
    return n


def analytic_flops_per_token(name: str, model: nn.Module, cfg: dict, seq_len: int) -> float | None:
    if name not in ("GPT2MEG", "STGPT2MEG"):
        return None
    N = _matmul_weights(model, cfg)
    L, d = cfg["n_layers"], cfg["d_model"]
    flops = 6 * N + 6 * L * seq_len * d  # 3 × (2·N + 4·d·T/2 per layer)
    if name == "STGPT2MEG":
        flops += 12 * L * cfg["num_channels"] * d
    return float(flops)


def _differentiable(out) -> torch.Tensor:
    """The model's prediction (what the loss backpropagates through)."""
    return out.prediction


def counted_flops(name: str, cfg: dict, inputs, loss_fn, spec) -> float:
    """FLOPs of one forward + backward, counted on the meta device (nothing is computed)."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        model = build_model(name, cfg).train()
    inputs = tuple(t.to("meta") for t in inputs) if isinstance(inputs, tuple) else inputs.to("meta")
    with FlopCounterMode(display=False) as fc:
        out = _call(model, inputs)
        _differentiable(out).float().sum().backward()  # the loss is negligible next to the model
    return float(fc.get_total_flops())


def _loss(loss_fn, out, targets):
    if loss_fn is not None:
        try:
            val = loss_fn(out, targets)
            return val["loss"] if isinstance(val, dict) else val
        except (ValueError, TypeError, RuntimeError):
            pass
    return _differentiable(out).float().pow(2).mean()


def _build(case: dict, precision: str, device: str, fused: bool) -> dict:
    """Model, optimizer, batch and the one-step closure of ``case`` in ``precision``."""
    name, spec = case["model"], get_model_spec(case["model"])
    torch.manual_seed(0)
    model = build_model(name, case["config"]).to(device).train()
    loss_fn = build_loss(spec.default_loss) if spec.default_loss else None
    inputs = model.example_inputs(batch_size=case["batch"], seq_len=case["seq_len"] + (
        1 if spec.input_kind == "tokens" else 0))
    if spec.input_kind == "tokens":
        inputs = inputs[..., :-1]
    inputs = tuple(t.to(device) for t in inputs) if isinstance(inputs, tuple) else inputs.to(device)
    opt = torch.optim.AdamW(param_groups(model, 0.1), lr=1e-4, fused=fused or None)
    dtype = torch.bfloat16 if precision == "bf16" else None
    ctx = (torch.autocast(device.split(":")[0], dtype=dtype) if dtype else nullcontext())
    with torch.no_grad(), ctx:
        targets = _targets(spec, _call(model, inputs), inputs)
    state = {"model": model, "inputs": inputs, "loss": None}

    def step():
        with ctx:
            out = _call(model, inputs)
            loss = _loss(loss_fn, out, targets)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        state["loss"] = loss

    state["step"] = step
    return state


def run_case(case: dict, precisions: list[str], steps: int, device: str, peaks: dict,
             fused: bool) -> list[dict]:
    """Time ``steps`` training steps per precision, interleaved (fp32, bf16, fp32, ...) so
    that both see the same machine load; the median step is reported."""
    name, spec = case["model"], get_model_spec(case["model"])
    states = {p: _build(case, p, device, fused) for p in precisions}
    times: dict[str, list[tuple[float, float]]] = {p: [] for p in precisions}
    peak_mem = {}
    for p, st in states.items():
        st["step"]()  # warm-up (allocations, autocast caches, kernel selection)
        _sync(device)
        if device.startswith("cuda"):  # activations of one step (+ both models' weights)
            torch.cuda.reset_peak_memory_stats()
            st["step"]()
            _sync(device)
            peak_mem[p] = torch.cuda.max_memory_allocated()
    for _ in range(steps):
        for p, st in states.items():
            w0, c0 = time.perf_counter(), time.process_time()
            st["step"]()
            _sync(device)
            times[p].append((time.perf_counter() - w0, time.process_time() - c0))
    out = []
    for p, st in states.items():
        model, inputs = st["model"], st["inputs"]
        primary = inputs[0] if isinstance(inputs, tuple) else inputs
        n_tokens = primary.numel() if spec.input_kind in ("tokens", "image_tokens") else None
        n_samples = primary.shape[0]
        sec = sorted(w for w, _ in times[p])[len(times[p]) // 2]  # median
        cpu = sorted(c for _, c in times[p])[len(times[p]) // 2]
        res = {"model": name, "size": case["size"], "precision": p, "batch": n_samples,
               "seq_len": case["seq_len"], "step_s": round(sec, 4),
               "params": sum(q.numel() for q in model.parameters()),
               "loss": round(float(st["loss"].detach().float()), 4),
               "samples_per_s": round(n_samples / sec, 2)}
        if device == "cpu":  # process CPU time: robust to other jobs on a shared machine
            res["cpu_step_s"] = round(cpu, 4)
        if p in peak_mem:
            res["peak_memory_mib"] = round(peak_mem[p] / 2**20, 1)
        if "num_channels" in case["config"]:
            res["channels"] = case["config"]["num_channels"]
        if n_tokens is not None:
            res["tokens_per_step"] = n_tokens
            res["tokens_per_s"] = round(n_tokens / sec, 1)
            if device == "cpu":
                res["tokens_per_cpu_s"] = round(n_tokens / cpu, 1)
            analytic = analytic_flops_per_token(name, model, case["config"], case["seq_len"])
            res["flops_per_token_analytic"] = analytic
            if case["size"] == "spec" and name == "STGPT2MEG":
                full = {**case["config"], "num_channels": SPEC["num_channels"]}
                res["flops_per_token_analytic_272ch"] = analytic_flops_per_token(
                    name, model, full, case["seq_len"])
        # FLOPs counted once in fp32 on a single sample (per-token cost is batch-free).
        one = tuple(t[:1] for t in inputs) if isinstance(inputs, tuple) else inputs[:1]
        try:
            counted = counted_flops(name, case["config"], one, None, spec)
        except RuntimeError as err:  # a forward that reads values (VQ codebook statistics,
            # k-means initialisation) cannot run on the meta device: keep the timing
            res["flops_not_counted"] = f"{type(err).__name__}: {err}"[:160]
            out.append(res)
            continue
        per_item = counted / (one[0] if isinstance(one, tuple) else one).numel() \
            if n_tokens is not None else counted
        if n_tokens is not None:
            res["flops_per_token_counted"] = per_item
            achieved = per_item * n_tokens / sec
        else:
            res["flops_per_sample_counted"] = per_item
            achieved = per_item * n_samples / sec
        res["achieved_tflops"] = round(achieved / 1e12, 4)
        res["mfu"] = round(achieved / peaks[p], 4)
        out.append(res)
    if {"fp32", "bf16"} <= set(precisions):
        r32, r16 = (next(r for r in out if r["precision"] == p) for p in ("fp32", "bf16"))
        for r in out:
            r["bf16_speedup"] = round(r32["step_s"] / r16["step_s"], 2)
            if "cpu_step_s" in r:
                r["bf16_speedup_cpu_time"] = round(r32["cpu_step_s"] / r16["cpu_step_s"], 2)
    return out


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=3,
                   help="timed steps per case and precision, interleaved across precisions, "
                        "after 1 warm-up (median reported)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--only", nargs="*", default=None, help="model names to run")
    p.add_argument("--no-spec", action="store_true", help="skip the SPEC-sized cases")
    p.add_argument("--spec-channels", type=int, default=16,
                   help="channels of the SPEC-sized cases (the SPEC model has 272)")
    p.add_argument("--precisions", nargs="*", default=["fp32", "bf16"])
    p.add_argument("--spec-activation", default="gelu", choices=["gelu", "gelu_tanh"],
                   help="MLP activation of the SPEC-sized cases (the example configs use gelu)")
    p.add_argument("--fused-adamw", action="store_true",
                   help="AdamW(fused=True) instead of the default (foreach) implementation")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is available to torch here")

    t_start = time.perf_counter()
    peaks = {"fp32": matmul_peak(torch.float32, args.device),
             "bf16": matmul_peak(torch.bfloat16, args.device)}
    logger.info("matmul peak: fp32 %.1f GFLOP/s, bf16 %.1f GFLOP/s",
                peaks["fp32"] / 1e9, peaks["bf16"] / 1e9)
    results = []
    for case in cases(args):
        t0 = time.perf_counter()
        try:
            rs = run_case(case, args.precisions, args.steps, args.device, peaks,
                          args.fused_adamw)
        except Exception as err:  # report, keep benchmarking the others
            rs = [{"model": case["model"], "size": case["size"], "precision": prec,
                   "error": f"{type(err).__name__}: {err}"[:300]} for prec in args.precisions]
        for r in rs:
            r["wall_s"] = round(time.perf_counter() - t0, 1)
            logger.info("%s", json.dumps(r))
        results.extend(rs)
    out = {
        "benchmark": "train_throughput",
        "device": args.device,
        "cpu": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name() if args.device.startswith("cuda") else None,
        "fused_adamw": args.fused_adamw,
        "spec_activation": args.spec_activation,
        "loadavg_1min": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
        "torch": torch.__version__,
        "matmul_peak_gflops": {k: round(v / 1e9, 1) for k, v in peaks.items()},
        "steps": args.steps,
        "results": results,
        "total_s": round(time.perf_counter() - t_start, 1),
    }
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
