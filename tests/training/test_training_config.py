"""Run-config validation: every mistake is one clear error naming the key path."""

from __future__ import annotations

import copy

import pytest
import yaml
from pydantic import BaseModel, ConfigDict
from training_helpers import write_yaml

from ephys_gpt.eval import registry as eval_registry
from ephys_gpt.training.config import (
    ConfigError,
    ConfigFileNotFoundError,
    ConfigTypeError,
    load_config,
    parse_override,
)


def _load(tmp_path, cfg, overrides=(), mode="train"):
    return load_config(write_yaml(tmp_path / "cfg" / "train.yaml", cfg), overrides, mode=mode)


def test_valid_config_fills_defaults_and_resolves(tmp_path, run_cfg):
    cfg = _load(tmp_path, run_cfg)
    assert cfg["dataset_name"] == "omega"
    assert cfg["dataloader"]["batch_size"] == 4 and cfg["dataloader"]["num_workers"] == 0
    assert cfg["lightning"]["lr"] == pytest.approx(1e-3)
    assert cfg["lightning"]["scheduler"] == "cosine"
    assert cfg["loss_name"] == "CrossEntropy"
    # A resolved config validates again to the same dict (it is what config.yaml holds).
    assert load_config(copy.deepcopy(cfg)) == cfg


def test_loss_name_defaults_to_model_default(tmp_path, run_cfg):
    del run_cfg["loss_name"]
    assert _load(tmp_path, run_cfg)["loss_name"] == "CrossEntropy"


def test_unknown_model_name_lists_valid_names(tmp_path, run_cfg):
    run_cfg["model_name"] = "GPT2MG"
    with pytest.raises(ConfigError) as exc:
        _load(tmp_path, run_cfg)
    msg = str(exc.value)
    assert "model_name" in msg and "'GPT2MG'" in msg and "Did you mean 'GPT2MEG'" in msg
    assert "STGPT2MEG" in msg  # valid names are listed
    assert "train.yaml" in msg  # the file is named


@pytest.mark.parametrize("where,key,hint", [
    ((), "dataspliter", "datasplitter"),
    (("lightning",), "lrr", "lr"),
    (("dataloader",), "batchsize", "batch_size"),
    (("trainer",), "max_epoch", "max_epochs"),
    (("datasplitter",), "val_ration", "val_ratio"),
    (("model_config",), "n_layer", "n_layers"),
])
def test_unknown_key_names_path_and_close_match(tmp_path, run_cfg, where, key, hint):
    node = run_cfg
    for w in where:
        node = node[w]
    node[key] = 1
    with pytest.raises(ConfigError) as exc:
        _load(tmp_path, run_cfg)
    msg = str(exc.value)
    assert "unknown key" in msg
    assert ".".join((*where, key)) in msg
    assert f"Did you mean {hint!r}" in msg


def test_wrong_type_is_a_type_error_naming_the_key(tmp_path, run_cfg):
    run_cfg["dataloader"]["batch_size"] = "eight"
    with pytest.raises(ConfigTypeError) as exc:
        _load(tmp_path, run_cfg)
    assert isinstance(exc.value, TypeError) and isinstance(exc.value, ValueError)
    assert "dataloader.batch_size" in str(exc.value) and "'eight'" in str(exc.value)


@pytest.mark.parametrize("block,key,value,fragment", [
    ("lightning", "lr", -1.0, "lightning.lr"),
    ("lightning", "scheduler", "linear", "lightning.scheduler"),
    ("trainer", "max_epochs", "3", "trainer.max_epochs"),
    ("model_config", "d_model", "big", "model_config.d_model"),
])
def test_bad_values(tmp_path, run_cfg, block, key, value, fragment):
    run_cfg[block][key] = value
    with pytest.raises(ConfigError, match=fragment.replace(".", r"\.")):
        _load(tmp_path, run_cfg)


