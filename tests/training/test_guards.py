"""Runs that would train nothing are refused up front; a non-finite loss stops training with
the step, the batch and the loss named, keeping the last good checkpoint."""

from __future__ import annotations

import math

import pytest
import torch
from training_helpers import write_yaml

from ephys_gpt.cli import main as cli_main
from ephys_gpt.models.loading import read_checkpoint
from ephys_gpt.training.errors import NonFiniteLossError
from ephys_gpt.training.experiment import ExperimentDL
from ephys_gpt.training.guards import NonFiniteLossGuard

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning")


def test_batch_larger_than_training_split_with_drop_last_is_refused(run_cfg, tmp_path, capsys):
    exp = ExperimentDL(run_cfg)
    n = len(exp.splits.train)
    run_cfg["dataloader"].update(batch_size=n + 1, drop_last=True)
    path = write_yaml(tmp_path / "train.yaml", run_cfg)
    assert cli_main(["train", "--args", str(path)]) == 1
    err = capsys.readouterr().err
    assert (f"dataloader.batch_size is {n + 1} but the training split has only {n} window(s) "
            "and dataloader.drop_last is true") in err
    assert "Traceback" not in err
    assert not (tmp_path / "run").exists()  # refused before anything was written


@pytest.mark.parametrize("override, message", [
    ("trainer.max_steps=0", "trainer.max_steps is 0"),
    ("trainer.max_epochs=0", "trainer.max_epochs is 0"),
    ("trainer.limit_train_batches=0", "trainer.limit_train_batches=0 of"),
])
def test_zero_optimizer_steps_are_refused(run_cfg, override, message):
    with pytest.raises(ValueError, match=message):
        ExperimentDL(run_cfg, [override]).train()


def test_resuming_a_finished_run_is_refused(run_cfg, tmp_path):
    run_cfg["trainer"].update(limit_train_batches=1, limit_val_batches=1)
    ExperimentDL(run_cfg).train()
    with pytest.raises(ValueError, match=r"finished 1 epoch\(s\), which already reaches "
                                         r"trainer\.max_epochs=1.*raise trainer\.max_epochs"):
        ExperimentDL(run_cfg, ["resume_from=last"]).train()
    assert ExperimentDL(run_cfg, ["resume_from=last", "trainer.max_epochs=2"]).train()[
        "global_step"] == 2


def _nan_from_call(monkeypatch, exp, bad_call: int) -> None:
    """Make the run's loss NaN from its ``bad_call``-th training evaluation on."""
    forward, calls = exp.lit.loss_fn.forward, {"n": 0}

    def nan_loss(outputs, targets):
        loss = forward(outputs, targets)
        if exp.lit.training:
            calls["n"] += 1
            if calls["n"] >= bad_call:
                return loss * math.nan
        return loss

    monkeypatch.setattr(exp.lit.loss_fn, "forward", nan_loss)


def test_nan_loss_stops_with_step_and_batch_and_keeps_good_checkpoint(run_cfg, monkeypatch):
    run_cfg["trainer"].update(limit_train_batches=4, limit_val_batches=0)
    run_cfg["checkpoint"] = {"every_n_train_steps": 1}
    exp = ExperimentDL(run_cfg)
    _nan_from_call(monkeypatch, exp, 3)
    with pytest.raises(NonFiniteLossError,
                       match=r"the training loss is nan at global step 2 \(epoch 0, batch 2; "
                             r"not finite: train/loss=nan\)") as info:
        exp.train()
    assert (info.value.global_step, info.value.batch_idx) == (2, 2)
    last = read_checkpoint(exp.ckpt_dir / "last.ckpt")
    assert last["global_step"] == 2  # the bad step never updated the weights on disk
    assert all(torch.isfinite(v).all() for v in last["state_dict"].values())
    assert not (exp.save_dir / "export").exists()


def test_deferred_check_on_accelerators_never_checkpoints_bad_weights(run_cfg, monkeypatch):
    """The device path (one flag per step, read every log_every_n_steps and before each
    checkpoint), exercised on the CPU."""
    monkeypatch.setattr(NonFiniteLossGuard, "host_devices", ())
    run_cfg["trainer"].update(limit_train_batches=6, limit_val_batches=0, log_every_n_steps=4)
    run_cfg["checkpoint"] = {"every_n_train_steps": 2}
    exp = ExperimentDL(run_cfg)
    _nan_from_call(monkeypatch, exp, 2)  # step 1 is the first bad one
    with pytest.raises(NonFiniteLossError, match=r"at global step 1 \(epoch 0, batch 1; not "
                                                 r"finite when the flags were read"):
        exp.train()
    # the step-2 checkpoint would hold weights updated by the NaN loss: it was not written
    assert not (exp.ckpt_dir / "last.ckpt").exists()


def test_cli_reports_nan_loss_in_one_line(run_cfg, tmp_path, monkeypatch, capsys):
    from ephys_gpt.losses.basic import CrossEntropy

    forward = CrossEntropy.forward
    monkeypatch.setattr(CrossEntropy, "forward",
                        lambda self, out, tgt: forward(self, out, tgt) * math.inf)
    path = write_yaml(tmp_path / "train.yaml", run_cfg)
    assert cli_main(["train", "--args", str(path)]) == 1
    err = capsys.readouterr().err
    assert "the training loss is inf at global step 0 (epoch 0, batch 0" in err
    assert "Traceback" not in err
