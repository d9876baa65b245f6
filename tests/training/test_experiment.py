"""End to end: chunk store → train → checkpoints → resume → test → export → reload."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from training_helpers import N_BITS, N_CH, write_yaml

from ephys_gpt.models.loading import load_model, read_checkpoint
from ephys_gpt.models.pretrained import from_pretrained
from ephys_gpt.training.config import ConfigError, load_config
from ephys_gpt.training.experiment import ExperimentDL

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning")


def test_train_resume_test_export(tmp_path, run_cfg):
    path = write_yaml(tmp_path / "train.yaml", run_cfg)
    exp = ExperimentDL(str(path))
    # num_channels and vocab_size were taken from the data
    assert exp.config["model_config"]["num_channels"] == N_CH
    assert exp.config["model_config"]["vocab_size"] == 2**N_BITS
    out = exp.train()
    save = tmp_path / "run"
    assert out["global_step"] == 3  # limit_train_batches=3, one epoch
    assert (save / "checkpoints" / "best.ckpt").is_file()
    assert (save / "checkpoints" / "last.ckpt").is_file()
    assert out["export"] == str(save / "export")
    metrics_csv = next((save / "logs" / "csv").glob("version_*/metrics.csv")).read_text()
    assert "train/loss_step" in metrics_csv and "val/loss" in metrics_csv and "val/acc" in metrics_csv
    assert any((save / "logs" / "tensorboard").rglob("events.out.tfevents.*"))

    # the resolved config is saved and loads again unchanged
    saved = yaml.safe_load((save / "config.yaml").read_text())
    assert saved["model_config"]["num_channels"] == N_CH
    assert load_config(save / "config.yaml") == exp.config

    # checkpoints hold only tensors and plain values
    ckpt = torch.load(save / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 3
    assert ckpt["hyper_parameters"]["model_name"] == "GPT2MEG"
    assert ckpt["hyper_parameters"]["data_info"]["sfreq"] == 100.0

    # resume continues from last.ckpt: the step counter goes on, it does not restart
    exp2 = ExperimentDL(str(path), ["resume_from=last", "trainer.max_epochs=2"])
    assert exp2.resume_path() == str(save / "checkpoints" / "last.ckpt")
    out2 = exp2.train()
    assert out2["global_step"] == 6
    assert read_checkpoint(save / "checkpoints" / "last.ckpt")["global_step"] == 6
    assert read_checkpoint(save / "checkpoints" / "last.ckpt")["epoch"] == 1

    # test writes metrics
    metrics = ExperimentDL(str(path), mode="test").test()
    written = json.loads((save / "test_metrics.json").read_text())
    assert written["metrics"] == pytest.approx(metrics)
    assert written["checkpoint"].endswith("best.ckpt")
    assert 0.0 < metrics["test/loss"] < 10.0 and 0.0 <= metrics["test/acc"] <= 1.0
    assert metrics["test/top5_acc"] >= metrics["test/acc"]

    # export == best checkpoint; from_pretrained and load_model agree exactly
    exported = from_pretrained(save / "export")
    from_ckpt, info = load_model(save / "checkpoints" / "best.ckpt")
    from_dir, info_dir = load_model(save)
    x = exported.example_inputs(batch_size=2)
    with torch.no_grad():
        ref = exported(x).prediction
        assert torch.equal(ref, from_ckpt(x).prediction) and torch.equal(ref, from_dir(x).prediction)
    for inf in (info, info_dir):
        assert inf["sfreq"] == 100.0 and len(inf["ch_names"]) == N_CH
        assert inf["steps"][-1]["name"] == "mulaw_quantize"
        assert inf["config"]["model_name"] == "GPT2MEG"


def test_resume_last_without_checkpoint_starts_fresh(tmp_path, run_cfg):
    run_cfg["resume_from"] = "last"
    run_cfg["trainer"]["limit_train_batches"] = 1
    run_cfg["trainer"]["limit_val_batches"] = 0
    exp = ExperimentDL(run_cfg)
    assert exp.resume_path() is None
    out = exp.train()
    assert out["global_step"] == 1
    # without validation, "best" is the latest checkpoint
    assert out["best"] and out["last"]


def test_bf16_mixed_precision_run(tmp_path, run_cfg):
    run_cfg["trainer"].update(precision="bf16-mixed", limit_train_batches=2, limit_val_batches=1)
    exp = ExperimentDL(run_cfg)
    exp.train()
    logged = exp.trainer.callback_metrics
    assert torch.isfinite(logged["train/loss_epoch"]) and torch.isfinite(logged["val/loss"])


def test_model_config_contradicting_data(tmp_path, run_cfg):
    run_cfg["model_config"]["num_channels"] = N_CH + 1
    with pytest.raises(ConfigError, match=r"model_config\.num_channels.*3 channels"):
        ExperimentDL(run_cfg)
    run_cfg["model_config"]["num_channels"] = N_CH
    run_cfg["model_config"]["vocab_size"] = 4
    with pytest.raises(ConfigError, match=r"model_config\.vocab_size"):
        ExperimentDL(run_cfg)


def test_load_model_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_model(tmp_path / "nothing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="neither"):
        load_model(tmp_path / "empty")
    bad = tmp_path / "bad.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": {}}, bad)
    with pytest.raises(ValueError, match="model_name"):
        load_model(bad)


def test_mixup_continuous_model(tmp_path, run_cfg, tmp_path_factory):
    from training_helpers import make_store

    store = make_store(tmp_path_factory.mktemp("cont") / "chunks", tokens=False)
    run_cfg.update(model_name="CNNMultivariate", loss_name="MSE", loss={},
                   model_config={"hidden_channels": 8, "n_layers": 2, "kernel_size": 2})
    run_cfg["datasplitter"].update(dataset_root=str(store),
                                   dataset_class="ChunkDatasetForecastCont")
    run_cfg["dataloader"]["mixup"] = {"alpha": 0.4}
    exp = ExperimentDL(run_cfg)
    loader = exp._loader(exp.splits.train, train=True)
    assert type(loader.collate_fn.collate).__name__ == "MixupCollate"  # keyed mixup (resume)
    out = exp.train()
    assert out["global_step"] == 3
    assert torch.isfinite(exp.trainer.callback_metrics["val/loss"])
    assert "val/acc" not in exp.trainer.callback_metrics  # no token metrics for MSE models


def test_mixup_quantized_feeds_token_model(tmp_path, run_cfg, tmp_path_factory):
    from training_helpers import make_store

    store = make_store(tmp_path_factory.mktemp("cont") / "chunks", tokens=False)
    run_cfg["datasplitter"].update(dataset_root=str(store),
                                   dataset_class="ChunkDatasetForecastCont")
    with pytest.raises(ConfigError, match="'tokens'.*'continuous'"):
        ExperimentDL(run_cfg)
    run_cfg["dataloader"]["mixup"] = {"alpha": 0.4, "quantize_bits": 5}
    exp = ExperimentDL(run_cfg)
    assert exp.config["model_config"]["vocab_size"] == 32
    assert exp.data_info["steps"][-1] == {"name": "mulaw_quantize", "n_bits": 5, "mu": 31,
                                          "scale": 1.0, "scale_from": "config"}
    assert exp.train()["global_step"] == 3
    _, info = load_model(tmp_path / "run" / "export")
    assert info["steps"][-1]["n_bits"] == 5


def test_warns_when_positions_outgrow_training_window(run_cfg, monkeypatch):
    """Positions past the training window are never trained; generation would use them."""
    from ephys_gpt.training import experiment

    said = []
    monkeypatch.setattr(experiment.logger, "warning", lambda msg, *a: said.append(msg % a))
    window = ExperimentDL(run_cfg).splits.train.window_samples
    assert run_cfg["model_config"]["n_positions"] > window
    ExperimentDL(run_cfg)
    assert any("n_positions is 32" in m and f"{window} samples" in m for m in said), said
    said.clear()
    run_cfg["model_config"]["n_positions"] = window
    ExperimentDL(run_cfg)
    assert not any("n_positions" in m for m in said), said
