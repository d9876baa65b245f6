"""The preprocessing YAML: validation messages, path resolution, overrides."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from ephys_gpt.preprocessing.config import load_preprocess_config, parse_overrides

REPO = Path(__file__).resolve().parents[2]


def _write(tmp_path, cfg: dict) -> Path:
    (tmp_path / "raw").mkdir(exist_ok=True)
    path = tmp_path / "pre.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def test_relative_paths_resolve_against_the_yaml_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    path = _write(tmp_path, {"data_path": "raw", "save_folder": "out"})
    cfg = load_preprocess_config(path)
    assert cfg.data_path == tmp_path / "raw"
    assert cfg.stage1_dir == tmp_path / "out" / "stage1"
    assert cfg.chunks_dir == tmp_path / "out" / "chunks"
    assert list(cfg.preproc_config) == ["normalize", "clip"]  # defaults


def test_unknown_key_names_it_and_the_allowed_ones(tmp_path):
    path = _write(tmp_path, {"data_path": "raw", "chunk_secs": 5})
    with pytest.raises(ValueError) as err:
        load_preprocess_config(path)
    msg = str(err.value)
    assert str(path) in msg and "'chunk_secs'" in msg and "chunk_seconds" in msg
    assert "n_workers" in msg


def test_unknown_nested_key_names_the_block_keys(tmp_path):
    path = _write(tmp_path, {"data_path": "raw", "recipe": {"lowpass": 40}})
    with pytest.raises(ValueError, match=r"'recipe.lowpass'.*h_freq"):
        load_preprocess_config(path)


def test_wrong_type_names_key_expected_and_found(tmp_path):
    path = _write(tmp_path, {"data_path": "raw", "n_workers": "many"})
    with pytest.raises(ValueError) as err:
        load_preprocess_config(path)
    msg = str(err.value)
    assert "'n_workers'" in msg and "integer" in msg and "'many'" in msg and "str" in msg


def test_missing_data_path_is_named(tmp_path):
    path = _write(tmp_path, {"data_path": "nowhere"})
    with pytest.raises(FileNotFoundError, match="data_path .*nowhere"):
        load_preprocess_config(path)
    # stage 2 alone does not need the raw data
    assert load_preprocess_config(path, require_data=False).data_path == tmp_path / "nowhere"


def test_missing_yaml_and_missing_osl_config(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.yaml"):
        load_preprocess_config(tmp_path / "nope.yaml")
    path = _write(tmp_path, {"data_path": "raw", "osl_config": "recipe.yml"})
    with pytest.raises(FileNotFoundError, match="osl_config .*recipe.yml"):
        load_preprocess_config(path)


def test_stage2_steps_are_checked_and_keep_their_order(tmp_path):
    path = _write(tmp_path, {"data_path": "raw", "preproc_config": {
        "clip": {"std_factor": 4}, "normalize": {"method": "zscore"},
        "mulaw_quantize": {"n_bits": 6}}})
    cfg = load_preprocess_config(path)
    assert list(cfg.preproc_config) == ["clip", "normalize", "mulaw_quantize"]
    assert cfg.preproc_config["mulaw_quantize"] == {"n_bits": 6, "scale": None}
    for steps, pattern in [({"smooth": {}}, "unknown stage-2 step 'smooth'.*normalize"),
                           ({"mulaw_quantize": {}, "clip": {}}, "must be the last"),
                           ({"normalize": {"method": "minmax"}}, "robust"),
                           ({"clip": {"std": 3}}, "clip.*std")]:
        path = _write(tmp_path, {"data_path": "raw", "preproc_config": steps})
        with pytest.raises(ValueError, match=pattern):
            load_preprocess_config(path)


def test_overrides(tmp_path, monkeypatch):
    path = _write(tmp_path, {"data_path": "raw"})
    other = tmp_path / "elsewhere"
    other.mkdir()
    monkeypatch.chdir(tmp_path)
    cfg = load_preprocess_config(path, ["n_workers=3", "preproc_config.clip.std_factor=4.5",
                                        "data_path=elsewhere", "recipe.notch_freqs=[60, 120]"])
    assert cfg.n_workers == 3 and cfg.preproc_config["clip"]["std_factor"] == 4.5
    assert cfg.data_path == other  # command-line paths are relative to the current folder
    assert cfg.recipe.notch_freqs == [60.0, 120.0]
    with pytest.raises(ValueError, match="key=value"):
        parse_overrides(["n_workers"])
    with pytest.raises(ValueError, match="'bogus'"):
        load_preprocess_config(path, ["bogus=1"])


def test_repo_template_is_valid_and_machine_independent():
    path = REPO / "configs" / "local" / "preprocess.yaml"
    raw = yaml.safe_load(path.read_text())
    for key in ("data_path", "save_folder"):
        assert not Path(raw[key]).is_absolute()
    cfg = load_preprocess_config(path, require_data=False)
    assert cfg.data_path == REPO / "data" / "raw"
    assert list(cfg.preproc_config) == ["normalize", "clip", "mulaw_quantize"]
