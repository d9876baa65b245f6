"""`ephys-gpt preprocess` and `python preprocess.py`: exit codes, errors, overrides."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from ephys_gpt.cli import main
from ephys_gpt.dataset import store

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
