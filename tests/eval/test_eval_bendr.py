"""EvalBENDR on a tiny model and a synthetic continuous chunk store."""

from __future__ import annotations

import json
import math

import mne
import numpy as np
import pytest
import torch

from ephys_gpt.eval.registry import get_eval_spec
from ephys_gpt.models.pretrained import save_pretrained
from ephys_gpt.models.registry import build_model, get_model_spec
from ephys_gpt.store import write_session

SFREQ = 100.0
SCALE = 1e-13  # normalized units -> tesla


def make_store(root, n_sessions=3, n_ch=4, seconds=6.0, seed=0):
    """Continuous store: 10 Hz + noise, normalized (with recorded steps) like stage 2."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * SFREQ)) / SFREQ
    for s in range(n_sessions):
        x = np.sin(2 * math.pi * 10 * t + rng.uniform(0, 6, (n_ch, 1)))
        x = (x + 0.3 * rng.standard_normal(x.shape)).astype(np.float32)
        meta = {"sfreq": SFREQ, "ch_names": [f"MEG{i:03d}" for i in range(n_ch)],
                "ch_types": ["mag"] * n_ch,
                "pos_2d": [[math.cos(i), math.sin(i)] for i in range(n_ch)],
                "chunk_samples": 300,
                "steps": [{"name": "normalize", "method": "zscore", "center": [0.0] * n_ch,
                           "scale": [SCALE] * n_ch}],
                "provenance": {"subject": f"{s:02d}", "session": "01"}}
        write_session(root, f"sub-{s:02d}", [x[:, :300], x[:, 300:]], meta)
    return root


@pytest.fixture(scope="module")
def bendr_setup(tmp_path_factory):
    root = make_store(tmp_path_factory.mktemp("store") / "chunks")
    dsp = {"dataset_root": str(root), "dataset_class": "ChunkDatasetReconstruction",
           "example_seconds": 0.4, "split_by": "session", "val_ratio": 0.34,
           "test_ratio": 0.34, "seed": 0, "dataset_kwargs": {"target_shift": 1}}
    torch.manual_seed(0)
    model = build_model("BENDRForecast", get_model_spec("BENDRForecast").tiny_config)
    return root, dsp, model


def _options(tmp_path, export, **over):
    spec = get_eval_spec("EvalBENDR")
    opts = {"ckpt_path": str(export), "batch_size": 2, "max_batches": 2, "future_steps": 8,
            "gen_seconds": 0.5, "psd_windows": 4, "psd_seconds": 0.2, "accelerator": "cpu",
            "progress": False, **over}
    return spec, spec.options.model_validate(opts)


def test_eval_bendr_writes_curves_figures_summary_and_fif(bendr_setup, tmp_path):
    root, dsp, model = bendr_setup
    export = save_pretrained(model, tmp_path / "export")
    spec, opts = _options(tmp_path, export)
    config = {"save_dir": str(tmp_path / "run"), "dataset_name": "omega", "datasplitter": dsp}
    summary = spec.cls(config, opts).run()
    out = tmp_path / "run" / "evals" / "EvalBENDR"
    for name in ["one_step_rmse_mag", "one_step_rmse_normalized", "nstep_rmse_mag",
                 "nstep_rmse_normalized", "psd_mag"]:
        assert (out / f"{name}.npy").is_file() and (out / f"{name}.json").is_file()
    for fig in ["one_step_rmse", "nstep_rmse", "psd", "channel_correlation"]:
        assert (out / f"{fig}.png").stat().st_size > 0 and (out / f"{fig}.pdf").is_file()
    assert (out / "report.md").read_text().startswith("# EvalBENDR")
    saved = json.loads((out / "summary.json").read_text())
    assert saved["model_name"] == "BENDRForecast" and saved["n_windows"] == summary["n_windows"]
    # curves: model, repeat-last, AR and VAR rows over the right horizon, finite
    linear = list(summary["linear_baselines"])
    assert [n.split("(")[0] for n in linear] == ["AR", "VAR"]
    curve = np.load(out / "nstep_rmse_normalized.npy", allow_pickle=False)
    assert curve.shape == (5, 8) and np.isfinite(curve).all()
    meta = json.loads((out / "nstep_rmse_mag.json").read_text())
    assert list(meta["curves"]) == ["BENDRForecast", "repeat-last", *linear]
    assert meta["unit"] == "fT"
    # the AR and VAR figures are in the summary: 1-step, N-step and free-running spectra
    for name in linear:
        assert summary["one_step"]["rmse_mean"][name]["normalized"] > 0
        assert name in summary["one_step"]["beats_linear"]
        assert summary["nstep"]["rmse_at_8"][name]["normalized"] > 0
        assert "mag" in summary["generation"]["linear"][name]["log_spectral_distance_db"]
    # with a full history the AR fitted on the 10 Hz training data beats repeat-last (the
    # channels' phases differ per session here, so the VAR's cross-channel terms do not carry)
    one = json.loads((out / "one_step_rmse_normalized.json").read_text())["curves"]
    assert one[linear[0]][-1] < 0.7 * one["repeat-last"][-1]
    assert "On held-out 1-step RMSE" in (out / "report.md").read_text()
    # repeat-last error in signal units equals SCALE x the normalized one (invert_steps used)
    mag = np.load(out / "nstep_rmse_mag.npy", allow_pickle=False)
    assert np.allclose(mag[2], curve[2] * SCALE * 1e15, rtol=1e-4)
    # the summary's figures are in its `units` (fT), one-step and N-step alike
    assert summary["units"]["mag"] == "fT"
    order = json.loads((out / "nstep_rmse_mag.json").read_text())["curves"]
    for name, values in order.items():
        assert summary["nstep"]["rmse_at_1"][name]["mag"] == pytest.approx(values[0], rel=1e-6)
    raw = mne.io.read_raw_fif(out / "generated_raw.fif", preload=True, verbose="error")
    assert raw.ch_names == [f"MEG{i:03d}" for i in range(4)] and raw.info["sfreq"] == SFREQ
    assert raw.n_times == 50
    # free running adds innovations with the training residual std (a positive scale)
    gen = summary["generation"]
    assert gen["free_run_noise"] == "residual" and gen["innovation_std_normalized"] > 0


def test_eval_bendr_rejects_bad_options_and_models(bendr_setup, tmp_path):
    root, dsp, model = bendr_setup
    spec = get_eval_spec("EvalBENDR")
    with pytest.raises(ValueError, match="unknown_key"):
        spec.options.model_validate({"ckpt_path": "x", "unknown_key": 1})
    export = save_pretrained(model, tmp_path / "export")
    _, opts = _options(tmp_path, export, future_steps=100)
    config = {"save_dir": str(tmp_path / "run"), "datasplitter": dsp}
    with pytest.raises(ValueError, match="future_steps"):
        spec.cls(config, opts).run()
    cnn = build_model("CNNLSTM", get_model_spec("CNNLSTM").tiny_config)
    _, opts = _options(tmp_path, export)
    with pytest.raises(ValueError, match="evaluates models with the Forecaster capability"):
        spec.cls(config, opts, model=cnn, info={}).run()
