"""Is bf16 training numerically safe here? fp32 vs bf16-mixed loss curves of a demo-sized run.

Trains the demo's GPT2MEG (or ``--model STGPT2MEG``; ``ephys_gpt.demo.FULL``'s model: width 64, 2 layers, 4 heads,
100 positions; the example configs' ``activation: gelu``) on the demo's token format (102
channels, 6-bit mu-law tokens, 1 s windows at 100 Hz, batch 2, AdamW lr 6e-3 with warmup and
cosine decay, gradient clipping 1.0) for ``--steps`` steps, in fp32 and under bf16 autocast
(Lightning's ``bf16-mixed``: fp32 weights and optimizer, bf16 matmuls and attention, loss in
fp32), from ``--seeds`` initialisations each. The data are simulated MEG-like signals (a few
oscillating latent sources mixed into the channels, plus noise), quantized as stage 2 does.

Reported: the loss curves (mean over blocks of ``--block`` steps), the training loss at the
end, the held-out loss at the end, and the noise floor they are compared with: the spread
(max - min) of the fp32 runs across seeds. bf16 is "within noise" when its seed-averaged
curve stays within that spread of fp32's.

Run: ``python bench/bf16_loss_curve.py`` (~15 minutes on 2 CPU cores; ``--steps``,
``--seeds``, ``--threads``, ``--device``, ``--model``). The last line printed is one JSON
object.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ephys_gpt.codec import mulaw_quantize  # noqa: E402
from ephys_gpt.models.registry import build_loss, build_model  # noqa: E402
from ephys_gpt.training.lit_model import WarmupCosine, param_groups  # noqa: E402

MODEL = {"num_channels": 102, "vocab_size": 64, "n_positions": 100, "d_model": 64,
         "n_layers": 2, "n_heads": 4, "dropout": 0.0, "activation": "gelu"}


def simulate_tokens(channels: int, samples: int, n_bits: int, seed: int) -> torch.Tensor:
    """int64 tokens (C, samples): 6 damped oscillators (4-30 Hz at 100 Hz) mixed into the
    channels plus white noise, scaled to ±3 std and mu-law quantized."""
    g = torch.Generator().manual_seed(seed)
    n_src, sfreq = 6, 100.0
    freqs = torch.tensor([4.0, 7.0, 10.0, 12.0, 20.0, 30.0])
    r = 0.97
    a1, a2 = 2 * r * torch.cos(2 * math.pi * freqs / sfreq), -r * r
    src = torch.zeros(n_src, samples)
    noise = torch.randn(n_src, samples, generator=g)
    for t in range(2, samples):
        src[:, t] = a1 * src[:, t - 1] + a2 * src[:, t - 2] + noise[:, t]
    mix = torch.randn(channels, n_src, generator=g)
    x = mix @ src + 2.0 * torch.randn(channels, samples, generator=g)
    x = (x - x.mean(1, keepdim=True)) / x.std(1, keepdim=True)
    return mulaw_quantize(x / 3.0, n_bits)


def windows(tokens: torch.Tensor, length: int) -> torch.Tensor:
    """Non-overlapping windows (N, C, length + 1)."""
    n = (tokens.shape[1] - 1) // length
    return torch.stack([tokens[:, i * length:i * length + length + 1] for i in range(n)])


def train(precision: str, seed: int, data: torch.Tensor, held_out: torch.Tensor, steps: int,
          batch: int, device: str, name: str = "GPT2MEG") -> dict:
    torch.manual_seed(seed)
    model = build_model(name, MODEL).to(device).train()
    loss_fn = build_loss("CrossEntropy")
    opt = torch.optim.AdamW(param_groups(model, 0.1), lr=6e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, WarmupCosine(20, steps, 0.1, cosine=True))
    amp = (torch.autocast(device.split(":")[0], dtype=torch.bfloat16) if precision == "bf16"
           else nullcontext())
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(1000 + seed))
    losses, t0 = [], time.perf_counter()
    for step in range(steps):
        idx = order[(step * batch + torch.arange(batch)) % len(data)]
        w = data[idx].to(device)
        with amp:
            loss = loss_fn(model(w[..., :-1]), w[..., 1:])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    model.eval()
    with torch.no_grad(), amp:
        held = [float(loss_fn(model(w[..., :-1].to(device)), w[..., 1:].to(device)))
                for w in held_out.split(batch)]
    return {"losses": losses, "held_out": sum(held) / len(held),
            "seconds": time.perf_counter() - t0}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--block", type=int, default=25, help="steps per averaged block")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--device", default="cpu")
    p.add_argument("--model", default="GPT2MEG", choices=["GPT2MEG", "STGPT2MEG"])
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    tokens = simulate_tokens(MODEL["num_channels"], 40_000, 6, seed=0)
    data = windows(tokens[:, :32_000], MODEL["n_positions"])
    held_out = windows(tokens[:, 32_000:], MODEL["n_positions"])[:32]
    runs: dict[str, list[dict]] = {"fp32": [], "bf16": []}
    for seed in range(args.seeds):
        for prec in runs:
            r = train(prec, seed, data, held_out, args.steps, args.batch, args.device,
                      args.model)
            runs[prec].append(r)
            print(f"{prec} seed {seed}: final block loss "
                  f"{sum(r['losses'][-args.block:]) / args.block:.4f}, held-out "
                  f"{r['held_out']:.4f} ({r['seconds']:.0f} s)", file=sys.stderr)

    def blocks(losses):
        return [sum(losses[i:i + args.block]) / len(losses[i:i + args.block])
                for i in range(0, len(losses), args.block)]

    curves = {prec: [blocks(r["losses"]) for r in rs] for prec, rs in runs.items()}
    mean = {prec: [sum(c) / len(c) for c in zip(*cs)] for prec, cs in curves.items()}
    spread = [max(c) - min(c) for c in zip(*curves["fp32"])]
    gap = [abs(a - b) for a, b in zip(mean["bf16"], mean["fp32"])]
    held = {prec: [r["held_out"] for r in rs] for prec, rs in runs.items()}
    out = {
        "benchmark": "bf16_loss_curve", "model_name": args.model, "model": MODEL,
        "steps": args.steps,
        "seeds": args.seeds, "block": args.block, "device": args.device,
        "torch": torch.__version__,
        "mean_curve": {k: [round(v, 4) for v in c] for k, c in mean.items()},
        "fp32_seed_spread": [round(v, 4) for v in spread],
        "bf16_minus_fp32_gap": [round(v, 4) for v in gap],
        "blocks_outside_fp32_spread": sum(g > s for g, s in zip(gap, spread)),
        "final_block_loss": {k: [round(c[-1], 4) for c in cs] for k, cs in curves.items()},
        "held_out_loss": {k: [round(v, 4) for v in vs] for k, vs in held.items()},
        "seconds_per_run": {k: round(sum(r["seconds"] for r in rs) / len(rs), 1)
                            for k, rs in runs.items()},
    }
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
