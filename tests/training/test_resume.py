"""Exact resume: a run stopped after a checkpoint and resumed from it ends bit-identical (CPU)
to the uninterrupted run, and logs the same losses, also from a mid-epoch checkpoint."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from training_helpers import exported_weights, logged_losses, resume_run, write_yaml

from ephys_gpt.models.loading import read_checkpoint
from ephys_gpt.training.experiment import ExperimentDL
from ephys_gpt.training.lit_model import LitModel
from ephys_gpt.training.resume import EpochSampler, ResumableLoader

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning")
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def reference(cont_store, tmp_path_factory):
    """The uninterrupted run every interrupted one is compared with."""
    save = tmp_path_factory.mktemp("reference") / "run"
    out = ExperimentDL(resume_run(cont_store, save)).train()
    assert out["global_step"] == 8
    return save


def assert_same_run(ref: Path, other: Path) -> None:
    a, b = exported_weights(ref), exported_weights(other)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs by {(a[k] - b[k]).abs().max()}"
    la, lb = logged_losses(ref), logged_losses(other)
    assert any(k[1] == "train/loss_epoch" for k in la) and any(k[1] == "val/loss" for k in la)
    assert la == lb


class Crash(Exception):
    pass


def test_resume_from_mid_epoch_checkpoint_is_exact(reference, cont_store, tmp_path, monkeypatch):
    save = tmp_path / "run"

    def crash(self, outputs, batch, batch_idx):  # dies a step after the step-3 checkpoint
        if self.trainer.global_step == 4:
            raise Crash

    monkeypatch.setattr(LitModel, "on_train_batch_end", crash)
    with pytest.raises(Crash):
        ExperimentDL(resume_run(cont_store, save)).train()
    monkeypatch.undo()
    ckpt = read_checkpoint(save / "checkpoints" / "last.ckpt")
    assert ckpt["global_step"] == 3  # epoch 0, after 3 of its 4 batches
    loader = ckpt["ephys_gpt_resume"]["loader"]
    assert (loader["epoch"], loader["position"]) == (0, 6)
    out = ExperimentDL(resume_run(cont_store, save) | {"resume_from": "last"}).train()
    assert out["global_step"] == 8
    assert_same_run(reference, save)


def _kill_after(marker: Path, step: int) -> str:
    """Python code for a training subprocess that writes ``marker`` once ``step`` optimizer
    steps are done (its checkpoint is on disk by then) and then idles until a signal."""
    return f"""
import sys, time
from ephys_gpt.training.lit_model import LitModel
from ephys_gpt.training.interrupt import SignalCheckpoint

def hook(self, outputs, batch, batch_idx):
    if self.trainer.global_step == {step}:
        open({str(marker)!r}, "w").write("ready")
        stop = next(c for c in self.trainer.callbacks if isinstance(c, SignalCheckpoint))
        deadline = time.time() + 120
        while stop.signum is None and time.time() < deadline:
            time.sleep(0.05)

