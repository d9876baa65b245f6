"""EvalQuant end to end on a tiny model and a small token store."""

from __future__ import annotations

import json

import mne
import numpy as np
import pytest
import torch
from eval_token_store import CH_NAMES, CH_TYPES, N_BITS, SFREQ
from pydantic import ValidationError

from ephys_gpt.codec import tokens_to_signal
from ephys_gpt.eval.baselines import (
    REPEAT_LAST,
    UNIGRAM,
    linear_distribution_name,
    unigram_distribution,
)
from ephys_gpt.eval.eval_quant import EvalQuant, EvalQuantOptions
from ephys_gpt.eval.registry import get_eval_spec
from ephys_gpt.eval.windows import full_window, to_signal, window_steps
from ephys_gpt.models.capabilities import TokenGenerator
from ephys_gpt.models.output import ModelOutput
from ephys_gpt.models.pretrained import save_pretrained
from ephys_gpt.models.registry import MODELS, ModelSpec, build_model

V = 2**N_BITS


def _tokens(dataset, i):
    return full_window(dataset, i)[0]
TINY = {"num_channels": 3, "vocab_size": V, "n_positions": 64, "d_model": 32, "n_layers": 2,
        "n_heads": 2}


def _opts(tmp_path, **kw):
    base = {"ckpt_path": str(tmp_path / "export"), "batch_size": 4, "max_batches": 2,
            "future_steps": 8, "gen_seconds": 3.0, "psd_windows": 16, "psd_seconds": 0.64,
            "progress": False, "out_dir": str(tmp_path / "evals")}
    return {**base, **kw}


