"""SIGINT / SIGTERM during training: a resumable checkpoint, a message saying how to resume,
exit 130 / 143; resuming from that checkpoint is exact."""

from __future__ import annotations

import os
import signal

import pytest
from test_resume import _kill_after, _start, assert_same_run, reference  # noqa: F401
from training_helpers import resume_run, write_yaml

from ephys_gpt.cli import main as cli_main
from ephys_gpt.models.loading import read_checkpoint
from ephys_gpt.training.errors import TrainingInterrupted
from ephys_gpt.training.experiment import ExperimentDL
from ephys_gpt.training.lit_model import LitModel

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning")


def _signal_at(monkeypatch, step: int, signum: int) -> None:
    """Send ``signum`` to this process once ``step`` optimizer steps are done."""

    def hook(self, outputs, batch, batch_idx):
        if self.trainer.global_step == step:
            os.kill(os.getpid(), signum)

    monkeypatch.setattr(LitModel, "on_train_batch_end", hook)


def test_sigint_saves_checkpoint_and_resume_is_exact(reference, cont_store, tmp_path,  # noqa: F811
                                                     monkeypatch):
    save = tmp_path / "run"
    before = signal.getsignal(signal.SIGINT)
    _signal_at(monkeypatch, 2, signal.SIGINT)
    with pytest.raises(TrainingInterrupted) as info:
        ExperimentDL(resume_run(cont_store, save)).train()
    monkeypatch.undo()
    err = info.value
    assert err.exit_code == 130 and err.signal_name == "SIGINT"
    # the next consistent point after step 2 is the end of the validation that follows it
    assert err.global_step == 2 and err.checkpoint == str(save / "checkpoints" / "last.ckpt")
    assert "resume_from=last" in str(err)
    assert read_checkpoint(err.checkpoint)["global_step"] == 2
    assert not (save / "export").exists()  # an interrupted run is not exported
    assert signal.getsignal(signal.SIGINT) == before  # the handlers are given back
    ExperimentDL(resume_run(cont_store, save) | {"resume_from": "last"}).train()
    assert_same_run(reference, save)


@pytest.mark.parametrize("signum, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_cli_exit_code_and_resume_command(cont_store, tmp_path, monkeypatch, capsys, signum,
                                          code):
    path = write_yaml(tmp_path / "train.yaml", resume_run(cont_store, tmp_path / "run"))
    _signal_at(monkeypatch, 5, signum)  # after validation at step 4: a mid-epoch stop
    assert cli_main(["train", "--args", str(path), "trainer.max_epochs=2"]) == code
    err = capsys.readouterr().err
    name = signal.Signals(signum).name
    assert f"training interrupted by {name} at global step 6" in err
    assert (f"Resume with: ephys-gpt train --args {path} trainer.max_epochs=2 resume_from=last"
            in err)
    assert "Traceback" not in err
    assert read_checkpoint(tmp_path / "run" / "checkpoints" / "last.ckpt")["global_step"] == 6


@pytest.mark.slow
def test_sigint_from_outside_then_resume_is_exact(reference, cont_store, tmp_path):  # noqa: F811
    """A real Ctrl-C from another process to `ephys-gpt train`."""
    save, marker = tmp_path / "run", tmp_path / "ready"
    path = write_yaml(tmp_path / "train.yaml", resume_run(cont_store, save))
    proc = _start(_kill_after(marker, 5), ["train", "--args", str(path)], marker)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 130, err[-3000:]
    assert "Resume with: ephys-gpt train --args" in err and "resume_from=last" in err
    assert read_checkpoint(save / "checkpoints" / "last.ckpt")["global_step"] == 6
    ExperimentDL(str(path), ["resume_from=last"]).train()
    assert_same_run(reference, save)
