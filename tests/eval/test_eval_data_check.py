"""Eval refuses data made differently from the model's training data (issue 8, item 7): a
model exported from a 100 Hz 8-bit store meets a 50 Hz store, a 6-bit store, other channels."""

from __future__ import annotations

import pytest
import torch
from eval_token_store import write_token_store

from ephys_gpt.compatibility import DataMismatchError
from ephys_gpt.dataset.datasplitter import split_datasets
from ephys_gpt.eval.eval_quant import EvalQuant, EvalQuantOptions
from ephys_gpt.fileio import to_jsonable
from ephys_gpt.models.pretrained import save_pretrained
from ephys_gpt.models.registry import build_model
from ephys_gpt.training.experiment import dataset_info

TINY = {"num_channels": 3, "vocab_size": 256, "n_positions": 64, "d_model": 16, "n_layers": 1,
        "n_heads": 2}
SPLIT = {"dataset_class": "ChunkDataset", "example_seconds": 0.64, "val_ratio": 0.25,
         "test_ratio": 0.25, "seed": 0}


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    """Token stores: the training one (100 Hz, 8 bits), one like it with other sessions, and
    three made differently."""
    root = tmp_path_factory.mktemp("stores")
    out = {}
    for name, kw in {"train": {}, "same": {"seed": 10}, "50hz": {"sfreq": 50.0},
                     "6bit": {"n_bits": 6}, "train4": {"n_bits": 4}}.items():
        write_token_store(root / name, n_sessions=4, seconds=4.0, chunk_seconds=2.0,
                          **{"n_bits": 8, **kw})
        out[name] = root / name
    return out


@pytest.fixture(scope="module")
def exported(stores, tmp_path_factory):
    """A tiny GPT2MEG exported as ExperimentDL.export does: weights + the training data's
    description (dataset_info of the training split)."""
    splits = split_datasets(stores["train"], **SPLIT)
    torch.manual_seed(0)
    model = build_model("GPT2MEG", TINY).eval()
    out = tmp_path_factory.mktemp("run") / "export"
    save_pretrained(model, out, extra=to_jsonable(dataset_info(splits.train, "omega")))
    return out


def _runner(tmp_path, export, root) -> EvalQuant:
    config = {"save_dir": str(tmp_path), "dataset_name": "omega",
              "datasplitter": {"dataset_root": str(root), **SPLIT}}
    opts = EvalQuantOptions(ckpt_path=str(export), accelerator="cpu", progress=False,
                            out_dir=str(tmp_path / "evals"))
    return EvalQuant(config, opts)


def test_eval_on_a_50hz_store_is_refused(stores, exported, tmp_path):
    # before: ran and exited 0, scoring a 100 Hz model on 50 Hz data
    with pytest.raises(DataMismatchError, match=(
            rf"the model {exported} was trained on data with sampling rate 100 Hz, but "
            rf"datasplitter.dataset_root={stores['50hz']} has 50 Hz")):
        _runner(tmp_path, exported, stores["50hz"]).run()
    assert not (tmp_path / "evals").exists()  # refused before writing anything


def test_eval_on_a_6bit_store_is_refused(stores, exported, tmp_path):
    with pytest.raises(DataMismatchError, match=(
            rf"trained on data with mulaw_quantize n_bits 8, but datasplitter.dataset_root="
            rf"{stores['6bit']} has 6; .*mulaw_quantize mu 255, but .* has 63")):
        _runner(tmp_path, exported, stores["6bit"]).run()


def test_eval_of_a_checkpoint_checks_its_recorded_data_info(stores, exported, tmp_path):
    # a Lightning checkpoint records the same description under hyper_parameters.data_info
    from ephys_gpt.models.pretrained import load_export_config

    cfg = load_export_config(exported)
    model = build_model("GPT2MEG", TINY)
    ckpt = tmp_path / "best.ckpt"
    torch.save({"state_dict": {f"model.{k}": v for k, v in model.state_dict().items()},
                "hyper_parameters": {"model_name": "GPT2MEG", "model_config": TINY,
                                     "data_info": {k: cfg.get(k) for k in
                                                   ("sfreq", "ch_names", "ch_types", "steps")}}},
               ckpt)
    with pytest.raises(DataMismatchError, match=rf"the model {ckpt} was trained on data with "
                                                r"sampling rate 100 Hz, but .* has 50 Hz"):
        _runner(tmp_path, ckpt, stores["50hz"]).run()


def test_other_sessions_made_the_same_way_are_accepted(stores, exported, tmp_path):
    # other sessions: other normalization statistics, same rate, channels and step settings
    runner = _runner(tmp_path, exported, stores["same"])
    runner.setup()
    assert runner.sfreq == 100.0 and runner.vocab_size == 256


def test_splits_given_in_python_are_named_by_their_folder(stores, exported, tmp_path):
    splits = split_datasets(stores["train4"], **SPLIT)
    opts = EvalQuantOptions(ckpt_path=str(exported), accelerator="cpu", progress=False,
                            out_dir=str(tmp_path / "evals"))
    with pytest.raises(DataMismatchError, match=rf"but the test data \({stores['train4']}\) "
                                                r"has 4"):
        EvalQuant({"save_dir": str(tmp_path)}, opts, splits=splits).run()