def test_model_config_cross_field_rule(tmp_path, run_cfg):
    run_cfg["model_config"].update(d_model=15, n_heads=2)
    with pytest.raises(ConfigError, match="divisible"):
        _load(tmp_path, run_cfg)


def test_managed_trainer_key_refused(tmp_path, run_cfg):
    run_cfg["trainer"]["callbacks"] = []
    with pytest.raises(ConfigError, match=r"trainer\.callbacks"):
        _load(tmp_path, run_cfg)


def test_loss_option_checked(tmp_path, run_cfg):
    run_cfg["loss"] = {"smoothing": 0.1}
    with pytest.raises(ConfigError, match=r"loss\.smoothing.*label_smoothing"):
        _load(tmp_path, run_cfg)


def test_missing_required_key(tmp_path, run_cfg):
    del run_cfg["save_dir"]
    with pytest.raises(ConfigError, match="required key 'save_dir' is missing"):
        _load(tmp_path, run_cfg)


def test_input_kind_mismatch(tmp_path, run_cfg):
    run_cfg["datasplitter"]["dataset_class"] = "ChunkDatasetForecastCont"
    with pytest.raises(ConfigError) as exc:
        _load(tmp_path, run_cfg)
    msg = str(exc.value)
    assert "GPT2MEG" in msg and "'tokens'" in msg and "'continuous'" in msg
    assert "ChunkDataset" in msg  # a dataset class that fits is suggested


def test_missing_files_name_the_key(tmp_path, run_cfg):
    cfg = copy.deepcopy(run_cfg)
    cfg["datasplitter"]["dataset_root"] = "nowhere/chunks"
    with pytest.raises(ConfigFileNotFoundError) as exc:
        _load(tmp_path, cfg)
    assert isinstance(exc.value, FileNotFoundError)
    assert "datasplitter.dataset_root" in str(exc.value) and "nowhere" in str(exc.value)

    cfg = copy.deepcopy(run_cfg)
    cfg["model_config"] = "missing_model.yaml"
    with pytest.raises(FileNotFoundError, match="missing_model.yaml"):
        _load(tmp_path, cfg)

    cfg = copy.deepcopy(run_cfg)
    cfg["resume_from"] = "old/last.ckpt"
    with pytest.raises(FileNotFoundError, match="resume_from"):
        _load(tmp_path, cfg)


def test_relative_paths_resolve_against_config_folder(tmp_path, run_cfg, token_store):
    folder = tmp_path / "cfg"
    write_yaml(folder / "model.yaml", run_cfg["model_config"])
    (folder / "data").symlink_to(token_store)
    run_cfg["model_config"] = "model.yaml"
    run_cfg["datasplitter"]["dataset_root"] = "data"
    run_cfg["save_dir"] = "../out"
    cfg = _load(tmp_path, run_cfg)
    assert cfg["model_config"]["d_model"] == 16  # the file was read and inlined
    assert cfg["datasplitter"]["dataset_root"] == str(folder / "data")
    assert cfg["save_dir"] == str(tmp_path / "out")


def test_overrides(tmp_path, run_cfg, token_store, monkeypatch):
    folder = tmp_path / "cfg"
    write_yaml(folder / "model.yaml", run_cfg["model_config"])
    run_cfg["model_config"] = "model.yaml"
    monkeypatch.chdir(token_store.parent)
    cfg = _load(tmp_path, run_cfg, [
        "trainer.max_epochs=3", "lightning.lr=1e-3", "model_config.n_layers=2",
        "dataloader.mixup={alpha: 0.4}", f"datasplitter.dataset_root={token_store.name}",
        "lightning.compile=false"])
    assert cfg["trainer"]["max_epochs"] == 3
    assert cfg["lightning"]["lr"] == pytest.approx(1e-3) and isinstance(cfg["lightning"]["lr"], float)
    assert cfg["model_config"]["n_layers"] == 2 and cfg["model_config"]["d_model"] == 16
    assert cfg["dataloader"]["mixup"] == {"alpha": 0.4, "quantize_bits": None, "quantize_scale": 1.0,
                                         "num_classes": None}
    # relative override paths resolve against the working directory
    assert cfg["datasplitter"]["dataset_root"] == str(token_store)
    with pytest.raises(ConfigError, match="key.path=value"):
        _load(tmp_path, run_cfg, ["trainer.max_epochs"])
    with pytest.raises(ConfigError, match=r"trainer\.max_epochz"):
        _load(tmp_path, run_cfg, ["trainer.max_epochz=2"])


