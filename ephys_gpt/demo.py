"""``ephys-gpt demo``: the whole pipeline on simulated MEG, end to end, on a laptop CPU.

simulate (osl-ephys MVAR template, 4 subjects x 2 sessions) → stage 1 (osl-ephys: filter,
notch, resample, bad segments/channels) → stage 2 (normalize, clip, mu-law tokens) → train a
small GPT2MEG (a fixed step budget) → EvalQuant (next-step accuracy vs baselines, N-step
curves, free-running generation compared by PSD and covariance) → ``<out>/report.md``.

It drives the pipeline through the command line functions (``ephys_gpt.cli.main``) with the
YAML files it writes into ``<out>/``, so it exercises exactly what users run, and the written
configs are a starting point for one's own runs::

    <out>/raw/                      simulated .fif sessions (BIDS-like)
    <out>/preprocess.yaml           stage 1 + 2 config
    <out>/preprocessed/stage1/      *_preproc-raw.fif
    <out>/preprocessed/chunks/      the chunk store (mu-law tokens)
    <out>/run.yaml                  training + eval config
    <out>/train/                    checkpoints, logs, export/, evals/EvalQuant/
    <out>/report.md                 what was done and the key figures
    <out>/demo_summary.json

A re-run skips stages whose outputs are complete (and made with the same settings) unless
``--force``; evaluation always runs again. When training must run again (``--force`` or a
changed plan), the demo replaces its own run in ``<out>/train`` (``train --overwrite``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ephys_gpt.eval import report as report_io
from ephys_gpt.fileio import to_jsonable

logger = logging.getLogger(__name__)

STAMP_DIR = ".stages"


@dataclass(frozen=True)
class DemoPlan:
    """Sizes and settings of one demo run (``FULL`` and ``QUICK`` below).

    The full plan is tuned so the whole demo takes well under 15 minutes on a 2-core CPU
    while GPT2MEG still has enough data and steps to beat the baselines.
    """

    subjects: int = 4               # simulated subjects (split by subject: 2 train, 1 val, 1 test)
    sessions: int = 2               # sessions per subject
    seconds: float = 150.0          # seconds per session (150 Hz template)
    seed: int = 0
    sfreq: float = 100.0            # stage-1 resampling rate (Hz)
    picks: str = "mag"              # stage-2 channels (magnetometers: 102 sensors)
    n_bits: int = 6                 # mu-law bits (vocabulary 64): coarser tokens that a small
                                    # model learns within the CPU budget (8 bits: no alpha)
    example_seconds: float = 1.0    # training window
    split_by: str = "subject"       # held-out data from unseen subjects (session: unseen sessions)
    model: dict = field(default_factory=lambda: {
        "n_positions": 100, "d_model": 64, "n_layers": 2, "n_heads": 4, "dropout": 0.0,
        "time_conv": 32,            # a causal conv over each channel's last 32 embeddings:
                                    # the signed AR-like filter attention learns slowly
        "linear_order": 30, "linear_fit": True, "linear_select": True})
                                    # a VAR (order <= 30, chosen on validation) fitted on the
                                    # training split, its forecast added to the logits
    steps: int = 1000               # optimizer steps in total
    batch_size: int = 2             # windows per step (x channels sequences)
    lr: float = 6e-3
    warmup_steps: int = 20
    precision: str = "bf16-mixed"   # CPU AMX bf16 matmuls; "32-true" for full precision
    val_batches: int = 8
    eval: dict = field(default_factory=lambda: {
        "batch_size": 8, "max_batches": 8, "future_steps": 20, "gen_seconds": 20.0,
        "gen_sampling": "top_p", "top_p": 0.98, "temperature": 1.0, "psd_windows": 64,
        "psd_seconds": 1.0, "psd_fmax": 45.0, "precision": "32"})

    def __post_init__(self):
        # GPT2MEG learns one position embedding per context slot from the training windows
        # only: slots past the window length keep their random initialization, and generation
        # (which fills the whole context before sliding) would run on them — that made the
        # free-running signal drift with twice the real amplitude. So the context is exactly
        # one training window.
        window = round(self.example_seconds * self.sfreq)
        if self.model.get("n_positions") != window:
            raise ValueError(f"DemoPlan: model n_positions ({self.model.get('n_positions')}) "
                             f"must equal the training window (example_seconds × sfreq = "
                             f"{window} samples), or the extra positions are never trained")

    def stage_key(self, stage: str) -> dict:
        """The settings a stage's output depends on (a changed value re-runs the stage)."""
        d = dataclasses.asdict(self)
        keys = {"simulate": ["subjects", "sessions", "seconds", "seed"],
                "preprocess": ["subjects", "sessions", "seconds", "seed", "sfreq", "picks",
                               "n_bits"],
                "train": [k for k in d if k != "eval"]}[stage]
        return {k: d[k] for k in keys}


