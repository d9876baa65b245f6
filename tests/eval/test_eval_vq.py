"""EvalVQ on a tiny tokenizer and a synthetic continuous chunk store."""

from __future__ import annotations

import json
import math

import mne
import numpy as np
import pytest
import torch

from ephys_gpt.dataset.datasplitter import split_datasets
from ephys_gpt.dataset.image_layout import gather_channels
from ephys_gpt.eval.eval_vq import codebook_usage, consecutive_windows, reconstruction_metrics
from ephys_gpt.eval.registry import get_eval_spec
from ephys_gpt.eval.windows import spread_indices
from ephys_gpt.models.pretrained import save_pretrained
from ephys_gpt.models.registry import build_model, get_model_spec
from ephys_gpt.store import write_session

SFREQ = 100.0
SCALE = 1e-13  # normalized units -> tesla
N_CH = 8


def make_store(root, n_sessions=3, seconds=6.0, seed=0):
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * SFREQ)) / SFREQ
    for s in range(n_sessions):
        x = np.sin(2 * math.pi * 10 * t + rng.uniform(0, 6, (N_CH, 1)))
        x = (x + 0.3 * rng.standard_normal(x.shape)).astype(np.float32)
        meta = {"sfreq": SFREQ, "ch_names": [f"MEG{i:03d}" for i in range(N_CH)],
                "ch_types": ["mag"] * N_CH,
                "pos_2d": [[math.cos(i), math.sin(i)] for i in range(N_CH)],
                "chunk_samples": 300,
                "steps": [{"name": "normalize", "method": "zscore", "center": [0.0] * N_CH,
                           "scale": [SCALE] * N_CH}],
                "provenance": {"subject": f"{s:02d}", "session": "01"}}
        write_session(root, f"sub-{s:02d}", [x[:, :300], x[:, 300:]], meta)
    return root


@pytest.fixture(scope="module")
def vq_setup(tmp_path_factory):
    root = make_store(tmp_path_factory.mktemp("store") / "chunks")
    dsp = {"dataset_root": str(root), "dataset_class": "ChunkDatasetImage",
           "example_seconds": 0.32, "split_by": "session", "val_ratio": 0.34,
           "test_ratio": 0.34, "seed": 0,
           "dataset_kwargs": {"image_size": 8, "interpolation": "gaussian"}}
    torch.manual_seed(0)
    model = build_model("VideoGPTTokenizer", get_model_spec("VideoGPTTokenizer").tiny_config)
    splits = split_datasets(**dsp)
    model.train()(torch.stack([splits.train[i][0] for i in range(8)]))  # initialise codes
    return root, dsp, model.eval()


def _options(export, **over):
    spec = get_eval_spec("EvalVQ")
    opts = {"ckpt_path": str(export), "batch_size": 4, "max_batches": 2, "psd_seconds": 0.32,
            "fif_seconds": 1.0, "accelerator": "cpu", "progress": False, **over}
    return spec, spec.options.model_validate(opts)


def _run_exported(model, dsp, tmp_path, options):
    """Export ``model`` and run EvalVQ on it with ``options(export)`` into ``tmp_path/run``."""
    spec, opts = options(save_pretrained(model, tmp_path / "export"))
    config = {"save_dir": str(tmp_path / "run"), "dataset_name": "omega", "datasplitter": dsp}
    return spec.cls(config, opts).run()


def test_eval_vq_outputs_and_figures_match_a_direct_computation(vq_setup, tmp_path):
    root, dsp, model = vq_setup
    summary = _run_exported(model, dsp, tmp_path, _options)
    out = tmp_path / "run" / "evals" / "EvalVQ"
    for name in ["per_channel", "rmse_by_position_mag", "psd_mag", "code_usage"]:
        assert (out / f"{name}.npy").is_file() and (out / f"{name}.json").is_file()
    for fig in ["rmse_by_position", "psd", "variance_explained_map", "code_usage", "traces"]:
        assert (out / f"{fig}.png").stat().st_size > 0 and (out / f"{fig}.pdf").is_file()
    assert (out / "report.md").read_text().startswith("# EvalVQ: VideoGPTTokenizer")
    saved = json.loads((out / "summary.json").read_text())
    assert saved["n_windows"] == 8 and saved["model_name"] == "VideoGPTTokenizer"
    # the figures are those of the model's reconstructions at the sensors
    test = split_datasets(**dsp).test
    idx = spread_indices(len(test), 8, 0)
    items = [test[int(i)] for i in idx]
    img = torch.stack([it[0] for it in items])
    signal = torch.stack([it[1].signal for it in items]).numpy()
    with torch.no_grad():
        rec = gather_channels(model.decode(model.encode(img)), items[0][1].pixels).numpy()
    sse = ((rec - signal) ** 2).sum()
    ss = ((signal - signal.mean(-1, keepdims=True)) ** 2).sum()
    assert saved["variance_explained"] == pytest.approx(1 - sse / ss, rel=1e-4, abs=1e-5)
    mag = saved["channel_types"]["mag"]
    assert mag["unit"] == "fT"
    assert mag["rmse"] == pytest.approx(np.sqrt(((rec - signal) ** 2).mean()) * SCALE * 1e15,
                                        rel=1e-4)
    assert mag["rmse_mean_baseline"] == pytest.approx(np.sqrt(ss / signal.size) * SCALE * 1e15,
                                                      rel=1e-4)
    cb = saved["codebook"]
    assert 1 <= cb["active_codes"] <= 16 and 1.0 <= cb["perplexity"] <= 16
    # continuous held-out signal as .fif, original and reconstruction
    for name in ("original_raw.fif", "reconstruction_raw.fif"):
        raw = mne.io.read_raw_fif(out / name, preload=True, verbose="error")
        assert raw.ch_names == [f"MEG{i:03d}" for i in range(N_CH)] and raw.n_times == 96
    orig = mne.io.read_raw_fif(out / "original_raw.fif", preload=True, verbose="error")
    first = test[consecutive_windows(test, 1.0)[0]][1].signal.numpy() * SCALE
    np.testing.assert_allclose(orig.get_data()[:, :32], first, rtol=1e-5, atol=1e-20)
    assert summary["fif"]["windows"] == 3