def test_parse_override_values():
    assert parse_override("a.b=3") == (["a", "b"], 3)
    assert parse_override("a=1e-4") == (["a"], 1e-4)
    assert parse_override("a=[1, 2]") == (["a"], [1, 2])
    assert parse_override("a=null") == (["a"], None)
    assert parse_override("a=bf16-mixed") == (["a"], "bf16-mixed")


class _StandinOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    ckpt_path: str
    n_steps: int = 4


@pytest.fixture
def standin_eval(monkeypatch):
    calls = []

    class StandinEval:
        def __init__(self, config, options):
            calls.append((config, options))

        def run(self):
            return {"ok": True}

    monkeypatch.setitem(eval_registry.EVALS, "StandinEval",
                        eval_registry.EvalSpec("StandinEval", StandinEval, _StandinOptions))
    return calls


def test_eval_block_validation(tmp_path, run_cfg, standin_eval):
    run_cfg["eval_class"] = "StandinEval"
    run_cfg["eval"] = {"ckpt_path": "no/such/export", "n_stepz": 3}
    with pytest.raises(ConfigError, match=r"eval\.n_stepz.*Did you mean 'n_steps'"):
        _load(tmp_path, run_cfg)
    # train mode does not need the checkpoint yet; eval mode does.
    run_cfg["eval"] = {"ckpt_path": "no/such/export"}
    assert _load(tmp_path, run_cfg)["eval"]["ckpt_path"].endswith("no/such/export")
    with pytest.raises(FileNotFoundError, match=r"eval\.ckpt_path"):
        _load(tmp_path, run_cfg, mode="eval")
    # ckpt_path defaults to the run's export folder
    run_cfg["eval"] = {}
    cfg = _load(tmp_path, run_cfg)
    assert cfg["eval"]["ckpt_path"] == str(tmp_path / "run" / "export")
    run_cfg["eval_class"] = "EvalQuantt"
    with pytest.raises(ConfigError, match="Did you mean 'EvalQuant'"):
        _load(tmp_path, run_cfg)


def test_eval_mode_needs_eval_block(tmp_path, run_cfg):
    with pytest.raises(ConfigError, match="'eval' block"):
        _load(tmp_path, run_cfg, mode="eval")


def test_yaml_errors_name_the_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model_name: [unclosed\n")
    with pytest.raises(ConfigError, match="bad.yaml"):
        load_config(bad)
    lst = tmp_path / "list.yaml"
    lst.write_text(yaml.safe_dump([1, 2]))
    with pytest.raises(ConfigTypeError, match="mapping"):
        load_config(lst)
    with pytest.raises(FileNotFoundError, match="absent.yaml"):
        load_config(tmp_path / "absent.yaml")


def test_augmentations_inline_file_and_errors(tmp_path, run_cfg):
    augs = [{"name": "gaussian_noise", "std": 0.05, "p": 0.5}]
    write_yaml(tmp_path / "cfg" / "augs.yaml", augs)
    run_cfg["augmentations"] = "augs.yaml"  # relative to the config file
    assert _load(tmp_path, run_cfg)["augmentations"] == augs
    run_cfg["augmentations"] = [{"name": "gausian_noise", "p": 0.5}]
    with pytest.raises(ConfigError, match="augmentations"):
        _load(tmp_path, run_cfg)
    run_cfg["augmentations"] = 3
    with pytest.raises(ConfigTypeError, match="augmentations"):
        _load(tmp_path, run_cfg)
