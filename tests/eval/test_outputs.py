"""Figure, curve, report and fif writers."""

from __future__ import annotations

import json

import mne
import numpy as np
import pytest

from ephys_gpt.eval import fif, plots, report
from ephys_gpt.fileio import to_jsonable


def test_save_figure_writes_png_and_pdf(tmp_path):
    fig, ax = plots.plot_curves(np.arange(1, 5), {"model": np.ones(4), "repeat-last": np.zeros(4)},
                                xlabel="Steps ahead", ylabel="Accuracy", baselines=["repeat-last"])
    assert ax.get_xlabel() == "Steps ahead"
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["model", "repeat-last"]
    assert ax.get_lines()[1].get_linestyle() == "--"
    paths = plots.save_figure(fig, tmp_path / "sub" / "curve")
    assert [p.name for p in paths] == ["curve.png", "curve.pdf"]
    assert paths[0].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert paths[1].read_bytes()[:5] == b"%PDF-"
    assert sorted(p.name for p in (tmp_path / "sub").iterdir()) == ["curve.pdf", "curve.png"]


def test_plot_psd_marks_band_and_peaks(tmp_path):
    freqs = np.linspace(0, 75, 151)
    fig, ax = plots.plot_psd(freqs, {"real": 1 / (1 + freqs), "generated": 2 / (1 + freqs)},
                             unit="fT", peaks={"real": 10.0, "generated": None})
    assert ax.get_ylabel() == "PSD (fT²/Hz)"
    assert ax.get_yscale() == "log"
    assert any(abs(line.get_xdata()[0] - 10.0) < 1e-9 for line in ax.get_lines()
               if len(line.get_xdata()) == 2)
    with pytest.raises(ValueError, match="shape"):
        plots.plot_psd(freqs, {"bad": np.ones(3)})


def test_save_curve_round_trip(tmp_path):
    x = np.arange(1, 6)
    paths = report.save_curve(tmp_path, "nstep", x, {"m": x * 0.1, "b": x * 0.0},
                              xlabel="k", ylabel="acc", sampling="greedy")
    arr = np.load(paths["npy"], allow_pickle=False)
    assert arr.shape == (3, 5)
    np.testing.assert_allclose(arr[0], x)
    np.testing.assert_allclose(arr[1], x * 0.1)
    meta = json.loads(paths["json"].read_text())
    assert meta["rows"] == ["x", "m", "b"]
    assert meta["sampling"] == "greedy"
    assert report.load_curve(paths["npy"])["curves"]["m"] == pytest.approx(list(x * 0.1))
    with pytest.raises(ValueError, match="'b' has shape"):
        report.save_curve(tmp_path, "bad", x, {"b": np.ones(2)}, xlabel="k", ylabel="y")


def test_json_conversion_and_markdown(tmp_path):
    obj = {"a": np.float32(0.5), "b": np.arange(3), "nan": float("nan"), "p": tmp_path}
    out = json.loads(report.write_json(tmp_path / "s.json", obj).read_text())
    assert out == {"a": 0.5, "b": [0, 1, 2], "nan": None, "p": str(tmp_path)}
    with pytest.raises(TypeError, match="cannot write object"):
        to_jsonable({"x": object()})
    rep = report.MarkdownReport("Title").section("Scores").table(["who", "acc"], [["m", 0.123456]])
    rep.figure(tmp_path / "figs" / "a.png", "A figure", relative_to=tmp_path)
    text = rep.write(tmp_path / "report.md").read_text()
    assert text.startswith("# Title\n")
    assert "| m | 0.1235 |" in text
    assert "![A figure](figs/a.png)" in text
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_fif_round_trip_keeps_channel_info(tmp_path):
    rng = np.random.default_rng(0)
    data = rng.standard_normal((3, 300)) * 1e-13
    names, types = ["MEG0111", "MEG0112", "EEG001"], ["mag", "grad", "eeg"]
    pos = np.array([[0.0, 0.05, 0.1], [0.0, 0.05, 0.1], [0.05, 0.0, 0.08]])
    ori = np.array([[0.0, 0.0, 1.0], [0.0, 0.0, 1.0], [0.0, 1.0, 0.0]])
    path = fif.save_signal_fif(data, tmp_path / "gen_raw.fif", ch_names=names, ch_types=types,
                               sfreq=150.0, pos_3d=pos, ori_3d=ori, description="test")
    raw = mne.io.read_raw_fif(path, preload=True, verbose=False)
    assert raw.ch_names == names
    assert raw.info["sfreq"] == 150.0
    assert raw.get_channel_types() == types
    np.testing.assert_allclose(raw.get_data(), data, rtol=1e-6, atol=1e-20)
    np.testing.assert_allclose(raw.info["chs"][0]["loc"][:3], pos[0])
    np.testing.assert_allclose(raw.info["chs"][2]["loc"][9:12], ori[2])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gen_raw.fif"]


def test_fif_with_template_info_copies_channels(tmp_path):
    template = mne.create_info(["A", "B", "C"], 300.0, ["mag", "grad", "mag"])
    template["chs"][2]["loc"][:3] = [0.01, 0.02, 0.03]
    info = fif.build_info(["C", "A"], ["mag", "mag"], 150.0, template=template)
    assert info["ch_names"] == ["C", "A"]
    assert info["sfreq"] == 150.0
    np.testing.assert_allclose(info["chs"][0]["loc"][:3], [0.01, 0.02, 0.03])
    with pytest.raises(ValueError, match="lacks channel"):
        fif.build_info(["Z"], ["mag"], 150.0, template=template)
    with pytest.raises(ValueError, match="disagree"):
        fif.build_info(["B"], ["mag"], 150.0, template=template)


def test_fif_bad_input(tmp_path):
    with pytest.raises(ValueError, match="2 channel names but 1"):
        fif.build_info(["a", "b"], ["mag"], 100.0)
    with pytest.raises(ValueError, match="NaN"):
        fif.array_to_raw(np.full((1, 10), np.nan), ch_names=["a"], ch_types=["mag"], sfreq=10.0)
    with pytest.raises(ValueError, match="data has 2 channels"):
        fif.array_to_raw(np.zeros((2, 10)), ch_names=["a"], ch_types=["mag"], sfreq=10.0)
    raw = fif.array_to_raw(np.zeros((1, 10)), ch_names=["a"], ch_types=["mag"], sfreq=10.0)
    with pytest.raises(ValueError, match="_raw.fif"):
        fif.write_raw_fif(raw, tmp_path / "gen.fif")
