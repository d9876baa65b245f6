"""The shipped LibriBrain config (configs/cnnlstm/train.yaml) trains and tests CNNLSTM on a
tiny folder in LibriBrain's on-disk layout, through the real pnpl reader, offline."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("pnpl", reason="needs the [libribrain] extra (pnpl)")
pytest.importorskip("h5py")

from tests.dataset.test_libribrain import TEST_KEY, TMAX, TMIN, TRAIN_KEY, VAL_KEY, write_run  # noqa: E402

CONFIG = Path(__file__).resolve().parents[2] / "configs" / "cnnlstm" / "train.yaml"

pytestmark = [pytest.mark.libribrain,
              pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning")]


def test_cnnlstm_config_trains_and_tests_on_libribrain_layout(tmp_path, monkeypatch):
    from ephys_gpt.training.experiment import ExperimentDL

    monkeypatch.setenv("PNPL_CACHE_DIR", str(tmp_path / "pnpl-cache"))
    root = tmp_path / "libribrain"
    for seed, key in enumerate((TRAIN_KEY, VAL_KEY, TEST_KEY)):
        write_run(root, key, seed)
    overrides = [
        f"datasplitter.dataset_root={root}", f"save_dir={tmp_path / 'run'}",
        f"datasplitter.train_runs=[[{','.join(TRAIN_KEY)}]]",
        f"datasplitter.tmin={TMIN}", f"datasplitter.tmax={TMAX}", "datasplitter.group_size=4",
        "dataloader.batch_size=4", "trainer.max_epochs=1", "trainer.limit_train_batches=2",
        "trainer.limit_val_batches=1", "trainer.accelerator=cpu",
        "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false",
    ]
    out = ExperimentDL(CONFIG, overrides).train()
    assert out["global_step"] == 2
    assert (tmp_path / "run" / "export" / "model.safetensors").is_file()
    ExperimentDL(CONFIG, overrides, mode="test").test()
    metrics = json.loads((tmp_path / "run" / "test_metrics.json").read_text())
    text = json.dumps(metrics).lower()
    for name in ("acc", "f1"):
        assert name in text, f"test metrics lack {name}: {metrics}"
