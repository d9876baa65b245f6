"""EvalDiffusion on a tiny NTD and a synthetic continuous chunk store."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from ephys_gpt.eval.eval_diffusion import EvalDiffusion
from ephys_gpt.eval.registry import get_eval_spec
from ephys_gpt.models.pretrained import save_pretrained
from ephys_gpt.models.registry import build_model, get_model_spec
from ephys_gpt.store import write_session

SFREQ = 100.0


def make_store(root, n_sessions=3, n_ch=3, seconds=6.0, seed=0):
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * SFREQ)) / SFREQ
    for s in range(n_sessions):
        x = np.sin(2 * math.pi * 10 * t + rng.uniform(0, 6, (n_ch, 1)))
        x = (x + 0.3 * rng.standard_normal(x.shape)).astype(np.float32)
        meta = {"sfreq": SFREQ, "ch_names": [f"MEG{i:03d}" for i in range(n_ch)],
                "ch_types": ["mag", "mag", "grad"][:n_ch],
                "pos_2d": [[math.cos(i), math.sin(i)] for i in range(n_ch)],
                "chunk_samples": 300,
                "steps": [{"name": "normalize", "method": "zscore", "center": [0.0] * n_ch,
                           "scale": [1e-13] * n_ch}]}
        write_session(root, f"sub-{s:02d}", [x[:, :300], x[:, 300:]], meta)
    return root


def test_eval_diffusion_writes_all_outputs(tmp_path):
    root = make_store(tmp_path / "chunks")
    dsp = {"dataset_root": str(root), "dataset_class": "ChunkDatasetForecastCont",
           "example_seconds": 0.32, "split_by": "session", "val_ratio": 0.34,
           "test_ratio": 0.34, "seed": 0}
    torch.manual_seed(0)
    model = build_model("NTD", get_model_spec("NTD").tiny_config)
    export = save_pretrained(model, tmp_path / "export")
    spec = get_eval_spec("EvalDiffusion")
    opts = spec.options.model_validate({
        "ckpt_path": str(export), "batch_size": 2, "max_batches": 1, "future_steps": 8,
        "history_lengths": [4, 16], "recursive_steps": 20, "gen_seconds": 0.4,
        "n_unconditional": 2, "psd_windows": 4, "psd_seconds": 0.2, "sampling_steps": 3,
        "n_samples": 3,
        "accelerator": "cpu", "progress": False})
    config = {"save_dir": str(tmp_path / "run"), "dataset_name": "omega", "datasplitter": dsp}
    summary = spec.cls(config, opts).run()
    out = tmp_path / "run" / "evals" / "EvalDiffusion"
    for name in ["horizon_rmse_mag", "horizon_rmse_grad", "horizon_rmse_normalized",
                 "history_sweep", "recursive_rmse_normalized", "psd_mag", "psd_grad",
                 "horizon_crps"]:
        assert (out / f"{name}.npy").is_file() and (out / f"{name}.json").is_file(), name
    for fig in ["horizon_rmse", "horizon_crps", "history_sweep", "recursive_rmse", "psd",
                "channel_correlation"]:
        assert (out / f"{fig}.png").is_file() and (out / f"{fig}.pdf").is_file()
    assert (out / "generated_raw.fif").is_file() and (out / "report.md").is_file()
    assert np.load(out / "unconditional_samples.npy").shape == (2, 3, 32)
    linear = list(summary["linear_baselines"])
    assert [n.split("(")[0] for n in linear] == ["AR", "VAR"]
    sweep = json.loads((out / "history_sweep.json").read_text())
    assert sweep["x"] == [4.0, 16.0] and list(sweep["curves"]) == ["NTD", "repeat-last",
                                                                    "zero (mean)", *linear]
    rec = np.load(out / "recursive_rmse_normalized.npy")
    assert rec.shape == (6, 20) and np.isfinite(rec).all()
    assert summary["sampling"] == {"steps": 3}
    assert json.loads((out / "summary.json").read_text())["horizon"]["future_steps"] == 8
    # the zero baseline's error is the held-out signal's RMS: finite and positive
    hz = summary["horizon"]
    assert hz["rmse_mean_normalized"]["zero (mean)"] > 0.1
    assert hz["n_samples"] == 3 and set(hz["rmse_mean_normalized"]) == {
        "NTD", "NTD (single draw)", "repeat-last", "zero (mean)", *linear}
    assert set(hz["beats_linear"]) == set(linear)
    for name in linear:
        assert set(summary["generation"]["linear"][name]["log_spectral_distance_db"]) == {
            "mag", "grad"}
        assert summary["recursive"]["rmse_mean_normalized"][name] > 0
    # a deterministic forecast's CRPS is its mean absolute error, so never above its RMSE
    for p in ("repeat-last", "zero (mean)", *linear):
        assert 0 < hz["crps_mean_normalized"][p] <= hz["rmse_mean_normalized"][p]
    assert "CRPS" in (out / "report.md").read_text()


def test_crps_estimator():
    crps = EvalDiffusion.crps_sums
    y = torch.tensor([[[1.0, -2.0]]])                     # (B=1, C=1, T=2)
    one = torch.tensor([[[[3.0, -2.5]]]])                 # K=1: absolute error
    assert np.allclose(crps(one, y), [2.0, 0.5])
    same = one.expand(4, -1, -1, -1)                      # identical draws: still the MAE
    assert np.allclose(crps(same, y), [2.0, 0.5])
    pair = torch.tensor([[[[0.0, -2.0]]], [[[2.0, -2.0]]]])   # {0, 2} around 1: fair CRPS 0
    assert np.allclose(crps(pair, y), [0.0, 0.0])
    # a sharp ensemble centred on the truth beats the same spread shifted away from it
    g = torch.Generator().manual_seed(0)
    draws = torch.randn(16, 1, 1, 2, generator=g) * 0.1
    assert crps(draws + y, y).sum() < crps(draws + y + 1.0, y).sum()


def test_eval_diffusion_option_errors(tmp_path):
    spec = get_eval_spec("EvalDiffusion")
    with pytest.raises(ValueError, match="history_lengths"):
        spec.options.model_validate({"ckpt_path": "x", "history_lengths": [0, 3]})
    with pytest.raises(ValueError, match="sampler"):
        spec.options.model_validate({"ckpt_path": "x", "sampler": "euler"})
    opts = spec.options.model_validate({"ckpt_path": str(tmp_path / "missing"),
                                        "accelerator": "cpu"})
    with pytest.raises(FileNotFoundError, match="missing"):
        spec.cls({"save_dir": str(tmp_path)}, opts).run()
