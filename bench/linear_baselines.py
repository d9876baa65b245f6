"""Fit cost and held-out skill of the linear AR/VAR baselines (ephys_gpt/linear/).

1. **Fit time and memory** at the demo's sizes: 102 or 306 channels, orders 10 and 30, on
   ``--seconds`` of synthetic 100 Hz data in 10 s segments (the demo's training split holds
   4 sessions x 150 s = 600 s). Each fit runs in a fresh subprocess; ``peak_rss_mb`` is how
   much the fit raised the process's peak resident memory, ``stats_mb`` the size of the
   float64 normal equations. VAR fits are timed with all channels as inputs and, where
   ``order x channels`` exceeds the default cap (4096), with the default ``auto`` reduction to
   principal components too.
2. **Held-out skill** (``--store PATH``): the baselines fitted on the training split of a
   chunk store (split with ``ephys_gpt.dataset.datasplitter.split_datasets``) and scored on
   its test split. Continuous stores: 1-step RMSE in normalized (store) units; token stores:
   next-token accuracy, predictions re-quantized through each session's recorded mu-law step.
   Two readings of each: ``windows`` scores every position of every test window as the eval
   runners do (EvalQuant's accuracy averaged over positions; EvalBENDR's RMSE per position
   averaged over positions), with the first ``p - 1`` positions predicted from a mean-filled
   history; ``full_history`` scores every sample of the test split's contiguous segments
   that has ``p`` samples of history. ``repeat-last`` is scored the same way for reference.

Prints one JSON object as the last line. Examples::

    python bench/linear_baselines.py                      # fit cost only (a few minutes)
    python bench/linear_baselines.py --skip-fit-cost --store runs/demo/preprocessed/chunks \\
        --split-by subject --val-ratio 0.25 --test-ratio 0.25      # the demo's token split
    python bench/linear_baselines.py --skip-fit-cost \\
        --store runs/demo/preprocessed_continuous/chunks           # configs/bendr's split

``--threads N`` sets torch's intra-op threads (default: torch's choice). On a CPU shared with
other busy processes, use ``--threads 1``: OpenMP threads waiting on each other make the many
small operations of a fit orders of magnitude slower, and read ``fit_cpu_seconds`` (the
process's CPU time) rather than the wall-clock ``fit_seconds``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time

import numpy as np
import torch

SFREQ = 100.0
SEGMENT = 1000  # 10 s segments, as the demo's chunks


class SyntheticSegments:
    """Re-iterable white-noise segments (C, SEGMENT), generated on the fly (no data held)."""

    def __init__(self, n_channels: int, n_segments: int, seed: int = 0):
        self.C, self.n, self.seed = n_channels, n_segments, seed

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
        for i in range(self.n):
            yield np.random.default_rng((self.seed, i)).standard_normal((self.C, SEGMENT))


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def fit_cost_one(kind: str, channels: int, order: int, seconds: float,
                 n_components: str | None) -> dict:
    """One timed fit (run in a fresh process by :func:`fit_cost`)."""
    from ephys_gpt.linear import fit_linear

    data = SyntheticSegments(channels, max(1, round(seconds * SFREQ / SEGMENT)))
    before = _rss_mb()
    t0, c0 = time.perf_counter(), time.process_time()
    kw = {} if kind == "ar" else {"n_components": None if n_components == "all"
                                  else n_components}
    model = fit_linear(data, kind, order, **kw)
    seconds_fit, cpu_fit = time.perf_counter() - t0, time.process_time() - c0
    K = channels if model.projection is None else model.projection.shape[0]
    F, G, n_out = (order, channels, 1) if kind == "ar" else (order * K, 1, channels)
    return {"model": model.name, "kind": kind, "channels": channels, "order": order,
            "inputs": F if kind == "var" else order, "samples": len(data) * SEGMENT,
            "fit_seconds": round(seconds_fit, 3), "fit_cpu_seconds": round(cpu_fit, 3),
            "peak_rss_mb": round(max(0.0, _rss_mb() - before), 1),
            "stats_mb": round(8 * G * (F * F + F * n_out + n_out * n_out) / 2**20, 1),
            "explained_variance": model.explained_variance}


def fit_cost(seconds: float, threads: int | None, configs) -> list[dict]:
    out = []
    for kind, channels, order, comps in configs:
        cmd = [sys.executable, __file__, "--one", f"{kind},{channels},{order},{comps}",
               "--seconds", str(seconds)]
        if threads:
            cmd += ["--threads", str(threads)]
        res = subprocess.run(cmd, capture_output=True, text=True, env=os.environ.copy())
        if res.returncode != 0:
            out.append({"kind": kind, "channels": channels, "order": order,
                        "error": res.stderr.strip().splitlines()[-1:]})
        else:
            out.append(json.loads(res.stdout.strip().splitlines()[-1]))
        print(json.dumps(out[-1]), file=sys.stderr, flush=True)
    return out


# -- held-out skill --------------------------------------------------------------------------


def _full_window(dataset, i: int) -> torch.Tensor:
    """Window ``i`` with its last target: (C, T + 1)."""
    inputs, targets = dataset[i]
    if isinstance(inputs, (tuple, list)):
        inputs = inputs[0]
    return torch.cat([inputs, targets[:, -1:]], dim=-1)


def heldout(store: str, args) -> dict:
    from ephys_gpt.dataset.datasplitter import split_datasets
    from ephys_gpt.linear import Segments, fit_linear
    from ephys_gpt.linear.data import requantize
    from ephys_gpt.store import list_sessions

    tokens = list_sessions(store)[0].is_tokens
    splits = split_datasets(store, dataset_class="ChunkDataset" if tokens
                            else "ChunkDatasetForecastCont", example_seconds=args.example_seconds,
                            split_by=args.split_by, val_ratio=args.val_ratio,
                            test_ratio=args.test_ratio, seed=args.seed)
    train, val, test = splits
    test_segments = Segments(test)
    # test windows in batches, with each window's session steps (token decoding)
    idx = list(range(len(test)))
    batches = []
    for j in range(0, len(idx), 64):
        part = idx[j:j + 64]
        x = torch.stack([_full_window(test, i) for i in part])
        steps = [test.session_steps(int(test.indices[i][0])) for i in part]
        batches.append((x, steps))
    results: dict = {}

    def score(name: str, predict_windows, predict_segment, order: int, extra: dict) -> None:
        # windows: per-position accuracy / squared error, averaged as the eval runners do
        T = batches[0][0].shape[-1] - 1
        hit, sq, n_rows = torch.zeros(T, dtype=torch.float64), torch.zeros(
            T, dtype=torch.float64), 0
        for x, steps in batches:
            pred = predict_windows(x[..., :-1], steps)
            tgt = x[..., 1:]
            if tokens:
                hit += (pred == tgt).double().sum((0, 1))
            else:
                sq += (pred.double() - tgt.double()).pow(2).sum((0, 1))
            n_rows += x.shape[0] * x.shape[1]
        # full history: every sample of the contiguous test segments with p samples before it
        f_hit = f_sq = f_n = 0.0
        for k in range(len(test_segments)):
            seg = test_segments.read(k)  # decoded float64 (C, L)
            if seg.shape[1] <= order:
                continue
            s = test_segments.runs[k][0]
            pred, tgt = predict_segment(seg, test.session_steps(s))
            pred, tgt = pred[:, order - 1:-1], tgt[:, order:]
            if tokens:
                f_hit += float((pred == tgt).sum())
            else:
                f_sq += float(((pred - tgt) ** 2).sum())
            f_n += tgt.size
        if tokens:
            results[name] = {"accuracy_windows": float((hit / n_rows).mean()),
                             "accuracy_full_history": f_hit / f_n, **extra}
        else:
            results[name] = {"rmse_windows": float((sq / n_rows).sqrt().mean()),
                             "rmse_full_history": float(np.sqrt(f_sq / f_n)), **extra}
        print(json.dumps({name: results[name]}), file=sys.stderr, flush=True)

    def seg_tokens(seg, steps):
        tok = requantize(seg.astype(np.float32), steps).astype(np.int64)
        return tok

    # repeat-last for reference
    score("repeat-last", lambda x, steps: x,
          lambda seg, steps: ((seg_tokens(seg, steps),) * 2) if tokens else (seg, seg), 1, {})
    for spec in args.models.split(","):
        kind, order_s, *comps = spec.split(":")
        order = "auto" if order_s == "auto" else int(order_s)
        kw = {}
        if comps:  # VAR inputs: auto, all (every channel) or a number of components
            kw["n_components"] = ({"auto": "auto", "all": None}[comps[0]]
                                  if comps[0] in ("auto", "all") else int(comps[0]))
        t0, c0 = time.perf_counter(), time.process_time()
        model = fit_linear(train, kind, order, val=val if len(val) else None,
                           max_order=args.max_order, progress=args.progress, **kw)
        extra = {"fit_seconds": round(time.perf_counter() - t0, 2),
                 "fit_cpu_seconds": round(time.process_time() - c0, 2),
                 "train_rows": model.n_rows,
                 "order": model.order}
        if model.selection:
            extra["selection"] = {"criterion": model.selection["criterion"],
                                  "chosen": model.selection["chosen"]}
        if model.projection is not None:
            extra["explained_variance"] = model.explained_variance
        if tokens:
            def windows(x, steps, m=model):
                return m.predict_next_tokens(x, steps)

            def segment(seg, steps, m=model):
                pred = requantize(m.predict_next(seg.astype(np.float32)), steps)
                return pred.astype(np.int64), seg_tokens(seg, steps)
        else:
            def windows(x, steps, m=model):
                return m.predict_next(x)

            def segment(seg, steps, m=model):
                return m.predict_next(seg), seg
        label = model.name if order != "auto" else f"{model.name} (auto)"
        score(label, windows, segment, model.order, extra)
    return {"store": str(store), "kind": "tokens" if tokens else "continuous",
            "metric": ("next-token accuracy (re-quantized through each session's mu-law step)"
                       if tokens else "1-step RMSE, normalized units"),
            "split": {"split_by": args.split_by, "val_ratio": args.val_ratio,
                      "test_ratio": args.test_ratio, "seed": args.seed,
                      "example_seconds": args.example_seconds},
            "train_samples": Segments(train).n_samples, "test_samples": test_segments.n_samples,
            "test_windows": len(test), "n_channels": test_segments.n_channels,
            "results": results}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=600.0,
                    help="synthetic training data for the fit cost (s at 100 Hz)")
    ap.add_argument("--skip-fit-cost", action="store_true")
    ap.add_argument("--skip-large", action="store_true",
                    help="skip VAR(30) on all 306 channels (a 9180-input regression)")
    ap.add_argument("--store", help="a chunk store for the held-out skill")
    ap.add_argument("--models", default="ar:10,ar:30,var:1,var:10,var:30",
                    help="kind:order[:inputs] list; order 'auto': chosen on the validation "
                         "split; VAR inputs 'auto' (default), 'all' or a number of "
                         "principal components")
    ap.add_argument("--max-order", type=int, default=30)
    ap.add_argument("--split-by", default="session")
    ap.add_argument("--val-ratio", type=float, default=0.2)
    ap.add_argument("--test-ratio", type=float, default=0.2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--example-seconds", type=float, default=1.0)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--progress", action="store_true")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.one:
        kind, channels, order, comps = args.one.split(",")
        print(json.dumps(fit_cost_one(kind, int(channels), int(order), args.seconds,
                                      None if comps == "None" else comps)))
        return
    out: dict = {"machine": {"python": platform.python_version(), "torch": torch.__version__,
                             "threads": torch.get_num_threads(), "cpus": os.cpu_count(),
                             "load_average": os.getloadavg()}}
    if not args.skip_fit_cost:
        configs = []
        for channels in (102, 306):
            for order in (10, 30):
                configs.append(("ar", channels, order, "None"))
                configs.append(("var", channels, order, "all"))
                if order * channels > 4096:
                    configs.append(("var", channels, order, "auto"))
        if args.skip_large:
            configs = [c for c in configs if not (c[0] == "var" and c[1] == 306 and c[2] == 30
                                                  and c[3] == "all")]
        out["fit_cost"] = fit_cost(args.seconds, args.threads, configs)
    if args.store:
        out["heldout"] = heldout(args.store, args)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