def test_eval_vq_rejects_other_models_and_datasets(vq_setup, tmp_path):
    root, dsp, model = vq_setup
    spec, opts = _options(tmp_path / "none")
    config = {"save_dir": str(tmp_path / "run"), "datasplitter": dsp}
    cnn = build_model("CNNLSTM", get_model_spec("CNNLSTM").tiny_config)
    with pytest.raises(ValueError, match="EvalVQ evaluates models with the Tokenizer or"):
        spec.cls(config, opts, model=cnn, info={}).run()
    quant = dict(dsp, dataset_class="ChunkDatasetImageQuantized",
                 dataset_kwargs={"image_size": 8, "quantize": {"n_bits": 8}})
    with pytest.raises(ValueError, match="channel-space target"):
        spec.cls({"save_dir": str(tmp_path / "run"), "datasplitter": quant}, opts,
                 model=model, info={}).run()
    with pytest.raises(ValueError, match="fif_seconds"):
        spec.options.model_validate({"ckpt_path": "x", "fif_seconds": 0})


def test_reconstruction_metrics_values():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((5, 3, 40))
    m = reconstruction_metrics(x, x)
    assert np.allclose(m["variance_explained"], 1.0) and np.allclose(m["correlation"], 1.0)
    assert np.allclose(m["rmse"], 0.0)
    mean = np.broadcast_to(x.mean(-1, keepdims=True), x.shape)
    m = reconstruction_metrics(x, mean)
    assert np.allclose(m["variance_explained"], 0.0) and float(m["variance_explained_total"]) == \
        pytest.approx(0.0, abs=1e-12)
    assert np.allclose(m["rmse"], m["rmse_mean_baseline"])
    m = reconstruction_metrics(x, 0.5 * x)
    assert np.allclose(m["correlation"], 1.0) and np.all(m["variance_explained"] < 1.0)


def test_codebook_usage_counts():
    codes = np.array([0, 0, 1, 1, 2, 2, 3, 3]).reshape(1, 2, 2, 2)
    u = codebook_usage(codes, 8)
    assert u["perplexity"] == pytest.approx(4.0) and u["active_codes"] == 4
    assert u["active_fraction"] == 0.5 and u["codes_for_90pct"] == 4
    rvq = np.stack([codes, np.zeros_like(codes)], -1)
    u = codebook_usage(rvq, 8)
    assert [s["active_codes"] for s in u["stages"]] == [4, 1]


# -- a prior over codes (VQGPT2MEG) ---------------------------------------------------------

@pytest.fixture(scope="module")
def prior_setup(vq_setup):
    """A tiny VQGPT2MEG over the fixture's tokenizer (its weights), 16 latent frames."""
    root, dsp, tok = vq_setup
    spec = get_model_spec("VQGPT2MEG")
    cfg = {**spec.tiny_config, "n_frames": 16,
           "tokenizer_config": {"model_name": "VideoGPTTokenizer",
                                "model_config": get_model_spec("VideoGPTTokenizer").tiny_config}}
    torch.manual_seed(0)
    model = build_model("VQGPT2MEG", cfg)
    model.tokenizer.load_state_dict(tok.state_dict())
    return root, dsp, model.eval()


def _prior_options(export, **over):
    return _options(export, **{"future_steps": 8, "gen_seconds": 1.0, "psd_windows": 4,
                               "unigram_max_windows": 8, "gen_sampling": "top_k", "top_k": 4,
                               **over})


