"""Helpers shared by the training tests: a synthetic chunk store and a tiny run config."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import yaml

N_CH, SFREQ, N_BITS = 3, 100.0, 4


def make_store(root: Path, n_sessions: int = 3, n_chunks: int = 2, chunk_samples: int = 200,
               tokens: bool = True, seed: int = 0) -> Path:
    """Write ``n_sessions`` sessions of AR(1)-like signals (as 4-bit tokens or float32)."""
    from ephys_gpt.codec import mulaw_quantize
    from ephys_gpt.store import write_session

    rng = np.random.default_rng(seed)
    for s in range(n_sessions):
        chunks = []
        for _ in range(n_chunks):
            x = np.cumsum(rng.standard_normal((N_CH, chunk_samples)), axis=-1) * 0.05
            x = np.clip(x, -1, 1).astype(np.float32)
            chunks.append(mulaw_quantize(x, N_BITS) if tokens else x)
        steps = [{"name": "normalize", "method": "zscore", "center": [0.0] * N_CH,
                  "scale": [1.0] * N_CH}]
        if tokens:
            steps.append({"name": "mulaw_quantize", "n_bits": N_BITS, "mu": 2**N_BITS - 1,
                          "scale": 1.0})
        write_session(root, f"sub-{s:02d}_ses-01", chunks, {
            "sfreq": SFREQ, "ch_names": [f"MEG{i:03d}" for i in range(N_CH)],
            "ch_types": ["mag"] * N_CH, "pos_2d": [[float(i), 0.0] for i in range(N_CH)],
            "chunk_samples": chunk_samples, "steps": steps})
    return root


def tiny_run(store: Path, save_dir: Path, **extra) -> dict:
    """A GPT2MEG run config small enough to train a few steps in about a second."""
    cfg = {
        "model_name": "GPT2MEG",
        "model_config": {"n_positions": 32, "d_model": 16, "n_layers": 1, "n_heads": 2},
        "loss_name": "CrossEntropy",
        "loss": {"label_smoothing": 0.0},
        "datasplitter": {"dataset_root": str(store), "dataset_class": "ChunkDataset",
                         "example_seconds": 0.2, "val_ratio": 0.34, "test_ratio": 0.34},
        "dataloader": {"batch_size": 4},
        "lightning": {"lr": 1e-3, "warmup_steps": 2},
        "trainer": {"max_epochs": 1, "limit_train_batches": 3, "limit_val_batches": 2,
                    "accelerator": "cpu", "devices": 1, "enable_progress_bar": False,
                    "enable_model_summary": False, "log_every_n_steps": 1,
                    "num_sanity_val_steps": 0},
        "save_dir": str(save_dir),
        "seed": 1,
    }
    for k, v in extra.items():
        cfg[k] = v
    return cfg


def write_yaml(path: Path, cfg: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def resume_run(store: Path, save_dir: Path, num_workers: int = 0) -> dict:
    """A run exercising every random draw of training (for the exact-resume tests).

    Mixup (keyed per batch) turns a continuous store into 4-bit tokens, windows get Gaussian
    noise (keyed per window), the model has dropout (torch's RNG), validation runs mid-epoch
    and ``last.ckpt`` is written every 3 optimizer steps, mid-epoch included: 2 epochs of 4
    steps, validation after batches 2 and 4.
    """
    cfg = tiny_run(store, save_dir)
    cfg["datasplitter"].update(dataset_class="ChunkDatasetForecastCont", example_seconds=0.1)
    cfg["model_config"].update(n_positions=10, dropout=0.1)
    cfg["dataloader"] = {"batch_size": 2, "num_workers": num_workers,
                         "mixup": {"alpha": 0.4, "quantize_bits": 4}}
    cfg["augmentations"] = [{"name": "gaussian_noise", "std": 0.05, "p": 0.5}]
    cfg["trainer"].update(max_epochs=2, limit_train_batches=4, limit_val_batches=2,
                          val_check_interval=2)
    cfg["checkpoint"] = {"every_n_train_steps": 3}
    return cfg


def exported_weights(save_dir: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(save_dir / "export" / "model.safetensors"))


def logged_losses(save_dir: Path) -> dict:
    """Every logged loss value of a run, ``{(step, column): value}``, over all CSV versions
    (a resumed run writes a new version; rows of a crashed version repeat the same values)."""
    import csv

    out: dict = {}
    for path in sorted((save_dir / "logs" / "csv").glob("version_*/metrics.csv")):
        with open(path, newline="") as fh:
            for row in csv.DictReader(fh):
                for key, value in row.items():
                    if "loss" in key and value not in ("", None):
                        prev = out.setdefault((int(row["step"]), key), value)
                        assert prev == value, f"{path}: {key} at step {row['step']} differs"
    return out
