"""Lightning DDP through the CLI: two CPU processes (gloo) train the same weights as one
process over the same global batches, rank 0 alone writes the run folder, validation metrics
are averaged over the ranks, and the user sees each log line once."""

from __future__ import annotations

import csv
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from training_helpers import make_store, tiny_run, write_yaml

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def _run(tmp_path, store, name: str, devices: int, batch: int):
    cfg = tiny_run(store, tmp_path / name, dataloader={"batch_size": batch, "shuffle": False})
    cfg["datasplitter"].update(val_ratio=0.25, test_ratio=0.25)
    cfg["lightning"]["total_steps"] = 10
    cfg["trainer"].update(max_epochs=2, limit_train_batches=None, limit_val_batches=None,
                          accelerator="cpu", devices=devices, log_every_n_steps=1)
    if devices > 1:
        cfg["trainer"]["strategy"] = "ddp"
    path = write_yaml(tmp_path / f"{name}.yaml", cfg)
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "SLURM_PROCID")}
    proc = subprocess.run([sys.executable, "-m", "ephys_gpt.cli", "train", "--args", str(path)],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return tmp_path / name, proc.stderr


def _val_losses(run) -> list[float]:
    (metrics,) = (run / "logs" / "csv").glob("version_*/metrics.csv")
    return [float(r["val/loss"]) for r in csv.DictReader(metrics.open()) if r.get("val/loss")]


def test_ddp_two_processes_match_one_process_over_the_same_global_batches(tmp_path):
    store = make_store(tmp_path / "chunks", n_sessions=4)  # 36 training windows
    ddp, err = _run(tmp_path, store, "ddp", devices=2, batch=4)
    one, _ = _run(tmp_path, store, "one", devices=1, batch=8)
    # the same global batches (sequential order, 2 x 4 = 8) give the same weights, up to the
    # order in which the gradient all-reduce sums
    a, b = load_file(ddp / "export" / "model.safetensors"), load_file(one / "export" /
                                                                       "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-5, rtol=1e-4), k
    # validation loss is averaged over both ranks' halves of the validation split
    assert _val_losses(ddp) == pytest.approx(_val_losses(one), rel=1e-4)
    # rank 0 alone wrote the run folder: one config, one split record, one export, one log
    assert sorted(p.name for p in ddp.iterdir()) == sorted(p.name for p in one.iterdir())
    assert len(list((ddp / "logs" / "csv").iterdir())) == 1
    assert len(list((ddp / "logs" / "tensorboard").iterdir())) == 1
    assert sorted(p.name for p in (ddp / "export").iterdir()) == ["config.json",
                                                                  "model.safetensors"]
    # each of our log lines once (rank 1 prints errors only)
    assert err.count("train split: ") == 1 and err.count("exported GPT2MEG") == 1
    assert "[rank 1]" not in err
