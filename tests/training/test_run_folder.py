"""save_dir: a run is never replaced silently, overwrite removes only the toolkit's files, and
the split of a run is recorded and reused (missing sessions refused, re-split on request)."""

from __future__ import annotations

import json

import pytest
import yaml
from training_helpers import make_store, tiny_run, write_yaml

from ephys_gpt.cli import main as cli_main
from ephys_gpt.training.experiment import ExperimentDL
from ephys_gpt.training.run_folder import RunFolderError, run_outputs

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning")


def _quick(cfg: dict) -> dict:
    cfg["trainer"].update(limit_train_batches=1, limit_val_batches=1)
    return cfg


def test_train_into_a_run_folder_is_refused_with_the_choices(token_store, tmp_path, capsys):
    save = tmp_path / "run"
    path = write_yaml(tmp_path / "train.yaml", _quick(tiny_run(token_store, save)))
    assert cli_main(["train", "--args", str(path)]) == 0
    before = {p: p.read_bytes() for p in run_outputs(save)}
    assert {"config.yaml", "split.json", "best.ckpt", "last.ckpt", "model.safetensors"} <= {
        p.name for p in before}
    capsys.readouterr()
    # a second run, even of another architecture, stops before any work
    assert cli_main(["train", "--args", str(path), "model_config.d_model=8"]) == 1
    err = capsys.readouterr().err
    assert f"save_dir {save} already holds a run" in err
    for choice in ("resume_from=last", "save_dir=NEW_FOLDER", "--overwrite (or overwrite=true)"):
        assert choice in err
    assert "Traceback" not in err
    assert {p: p.read_bytes() for p in run_outputs(save)} == before
    # continuing the run in its own folder is allowed
    assert cli_main(["train", "--args", str(path), "resume_from=last",
                     "trainer.max_epochs=2"]) == 0


def test_overwrite_removes_only_what_ephys_gpt_wrote(token_store, tmp_path):
    save = tmp_path / "run"
    cfg = _quick(tiny_run(token_store, save))
    ExperimentDL(cfg).train()
    evals = save / "evals" / "EvalQuant"
    evals.mkdir(parents=True)
    (evals / "curve.npy").write_bytes(b"x")
    (evals / "summary.json").write_text(json.dumps({"files": ["curve.npy"]}))
    mine = [save / "notes.md", save / "checkpoints" / "my-copy.ckpt", save / "export" / "README",
            save / "logs" / "mine.txt", evals / "my_figure.png"]
    for p in mine:
        p.write_text("the user's")
    old_ckpt = (save / "checkpoints" / "last.ckpt").read_bytes()

    with pytest.raises(RunFolderError, match="already holds a run"):
        ExperimentDL(cfg)
    exp = ExperimentDL(cfg, ["model_config.d_model=8"], overwrite=True)  # another model
    assert (save / "checkpoints" / "last.ckpt").read_bytes() == old_ckpt  # nothing gone yet
    exp.train()
    assert all(p.read_text() == "the user's" for p in mine)
    assert not (evals / "curve.npy").exists() and not (evals / "summary.json").exists()
    assert (save / "checkpoints" / "last.ckpt").read_bytes() != old_ckpt
    assert len(list((save / "logs" / "csv").glob("version_*"))) == 1  # the old logs are gone
    # the switch is a one-off: the saved config does not overwrite when run again
    assert yaml.safe_load((save / "config.yaml").read_text())["overwrite"] is False
    # overwrite=true as a config key does the same
    ExperimentDL(cfg, ["overwrite=true"]).train()
    assert all(p.read_text() == "the user's" for p in mine)
    with pytest.raises(RunFolderError, match="contradict"):
        ExperimentDL(cfg, ["overwrite=true", "resume_from=last"])


@pytest.fixture
def own_store(tmp_path):
    return make_store(tmp_path / "chunks", n_sessions=4)


def test_split_is_recorded_and_reused(own_store, tmp_path):
    save = tmp_path / "run"
    cfg = _quick(tiny_run(own_store, save))
    exp = ExperimentDL(cfg)
    exp.train()
    record = json.loads((save / "split.json").read_text())
    assert record["sessions"] == {name: [m.name for m in getattr(exp.splits, name).metas]
                                  for name in ("train", "val", "test")}
    assert record["settings"] == {"split_by": "session", "val_ratio": 0.34, "test_ratio": 0.34,
                                  "seed": 0}
    assert record["dataset_root"] == str(own_store)
    # another seed would draw another split: the recorded one is kept, or refused explicitly
    tested = ExperimentDL(cfg, mode="test")
    assert [m.name for m in tested.splits.test.metas] == record["sessions"]["test"]
    with pytest.raises(RunFolderError, match=r"datasplitter\.seed is 5, the record says 0.*"
                                             r"--resplit"):
        ExperimentDL(cfg, ["datasplitter.seed=5"], mode="test")
    resplit = ExperimentDL(cfg, ["datasplitter.seed=5"], mode="test", resplit=True)
    assert resplit.split_record is None


def test_test_and_eval_refuse_a_split_whose_sessions_are_gone(own_store, tmp_path, capsys):
    save = tmp_path / "run"
    cfg = _quick(tiny_run(own_store, save))
    cfg["eval_class"] = "EvalQuant"
    cfg["eval"] = {"max_batches": 1, "batch_size": 2, "future_steps": 2, "gen_seconds": 0.1,
                   "psd_windows": 2, "psd_seconds": 0.1, "progress": False,
                   "accelerator": "cpu"}
    path = write_yaml(tmp_path / "run.yaml", cfg)
    assert cli_main(["train", "--args", str(path)]) == 0
    held_out = json.loads((save / "split.json").read_text())["sessions"]["test"][0]
    (own_store / held_out / "meta.json").unlink()
    capsys.readouterr()
    for argv in (["test", "--args", str(path)], ["eval", "--args", str(path)]):
        assert cli_main(argv) == 1
        err = capsys.readouterr().err
        assert (f"the split recorded in {save / 'split.json'} names 1 session(s) that the "
                f"chunk store {own_store} no longer holds") in err
        assert f"['{held_out}']" in err and "--resplit" in err and "Traceback" not in err
    assert not (save / "test_metrics.json").exists()
    # a deliberate re-split uses the sessions that are there
    assert cli_main(["test", "--args", str(path), "--resplit"]) == 0
    assert (save / "test_metrics.json").is_file()


def test_test_refuses_data_made_differently_from_the_training_data(token_store, tmp_path,
                                                                    capsys):
    """`test` on another store (here resampled to 50 Hz) is refused naming both rates."""
    import shutil

    save = tmp_path / "run"
    path = write_yaml(tmp_path / "train.yaml", _quick(tiny_run(token_store, save)))
    assert cli_main(["train", "--args", str(path)]) == 0
    other = tmp_path / "other"
    shutil.copytree(token_store, other)
    for meta in other.glob("*/meta.json"):
        m = json.loads(meta.read_text())
        m["sfreq"] = 50.0
        meta.write_text(json.dumps(m))
    capsys.readouterr()
    assert cli_main(["test", "--args", str(path), f"datasplitter.dataset_root={other}",
                     "--resplit"]) == 1
    err = capsys.readouterr().err
    assert "sampling rate 100 Hz" in err and "50 Hz" in err and "Traceback" not in err
    assert cli_main(["test", "--args", str(path)]) == 0  # the run's own data is accepted
