"""FAST tokenizer: round trip, files, errors, the ``tokenizer`` command; all offline."""

from __future__ import annotations

import json
import socket
import sys
from pathlib import Path

import numpy as np
import pytest

from ephys_gpt.tokenizers.fast import (
    BPE_NAME,
    CONFIG_NAME,
    FASTTokenizer,
    dct_coefficients,
    inverse_dct,
    load_tokenizer,
)

pytest.importorskip("tokenizers")

from tests.dataset.store_helpers import write_store  # noqa: E402

C, T = 6, 32


def _signals(n=60, seed=0):
    """Smooth, correlated multichannel windows (a few sinusoids + a little noise)."""
    rng = np.random.default_rng(seed)
    t = np.arange(T) / 100.0
    out = []
    for _ in range(n):
        f = rng.uniform(2, 15, 3)
        mix = rng.standard_normal((C, 3))
        src = np.sin(2 * np.pi * f[:, None] * t + rng.uniform(0, 6, (3, 1)))
        out.append((mix @ src + 0.05 * rng.standard_normal((C, T))).astype(np.float32))
    return np.stack(out)


def _fit(x, **kw):
    kw = {"scale": 4.0, "vocab_size": 256, "progress": False, **kw}
    return FASTTokenizer.fit(lambda: iter(x), n_windows=len(x), **kw)


def test_round_trip_error_shrinks_as_the_scale_grows():
    x = _signals()
    errors = []
    for scale in (1.0, 4.0, 16.0):
        tok = _fit(x[:40], scale=scale, vocab_size=2048)
        held = x[40:]
        rec = np.stack([tok.decode(ids) for ids in tok.encode_batch(held)])
        rmse = float(np.sqrt(((rec - held) ** 2).mean()))
        errors.append(rmse)
        # rounding is the only loss: about 1 / (scale sqrt(12)) per coefficient (orthonormal DCT)
        assert rmse == pytest.approx(1 / (scale * np.sqrt(12)), rel=0.35)
    assert errors[0] > errors[1] > errors[2]


def test_bpe_is_lossless_and_compresses():
    x = _signals()
    tok = _fit(x, word_rows=None)
    for w in x[:5]:
        ids = tok.encode(w)
        expect = inverse_dct(np.rint(dct_coefficients(w) * 4.0) / 4.0)
        np.testing.assert_allclose(tok.decode(ids), expect, atol=1e-12)  # BPE loses nothing
        assert len(ids) < C * T  # fewer tokens than coefficients
        assert all(0 <= i < tok.vocab_size for i in ids)


def test_values_beyond_the_fitted_range_are_clipped_and_counted():
    x = _signals()
    tok = _fit(x)
    big = x[0] * 100
    rec = tok.decode(tok.encode(big))
    assert tok.clipped > 0 and np.isfinite(rec).all()


def test_save_and_load_round_trip(tmp_path):
    tok = _fit(_signals(), info={"sfreq": 100.0})
    out = tok.save(tmp_path / "fast")
    assert sorted(p.name for p in out.iterdir()) == [BPE_NAME, CONFIG_NAME]
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temporaries left
    cfg = json.loads((out / CONFIG_NAME).read_text())
    assert cfg["scale"] == 4.0 and cfg["n_channels"] == C and cfg["info"]["sfreq"] == 100.0
    loaded = load_tokenizer(out)
    w = _signals(3, seed=5)[0]
    assert loaded.encode(w) == tok.encode(w)
    np.testing.assert_array_equal(loaded.decode(tok.encode(w)), tok.decode(tok.encode(w)))
    tok.save(out)  # re-saving its own folder is fine


def test_load_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a FAST tokenizer folder"):
        load_tokenizer(tmp_path)
    out = _fit(_signals()).save(tmp_path / "fast")
    (out / BPE_NAME).write_text((out / BPE_NAME).read_text().replace('"BPE"', '"BPE" '))
    with pytest.raises(ValueError, match="SHA-256 differs"):
        load_tokenizer(out)
    (out / CONFIG_NAME).write_text(json.dumps({"format": "something else"}))
    with pytest.raises(ValueError, match="is not a FAST tokenizer file"):
        load_tokenizer(out)


