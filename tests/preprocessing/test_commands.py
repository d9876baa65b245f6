"""`ephys-gpt preprocess` and `python preprocess.py`: exit codes, errors, overrides."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from ephys_gpt import store
from ephys_gpt.cli import main

REPO = Path(__file__).resolve().parents[2]


def _yaml(tmp_path, data_path, **extra):
    cfg = {"data_path": str(data_path), "save_folder": "out", "chunk_seconds": 5,
           "bad_channels": "keep", "progress": False, **extra}
    path = tmp_path / "pre.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def test_preprocess_stage2_from_existing_stage1(stage1_run, tmp_path):
    stage1_dir = stage1_run[0]
    shutil.copytree(stage1_dir, tmp_path / "out" / "stage1")
    path = _yaml(tmp_path, tmp_path / "absent")  # stage 2 alone needs no raw data
    rc = main(["-q", "preprocess", "--args", str(path), "--stage", "stage_2",
               "preproc_config={normalize: {method: zscore}, mulaw_quantize: {n_bits: 8}}"])
    assert rc == 0
    metas = store.list_sessions(tmp_path / "out" / "chunks")
    assert [m.name for m in metas] == ["sub-01_ses-01_task-rest", "sub-01_ses-02_task-rest"]
    assert [s["name"] for s in metas[0].steps] == ["normalize", "mulaw_quantize"]
    assert metas[0].dtype == "uint8" and metas[0].chunk_samples == 500


def test_preprocess_both_reports_failures_with_exit_code(simulated, tmp_path, capsys):
    raw_copy = tmp_path / "raw"
    shutil.copytree(simulated[0], raw_copy)
    broken = raw_copy / "sub-02" / "ses-01" / "meg" / "sub-02_ses-01_task-rest_meg.fif"
    broken.parent.mkdir(parents=True)
    broken.write_bytes(b"\x00" * 1000)
    path = _yaml(tmp_path, raw_copy)
    rc = main(["preprocess", "--args", str(path), "--dataset", "bids"])
    assert rc == 1
    err = capsys.readouterr().err
    assert "1 failure(s)" in err and "stage 1: sub-02_ses-01_task-rest" in err
    assert "file id tag" in err
    chunks = tmp_path / "out" / "chunks"
    assert sorted(p.name for p in chunks.iterdir()) == ["sub-01_ses-01_task-rest",
                                                        "sub-01_ses-02_task-rest"]


def test_config_errors_exit_cleanly(tmp_path, capsys):
    path = _yaml(tmp_path, tmp_path, chunk_size=3)
    assert main(["preprocess", "--args", str(path)]) == 1
    err = capsys.readouterr().err
    assert "unknown key 'chunk_size'" in err and "Traceback" not in err
    assert main(["preprocess", "--args", str(path), "--stage", "stage_2",
                 "chunk_size=null"]) == 1
    with pytest.raises(SystemExit):
        main(["preprocess", "--args", str(path), "--stage", "stage_3"])


def test_preprocess_py_wrapper(stage1_run, tmp_path):
    shutil.copytree(stage1_run[0], tmp_path / "out" / "stage1")
    path = _yaml(tmp_path, tmp_path)
    proc = subprocess.run([sys.executable, str(REPO / "preprocess.py"), "--dataset", "omega",
                           "--stage", "stage_2", "--args", str(path), "-q"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert store.is_complete(tmp_path / "out" / "chunks", "sub-01_ses-01_task-rest")
    bad = subprocess.run([sys.executable, str(REPO / "preprocess.py"), "--args",
                          str(tmp_path / "missing.yaml")], capture_output=True, text=True,
                         timeout=300)
    assert bad.returncode == 1 and "missing.yaml" in bad.stderr


# ------------------------------------------------------------------ store integrity and lock
@pytest.fixture(scope="module")
def preprocessed(stage1_run, tmp_path_factory):
    """A save_folder with stage 1 (copied) and a continuous chunk store from `preprocess`."""
    base = tmp_path_factory.mktemp("preprocessed")
    shutil.copytree(stage1_run[0], base / "out" / "stage1")
    path = _yaml(base, base / "absent")
    assert main(["-q", "preprocess", "--args", str(path), "--stage", "stage_2"]) == 0
    return base


@pytest.fixture
def save_folder(preprocessed, tmp_path):
    """A private copy of ``preprocessed``; returns (its YAML, its chunk store)."""
    shutil.copytree(preprocessed, tmp_path, dirs_exist_ok=True)
    path = _yaml(tmp_path, tmp_path / "absent")
    return path, tmp_path / "out" / "chunks"


def _digests(chunks):
    import json

    return {d.name: json.loads((d / "meta.json").read_text())["chunk_checksums"]["digests"]
            for d in sorted(chunks.iterdir()) if d.is_dir()}


def _follow(message):
    """Run the `ephys-gpt ...` command a message gives, literally; return its exit code."""
    import re
    import shlex

    commands = re.findall(r"`(ephys-gpt [^`]+)`", message)
    assert len(commands) == 1, message
    return main(["-q", *shlex.split(commands[0])[1:]])


def test_data_check_advice_repairs_a_truncated_chunk(save_folder):
    """The data check before training names the damaged chunk and a command; running that
    command literally makes the store whole again (the same bytes as first written)."""
    from ephys_gpt.dataset.datasplitter import split_datasets

    _, chunks = save_folder
    before = _digests(chunks)
    session = chunks / "sub-01_ses-02_task-rest"
    import json

    meta_path = session / "meta.json"  # a save_folder moved after stage 2 (stale path)
    meta = json.loads(meta_path.read_text())
    meta["provenance"]["stage1_file"] = "/moved/away/sub-01_ses-02_task-rest_preproc-raw.fif"
    meta_path.write_text(json.dumps(meta))
    chunk = session / "2.npy"
    chunk.write_bytes(chunk.read_bytes()[:5000])
    with pytest.raises(store.StoreError) as info:
        split_datasets(chunks, dataset_class="ChunkDatasetForecastCont", example_seconds=1.0,
                   split_by="time")
    assert f"{chunk} is not a readable .npy array" in str(info.value)
    assert _follow(str(info.value)) == 0
    assert _digests(chunks) == before
    split_datasets(chunks, dataset_class="ChunkDatasetForecastCont", example_seconds=1.0,
                   split_by="time")


def test_non_finite_value_advice_repairs_the_chunk(save_folder):
    import numpy as np

    from ephys_gpt.dataset.datasets import ChunkDatasetForecastCont

    _, chunks = save_folder
    before = _digests(chunks)
    chunk = chunks / "sub-01_ses-01_task-rest" / "0.npy"
    offset = np.load(chunk, mmap_mode="r").offset + 4 * 50  # channel 0, sample 50
    data = bytearray(chunk.read_bytes())
    data[offset:offset + 4] = np.array([np.nan], dtype="<f4").tobytes()
    chunk.write_bytes(bytes(data))
    ds = ChunkDatasetForecastCont.from_root(chunks, example_seconds=1.0)
    with pytest.raises(store.StoreError, match="non-finite value") as info:
        for i in range(len(ds)):
            ds[i]
    assert _follow(str(info.value)) == 0
    assert _digests(chunks) == before


def test_check_store_reports_damage_and_repairs(save_folder, capsys):
    import json

    _, chunks = save_folder
    assert main(["check-store", str(chunks), "--no-progress"]) == 0
    assert "every session is whole" in capsys.readouterr().err
    chunk = chunks / "sub-01_ses-01_task-rest" / "1.npy"
    data = bytearray(chunk.read_bytes())
    data[200:208] = bytes(8)  # same size, other content
    chunk.write_bytes(bytes(data))
    assert main(["check-store", str(chunks), "--no-progress", "--sizes-only"]) == 0
    capsys.readouterr()
    assert main(["check-store", str(chunks), "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert f"damaged: {chunks / 'sub-01_ses-01_task-rest'}: chunk 1 (1.npy): sha256 differs" in err
    assert "1 damaged session(s): sub-01_ses-01_task-rest" in err
    assert _follow(err.split("To repair:")[1]) == 0
    assert main(["check-store", str(chunks.parent), "--no-progress"]) == 0  # save_folder works
    # a store written before sizes and checksums were recorded still checks, and says so
    meta_path = chunks / "sub-01_ses-02_task-rest" / "meta.json"
    meta = json.loads(meta_path.read_text())
    del meta["chunk_sizes"], meta["chunk_checksums"]
    meta_path.write_text(json.dumps(meta))
    capsys.readouterr()
    assert main(["check-store", str(chunks), "--no-progress"]) == 0
    assert "1 session(s) were written before ephys-gpt recorded chunk sizes and checksums" \
        in capsys.readouterr().err
    assert main(["check-store", str(chunks / "nope")]) == 1
    assert "does not exist" in capsys.readouterr().err


def test_preprocess_is_refused_or_waits_while_another_run_holds_save_folder(save_folder,
                                                                              capsys):
    import textwrap

    path, chunks = save_folder
    script = textwrap.dedent(f"""
        import sys, time
        from ephys_gpt.locking import FolderLock
        with FolderLock({str(chunks.parent)!r}, command="ephys-gpt preprocess --args a.yaml"):
            print("locked", flush=True)
            time.sleep(float(sys.argv[1]))
    """)
    holder = subprocess.Popen([sys.executable, "-c", script, "60"], stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        rc = main(["preprocess", "--args", str(path), "--stage", "stage_2"])
        err = capsys.readouterr().err
        assert rc == 1 and f"save_folder {chunks.parent} is in use" in err
        assert f"pid {holder.pid}" in err and "ephys-gpt preprocess --args a.yaml" in err
        assert "--wait SECONDS" in err
    finally:
        holder.kill()
        holder.wait()
    holder = subprocess.Popen([sys.executable, "-c", script, "1"], stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        rc = main(["preprocess", "--args", str(path), "--stage", "stage_2", "--wait", "60"])
        assert rc == 0 and "waiting for it to finish" in capsys.readouterr().err
    finally:
        holder.kill()
        holder.wait()
    with pytest.raises(SystemExit):
        main(["preprocess", "--args", str(path), "--wait", "-3"])