FULL = DemoPlan()
QUICK = DemoPlan(subjects=2, sessions=2, seconds=24.0, split_by="session", steps=6, batch_size=1,
                 warmup_steps=2, val_batches=2,
                 model={"n_positions": 50, "d_model": 16, "n_layers": 1, "n_heads": 2,
                        "linear_order": 5, "linear_fit": True, "linear_select": True},
                 example_seconds=0.5,
                 eval={"batch_size": 2, "max_batches": 1, "future_steps": 4, "gen_seconds": 1.0,
                       "gen_sampling": "top_p", "top_p": 0.98, "psd_windows": 8,
                       "psd_seconds": 0.5, "history_lengths": [1, 49]})


# -- stages ----------------------------------------------------------------------------------


def _cli(argv: list[str], verbosity: list[str]) -> None:
    """Run one ``ephys-gpt`` command; a non-zero exit code stops the demo."""
    from ephys_gpt.cli import main

    logger.info("$ ephys-gpt %s", " ".join(argv))
    code = main([*verbosity, *argv])
    if code != 0:
        raise RuntimeError(f"`ephys-gpt {' '.join(argv)}` failed with exit code {code} "
                           "(see the messages above)")


def _stamp_path(out: Path, stage: str) -> Path:
    return out / STAMP_DIR / f"{stage}.json"


def _is_done(out: Path, stage: str, key: dict, outputs: list[Path]) -> bool:
    stamp = _stamp_path(out, stage)
    if not stamp.is_file() or not all(p.exists() for p in outputs):
        return False
    try:
        return json.loads(stamp.read_text()).get("settings") == to_jsonable(key)
    except (json.JSONDecodeError, OSError):
        return False


def _mark_done(out: Path, stage: str, key: dict, seconds: float) -> None:
    report_io.write_json(_stamp_path(out, stage), {"settings": key, "seconds": seconds})


def _write_yaml(path: Path, obj: dict, header: str) -> Path:
    text = header.rstrip() + "\n" + yaml.safe_dump(to_jsonable(obj), sort_keys=False)
    return report_io.write_text(path, text)


def preprocess_config(plan: DemoPlan) -> dict:
    """The preprocessing YAML (paths relative to the demo folder)."""
    return {
        "data_path": "raw",
        "save_folder": "preprocessed",
        "dataset": "auto",
        "osl_config": None,
        "recipe": {"l_freq": 1.0, "h_freq": 45.0, "notch_freqs": [50.0], "sfreq": plan.sfreq,
                   "detect_bad_segments": True, "detect_bad_channels": True},
        "gen_report": False,
        "n_workers": 1,
        "chunk_seconds": 10,
        "picks": plan.picks,
        "preproc_config": {"normalize": {"method": "robust"}, "clip": {"std_factor": 6},
                           "mulaw_quantize": {"n_bits": plan.n_bits}},
    }


