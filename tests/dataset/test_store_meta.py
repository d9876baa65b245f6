"""A malformed meta.json is a StoreError naming the file, the key and what was found, never a
traceback from deep inside (issue 8, item 13)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from ephys_gpt.store import SessionMeta, StoreError, check_compatible, read_meta

C = 3

#: Wrong values tried for every field: wrong types, wrong shapes, out of range.
WRONG = [None, True, 0, -1, 1.5, float("nan"), float("inf"), "", "abc", "8", [], {},
         ["a"], [None], [1.5], [-1], [0], [True], [[0.0, "a"]], [[0.0]], [["x", "y"]],
         {"name": "normalize"}, [{"noname": 1}], ["normalize"], [{"name": 5}],
         [{"name": "reverb"}]]


def valid_meta() -> dict:
    return {
        "format": "ephys-gpt-chunks", "format_version": 1, "sfreq": 100.0,
        "ch_names": ["MEG0111", "MEG0112", "MEG0113"], "ch_types": ["mag", "grad", "grad"],
        "pos_2d": [[0.0, 0.0], [0.1, 0.0], [0.0, 0.1]],
        "pos_3d": [[0.0, 0.0, 0.1]] * C, "ori_3d": [[0.0, 0.0, 1.0]] * C,
        "chunk_samples": 50, "n_chunks": 2, "chunk_lengths": [50, 30], "dtype": "uint8",
        "steps": [{"name": "normalize", "method": "robust", "center": [0.0] * C,
                   "scale": [1.0] * C},
                  {"name": "clip", "std_factor": 6.0, "low": [-6.0] * C, "high": [6.0] * C},
                  {"name": "mulaw_quantize", "n_bits": 8, "mu": 255, "scale": 6.0,
                   "scale_from": "clip"}],
        "provenance": {"subject": "01"},
    }


def _write(tmp_path, meta) -> tuple:
    session = tmp_path / "s"
    session.mkdir(exist_ok=True)
    path = session / "meta.json"
    path.write_text(json.dumps(meta))  # NaN/Infinity as Python's json writes them
    return session, path


def _consume(m: SessionMeta) -> None:
    """What the datasets do with a SessionMeta: none of it may raise."""
    assert isinstance(m.sfreq, float) and math.isfinite(m.sfreq) and m.sfreq > 0
    assert all(isinstance(c, str) for c in m.ch_names + m.ch_types)
    assert m.pos_2d.shape == (m.n_channels, 2) and m.pos_2d.dtype == np.float64
    assert all(isinstance(n, int) and n >= 1 for n in m.chunk_lengths)
    assert np.dtype(m.dtype).kind in "iuf"
    m.step("mulaw_quantize"), m.is_tokens, m.chunk_path(0)
    check_compatible([m, m])


def test_the_valid_meta_reads(tmp_path):
    session, _ = _write(tmp_path, valid_meta())
    _consume(read_meta(session))


# every top-level key and the entries inside lists and steps
FIELDS = [(k,) for k in valid_meta()] + [
    ("ch_names", 1), ("ch_types", 0), ("pos_2d", 1), ("pos_2d", 1, 0), ("pos_3d", 0),
    ("chunk_lengths", 0), ("chunk_lengths", 1), ("steps", 0), ("steps", 2),
    ("steps", 0, "center"), ("steps", 0, "scale"), ("steps", 0, "method"), ("steps", 0, "name"),
    ("steps", 1, "std_factor"), ("steps", 1, "low"), ("steps", 2, "n_bits"),
    ("steps", 2, "mu"), ("steps", 2, "scale"), ("provenance",),
]


@pytest.mark.parametrize("field", FIELDS, ids=lambda f: ".".join(map(str, f)))
def test_every_wrong_value_of_every_field_is_a_store_error(tmp_path, field):
    # before: non-numeric chunk_lengths / pos_2d entries, string steps, steps without a name
    # and many others ended in ValueError/TypeError/AttributeError tracebacks, or were
    # accepted and failed later
    tracebacks = []
    for wrong in WRONG:
        meta = valid_meta()
        parent = meta
        for k in field[:-1]:
            parent = parent[k]
        parent[field[-1]] = wrong
        session, path = _write(tmp_path, meta)
        try:
            m = read_meta(session)
        except StoreError as err:
            msg = str(err)
            assert str(path) in msg, msg
            assert f"'{field[0]}" in msg, (field, wrong, msg)  # the key, quoted
            continue
        except Exception as err:  # noqa: BLE001 - the point of the test
            tracebacks.append(f"{field}={wrong!r}: {type(err).__name__}: {err}")
            continue
        try:
            _consume(m)  # accepted: then it must be usable
        except Exception as err:  # noqa: BLE001
            tracebacks.append(f"{field}={wrong!r} accepted, then {type(err).__name__}: {err}")
    assert not tracebacks, "\n".join(tracebacks)


@pytest.mark.parametrize("field, wrong, message", [
    (("chunk_lengths",), [50, "30"], r"key 'chunk_lengths\[1\]' should be an integer >= 1 "
                                      r"\(samples\), found '30' \(str\)"),
    (("pos_2d",), [[0.0, 0.0], [0.1, "a"], [0.0, 0.1]],
     r"key 'pos_2d\[1\]' should be a list of 2 numbers, found \[0.1, 'a'\] \(list\)"),
    (("steps",), "normalize,clip", r"key 'steps' should be list, found 'normalize,clip' \(str\)"),
    (("steps",), ["normalize"], r"key 'steps\[0\]' should be a JSON object with a \"name\""),
    (("steps", 2, "n_bits"), "8", r"key 'steps\[2\].n_bits' should be an integer in \[1, 16\] "
                                  r"\(mulaw_quantize n_bits\), found '8' \(str\)"),
    (("steps", 2, "mu"), 63, r"key 'steps\[2\].mu' should be 2\*\*n_bits - 1 = 255"),
    (("steps", 0, "scale"), [1.0, 0.0, 1.0], r"key 'steps\[0\].scale' should be a positive"),
    (("sfreq",), float("nan"), r"key 'sfreq' should be a positive number \(Hz\), found nan"),
    (("dtype",), "object", r"key 'dtype' should be an integer or floating numpy dtype"),
    (("ch_names",), ["A", "B", "A"], r"'ch_names' lists \['A'\] more than once"),
])
def test_messages_name_file_key_and_what_was_found(tmp_path, field, wrong, message):
    meta = valid_meta()
    parent = meta
    for k in field[:-1]:
        parent = parent[k]
    parent[field[-1]] = wrong
    session, path = _write(tmp_path, meta)
    with pytest.raises(StoreError, match=rf"^{path}: {message}"):
        read_meta(session)


def test_a_missing_step_parameter_is_named(tmp_path):
    meta = valid_meta()
    del meta["steps"][0]["center"]
    session, path = _write(tmp_path, meta)
    with pytest.raises(StoreError, match=rf"{path}: key 'steps\[0\].center' is missing "
                                         r"\(every 'normalize' step records 'center'\)"):
        read_meta(session)
