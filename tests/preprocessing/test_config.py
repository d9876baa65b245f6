"""The preprocessing YAML: validation messages, path resolution, overrides."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from ephys_gpt.configfile import parse_override
from ephys_gpt.preprocessing.config import load_preprocess_config

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
    with pytest.raises(ValueError, match="key.path=value"):
        parse_override("n_workers")
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


@pytest.mark.parametrize("recipe, needles", [
    # MNE would build a band-stop filter: refused, with both values and the fix
    ({"l_freq": 40, "h_freq": 1}, ["l_freq (40 Hz)", "h_freq (1 Hz)", "band-stop", "Swap"]),
    ({"l_freq": 10, "h_freq": 10}, ["l_freq (10 Hz)", "h_freq (10 Hz)", "empty"]),
    ({"l_freq": -1}, ["'recipe.l_freq'", "greater than or equal to 0", "-1"]),
    ({"h_freq": float("nan")}, ["'recipe.h_freq'", "finite", "nan"]),
    ({"h_freq": float("inf")}, ["'recipe.h_freq'", "finite", "inf"]),
    ({"notch_freqs": [50, -60]}, ["notch_freqs[1]", "> 0", "-60"]),
    ({"notch_freqs": [float("nan")]}, ["'recipe.notch_freqs.0'", "finite"]),
    # resampling to 60 Hz removes everything above 30 Hz: a 45 Hz low-pass edge is moot
    ({"sfreq": 60}, ["h_freq (45 Hz)", "Nyquist", "sfreq 60 Hz / 2 = 30 Hz", "raise sfreq above 90"]),
    ({"h_freq": None, "l_freq": 55}, ["l_freq (55 Hz)", "Nyquist", "50 Hz"]),
])
def test_recipe_filter_settings_are_refused(tmp_path, recipe, needles):
    path = _write(tmp_path, {"data_path": "raw", "recipe": recipe})
    with pytest.raises(ValueError) as err:
        load_preprocess_config(path)
    msg = str(err.value)
    assert str(path) in msg
    for needle in needles:
        assert needle in msg, (needle, msg)


def test_sensible_recipes_pass(tmp_path):
    for recipe in ({"l_freq": None, "h_freq": 40}, {"l_freq": 0.5, "h_freq": None},
                   {"l_freq": None, "h_freq": None, "notch_freqs": []},
                   {"sfreq": 250, "h_freq": 100, "notch_freqs": [60, 120, 180]}):
        cfg = load_preprocess_config(_write(tmp_path, {"data_path": "raw", "recipe": recipe}))
        assert cfg.recipe.h_freq == recipe["h_freq"]


def test_user_osl_recipe_with_a_reversed_band_is_refused_before_any_work(tmp_path):
    from ephys_gpt.preprocessing.stage1 import load_recipe

    osl = tmp_path / "recipe.yml"
    osl.write_text(yaml.safe_dump({"preproc": [
        {"notch_filter": {"freqs": [50]}},
        {"filter": {"l_freq": 45, "h_freq": 1, "method": "iir"}}]}))
    path = _write(tmp_path, {"data_path": "raw", "osl_config": "recipe.yml"})
    for load in (lambda: load_preprocess_config(path), lambda: load_recipe(osl)):
        with pytest.raises(ValueError) as err:
            load()
        msg = str(err.value)
        assert str(osl) in msg and "preproc step 1 (filter)" in msg
        assert "l_freq (45 Hz)" in msg and "band-stop" in msg
    # a band edge above the Nyquist frequency of a later resample step
    osl.write_text(yaml.safe_dump({"preproc": [
        {"filter": {"l_freq": 1, "h_freq": 80}}, {"resample": {"sfreq": 100}}]}))
    with pytest.raises(ValueError, match=r"preproc step 1 \(resample\) after the filter of step "
                                         r"0: h_freq \(80 Hz\) must be below the Nyquist"):
        load_recipe(osl)
    osl.write_text(yaml.safe_dump({"preproc": [
        {"filter": {"l_freq": 1, "h_freq": 45}}, {"resample": {"sfreq": 100}},
        {"notch_filter": {"freqs": 50}}]}))
    assert load_recipe(osl)["preproc"][0]["filter"]["h_freq"] == 45