def run_config(plan: DemoPlan, progress: bool) -> dict:
    """The training + evaluation YAML (paths relative to the demo folder)."""
    val_every = max(1, plan.steps // 4)
    return {
        "model_name": "GPT2MEG",
        "model_config": dict(plan.model),
        "loss_name": "CrossEntropy",
        "dataset_name": "omega",
        "datasplitter": {"dataset_root": "preprocessed/chunks", "dataset_class": "ChunkDataset",
                         "example_seconds": plan.example_seconds, "split_by": plan.split_by,
                         "val_ratio": 0.25, "test_ratio": 0.25, "seed": plan.seed},
        "dataloader": {"batch_size": plan.batch_size, "num_workers": 0},
        "lightning": {"lr": plan.lr, "warmup_steps": plan.warmup_steps, "scheduler": "cosine",
                      "total_steps": plan.steps},
        # exactly plan.steps optimizer steps, however many epochs that is; validation (and
        # the best checkpoint) every quarter of the budget, the last one at the final step
        "trainer": {"accelerator": "cpu", "devices": 1, "precision": plan.precision,
                    "max_steps": plan.steps, "max_epochs": -1,
                    "val_check_interval": val_every, "check_val_every_n_epoch": None,
                    "limit_val_batches": plan.val_batches, "gradient_clip_val": 1.0,
                    "log_every_n_steps": max(1, min(25, val_every)),
                    "enable_progress_bar": progress, "enable_model_summary": False},
        "save_dir": "train",
        "seed": plan.seed,
        "eval_class": "EvalQuant",
        "eval": {"ckpt_path": "train/export", "accelerator": "cpu", "seed": plan.seed,
                 "progress": progress, **plan.eval},
    }


def run_demo(out: str | os.PathLike = "runs/demo", *, quick: bool = False, force: bool = False,
             progress: bool = True, verbosity: list[str] | None = None) -> dict[str, Any]:
    """Run (or resume) the demo into ``out`` and return its summary (also written as JSON)."""
    plan = QUICK if quick else FULL
    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    verbosity = list(verbosity or [])
    no_progress = [] if progress else ["--no-progress"]
    timings: dict[str, float] = {}
    skipped: list[str] = []
    t_all = time.perf_counter()
    logger.info("ephys-gpt demo (%s) into %s", "quick" if quick else "full", out)

    # 1. simulate
    raw = out / "raw"
    key = plan.stage_key("simulate")
    if not force and _is_done(out, "simulate", key, [raw / "dataset_description.json"]):
        skipped.append("simulate")
        logger.info("simulation: already done (%s), skipping", raw)
    else:
        for stage in ("simulate", "preprocess", "train"):
            _stamp_path(out, stage).unlink(missing_ok=True)
        if raw.exists():
            shutil.rmtree(raw)
        t = time.perf_counter()
        _cli(["simulate", "--out", str(raw), "--subjects", str(plan.subjects), "--sessions",
              str(plan.sessions), "--seconds", str(plan.seconds), "--seed", str(plan.seed),
              *no_progress], verbosity)
        timings["simulate"] = time.perf_counter() - t
        _mark_done(out, "simulate", key, timings["simulate"])

    # 2. stage 1 + stage 2
    pre_yaml = _write_yaml(out / "preprocess.yaml", preprocess_config(plan),
                           "# written by `ephys-gpt demo`; run with\n"
                           "#   ephys-gpt preprocess --args preprocess.yaml\n"
                           "# relative paths resolve against this file's folder\n")
    chunks = out / "preprocessed" / "chunks"
    key = plan.stage_key("preprocess")
    if not force and _is_done(out, "preprocess", key, [chunks]):
        skipped.append("preprocess")
        logger.info("preprocessing: already done (%s), skipping", chunks)
    else:
        _stamp_path(out, "train").unlink(missing_ok=True)
        if (out / "preprocessed").exists():
            shutil.rmtree(out / "preprocessed")
        t = time.perf_counter()
        _cli(["preprocess", "--args", str(pre_yaml), "--stage", "both"], verbosity)
        timings["preprocess"] = time.perf_counter() - t
        _mark_done(out, "preprocess", key, timings["preprocess"])

    # 3. train
    run_yaml = _write_yaml(out / "run.yaml", run_config(plan, progress),
                           "# written by `ephys-gpt demo`; run with\n"
                           "#   ephys-gpt train --args run.yaml   # then: ephys-gpt eval --args run.yaml\n"
                           "# relative paths resolve against this file's folder\n")
    export = out / "train" / "export"
    # a changed plan or training config redoes training (progress bars do not count)
    key = {**plan.stage_key("train"), "run_config": run_config(plan, progress=False)}
    if not force and _is_done(out, "train", key, [export / "model.safetensors"]):
        skipped.append("train")
        logger.info("training: already done (%s), skipping", export)
    else:
        # the demo owns <out>/train: a changed plan replaces the run there (--overwrite
        # deletes only what ephys-gpt wrote, nothing else in the folder)
        t = time.perf_counter()
        _cli(["train", "--args", str(run_yaml), "--overwrite"], verbosity)
        timings["train"] = time.perf_counter() - t
        _mark_done(out, "train", key, timings["train"])

    # 4. evaluate
    t = time.perf_counter()
    _cli(["eval", "--args", str(run_yaml)], verbosity)
    timings["eval"] = time.perf_counter() - t
    timings["total"] = time.perf_counter() - t_all

    eval_dir = out / "train" / "evals" / "EvalQuant"
    summary_path = eval_dir / "summary.json"
    if not summary_path.is_file():
        raise RuntimeError(f"evaluation wrote no {summary_path}")
    ev = json.loads(summary_path.read_text())
    demo = _demo_summary(plan, quick, out, ev, timings, skipped)
    report_io.write_json(out / "demo_summary.json", demo)
    _write_report(out, demo, ev, eval_dir)
    logger.info("demo finished in %.0f s; report: %s", timings["total"], out / "report.md")
    return demo


def _demo_summary(plan: DemoPlan, quick: bool, out: Path, ev: dict, timings: dict,
                  skipped: list[str]) -> dict:
    acc = ev["next_step"]["accuracy"]
    model = ev["model_name"]
    linear = list(ev["next_step"]["beats_linear"])
    naive = {k: v for k, v in acc.items() if k != model and k not in linear}
    psd = ev["generation"]["psd"]
    return {
        "mode": "quick" if quick else "full",
        "plan": dataclasses.asdict(plan),
        "timings_seconds": timings,
        "skipped_stages": skipped,
        "next_step_accuracy": acc,
        "next_step_nll_nats": ev["next_step"].get("nll_nats", {}),
        "beats_baselines": all(acc[model] > v for v in naive.values()),
        "beats_linear": ev["next_step"]["beats_linear"],
        "nstep_accuracy_at_1": ev["nstep"]["accuracy_at_1"],
        "alpha_peak_hz": {t: {"held-out": d["alpha_peak_heldout_hz"],
                              "generated": d["alpha_peak_generated_hz"],
                              "generated_detected": d["alpha_peak_detected_generated"],
                              "generated_peak_ratio": d["alpha_peak_ratio_generated"]}
                          for t, d in psd.items()},
        "correlation_similarity": ev["generation"]["correlation_similarity"],
        "eval_dir": str((out / "train" / "evals" / "EvalQuant").relative_to(out)),
    }


def _write_report(out: Path, demo: dict, ev: dict, eval_dir: Path) -> Path:
    plan = demo["plan"]
    model = ev["model_name"]
    rep = report_io.MarkdownReport("ephys-gpt demo")
    t = demo["timings_seconds"]
    rep.text(f"Mode **{demo['mode']}**, finished in {t['total']:.0f} s"
             + (f" (skipped, already done: {', '.join(demo['skipped_stages'])})"
                if demo["skipped_stages"] else "") + ".")
    rep.section("What was done")
    rep.bullets([
        f"**Simulate**: {plan['subjects']} subjects × {plan['sessions']} sessions × "
        f"{plan['seconds']:g} s of 306-channel MEGIN MEG from the osl-ephys MVAR template "
        f"(150 Hz) → `raw/`" + _took(t, "simulate"),
        f"**Stage 1** (osl-ephys): 1–45 Hz band-pass, 50 Hz notch, resample to "
        f"{plan['sfreq']:g} Hz, bad segments/channels → `preprocessed/stage1/`; **stage 2**: "
        f"pick `{plan['picks']}`, robust normalize, clip at 6 SD, {plan['n_bits']}-bit mu-law "
        f"tokens in 10 s chunks → `preprocessed/chunks/` (config `preprocess.yaml`)"
        + _took(t, "preprocess"),
        f"**Train** GPT2MEG ({_fmt_model(plan['model'])}) for {plan['steps']} steps of "
        f"{plan['batch_size']} × {plan['example_seconds']:g} s windows, lr {plan['lr']:g}, "
        f"{plan['precision']}; split by {plan['split_by']} (train / val / test) → `train/` "
        f"(config `run.yaml`)" + _took(t, "train"),
        f"**Evaluate** with EvalQuant on the held-out test {plan['split_by']}(s) → "
        f"`{demo['eval_dir']}/`" + _took(t, "eval"),
    ])
    rep.section("Next-step accuracy on held-out data")
    acc, nll = demo["next_step_accuracy"], demo["next_step_nll_nats"]
    rows = [[k, v, nll.get(k), demo["nstep_accuracy_at_1"].get(k)] for k, v in acc.items()]
    rep.table(["predictor", "teacher-forced accuracy", "NLL (nats/token)",
               "1-step rollout accuracy"], rows)
    verdict = "beats" if demo["beats_baselines"] else "does **not** beat"
    rep.text(f"{model} {verdict} both naive baselines (`repeat-last`: copy the previous "
             f"token; `unigram`: draw from each channel's training-set token distribution). "
             f"Chance with {2 ** plan['n_bits']} tokens is {1 / 2 ** plan['n_bits']:.4f}.")
    rep.text(_linear_sentence(model, acc, demo["beats_linear"],
                              bool(plan["model"].get("linear_order"))))
    scored = {k: v for k, v in nll.items() if k != model and k in demo["beats_linear"]}
    if model in nll and scored:
        rep.text("`, token distribution`: the linear model's Gaussian forecast given to each "
                 "token as the mass of its mu-law bin, scored like the model (its most "
                 "probable token; its likelihood). By likelihood " + model + " (" +
                 f"{nll[model]:.3f} nats) " + "; it ".join(
                     f"{'beats' if nll[model] < v else 'does **not** beat'} {k} ({v:.3f})"
                     for k, v in scored.items()) + ".")
    rep.section(f"Free-running generation ({ev['generation']['seconds']:g} s, "
                f"{ev['generation']['sampling']})")
    rep.table(["channel type", "alpha peak held-out (Hz)", "alpha peak generated (Hz)",
               "generated peak / 1/f background", "generated peak detected"],
              [[k, d["held-out"], d["generated"], d["generated_peak_ratio"],
                "yes" if d["generated_detected"] else "no"]
               for k, d in demo["alpha_peak_hz"].items()])
    sim = demo["correlation_similarity"]["offdiag_correlation"]
    why = ("its channels meet through the VAR's forecast and the channels' draws, dependent "
           "like the VAR's errors" if plan["model"].get("linear_order") else
           "GPT2MEG models each channel separately (shared weights, channel embedding), so "
           "little spatial correlation is expected")
    rep.text(f"Channel-correlation similarity of generated vs held-out (off-diagonal r): "
             f"{report_io.fmt_value(sim, 3)} — {why}.")
    rep.section("Figures")
    for name, caption in [("accuracy_by_position", "Next-step accuracy vs history length"),
                          ("nstep_accuracy", "N-step-ahead accuracy, model vs baselines"),
                          ("nstep_rmse", "N-step-ahead RMSE in signal units"),
                          ("psd", "PSD of generated vs held-out signal (alpha band shaded)"),
                          ("channel_correlation", "Channel correlation matrices"),
                          ("traces", "Held-out vs generated traces")]:
        rep.figure(eval_dir / f"{name}.png", caption, relative_to=out)
    rep.text(f"All curves (`.npy` + `.json`), PDFs, `summary.json`, the evaluation's own "
             f"`report.md` and the generated signal `generated_raw.fif` (open with "
             f"`mne.io.read_raw_fif`) are in `{demo['eval_dir']}/`.")
    return rep.write(out / "report.md")


def _linear_sentence(model: str, acc: dict, beats: dict, with_var: bool) -> str:
    """How the model compares with the fitted AR and VAR, plainly (``with_var``: the model
    adds a fitted VAR's forecast to its logits)."""
    if not beats:
        return "No linear baselines were fitted."
    parts = [f"{'beats' if won else 'does **not** beat'} {name} ({acc[model]:.3f} vs "
             f"{acc[name]:.3f})" for name, won in beats.items()]
    how = (f"{model} adds to its logits the forecast of a VAR fitted on the training split "
           "(`linear_order`), so its transformer learns what the VAR does not predict; the "
           "likelihood below says how much that is. " if with_var else
           f"{model} predicts each channel from its own past only (a per-channel AR is its "
           "linear counterpart); the VAR uses every channel's past. ")
    return (f"Against linear models fitted by least squares to the same training data: "
            f"{model} {'; it '.join(parts)}. " + how + "The simulated data come from a "
            "linear MVAR model, where a long VAR is close to the best possible predictor: it "
            "is the yardstick, not a rival to ignore.")


def _took(timings: dict, stage: str) -> str:
    return f" ({timings[stage]:.0f} s)" if stage in timings else " (already done)"


def _fmt_model(cfg: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in cfg.items())


# -- command line ----------------------------------------------------------------------------


def cmd_demo(args: argparse.Namespace) -> int:
    verbosity = ["-q"] if args.quiet else ["-v"] * args.verbose
    try:
        run_demo(args.out, quick=args.quick, force=args.force, progress=not args.no_progress,
                 verbosity=verbosity)
    except RuntimeError as err:  # a stage failed; its own error was logged already
        logger.error("demo stopped: %s", err)
        return 1
    return 0


def register(subparsers) -> None:
    """Add ``ephys-gpt demo`` to the command line."""
    p = subparsers.add_parser(
        "demo", help="simulate MEG, preprocess, train GPT2MEG and evaluate it, end to end",
        description="Run the whole pipeline on simulated MEG (CPU, offline) and write a "
                    "report; re-running skips finished stages.")
    p.add_argument("--out", default="runs/demo", help="output folder (default runs/demo)")
    p.add_argument("--quick", action="store_true",
                   help="a tiny run (about a minute) that checks the pipeline, not the model")
    p.add_argument("--force", action="store_true", help="redo every stage")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_demo)