def test_save_refuses_files_it_did_not_write(tmp_path):
    (tmp_path / BPE_NAME).write_text("mine")
    with pytest.raises(FileExistsError, match="not a FAST tokenizer folder written by"):
        _fit(_signals()).save(tmp_path)
    assert (tmp_path / BPE_NAME).read_text() == "mine"


def test_fit_and_encode_errors():
    x = _signals()
    with pytest.raises(ValueError, match="vocab_size 20 is smaller than the coefficient alphabet"):
        _fit(x, vocab_size=20)
    with pytest.raises(ValueError, match="scale must be a positive number"):
        _fit(x, scale=0)
    with pytest.raises(ValueError, match="no windows to fit on"):
        _fit(x[:0])
    tok = _fit(x)
    with pytest.raises(ValueError, match=r"fitted on windows of \(6, 32\)"):
        tok.encode(x[0][:, :10])
    with pytest.raises(ValueError, match="decode to .* coefficients"):
        tok.decode(tok.encode(x[0])[:-3])


def test_nothing_touches_the_network():
    """The autouse guard (tests/conftest.py) fails any socket connection; fitting, saving,
    loading and encoding all run under it."""
    with pytest.raises(RuntimeError, match="network connection"):
        socket.create_connection(("example.org", 80))
    tok = _fit(_signals())
    assert tok.decode(tok.encode(_signals(1)[0])).shape == (C, T)


def _store_config(tmp_path, **fast):
    import yaml

    root = write_store(tmp_path / "chunks", n_sessions=4, n_channels=C, chunk_lengths=(200,),
                       seed=1)
    cfg = {"tokenizer": "FAST",
           "datasplitter": {"dataset_root": str(root), "example_seconds": 0.32,
                            "val_ratio": 0.25, "test_ratio": 0.25},
           "fast": {"scale": 4.0, "vocab_size": 300, **fast}, "save_dir": "out/fast",
           "progress": False}
    path = tmp_path / "tok.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_tokenizer_command_fits_saves_and_reports(tmp_path):
    from ephys_gpt.cli import main

    path = _store_config(tmp_path)
    assert main(["tokenizer", "--args", str(path)]) == 0
    out = tmp_path / "out" / "fast"  # save_dir resolves against the YAML's folder
    summary = json.loads((out / "fit_summary.json").read_text())
    assert summary["round_trip_split"] == "test" and summary["vocab_size"] <= 300
    assert summary["tokens_per_second"] == pytest.approx(summary["tokens_per_window"] / 0.32)
    # the store is normalized with scale 1: signal units are the normalized ones (x 1e15 fT)
    assert summary["rmse_signal"]["mag"]["rmse"] == pytest.approx(
        summary["rmse_normalized"] * 1e15, rel=1e-6)
    assert summary["rmse_normalized"] == pytest.approx(1 / (4 * np.sqrt(12)), rel=0.3)
    tok = load_tokenizer(out)
    assert tok.info["fit"]["tokens_per_window"] == summary["tokens_per_window"]
    assert tok.info["ch_names"] == [f"MEG{i:03d}" for i in range(C)]


def test_run_py_tokenizer_mode_and_overrides(tmp_path, monkeypatch):
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    import run

    path = _store_config(tmp_path)
    monkeypatch.chdir(tmp_path)
    assert run.main(["--mode", "tokenizer", "--args", str(path), "save_dir=elsewhere",
                     "fast.vocab_size=280"]) == 0
    assert load_tokenizer(tmp_path / "elsewhere").vocab_size <= 280


def test_tokenizer_command_config_errors(tmp_path, capsys):
    from ephys_gpt.cli import main

    path = _store_config(tmp_path)
    assert main(["tokenizer", "--args", str(path), "fast.sclae=3"]) == 1
    assert "unknown key 'fast.sclae'. Did you mean 'scale'?" in capsys.readouterr().err
    assert main(["tokenizer", "--args", str(path), "datasplitter.dataset_root=/nonexistent"]) == 1
    assert "datasplitter.dataset_root' /nonexistent does not exist" in capsys.readouterr().err
    assert main(["tokenizer", "--args", str(path), "datasplitter.dataset_class=ChunkDataset"]) == 1
    assert "continuous" in capsys.readouterr().err
    assert main(["tokenizer", "--args", str(path), "datasplitter.example_secs=1"]) == 1
    assert "unknown key(s) ['example_secs'] in 'datasplitter'" in capsys.readouterr().err
