"""Sessions made differently cannot share a dataset (store.check_compatible), and the rule it
shares with eval (compatibility.py): settings are compared, per-session statistics
are not."""

from __future__ import annotations

import pytest

from ephys_gpt.compatibility import (
    DataMismatchError,
    check_model_data,
    differences,
    step_differences,
)
from ephys_gpt.dataset.datasets import ChunkDataset, ChunkDatasetForecastCont
from ephys_gpt.dataset.datasplitter import build_indices, split_datasets
from ephys_gpt.store import StoreError

C = 4


def steps(*, method="robust", center=0.0, std_factor=6.0, low=-6.0, n_bits=None,
          scale=1.0, scale_from="clip", clip=True):
    """Stage-2 steps as stage 2 records them, with adjustable settings and statistics."""
    out = [{"name": "normalize", "method": method, "center": [center] * C, "scale": [1.0] * C}]
    if clip:
        out.append({"name": "clip", "std_factor": std_factor, "low": [low] * C,
                    "high": [-low] * C})
    if n_bits:
        out.append({"name": "mulaw_quantize", "n_bits": n_bits, "mu": 2**n_bits - 1,
                    "scale": scale, "scale_from": scale_from})
    return out


def two_sessions(make_store, first: dict, second: dict, names=("a", "b"), store="mixed"):
    """A store of two sessions ``names`` written with ``first``/``second`` kwargs."""
    root = make_store(store, n_sessions=1, names=[names[0]], n_channels=C, **first)
    make_store(store, n_sessions=1, names=[names[1]], n_channels=C, seed=1, **second)
    return root


@pytest.mark.parametrize("bits", [(6, 8), (8, 6)], ids=["6-bit-first", "8-bit-first"])
def test_sessions_of_different_mulaw_bits_are_refused_in_either_order(make_store, bits):
    # before: accepted silently (the first session's n_bits taken for all; a 6-bit first
    # session then meets 8-bit tokens: an IndexError deep in the model's embedding)
    a, b = bits
    root = two_sessions(make_store, {"tokens": True, "n_bits": a}, {"tokens": True, "n_bits": b})
    msg = (rf"sessions {root / 'a'} and {root / 'b'} cannot share one dataset: different "
           rf"mulaw_quantize n_bits \({a} in a vs {b} in b\)")
    with pytest.raises(StoreError, match=msg):
        split_datasets(root, example_seconds=0.1, val_ratio=0, test_ratio=0)
    with pytest.raises(StoreError, match=msg):
        ChunkDataset.from_root(root, example_seconds=0.1)
    with pytest.raises(StoreError, match=msg):
        build_indices(root, 10)


def test_per_session_statistics_may_differ(make_store):
    # normalization statistics, clip bounds and a mu-law scale derived from them differ
    # between sessions of one store by design
    first = steps(center=0.0, low=-6.0, n_bits=8, scale=6.0)
    second = steps(center=3.0, low=-5.5, n_bits=8, scale=5.5)
    root = two_sessions(make_store, {"tokens": True, "steps": first},
                        {"tokens": True, "steps": second})
    ds = ChunkDataset.from_root(root, example_seconds=0.1)
    assert len(ds.metas) == 2
    assert [ds.session_steps(i)[-1]["scale"] for i in (0, 1)] == [6.0, 5.5]


@pytest.mark.parametrize("first, second, what, va, vb", [
    (steps(method="robust"), steps(method="zscore"), "normalize method", "'robust'",
     "'zscore'"),
    (steps(std_factor=6.0), steps(std_factor=4.0), "clip std_factor", "6", "4"),
    (steps(), steps(clip=False), "stage-2 steps", "normalize -> clip", "normalize"),
    (steps()[::-1], steps(), "stage-2 steps", "clip -> normalize", "normalize -> clip"),
])
def test_sessions_with_different_step_settings_are_refused(make_store, first, second, what,
                                                           va, vb):
    root = two_sessions(make_store, {"steps": first}, {"steps": second})
    with pytest.raises(StoreError, match=rf"different {what} \({va} in a vs {vb} in b\)"):
        ChunkDatasetForecastCont.from_root(root, example_seconds=0.1)


