"""The train/test/eval/list-models commands and run.py."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
from pydantic import BaseModel, ConfigDict
from training_helpers import write_yaml

from ephys_gpt.cli import main as cli_main
from ephys_gpt.eval import registry as eval_registry
from ephys_gpt.models.registry import list_models

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning")
ROOT = Path(__file__).resolve().parents[2]


def _run_py():
    spec = importlib.util.spec_from_file_location("run_py", ROOT / "run.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_list_models_table(capsys):
    assert cli_main(["list-models"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:3] == ["name", "input", "kind"]
    rows = {ln.split()[0]: ln.split() for ln in lines[2:]}
    assert set(rows) == {s.name for s in list_models()}
    gpt = rows["GPT2MEG"]
    assert gpt[1:4] == ["tokens", "yes", "TokenGenerator"]


def test_train_then_test_through_run_py(tmp_path, run_cfg):
    path = write_yaml(tmp_path / "cfg" / "train.yaml", run_cfg)
    run_py = _run_py()
    assert run_py.main(["--mode", "train", "--args", str(path),
                        "trainer.limit_train_batches=2"]) == 0
    ckpt = tmp_path / "run" / "checkpoints" / "last.ckpt"
    assert ckpt.is_file()
    assert run_py.main(["--mode", "test", "--args", str(path)]) == 0
    assert (tmp_path / "run" / "test_metrics.json").is_file()


def test_config_errors_exit_1_with_message(tmp_path, run_cfg, capsys):
    run_cfg["trainer"]["max_epoch"] = 1
    path = write_yaml(tmp_path / "cfg" / "train.yaml", run_cfg)
    assert cli_main(["train", "--args", str(path)]) == 1
    err = capsys.readouterr().err
    assert "trainer.max_epoch" in err and "max_epochs" in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()  # nothing was started


class _Opts(BaseModel):
    model_config = ConfigDict(extra="forbid")
    ckpt_path: str
    horizon: int = 2


def test_eval_dispatches_to_registered_runner(tmp_path, run_cfg, monkeypatch):
    seen = {}

    class Runner:
        def __init__(self, config, options):
            seen["config"], seen["options"] = config, options

        def run(self):
            seen["ran"] = True
            return {"ok": 1}

    monkeypatch.setitem(eval_registry.EVALS, "StandinEval",
                        eval_registry.EvalSpec("StandinEval", Runner, _Opts))
    (tmp_path / "export").mkdir()
    run_cfg.update(eval_class="StandinEval", eval={"ckpt_path": "../export", "horizon": 5})
    path = write_yaml(tmp_path / "cfg" / "eval.yaml", run_cfg)
    assert cli_main(["eval", "--args", str(path)]) == 0
    assert seen["ran"] and isinstance(seen["options"], _Opts)
    assert seen["options"].horizon == 5
    assert seen["options"].ckpt_path == str(tmp_path / "export")
    assert seen["config"]["model_name"] == "GPT2MEG"
    # a missing checkpoint stops eval before the runner starts
    seen.clear()
    assert cli_main(["eval", "--args", str(path), "eval.ckpt_path=/no/such/dir"]) == 1
    assert not seen


def test_cli_silences_only_known_third_party_chatter(caplog):
    import logging
    import warnings

    from ephys_gpt.cli import quiet_third_party

    quiet_third_party()
    quiet_third_party()  # idempotent: one filter, not two
    log = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    assert len(log.filters) == 1
    with caplog.at_level(logging.INFO, logger="lightning.pytorch.utilities.rank_zero"):
        log.info("💡 Tip: For seamless cloud logging, try installing litlogger")
        log.info("GPU available: False, used: False")
    assert [r.getMessage() for r in caplog.records] == ["GPU available: False, used: False"]
    with warnings.catch_warnings(record=True) as got:
        warnings.simplefilter("default")
        quiet_third_party()
        warnings.warn("`isinstance(treespec, LeafSpec)` is deprecated, use ...", stacklevel=1)
        warnings.warn("something the user must see", stacklevel=1)
    assert [str(w.message) for w in got] == ["something the user must see"]


def test_models_doc_table_is_generated_from_the_registry(capsys):
    """docs/models.md's table is what `ephys-gpt list-models --markdown` prints (regenerate
    it with that command when a model is added or changed)."""
    from ephys_gpt.models.registry import models_table_markdown

    doc = (Path(__file__).resolve().parents[2] / "docs" / "models.md").read_text()
    start, end = "<!-- models-table:start -->\n", "\n<!-- models-table:end -->"
    table = doc[doc.index(start) + len(start):doc.index(end)]
    assert table == models_table_markdown(), (
        "docs/models.md is stale: paste the output of `ephys-gpt list-models --markdown` "
        "between its models-table markers")
    assert cli_main(["list-models", "--markdown"]) == 0
    assert capsys.readouterr().out.strip() == table
