"""Every YAML under configs/ loads and validates; the shipped run configs really train.

- run configs (a ``model_name`` key): validated fully by ``load_config`` (eval configs in eval
  mode), with the dataset root (and checkpoint) pointed at synthetic stand-ins;
- model YAMLs (referenced by a run config's ``model_config``): checked against the model's
  ``config_class``;
- preprocessing configs: checked by the preprocessing loader;
- anything else fails, so a new kind of YAML gets a check here.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import yaml

from ephys_gpt.models.registry import get_model_spec
from ephys_gpt.training.config import load_config, read_yaml

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs").rglob("*.yaml"))
RUN = [p for p in CONFIGS if isinstance(read_yaml(p), dict) and "model_name" in read_yaml(p)]
PREPROCESS = [p for p in CONFIGS if p not in RUN and "preproc_config" in (read_yaml(p) or {})]
TOKENIZER = [p for p in CONFIGS if p not in RUN and "tokenizer" in (read_yaml(p) or {})]
IDS = lambda paths: [str(p.relative_to(ROOT / "configs")) for p in paths]  # noqa: E731


def _model_yamls() -> dict[Path, str]:
    """model YAML path → model name, from the run configs that reference them."""
    out = {}
    for p in RUN:
        raw = read_yaml(p)
        if isinstance(raw.get("model_config"), str):
            out[(p.parent / raw["model_config"]).resolve()] = raw["model_name"]
    return out


MODEL_YAMLS = _model_yamls()


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    """Tiny token and continuous chunk stores (2 channels, 3 sessions)."""
    from ephys_gpt.codec import mulaw_quantize
    from ephys_gpt.store import write_session

    rng = np.random.default_rng(0)
    out = {}
    for kind in ("tokens", "continuous"):
        root = tmp_path_factory.mktemp(kind) / "chunks"
        for s in range(3):
            x = np.clip(rng.standard_normal((2, 300)) * 0.3, -1, 1).astype(np.float32)
            steps = [{"name": "mulaw_quantize", "n_bits": 8, "mu": 255, "scale": 1.0}]
            write_session(root, f"sub-{s}", [mulaw_quantize(x, 8) if kind == "tokens" else x], {
                "sfreq": 100.0, "ch_names": ["MEG1", "MEG2"], "ch_types": ["mag", "mag"],
                "pos_2d": [[0.0, 0.0], [1.0, 0.0]], "chunk_samples": 300,
                "steps": steps if kind == "tokens" else []})
        out[kind] = root
    return out


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    """A tiny exported VideoGPTTokenizer (16 x 16 images → 4 x 4 codes, 2 samples per latent
    frame), standing in for the tokenizer_path of models over a tokenizer's codes."""
    import torch

    from ephys_gpt.models.pretrained import save_pretrained
    from ephys_gpt.models.registry import build_model

    torch.manual_seed(0)
    tok = build_model("VideoGPTTokenizer", {
        "hidden": 16, "n_res_layers": 1, "n_heads": 2, "downsample": [2, 4, 4], "embed_dim": 8,
        "codebook_size": 16, "groups": 4, "image_size": [16, 16]})
    return save_pretrained(tok, tmp_path_factory.mktemp("tokenizer") / "export")


def _model_config(path: Path, raw: dict) -> dict:
    value = raw.get("model_config")
    return (read_yaml(path.parent / value) or {}) if isinstance(value, str) else (value or {})


def _overrides(path: Path, raw: dict, stores: dict, tmp_path: Path, tokenizer: Path
               ) -> list[str]:
    spec = get_model_spec(raw["model_name"])
    ov = [f"save_dir={tmp_path / 'run'}"]
    if "tokenizer_path" in _model_config(path, raw):
        ov.append(f"model_config.tokenizer_path={tokenizer}")
    if raw.get("dataset_name", "omega") != "libribrain":
        kind = "tokens" if spec.input_kind in ("tokens", "image_tokens") else "continuous"
        ov.append(f"datasplitter.dataset_root={stores[kind]}")
    if raw.get("eval") is not None:
        (tmp_path / "export").mkdir(exist_ok=True)
        ov.append(f"eval.ckpt_path={tmp_path / 'export'}")
    return ov


def test_every_yaml_is_checked():
    known = set(RUN) | set(PREPROCESS) | set(TOKENIZER) | {
        p for p in CONFIGS if p.resolve() in MODEL_YAMLS}
    unchecked = [str(p) for p in CONFIGS if p not in known]
    assert not unchecked, f"YAML files no test validates: {unchecked}"
    assert len(RUN) >= 6  # gpt2meg, stgpt2meg, wavenetfullchannel: train + eval each


@pytest.mark.parametrize("path", RUN, ids=IDS(RUN))
def test_run_config_validates(path, stores, tmp_path, tokenizer):
    raw = read_yaml(path)
    mode = "eval" if raw.get("eval") is not None else "train"
    cfg = load_config(path, _overrides(path, raw, stores, tmp_path, tokenizer), mode=mode)
    assert cfg["model_name"] == raw["model_name"]
    # no machine-specific paths: everything the file names is relative
    for key in ("save_dir", "model_config", "resume_from", "augmentations"):
        if isinstance(raw.get(key), str) and raw[key] != "last":
            assert not Path(raw[key]).is_absolute(), f"{path}: {key} is an absolute path"
    tok = _model_config(path, raw).get("tokenizer_path")
    assert not (isinstance(tok, str) and Path(tok).is_absolute()), f"{path}: tokenizer_path"
    for block, key in (("datasplitter", "dataset_root"), ("eval", "ckpt_path")):
        value = (raw.get(block) or {}).get(key)
        if isinstance(value, str):
            assert not Path(value).is_absolute(), f"{path}: {block}.{key} is an absolute path"