def test_eval_vq_on_a_prior_over_codes_matches_a_direct_computation(prior_setup, tmp_path):
    root, dsp, model = prior_setup
    summary = _run_exported(model, dsp, tmp_path, _prior_options)
    out = tmp_path / "run" / "evals" / "EvalVQ"
    assert json.loads((out / "summary.json").read_text())["next_code"] == summary["next_code"]
    for name in ["next_code_accuracy", "nstep_rmse_mag", "nstep_rmse_normalized", "psd_mag"]:
        assert (out / f"{name}.npy").is_file() and (out / f"{name}.json").is_file()
    for fig in ["next_code_accuracy", "nstep_rmse", "psd", "channel_correlation", "traces"]:
        assert (out / f"{fig}.png").stat().st_size > 0 and (out / f"{fig}.pdf").is_file()
    assert (out / "report.md").read_text().startswith("# EvalVQ: VQGPT2MEG")
    raw = mne.io.read_raw_fif(out / "generated_raw.fif", preload=True, verbose="error")
    assert raw.n_times == 100 and raw.ch_names == [f"MEG{i:03d}" for i in range(N_CH)]
    saved = json.loads((out / "summary.json").read_text())
    assert saved["model_name"] == "VQGPT2MEG" and saved["n_windows"] == 8
    assert saved["codes_per_second"] == 800.0  # 4 x 4 codes per 2 samples at 100 Hz

    # next-code accuracy and both code baselines, recomputed
    splits = split_datasets(**dsp)
    test, train = splits.test, splits.train
    idx = [int(i) for i in spread_indices(len(test), 8, 0)]
    items = [test[i] for i in idx]
    img = torch.stack([it[0] for it in items])
    with torch.no_grad():
        codes = model.encode(img)
        logits = model.code_logits(codes).flatten(2, 3)[:, 1:]
    tgt = codes.flatten(2)[:, 1:]
    tr = [int(i) for i in spread_indices(len(train), 8, 0)]
    with torch.no_grad():
        tr_codes = model.encode(torch.stack([train[i][0] for i in tr])).flatten(2)
    counts = np.ones((16, 16))
    for s in range(16):
        counts[s] += np.bincount(tr_codes[..., s].reshape(-1).numpy(), minlength=16)
    acc = saved["next_code"]["accuracy"]
    assert acc["VQGPT2MEG"] == pytest.approx((logits.argmax(-1) == tgt).float().mean().item())
    assert acc["repeat-last code"] == pytest.approx(
        (codes.flatten(2)[:, :-1] == tgt).float().mean().item())
    assert acc["unigram code"] == pytest.approx(
        (torch.as_tensor(counts.argmax(-1)) == tgt).float().mean().item())
    uni_nll = -np.log(counts / counts.sum(1, keepdims=True))[np.arange(16), tgt.numpy()].mean()
    assert saved["next_code"]["nll_nats"]["unigram code"] == pytest.approx(uni_nll, rel=1e-5)

    # N-step errors in fT: the model's greedy continuation, repeat-last and the true codes
    signal = torch.stack([it[1].signal for it in items])
    pixels = items[0][1].pixels
    fut = signal[..., 24:]
    with torch.no_grad():
        gen = gather_channels(model.generate(img[..., :24], 8, temperature=0.0), pixels)
        true = gather_channels(model.decode(model.encode(img)), pixels)
    ns = saved["nstep"]
    for name, pred in (("VQGPT2MEG", gen[..., 24:]), ("tokenizer (true codes)", true[..., 24:]),
                       ("repeat-last", signal[..., 23:24].expand_as(fut)),
                       ("zero (mean)", torch.zeros_like(fut))):
        err = ((pred - fut) ** 2).mean((0, 1)).sqrt() * SCALE * 1e15
        assert ns["rmse_at_1"][name]["mag"] == pytest.approx(float(err[0]), rel=1e-4), name
        assert ns["rmse_at_8"][name]["mag"] == pytest.approx(float(err[-1]), rel=1e-4), name
    assert {"AR", "VAR"} <= {k.split("(")[0] for k in ns["rmse_at_1"]}
    gen_sum = saved["generation"]
    assert gen_sum["seconds_per_signal_second"] > 0
    assert gen_sum["psd"]["mag"]["log_spectral_distance_db"] >= 0
    assert set(gen_sum["linear"]) == set(saved["linear_baselines"])


def test_eval_vq_dispatches_on_capabilities(prior_setup, tmp_path):
    root, dsp, model = prior_setup
    spec, opts = _prior_options(tmp_path / "none")
    config = {"save_dir": str(tmp_path / "run"), "datasplitter": dsp}
    cnn = build_model("CNNLSTM", get_model_spec("CNNLSTM").tiny_config)
    with pytest.raises(ValueError, match="Tokenizer or TokenGenerator capability on 'image'"):
        spec.cls(config, opts, model=cnn, info={}).run()
    gpt = build_model("GPT2MEG", get_model_spec("GPT2MEG").tiny_config)
    with pytest.raises(ValueError, match="GPT2MEG consumes 'tokens'"):
        spec.cls(config, opts, model=gpt, info={}).run()
    with pytest.raises(ValueError, match="future_steps .* at least one latent frame"):
        spec.cls(config, _prior_options(tmp_path / "none", future_steps=31)[1], model=model,
                 info={}).run()
