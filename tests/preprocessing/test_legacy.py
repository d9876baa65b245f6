"""Conversion of the original toolkit's pickled-dict chunks into the chunk store."""

from __future__ import annotations

import numpy as np
import pytest

from ephys_gpt import store
from ephys_gpt.cli import main
from ephys_gpt.preprocessing.legacy import convert_legacy


def _legacy_session(folder, n_chunks=3, c=4, t=50, ch_types=True, dtype=np.float64, seed=0):
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    chunks = []
    for i in range(n_chunks):
        d = {"data": rng.normal(size=(c, t if i < n_chunks - 1 else t // 2)).astype(dtype),
             "sfreq": 100.0, "ch_names": [f"MEG{j:03d}" for j in range(c)],
             "pos_2d": rng.uniform(size=(c, 2)), "session": folder.name}
        if ch_types:
            d["ch_types"] = ["mag", "grad"] * (c // 2)
        np.save(folder / f"{i}.npy", d, allow_pickle=True)
        chunks.append(d["data"])
    return chunks


def test_convert_folder_of_sessions(tmp_path):
    a = _legacy_session(tmp_path / "src" / "sub-01")
    b = _legacy_session(tmp_path / "src" / "sub-02", ch_types=False, seed=1)
    result = convert_legacy(tmp_path / "src", tmp_path / "dst", trust_pickle=True,
                            progress=False)
    assert result.ok and sorted(p.name for p in result.written) == ["sub-01", "sub-02"]
    metas = store.list_sessions(tmp_path / "dst")
    m1, m2 = metas
    assert m1.ch_types == ["mag", "grad", "mag", "grad"] and m2.ch_types == ["mag"] * 4
    assert m1.sfreq == 100.0 and m1.chunk_lengths == [50, 50, 25] and m1.dtype == "float32"
    assert m1.steps == [] and m1.provenance["legacy_extra_keys"] == ["session"]
    for meta, chunks in ((m1, a), (m2, b)):
        for i, ref in enumerate(chunks):
            np.testing.assert_allclose(store.load_chunk(meta, i), ref.astype(np.float32))
    # the converted chunks are plain arrays: readable without pickle
    arr = np.load(m1.chunk_path(0), allow_pickle=False)
    assert arr.shape == (4, 50)
    # a second run skips finished sessions
    again = convert_legacy(tmp_path / "src", tmp_path / "dst", trust_pickle=True,
                           progress=False)
    assert again.skipped == ["sub-01", "sub-02"]


def test_integer_tokens_keep_their_dtype_and_single_session_folder(tmp_path):
    _legacy_session(tmp_path / "sess", dtype=np.int16)
    result = convert_legacy(tmp_path / "sess", tmp_path / "dst", trust_pickle=True,
                            progress=False)
    meta = store.read_meta(result.written[0])
    assert meta.name == "sess" and meta.is_tokens and meta.dtype == "int16"


def test_bad_legacy_files_are_reported(tmp_path):
    _legacy_session(tmp_path / "src" / "good")
    bad = tmp_path / "src" / "bad"
    bad.mkdir()
    np.save(bad / "0.npy", {"data": np.zeros((2, 10)), "sfreq": 100.0}, allow_pickle=True)
    result = convert_legacy(tmp_path / "src", tmp_path / "dst", trust_pickle=True,
                            progress=False)
    assert [p.name for p in result.written] == ["good"]
    assert "0.npy" in result.failed["bad"] and "'ch_names'" in result.failed["bad"]
    plain = tmp_path / "plain"
    plain.mkdir()
    np.save(plain / "0.npy", np.zeros((2, 10)))
    result = convert_legacy(plain, tmp_path / "dst2", trust_pickle=True, progress=False)
    assert "expected a pickled dict" in result.failed["plain"]
    with pytest.raises(FileNotFoundError, match="nowhere"):
        convert_legacy(tmp_path / "nowhere", tmp_path / "dst3", trust_pickle=True,
                       progress=False)


def test_store_refuses_legacy_chunks_and_cli_converts(tmp_path):
    _legacy_session(tmp_path / "src" / "s1")
    # a reader pointed at a legacy folder fails loudly instead of unpickling
    meta = {"sfreq": 100.0, "ch_names": ["a", "b", "c", "d"], "ch_types": ["mag"] * 4,
            "pos_2d": [[0, 0]] * 4, "chunk_samples": 50, "steps": []}
    store.write_session(tmp_path / "fake", "s1", [np.zeros((4, 50), np.float32)], meta)
    np.save(tmp_path / "fake" / "s1" / "0.npy", {"data": 1}, allow_pickle=True)
    with pytest.raises(store.StoreError, match="convert-legacy"):
        store.load_chunk(store.read_meta(tmp_path / "fake" / "s1"), 0)
    rc = main(["-q", "convert-legacy", str(tmp_path / "src"), str(tmp_path / "dst"),
               "--no-progress", "--trust-pickle"])
    assert rc == 0 and store.is_complete(tmp_path / "dst", "s1")


def _booby_trapped_session(folder, marker):
    """A legacy chunk whose unpickling creates ``marker`` (what a crafted file could do)."""
    import pickle

    class Trap:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    folder.mkdir(parents=True)
    payload = pickle.dumps({"data": Trap()}, protocol=2)
    # a valid .npy header for an object array, followed by the pickle (what np.save writes)
    with open(folder / "0.npy", "wb") as f:
        np.lib.format.write_array_header_1_0(
            f, {"descr": "|O", "fortran_order": False, "shape": ()})
        f.write(payload)


def test_unpickling_is_refused_without_trust_pickle(tmp_path, capsys):
    from ephys_gpt.preprocessing.legacy import (
        UntrustedPickleError,
        convert_session,
        load_legacy_chunk,
    )

    marker = tmp_path / "code-was-executed"
    _booby_trapped_session(tmp_path / "src" / "s1", marker)
    chunk = tmp_path / "src" / "s1" / "0.npy"
    for call in (lambda: convert_legacy(tmp_path / "src", tmp_path / "dst", progress=False),
                 lambda: convert_session(tmp_path / "src" / "s1", tmp_path / "dst"),
                 lambda: load_legacy_chunk(chunk),
                 lambda: load_legacy_chunk(chunk, trust_pickle="yes")):  # only True opts in
        with pytest.raises(UntrustedPickleError, match="--trust-pickle") as err:
            call()
        assert "executes any code" in str(err.value)
    assert not marker.exists() and not (tmp_path / "dst").exists()

    # the command line: refused with the reason and the flag, exit 1, nothing read or written
    rc = main(["convert-legacy", str(tmp_path / "src"), str(tmp_path / "dst"), "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 1 and "--trust-pickle" in err and "executes any code" in err
    assert "Traceback" not in err and not marker.exists() and not (tmp_path / "dst").exists()

    # opting in really unpickles (the trap fires; the chunk is then rejected as malformed)
    result = convert_legacy(tmp_path / "src", tmp_path / "dst", trust_pickle=True,
                            progress=False)
    assert marker.exists() and "s1" in result.failed


def test_help_says_what_trust_pickle_means(capsys):
    with pytest.raises(SystemExit):
        main(["convert-legacy", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--trust-pickle" in text and "executes any code" in text
    assert "refuses unless you pass --trust-pickle" in text