@pytest.mark.parametrize("path", sorted(MODEL_YAMLS), ids=IDS(sorted(MODEL_YAMLS)))
def test_model_yaml_matches_config_class(path, tokenizer):
    spec = get_model_spec(MODEL_YAMLS[path])
    cfg = yaml.safe_load(path.read_text()) or {}
    if "tokenizer_path" in cfg:  # an exported tokenizer (made by another config) stands in
        cfg["tokenizer_path"] = str(tokenizer)
    assert spec.config_class is not None
    allowed = {f.name for f in dataclasses.fields(spec.config_class)}
    assert set(cfg) <= allowed, f"{path}: unknown keys {sorted(set(cfg) - allowed)}"
    spec.config_class(**{**cfg, **{k: v for k, v in (spec.tiny_config or {}).items()
                                   if k in ("num_channels", "vocab_size") and k not in cfg}})


@pytest.mark.parametrize("path", PREPROCESS, ids=IDS(PREPROCESS))
def test_preprocess_config_validates(path, tmp_path):
    from ephys_gpt.preprocessing.config import load_preprocess_config

    (tmp_path / "raw").mkdir()
    load_preprocess_config(path, [f"data_path={tmp_path / 'raw'}",
                                  f"save_folder={tmp_path / 'out'}"])


@pytest.mark.parametrize("path", TOKENIZER, ids=IDS(TOKENIZER))
def test_tokenizer_config_validates(path, stores, tmp_path):
    from ephys_gpt.tokenizers.commands import load_tokenizer_config

    raw = read_yaml(path)
    cfg = load_tokenizer_config(path, [f"datasplitter.dataset_root={stores['continuous']}",
                                       f"save_dir={tmp_path / 'tok'}"])
    assert cfg["tokenizer"] == raw["tokenizer"]
    for value in (raw.get("save_dir"), (raw.get("datasplitter") or {}).get("dataset_root")):
        assert not (isinstance(value, str) and Path(value).is_absolute()), f"{path}: absolute path"


TRAIN = [p for p in RUN if read_yaml(p).get("eval") is None
         and read_yaml(p).get("dataset_name", "omega") != "libribrain"]


@pytest.mark.parametrize("path", TRAIN, ids=IDS(TRAIN))
@pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning")
def test_train_config_trains_one_step(path, stores, tmp_path, tokenizer):
    """The shipped model/optimizer settings really train (on a 2-channel store, one step)."""
    from ephys_gpt.training.experiment import ExperimentDL

    raw = read_yaml(path)
    ov = _overrides(path, raw, stores, tmp_path, tokenizer) + [
        "trainer.max_epochs=1", "trainer.limit_train_batches=1", "trainer.limit_val_batches=1",
        "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false",
        "trainer.accelerator=cpu", "datasplitter.val_ratio=0.34", "datasplitter.test_ratio=0.34",
        "dataloader.num_workers=0"]
    out = ExperimentDL(path, ov).train()
    assert out["global_step"] == 1
    assert (tmp_path / "run" / "export" / "model.safetensors").is_file()


EVAL = [p for p in RUN if read_yaml(p).get("eval") is not None
        and (p.parent / "train.yaml").is_file()]


@pytest.mark.parametrize("path", EVAL, ids=IDS(EVAL))
@pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning")
def test_eval_config_runs_after_training(path, stores, tmp_path, tokenizer):
    """train.yaml then eval.yaml of the same folder, end to end through the CLI."""
    from ephys_gpt.cli import main as cli_main

    raw = read_yaml(path)
    kind = "tokens" if get_model_spec(raw["model_name"]).input_kind == "tokens" else "continuous"
    common = [f"save_dir={tmp_path / 'run'}", f"datasplitter.dataset_root={stores[kind]}",
              "datasplitter.val_ratio=0.34", "datasplitter.test_ratio=0.34"]
    if "tokenizer_path" in _model_config(path, raw):
        common.append(f"model_config.tokenizer_path={tokenizer}")
    assert cli_main(["train", "--args", str(path.parent / "train.yaml"), *common,
                     "trainer.max_epochs=1", "trainer.limit_train_batches=2",
                     "trainer.limit_val_batches=1", "trainer.accelerator=cpu",
                     "trainer.enable_progress_bar=false"]) == 0
    assert cli_main(["eval", "--args", str(path), *common,
                     f"eval.ckpt_path={tmp_path / 'run' / 'export'}", "eval.max_batches=1",
                     "eval.batch_size=2", "eval.future_steps=4", "eval.gen_seconds=1.0",
                     "eval.psd_windows=2", "eval.psd_seconds=0.5", "eval.progress=false",
                     "eval.accelerator=cpu"]) == 0
    assert (tmp_path / "run" / "evals" / raw.get("eval_class", "EvalQuant")).is_dir()
