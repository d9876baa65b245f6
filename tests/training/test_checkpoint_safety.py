"""Checkpoints and exports: weights-only loading whatever the environment, one-line messages
for damaged files and a full disk, files readable as the umask allows."""

from __future__ import annotations

import builtins
import errno
import os
import shutil
import stat

import pytest
import torch
from training_helpers import tiny_run, write_yaml

from ephys_gpt.cli import main as cli_main
from ephys_gpt.fileio import DiskFullError
from ephys_gpt.models.loading import load_model, read_checkpoint
from ephys_gpt.models.pretrained import from_pretrained, save_pretrained
from ephys_gpt.models.registry import build_model
from ephys_gpt.training.checkpoint import SafeCheckpointIO
from ephys_gpt.training.experiment import ExperimentDL

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning")


@pytest.fixture(scope="module")
def trained(token_store, tmp_path_factory):
    """A finished tiny run: (config path, save_dir)."""
    base = tmp_path_factory.mktemp("trained")
    cfg = tiny_run(token_store, base / "run")
    cfg["trainer"].update(limit_train_batches=2, limit_val_batches=1)
    path = write_yaml(base / "train.yaml", cfg)
    ExperimentDL(str(path)).train()
    return path, base / "run"


class _OpensAFile:
    """Unpickling this calls open(marker, "w"): a stand-in for arbitrary code."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (builtins.open, (self.marker, "w"))


@pytest.fixture
def evil_ckpt(tmp_path, trained):
    """A checkpoint that looks like the run's but runs code when unpickled."""
    marker = tmp_path / "code-ran"
    ckpt = read_checkpoint(trained[1] / "checkpoints" / "last.ckpt")
    ckpt["hyper_parameters"]["payload"] = _OpensAFile(marker)
    path = tmp_path / "evil.ckpt"
    torch.save(ckpt, path)
    return path, marker


def test_crafted_checkpoint_never_runs_code_even_when_torch_is_told_to_unpickle(
        evil_ckpt, trained, tmp_path, monkeypatch, capsys):
    path, marker = evil_ckpt
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    # the threat is real: torch's default under this variable runs the payload
    torch.load(path)
    assert marker.exists()
    marker.unlink()

    for load in (read_checkpoint, load_model, SafeCheckpointIO().load_checkpoint):
        with pytest.raises(ValueError, match=r"refusing to load .*evil\.ckpt: it is not a "
                                             r"weights-only checkpoint \(it asks for "
                                             r"'io\.open'\)"):
            load(path)
    config, save = trained
    for argv in (["train", "--args", str(config), f"resume_from={path}",
                  f"save_dir={tmp_path / 'new'}"],
                 ["test", "--args", str(config), "--ckpt", str(path)]):
        assert cli_main(argv) == 1
        err = capsys.readouterr().err
        assert "refusing to load" in err and "Traceback" not in err
    assert not marker.exists()


def test_damaged_exports_and_checkpoints_are_one_line_errors(trained, tmp_path, capsys):
    config, save = trained
    export = tmp_path / "export"
    shutil.copytree(save / "export", export)
    weights = export / "model.safetensors"
    good = weights.read_bytes()
    eval_argv = ["eval", "--args", str(config), f"eval.ckpt_path={export}",
                 f"save_dir={tmp_path / 'evalrun'}"]

    weights.write_bytes(good[: len(good) // 2])  # truncated
    with pytest.raises(ValueError, match=r"model\.safetensors is not a readable safetensors"):
        from_pretrained(export)
    assert cli_main(eval_argv + ["eval_class=EvalQuant", "eval.max_batches=1"]) == 1
    err = capsys.readouterr().err
    assert "model.safetensors is not a readable safetensors file" in err
    assert "Traceback" not in err

    weights.write_bytes(os.urandom(4096))  # random bytes
    with pytest.raises(ValueError, match=r"not a readable safetensors file"):
        load_model(export)

    weights.write_bytes(good)
    (export / "config.json").write_text('{"model_name": "GPT2MEG", ')  # malformed JSON
    with pytest.raises(ValueError, match=r"export config .*config\.json is not valid JSON"):
        from_pretrained(export)
    (export / "config.json").write_text('["GPT2MEG"]')
    with pytest.raises(ValueError, match=r"config\.json should hold a JSON object, found list"):
        load_model(export)

    ckpt = tmp_path / "short.ckpt"
    ckpt.write_bytes((save / "checkpoints" / "last.ckpt").read_bytes()[:1000])
    assert cli_main(["test", "--args", str(config), "--ckpt", str(ckpt)]) == 1
    err = capsys.readouterr().err
    assert f"{ckpt} is not a readable checkpoint (truncated" in err and "Traceback" not in err


@pytest.mark.parametrize("failure", [OSError(errno.ENOSPC, "No space left on device"),
                                     OSError("306000 requested and 49024 written")])
def test_disk_full_during_export_is_one_line(token_store, tmp_path, monkeypatch, capsys,
                                             failure):
    from ephys_gpt.models import pretrained

    def full_disk(state, filename, metadata=None):
        with open(filename, "wb") as fh:
            fh.write(b"\0" * 100)
        raise failure

    monkeypatch.setattr(pretrained, "save_file", full_disk)
    cfg = tiny_run(token_store, tmp_path / "run")
    cfg["trainer"].update(limit_train_batches=1, limit_val_batches=1)
    path = write_yaml(tmp_path / "train.yaml", cfg)
    assert cli_main(["train", "--args", str(path)]) == 1
    err = capsys.readouterr().err
    weights = tmp_path / "run" / "export" / "model.safetensors"
    assert f"the disk is full: could not write {weights}" in err
    assert "Traceback" not in err and len(err.strip().splitlines()[-1]) > 0
    assert not weights.exists() and not list(weights.parent.glob(".*.tmp"))


def test_disk_full_while_saving_a_checkpoint(tmp_path, monkeypatch):
    def full_disk(obj, fh):
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError:
            raise RuntimeError("[enforce fail at inline_container.cc] unexpected pos") from None

    monkeypatch.setattr(torch, "save", full_disk)
    target = tmp_path / "checkpoints" / "last.ckpt"
    with pytest.raises(DiskFullError, match=f"the disk is full: could not write {target}"):
        SafeCheckpointIO().save_checkpoint({"state_dict": {}}, target)
    assert not target.exists() and not list(target.parent.iterdir())


def test_exports_and_checkpoints_follow_the_umask(tmp_path):
    model = build_model("GPT2MEG", {"n_positions": 8, "d_model": 8, "n_layers": 1, "n_heads": 2,
                                    "num_channels": 2, "vocab_size": 16})
    old = os.umask(0o022)
    try:
        out = save_pretrained(model, tmp_path / "export")
        SafeCheckpointIO().save_checkpoint({"state_dict": model.state_dict()},
                                           tmp_path / "checkpoints" / "last.ckpt")
    finally:
        os.umask(old)
    for p in (out / "model.safetensors", out / "config.json",
              tmp_path / "checkpoints" / "last.ckpt"):
        assert stat.S_IMODE(p.stat().st_mode) == 0o644, p
