"""Headroom over a VAR on simulated MEG: `--dynamics mvar` vs `--dynamics bursty`.

Simulates one session with bursty dynamics (its background, drawn from the same seed, is
exactly the `mvar` session), then for each of the two fits a VAR(p) by plain least squares
on the first 75 % and scores 1-step predictions on the last 25 %, next to the oracle that
knows the generator (the template's MVAR conditional mean plus, for bursty, the hidden
state and the oscillators: ``burst_one_step_mean``). Errors are per-channel normalized MSE
(each channel divided by its training standard deviation; 1 = predicting the mean), averaged
over the channels of each type; the VAR runs in the data's principal subspace (the template
has rank 50 per sensor type, so a VAR on the 102/204 sensors directly is singular).

Prints one JSON object as the last line:

    python bench/simulate_headroom.py [--seconds 600] [--seed 0] [--orders 10 20]
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np


def var_one_step(x: np.ndarray, p: int, train: int) -> np.ndarray:
    """1-step predictions (C, T - train) of a VAR(p) with intercept fitted by least squares
    on ``x[:, :train]`` (normal equations; ``x`` is full rank)."""
    n = x.shape[1]
    lags = np.vstack([x[:, p - lag - 1: n - lag - 1] for lag in range(p)]
                     + [np.ones((1, n - p))])
    target = x[:, p:]
    fit = lags[:, : train - p]
    coef = np.linalg.solve(fit @ fit.T, fit @ target[:, : train - p].T)
    return coef.T @ lags[:, train - p:]


def score(x: np.ndarray, oracle: np.ndarray, orders: list[int], train: int) -> dict:
    scale = x[:, :train].std(axis=1, keepdims=True)
    mean = x[:, :train].mean(axis=1, keepdims=True)
    xn, on = (x - mean) / scale, (oracle - mean) / scale
    u, sv, _ = np.linalg.svd(xn[:, :train], full_matrices=False)
    basis = u[:, sv > sv[0] * 1e-6]
    y = basis.T @ xn
    out = {"rank": int(basis.shape[1]),
           "oracle": float(((xn - on)[:, train:] ** 2).mean())}
    for p in orders:
        t0 = time.perf_counter()
        pred = basis @ var_one_step(y, p, train)
        out[f"var{p}"] = float(((xn[:, train:] - pred) ** 2).mean())
        out[f"var{p}_over_oracle"] = out[f"var{p}"] / out["oracle"]
        out[f"var{p}_fit_seconds"] = time.perf_counter() - t0
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seconds", type=float, default=600.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--orders", type=int, nargs="+", default=[10, 20])
    args = ap.parse_args()

    import mne

    from ephys_gpt.preprocessing.dynamics import BurstyDynamics, burst_one_step_mean
    from ephys_gpt.preprocessing.simulate import simulate_session, template_one_step_mean

    t0 = time.perf_counter()
    sim = simulate_session(args.seconds, args.seed, dynamics="bursty")
    sim_seconds = time.perf_counter() - t0
    info = sim.raw.info
    bg_oracle = template_one_step_mean(sim.background, info)
    oracle = bg_oracle + sim.patterns @ burst_one_step_mean(sim.trace, BurstyDynamics())
    train = int(0.75 * sim.raw.n_times)
    skip = 20  # the template oracle needs 18 samples of history
    result: dict = {"seconds": args.seconds, "seed": args.seed, "sfreq": info["sfreq"],
                    "train_fraction": 0.75, "simulate_seconds": sim_seconds,
                    "state_fractions": (np.bincount(sim.trace.states) / sim.trace.states.size
                                        ).round(3).tolist()}
    for kind in ("mag", "grad"):
        picks = mne.pick_types(info, meg=kind)
        for name, x, pred in (("mvar", sim.background, bg_oracle),
                              ("bursty", sim.raw.get_data(), oracle)):
            result[f"{name}_{kind}"] = score(x[picks, skip:], pred[picks, skip:], args.orders,
                                             train - skip)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
