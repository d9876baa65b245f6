"""Preprocessing on an existing Dask cluster: stage 1 and stage 2 run through a scheduler
address (``dask_scheduler``) and give the same stage-1 files and the same chunk store as a
serial run."""

from __future__ import annotations

import json
import subprocess
import sys

import mne
import numpy as np

from ephys_gpt.preprocessing.stage2 import Stage2Settings, run_stage2
from ephys_gpt.store import list_sessions, load_chunk

# Runs in a subprocess: the test process refuses network sockets (tests/conftest.py), and
# Dask's scheduler and workers talk over loopback TCP.
SCRIPT = """
import json, sys
from distributed import LocalCluster
from ephys_gpt.preprocessing.config import load_preprocess_config
from ephys_gpt.preprocessing.pipeline import run_preprocess

data, out = sys.argv[1], sys.argv[2]
with LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                  dashboard_address=None) as cluster:
    cfg = load_preprocess_config(None, [f"data_path={data}", f"save_folder={out}",
                                        f"dask_scheduler={cluster.scheduler_address}",
                                        "progress=false", "chunk_seconds=5"])
    result = run_preprocess(cfg, "both")
print(json.dumps(result.failed))
"""


def test_both_stages_on_a_dask_cluster_match_a_serial_run(simulated, stage1_run, tmp_path):
    data, _ = simulated
    serial_stage1, _, _ = stage1_run  # the serial stage-1 run shared by the stage-1 tests
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(data), str(tmp_path / "dask")],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == {}
    fifs = sorted(serial_stage1.glob("*/*_preproc-raw.fif"))
    assert len(fifs) == 2
    for fif in fifs:
        other = tmp_path / "dask" / "stage1" / fif.parent.name / fif.name
        a = mne.io.read_raw_fif(fif, verbose="error")
        b = mne.io.read_raw_fif(other, verbose="error")
        assert a.info["bads"] == b.info["bads"]
        np.testing.assert_array_equal(a.get_data(), b.get_data())
    serial = run_stage2(fifs, tmp_path / "serial" / "chunks",
                        Stage2Settings(chunk_seconds=5.0), progress=False)
    assert serial.ok
    one = list_sessions(tmp_path / "serial" / "chunks")
    two = list_sessions(tmp_path / "dask" / "chunks")
    assert [m.name for m in one] == [m.name for m in two] and len(one) == 2
    for a, b in zip(one, two):
        assert a.steps == b.steps and a.chunk_lengths == b.chunk_lengths
        for i in range(a.n_chunks):
            np.testing.assert_array_equal(load_chunk(a, i), load_chunk(b, i))


def test_an_unreachable_scheduler_is_one_clear_error(tmp_path):
    """No cluster at the address: a message naming it, before any work (in a subprocess, as
    the test process refuses sockets)."""
    script = ("from ephys_gpt.preprocessing.parallel import dask_client\n"
              "try:\n"
              "    with dask_client(1, 'tcp://127.0.0.1:9'):\n"
              "        pass\n"
              "except ValueError as err:\n"
              "    print(err)\n")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=300)
    assert "cannot reach the Dask scheduler at tcp://127.0.0.1:9" in proc.stdout, proc.stderr