LitModel.on_train_batch_end = hook
from ephys_gpt.cli import main
sys.exit(main(sys.argv[1:]))
"""


def _start(code: str, args: list[str], marker: Path) -> subprocess.Popen:
    # one CPU thread, as this process (tests/conftest.py): float sums split the same way
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads()),
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen([sys.executable, "-c", code, *args], env=env, cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while not marker.exists():
        if proc.poll() is not None or time.time() > deadline:
            proc.kill()
            out, err = proc.communicate()
            pytest.fail(f"training subprocess ended early ({proc.returncode}):\n{err[-3000:]}")
        time.sleep(0.1)
    return proc


@pytest.mark.slow
def test_sigkill_after_mid_epoch_checkpoint_then_resume_is_exact(reference, cont_store,
                                                                 tmp_path):
    save, marker = tmp_path / "run", tmp_path / "ready"
    path = write_yaml(tmp_path / "train.yaml", resume_run(cont_store, save))
    proc = _start(_kill_after(marker, 3), ["train", "--args", str(path)], marker)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    assert proc.returncode == -signal.SIGKILL
    assert read_checkpoint(save / "checkpoints" / "last.ckpt")["global_step"] == 3
    ExperimentDL(str(path), ["resume_from=last"]).train()
    assert_same_run(reference, save)


def test_resume_with_dataloader_workers_is_exact(cont_store, tmp_path, monkeypatch):
    """Two workers load (and augment, and mix) the windows: same result as one process."""
    ref = tmp_path / "ref"
    ExperimentDL(resume_run(cont_store, ref, num_workers=2)).train()
    save = tmp_path / "run"

    def crash(self, outputs, batch, batch_idx):
        if self.trainer.global_step == 4:
            raise Crash

    monkeypatch.setattr(LitModel, "on_train_batch_end", crash)
    with pytest.raises(Crash):
        ExperimentDL(resume_run(cont_store, save, num_workers=2)).train()
    monkeypatch.undo()
    ExperimentDL(resume_run(cont_store, save, num_workers=2) | {"resume_from": "last"}).train()
    assert_same_run(ref, save)


def test_epoch_sampler_order_is_a_function_of_seed_and_epoch():
    s = EpochSampler(10, seed=3)
    first = [k[0] for k in s]
    assert sorted(first) == list(range(10))
    s.set_epoch(1)
    second = [k[0] for k in s]
    assert second != first
    s.set_epoch(0)
    assert [k[0] for k in s] == first  # the same epoch, the same order
    s.start = 4  # resume: skip what was trained
    assert [k for k in s] == [(i, 0, p) for p, i in enumerate(first)][4:]
    assert [k[0] for k in s] == first  # the skip applies once
    s.start = 4
    s.set_epoch(2)  # a new epoch cancels the skip
    assert len(list(s)) == 10
    assert [k[0] for k in EpochSampler(5, seed=3, shuffle=False)] == list(range(5))


def test_loader_state_round_trip_and_mismatch(cont_store):
    from torch.utils.data import TensorDataset

    ds = TensorDataset(torch.arange(10.0))
    loader = ResumableLoader(ds, seed=0, batch_size=3)
    it = iter(loader)
    seen = [next(it)[0] for _ in range(2)]
    state = loader.state_dict()
    assert (state["epoch"], state["position"], state["size"]) == (0, 6, 10)
    fresh = ResumableLoader(ds, seed=0, batch_size=3)
    fresh.load_state_dict(state)
    rest = torch.cat([b[0] for b in fresh])
    assert torch.equal(torch.cat(seen + [rest]).sort().values, torch.arange(10.0))
    other = ResumableLoader(TensorDataset(torch.arange(12.0)), seed=0, batch_size=3)
    with pytest.raises(ValueError, match=r"training windows per process: 10 in the checkpoint, 12 now"):
        other.load_state_dict(state)


def test_augmentations_and_mixup_are_keyed_by_position_not_by_process():
    from ephys_gpt.dataset.augmentations import Augmentations
    from ephys_gpt.dataset.mixup import MixupCollate

    augs = Augmentations([{"name": "gaussian_noise", "std": 1.0, "p": 1.0}], seed=5)
    x = np.zeros((2, 8), np.float32)
    augs.seed_item(1, 0, 7)
    a = augs(x.copy())
    augs(x.copy())  # other draws in between do not matter
    augs.seed_item(1, 0, 7)
    assert np.array_equal(augs(x.copy()), a)
    augs.seed_item(1, 0, 8)
    assert not np.array_equal(augs(x.copy()), a)

    mix = MixupCollate(alpha=0.4)
    batch = [(torch.randn(2, 4), torch.randn(2, 4)) for _ in range(4)]
    mix.seed_batch(1, 0, 4)
    first = mix(batch)
    torch.manual_seed(123)  # torch's RNG plays no part in a keyed batch
    mix.seed_batch(1, 0, 4)
    again = mix(batch)
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])


def test_ranks_share_one_order_and_key_draws_by_global_position():
    """Two ranks together read exactly the one-process order (padded to even shares), with
    the same (epoch, position) keys, so augmentations draw the same numbers."""
    from ephys_gpt.training.resume import EpochSampler

    one = EpochSampler(7, seed=3, shuffle=True)
    ranks = [EpochSampler(7, seed=3, shuffle=True, rank=r, world=2) for r in range(2)]
    full = list(one)
    shares = [list(s) for s in ranks]
    assert [len(s) for s in shares] == [4, 4] and len(ranks[0]) == 4
    merged = sorted(shares[0] + shares[1], key=lambda k: k[2])
    assert merged[:7] == full  # interleaved shares are the one order...
    assert merged[7][0] == full[0][0]  # ...padded by repeating its start
    with pytest.raises(ValueError, match="rank must be in"):
        EpochSampler(7, seed=3, rank=2, world=2)