def test_mulaw_scale_is_compared_only_when_configured(make_store):
    configured = {"tokens": True, "steps": steps(n_bits=8, scale=1.0, scale_from="config")}
    root = two_sessions(make_store, configured,
                        {"tokens": True, "steps": steps(n_bits=8, scale=4.0, scale_from="config")})
    with pytest.raises(StoreError, match=r"different mulaw_quantize scale \(1 in a vs 4 in b\)"):
        build_indices(root, 10)
    derived = two_sessions(make_store, configured,
                           {"tokens": True, "steps": steps(n_bits=8, scale=4.0)},
                           names=("c", "d"), store="derived")
    with pytest.raises(StoreError, match=r"mulaw_quantize scale \(1 in c vs per session, from "
                                         r"the clip bounds in d\)"):
        build_indices(derived, 10)


def test_differences_of_rates_channels_and_types():
    a = {"sfreq": 100.0, "ch_names": ["A", "B", "C"], "ch_types": ["mag", "grad", "grad"],
         "steps": steps(n_bits=8)}
    assert differences(a, dict(a)) == []
    assert differences(a, {"sfreq": None, "ch_names": None}) == []  # missing: not compared
    (d,) = differences(a, {**a, "sfreq": 50.0})
    assert (d.what, d.first, d.second) == ("sampling rate", "100 Hz", "50 Hz")
    (d,) = differences(a, {**a, "ch_names": ["A", "C", "B"]})
    assert d.what == "channels" and "different order: position 1 is 'B' vs 'C'" in d.detail
    (d,) = differences(a, {**a, "ch_names": ["A", "B", "X"]}, ("model", "data"))
    assert d.detail == "only in model: ['C']; only in data: ['X']"
    (d,) = differences(a, {**a, "ch_types": ["mag", "mag", "grad"]})
    assert d.what == "channel types" and "'B' is 'grad' vs 'mag'" in d.detail
    # n_bits and mu both differ; a derived scale is not compared against another derived one
    diffs = step_differences(steps(n_bits=8, scale=6.0), steps(n_bits=6, scale=2.0))
    assert [(d.what, d.first, d.second) for d in diffs] == [
        ("mulaw_quantize n_bits", "8", "6"), ("mulaw_quantize mu", "255", "63")]
    # steps recorded before scale_from existed: the scale is not compared
    old = [{k: v for k, v in s.items() if k != "scale_from"} for s in steps(n_bits=8)]
    assert step_differences(old, steps(n_bits=8, scale=3.0, scale_from="config")) == []
    # a malformed description (an edited config.json) gives differences, not a traceback
    assert step_differences(["normalize"], ["normalize"]) == []
    (d,) = differences({"sfreq": "fast"}, {"sfreq": 100.0})
    assert (d.first, d.second) == ("'fast' Hz", "100 Hz")


def test_check_model_data_names_both_values():
    trained = {"sfreq": 100.0, "ch_names": ["A", "B"], "steps": steps(n_bits=8)}
    with pytest.raises(DataMismatchError, match=r"export/ was trained on data with sampling "
                                                r"rate 100 Hz, but datasplitter.dataset_root="
                                                r"/d has 50 Hz"):
        check_model_data(trained, {**trained, "sfreq": 50.0}, model="export/",
                         data_label="datasplitter.dataset_root=/d")
    check_model_data(trained, {**trained, "steps": steps(n_bits=8, center=2.0, low=-3.0)})


def test_stage2_and_on_the_fly_quantization_record_where_the_scale_came_from(make_store):
    import numpy as np

    from ephys_gpt.codec import fit_steps

    x = np.random.default_rng(0).standard_normal((C, 500)).astype(np.float32)
    good = np.ones(500, dtype=bool)
    for config, source in [({"clip": {}, "mulaw_quantize": {}}, "clip"),
                           ({"mulaw_quantize": {}}, "data"),
                           ({"clip": {}, "mulaw_quantize": {"scale": 4.0}}, "config")]:
        _, recorded, _ = fit_steps(x.copy(), good, {"normalize": {}, **config})
        assert recorded[-1]["scale_from"] == source, config
    ds = ChunkDataset.from_root(make_store(n_channels=C), example_seconds=0.1,
                                quantize={"n_bits": 6, "scale": 3.0})
    assert ds.steps[-1] == {"name": "mulaw_quantize", "n_bits": 6, "mu": 63, "scale": 3.0,
                            "scale_from": "config", "on_the_fly": True}
