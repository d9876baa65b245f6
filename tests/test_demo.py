"""`ephys-gpt demo --quick` end to end: simulate → stage 1 → stage 2 → train → EvalQuant."""

from __future__ import annotations

import json

import mne
import pytest
import yaml

from ephys_gpt._optional import require
from ephys_gpt.cli import build_parser, main
from ephys_gpt.demo import FULL, QUICK, preprocess_config, run_config


def _has_osl() -> bool:
    try:
        require("osl_ephys")
    except ImportError:
        return False
    return True




@pytest.mark.preprocess
@pytest.mark.skipif(not _has_osl(), reason="needs the [preprocess] extra (osl-ephys)")
def test_demo_quick_end_to_end_and_resume(tmp_path):
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--quick", "--no-progress"]) == 0

    # the configs users can re-run, written where the pipeline read them
    run = yaml.safe_load((out / "run.yaml").read_text())
    assert run["model_name"] == "GPT2MEG" and run["eval_class"] == "EvalQuant"
    assert yaml.safe_load((out / "preprocess.yaml").read_text())["preproc_config"][
        "mulaw_quantize"] == {"n_bits": QUICK.n_bits}
    assert sorted(p.name for p in (out / "raw").glob("sub-*")) == ["sub-01", "sub-02"]
    assert len(list((out / "preprocessed" / "chunks").glob("*/meta.json"))) == 4
    assert (out / "train" / "export" / "model.safetensors").is_file()

    summary = json.loads((out / "demo_summary.json").read_text())
    assert summary["mode"] == "quick" and summary["skipped_stages"] == []
    acc = summary["next_step_accuracy"]
    linear = set(summary["beats_linear"])
    assert {n.split("(")[0] for n in linear} == {"AR", "VAR"}
    assert set(acc) == {"GPT2MEG", "repeat-last", "unigram", *linear}
    assert all(0.0 <= v <= 1.0 for v in acc.values())
    assert set(summary["alpha_peak_hz"]) == {"mag"}
    nll = summary["next_step_nll_nats"]  # the model's and each linear token distribution's
    assert {k for k in linear if k.endswith("token distribution")} <= set(nll)
    assert all(v > 0 for v in nll.values()) and "GPT2MEG" in nll

    text = (out / "report.md").read_text()
    assert text.startswith("# ephys-gpt demo")
    for needle in ["Next-step accuracy on held-out data", "| repeat-last |", "| unigram |",
                   "Against linear models fitted by least squares", "By likelihood GPT2MEG",
                   "| NLL (nats/token) |",
                   "alpha peak generated", "](train/evals/EvalQuant/psd.png)"]:
        assert needle in text, needle
    ev = out / "train" / "evals" / "EvalQuant"
    for name in ["summary.json", "report.md", "nstep_accuracy.npy", "nstep_accuracy.json",
                 "psd.png", "psd.pdf", "history_sweep.pdf"]:
        assert (ev / name).is_file(), name
    raw = mne.io.read_raw_fif(ev / "generated_raw.fif", verbose=False)
    assert raw.info["sfreq"] == QUICK.sfreq
    assert len(raw.ch_names) == 102 and set(raw.get_channel_types()) == {"mag"}
    assert raw.n_times == int(QUICK.eval["gen_seconds"] * QUICK.sfreq)

    # a re-run skips the finished stages and evaluates again
    first_eval = (ev / "summary.json").stat().st_mtime_ns
    assert main(["demo", "--out", str(out), "--quick", "--no-progress"]) == 0
    again = json.loads((out / "demo_summary.json").read_text())
    assert again["skipped_stages"] == ["simulate", "preprocess", "train"]
    assert set(again["timings_seconds"]) == {"eval", "total"}
    assert (ev / "summary.json").stat().st_mtime_ns > first_eval
    assert again["next_step_accuracy"] == summary["next_step_accuracy"]  # same seed, same model

    # changed training settings retrain into the demo's own (occupied) run folder: the
    # previous run is replaced, a file of the user's there is kept
    (out / "train" / "my_notes.md").write_text("mine")
    stamp = out / ".stages" / "train.json"
    recorded = json.loads(stamp.read_text())
    recorded["settings"]["steps"] = -1  # as if the plan had changed since
    stamp.write_text(json.dumps(recorded))
    assert main(["demo", "--out", str(out), "--quick", "--no-progress"]) == 0
    third = json.loads((out / "demo_summary.json").read_text())
    assert third["skipped_stages"] == ["simulate", "preprocess"]
    assert (out / "train" / "my_notes.md").read_text() == "mine"
    assert len(list((out / "train" / "logs" / "csv").glob("version_*"))) == 1


def test_demo_configs_are_valid_run_configs(tmp_path):
    """The YAML the full demo writes passes the run-config validator (without running it)."""
    from ephys_gpt.training.config import load_config

    (tmp_path / "preprocessed" / "chunks").mkdir(parents=True)
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(run_config(FULL, progress=False)))
    cfg = load_config(path, mode="train")
    assert cfg["eval"]["future_steps"] == FULL.eval["future_steps"]
    assert cfg["eval"]["ckpt_path"] == str(tmp_path / "train" / "export")
    assert cfg["datasplitter"]["split_by"] == "subject"
    pre = preprocess_config(FULL)
    assert pre["recipe"]["sfreq"] == FULL.sfreq and pre["picks"] == FULL.picks


def test_demo_command_line():
    args = build_parser().parse_args(["demo", "--quick", "--force"])
    assert args.quick and args.force and args.out == "runs/demo"


@pytest.mark.parametrize("plan", [FULL, QUICK], ids=["full", "quick"])
def test_demo_context_is_one_training_window(plan):
    """Every GPT2MEG position the demo generates with is trained: n_positions == window."""
    assert plan.model["n_positions"] == round(plan.example_seconds * plan.sfreq)


def test_demo_plan_rejects_untrained_positions():
    from ephys_gpt.demo import DemoPlan

    with pytest.raises(ValueError, match="n_positions"):
        DemoPlan(example_seconds=1.0, model={"n_positions": 128, "d_model": 16,
                                             "n_layers": 1, "n_heads": 2})