@pytest.fixture(scope="module")
def trained_export(token_splits, tmp_path_factory):
    """A tiny GPT2MEG trained for a hundred steps on the training windows, exported."""
    torch.manual_seed(0)
    model = build_model("GPT2MEG", TINY)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    train = token_splits.train
    data = torch.stack([_tokens(train, i) for i in range(len(train))])  # (N, C, 65)
    g = torch.Generator().manual_seed(0)
    for _ in range(100):
        x = data[torch.randint(0, len(data), (16,), generator=g)]
        logits = model(x[..., :-1]).prediction
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, V), x[..., 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
    out = tmp_path_factory.mktemp("model") / "export"
    save_pretrained(model.eval(), out)
    return out


class CopyLast(torch.nn.Module):
    """A 'model' that always predicts the previous token: it must score exactly repeat-last."""

    registry_name = "CopyLast"

    def forward(self, x):  # (B, C, T) -> (B, C, T, V)
        return ModelOutput(torch.nn.functional.one_hot(x, V).float() * 10.0)

    def generate(self, context, steps, *, temperature=1.0, top_k=None, top_p=None,
                 use_cache=True, generator=None, progress=False):
        return torch.cat([context, context[..., -1:].expand(*context.shape[:2], steps)], -1)


def test_registered_with_strict_options():
    spec = get_eval_spec("EvalQuant")
    assert spec.cls is EvalQuant and spec.options is EvalQuantOptions
    with pytest.raises(ValidationError, match="ckpt_path"):
        EvalQuantOptions.model_validate({})
    with pytest.raises(ValidationError, match="Extra inputs are not permitted"):
        EvalQuantOptions.model_validate({"ckpt_path": "x", "future_step": 3})
    with pytest.raises(ValidationError, match="history_lengths"):
        EvalQuantOptions.model_validate({"ckpt_path": "x", "history_lengths": [0, 4]})
    with pytest.raises(ValidationError, match="gen_sampling"):
        EvalQuantOptions.model_validate({"ckpt_path": "x", "gen_sampling": "beam"})
    o = EvalQuantOptions(ckpt_path="x", gen_sampling="top_k", top_k=7, temperature=0.8)
    assert o.gen_kwargs() == {"temperature": 0.8, "top_k": 7}
    assert EvalQuantOptions(ckpt_path="x", gen_sampling="greedy").gen_kwargs() == {
        "temperature": 0.0}


def test_unigram_distribution_counts_training_tokens(token_splits):
    probs = unigram_distribution(token_splits.train, V)
    assert probs.shape == (3, V)
    np.testing.assert_allclose(probs.sum(1), 1.0)
    # from whole chunks: the same as counting all tokens of both training sessions
    from ephys_gpt.store import load_chunk

    tokens = np.concatenate([np.asarray(load_chunk(m, i)) for m in token_splits.train.metas
                             for i in range(m.n_chunks)], axis=1)
    counts = np.stack([np.bincount(t, minlength=V) for t in tokens]) + 1.0
    np.testing.assert_allclose(probs, counts / counts.sum(1, keepdims=True))


def test_eval_quant_writes_every_output(trained_export, token_splits, tmp_path):
    opts = EvalQuantOptions(**_opts(tmp_path, ckpt_path=str(trained_export)))
    summary = EvalQuant({"save_dir": str(tmp_path)}, opts, splits=token_splits).run()
    out = tmp_path / "evals"
    for name in ["accuracy_by_position", "history_sweep", "nstep_accuracy", "nstep_rmse_mag",
                 "nstep_rmse_grad", "nstep_rmse_normalized", "psd_mag", "psd_grad"]:
        assert (out / f"{name}.npy").is_file() and (out / f"{name}.json").is_file(), name
    for name in ["accuracy_by_position", "history_sweep", "nstep_accuracy", "nstep_rmse", "psd",
                 "channel_correlation", "traces"]:
        assert (out / f"{name}.png").stat().st_size > 1000, name
        assert (out / f"{name}.pdf").read_bytes()[:5] == b"%PDF-", name
    for name in ["summary.json", "report.md", "covariance.json", "generated_raw.fif",
                 "cov_generated.npy", "corr_heldout.npy", "generated_tokens.npy"]:
        assert (out / name).is_file(), name
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp") or p.name.startswith(".")]

    on_disk = json.loads((out / "summary.json").read_text())
    assert on_disk["model_name"] == "GPT2MEG"
    assert set(on_disk["files"]) >= {"nstep_accuracy.npy", "psd.pdf", "generated_raw.fif"}
    assert summary["n_windows"] == 8

    # the baselines' curves are stored beside the model's
    nstep = json.loads((out / "nstep_accuracy.json").read_text())
    linear = list(summary["linear_baselines"])
    assert [n.split("(")[0] for n in linear] == ["AR", "VAR"]
    dists = [linear_distribution_name(n) for n in linear]
    assert list(nstep["curves"]) == ["GPT2MEG", REPEAT_LAST, UNIGRAM, *linear, *dists]
    assert nstep["x"] == list(range(1, 9)) and nstep["sampling"] == "greedy"
    arr = np.load(out / "nstep_accuracy.npy", allow_pickle=False)
    assert arr.shape == (8, 8) and np.all((arr[1:] >= 0) & (arr[1:] <= 1))
    rmse = json.loads((out / "nstep_rmse_mag.json").read_text())
    assert rmse["unit"] == "fT" and all(v > 0 for v in rmse["curves"][UNIGRAM])

    # the AR and VAR baselines are scored on the same targets, in every part of the summary
    acc = summary["next_step"]["accuracy"]
    for name in linear:
        assert 0 < acc[name] <= 1 and name in summary["next_step"]["beats_linear"]
        assert len(summary["history_sweep"][name]) == len(summary["history_sweep"]["accuracy"])
        assert name in summary["nstep"]["accuracy_at_1"]
        gen = summary["generation"]["linear"][name]
        assert set(gen["log_spectral_distance_db"]) == {"mag", "grad"}
    assert linear[1] in acc and acc[linear[1]] > acc[UNIGRAM]  # the VAR learns the rhythm
    # each linear model's Gaussian forecast over tokens: a likelihood to compare with the
    # model's (and with the unigram's), and the accuracy of its most probable token
    nll = summary["next_step"]["nll_nats"]
    for name in linear:
        dist = linear_distribution_name(name)
        assert 0 < acc[dist] <= 1 and dist in summary["next_step"]["beats_linear"]
        assert 0 < nll[dist] < nll[UNIGRAM] * 1.5 and name not in nll
        # the history sweep and the N-step curves read it too (k-step Gaussian forecasts)
        assert len(summary["history_sweep"][dist]) == len(summary["history_sweep"]["accuracy"])
        assert 0 < summary["nstep"]["accuracy_at_1"][dist] <= 1
        assert set(summary["nstep"]["rmse_at_1"][dist]) == {"mag", "grad"}
    assert nll[linear_distribution_name(linear[1])] < nll[UNIGRAM]
    assert linear_distribution_name(linear[1]) in (out / "report.md").read_text()
    assert "On held-out next-token accuracy, GPT2MEG" in (out / "report.md").read_text()
    # a trained model must beat drawing tokens from the training distribution
    assert acc["GPT2MEG"] > acc[UNIGRAM]
    assert summary["nstep"]["accuracy_at_1"]["GPT2MEG"] > summary["nstep"]["accuracy_at_1"][UNIGRAM]
    psd = summary["generation"]["psd"]
    assert set(psd) == {"mag", "grad"}
    assert psd["mag"]["alpha_peak_detected_heldout"]
    assert -1 <= summary["generation"]["correlation_similarity"]["offdiag_correlation"] <= 1

    # the generated signal round-trips through MNE with the original channel info
    raw = mne.io.read_raw_fif(out / "generated_raw.fif", preload=True, verbose=False)
    assert raw.ch_names == CH_NAMES
    assert raw.get_channel_types() == CH_TYPES
    assert raw.info["sfreq"] == SFREQ
    assert raw.n_times == int(3.0 * SFREQ)
    np.testing.assert_allclose(raw.info["chs"][1]["loc"][:3], [0.01, 0.05, 0.1])
    assert 1e-15 < np.abs(raw.get_data()).max() < 1e-11  # tesla, not tokens

    report = (out / "report.md").read_text()
    assert "repeat-last" in report and "![PSD generated vs held-out](psd.png)" in report


def test_copy_model_scores_exactly_repeat_last(token_splits, tmp_path, monkeypatch):
    """Curves are computed on the same targets: a copy-the-last-token model == repeat-last."""
    monkeypatch.setitem(MODELS, "CopyLast", ModelSpec("CopyLast", CopyLast, "tokens", True,
                                                      (TokenGenerator,), None))
    opts = EvalQuantOptions(**_opts(tmp_path, history_lengths=[1, 4, 64], gen_seconds=1.0))
    summary = EvalQuant({}, opts, model=CopyLast(), info={}, splits=token_splits).run()
    acc = summary["next_step"]["accuracy"]
    assert acc["CopyLast"] == pytest.approx(acc[REPEAT_LAST])
    np.testing.assert_allclose(summary["history_sweep"]["accuracy"],
                               summary["history_sweep"][REPEAT_LAST])
    nstep = json.loads((tmp_path / "evals" / "nstep_accuracy.json").read_text())
    np.testing.assert_allclose(nstep["curves"]["CopyLast"], nstep["curves"][REPEAT_LAST])
    rmse = json.loads((tmp_path / "evals" / "nstep_rmse_grad.json").read_text())
    np.testing.assert_allclose(rmse["curves"]["CopyLast"], rmse["curves"][REPEAT_LAST])
    # the sweep's full-context point is the teacher-forced last position, for the linear
    # models' both readings too (two code paths: all positions at once, one forecast)
    pos = json.loads((tmp_path / "evals" / "accuracy_by_position.json").read_text())["curves"]
    linear = list(summary["linear_baselines"])
    for name in [*linear, *map(linear_distribution_name, linear)]:
        assert summary["history_sweep"][name][-1] == pytest.approx(pos[name][-1]), name
    # repeat-last accuracy recomputed independently from the held-out windows
    batch = torch.stack([_tokens(token_splits.test, i) for i in range(len(token_splits.test))])
    assert 0.05 < (batch[..., 1:] == batch[..., :-1]).float().mean() < 0.9
    assert not summary["next_step"]["beats_baselines"]


def test_greedy_rollouts_are_reproducible(trained_export, token_splits, token_store, tmp_path):
    """Same seed, same numbers; splits built from the run config equal the injected ones."""
    kw = _opts(tmp_path, ckpt_path=str(trained_export), max_batches=1, gen_seconds=0.5)
    a = EvalQuant({}, EvalQuantOptions(**{**kw, "out_dir": str(tmp_path / "a")}),
                  splits=token_splits).run()
    config = {"save_dir": str(tmp_path / "run"), "dataset_name": "omega",
              "datasplitter": {"dataset_root": str(token_store), "example_seconds": 0.64,
                               "val_ratio": 0.25, "test_ratio": 0.25, "seed": 0}}
    b = EvalQuant(config, EvalQuantOptions(**{**kw, "out_dir": None})).run()
    assert a["nstep"]["accuracy_at_8"] == b["nstep"]["accuracy_at_8"]
    assert a["next_step"] == b["next_step"]
    ta = np.load(tmp_path / "a" / "generated_tokens.npy")
    tb = np.load(tmp_path / "run" / "evals" / "EvalQuant" / "generated_tokens.npy")
    np.testing.assert_array_equal(ta, tb)  # same seed, same sampled signal


def test_windows_decode_with_their_own_session_steps(token_splits):
    train = token_splits.train
    sessions = train.indices[:, 0]
    first, other = 0, int(np.flatnonzero(sessions != sessions[0])[0])
    a, b = window_steps(train, first), window_steps(train, other)
    assert a[0]["name"] == "normalize" and a[0]["center"] != b[0]["center"]
    tok = torch.stack([_tokens(train, first), _tokens(train, other)])
    sig = to_signal(tok, [a, b])
    np.testing.assert_allclose(sig[1].numpy(), tokens_to_signal(tok[1], b).numpy())
    z = to_signal(tok, [a, b], normalized=True)
    assert abs(float(z.abs().max())) <= 4.0 + 1e-5  # mu-law scale 4 in normalized units


def test_bad_configurations_fail_clearly(trained_export, token_splits, tmp_path):
    with pytest.raises(ValueError, match="save_dir"):
        EvalQuant({}, EvalQuantOptions(ckpt_path="x"))
    with pytest.raises(FileNotFoundError, match="ckpt_path"):
        EvalQuant({}, EvalQuantOptions(**_opts(tmp_path, ckpt_path=str(tmp_path / "nope"))),
                  splits=token_splits).run()
    with pytest.raises(ValueError, match="future_steps"):
        EvalQuant({}, EvalQuantOptions(**_opts(tmp_path, ckpt_path=str(trained_export),
                                               future_steps=65)), splits=token_splits).run()
    with pytest.raises(ValueError, match="history_lengths"):
        EvalQuant({}, EvalQuantOptions(**_opts(tmp_path, ckpt_path=str(trained_export),
                                               history_lengths=[100])),
                  splits=token_splits).run()
    with pytest.raises(ValueError, match="num_channels is 5"):
        EvalQuant({}, EvalQuantOptions(**_opts(tmp_path, ckpt_path=str(trained_export),
                                               num_channels=5)), splits=token_splits).run()
