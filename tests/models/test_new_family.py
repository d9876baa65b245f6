"""Adding a model family is one file: a model defined outside the package, registered with
its decorator, trains one step through the CLI with no other file edited, its auxiliary loss
is added to the objective and logged by name, and its export loads back."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "training"))
from training_helpers import make_store, write_yaml  # noqa: E402

FAMILY = '''
"""A throw-away model family: one file, nothing else edited."""
from dataclasses import dataclass

import torch
from torch import nn

from ephys_gpt.models.capabilities import TokenGenerator
from ephys_gpt.models.output import ModelOutput
from ephys_gpt.models.registry import register_model


@dataclass
class TinyConfig:
    num_channels: int = 3
    vocab_size: int = 16
    width: int = 8


@register_model("TinyLastToken", input_kind="tokens", causal=True,
                capabilities=(TokenGenerator,), tiny_config={"num_channels": 3},
                output_time_dim=-2, default_loss="CrossEntropy", config_class=TinyConfig)
class TinyLastToken(nn.Module):
    """Next token from the current one only, with a weight-decay-like auxiliary loss."""

    def __init__(self, **config):
        super().__init__()
        self.config = cfg = TinyConfig(**config)
        self.emb = nn.Embedding(cfg.vocab_size, cfg.width)
        self.head = nn.Linear(cfg.width, cfg.vocab_size)

    def forward(self, x):
        logits = self.head(self.emb(x))  # (B, C, T, V)
        return ModelOutput(logits, aux_losses={"emb_norm": 1e-3 * self.emb.weight.pow(2).mean()},
                           metrics={"mean_logit": logits.detach().mean()})

    def example_inputs(self, batch_size=2, seq_len=None):
        return torch.randint(0, self.config.vocab_size, (batch_size, 3, seq_len or 8))

    @torch.no_grad()
    def generate(self, context, steps, *, temperature=1.0, top_k=None, top_p=None,
                 use_cache=True, generator=None, progress=False):
        out = context
        for _ in range(steps):
            nxt = self.forward(out[..., -1:]).prediction[..., -1, :].argmax(-1)
            out = torch.cat([out, nxt[..., None]], -1)
        return out
'''


def test_a_model_family_from_one_file_trains_through_the_cli(tmp_path):
    pkg = tmp_path / "plugins" / "tinyfam"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "last_token.py").write_text(textwrap.dedent(FAMILY))
    store = make_store(tmp_path / "chunks")
    cfg = write_yaml(tmp_path / "configs" / "tinylasttoken" / "train.yaml", {
        "imports": ["tinyfam.last_token"],
        "model_name": "TinyLastToken",
        "model_config": {"width": 8},
        "datasplitter": {"dataset_root": str(store), "example_seconds": 0.2,
                         "val_ratio": 0.34, "test_ratio": 0.34},
        "dataloader": {"batch_size": 4},
        "trainer": {"max_steps": 1, "limit_val_batches": 1, "accelerator": "cpu",
                    "enable_progress_bar": False, "log_every_n_steps": 1,
                    "num_sanity_val_steps": 0},
        "save_dir": str(tmp_path / "run"),
    })
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(tmp_path / "plugins"), *filter(None, [os.environ.get("PYTHONPATH")])]))
    proc = subprocess.run([sys.executable, "-m", "ephys_gpt.cli", "train", "--args", str(cfg)],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    export = tmp_path / "run" / "export"
    assert (export / "model.safetensors").is_file()
    (metrics_csv,) = (tmp_path / "run" / "logs" / "csv").glob("version_*/metrics.csv")
    rows = list(csv.DictReader(metrics_csv.open()))
    logged = {k for r in rows for k, v in r.items() if v}
    assert {"train/loss_step", "train/emb_norm_step", "train/objective_step",
            "train/mean_logit_step"} <= logged, sorted(logged)
    step = next(r for r in rows if r.get("train/loss_step"))
    total = float(step["train/loss_step"])
    assert total == pytest.approx(float(step["train/objective_step"])
                                  + float(step["train/emb_norm_step"]), rel=1e-5)
    # the export names the module that defines the family, so it loads back on its own
    check = ("from ephys_gpt.models.pretrained import from_pretrained; "
             f"m = from_pretrained({str(export)!r}); print(type(m).__module__)")
    out = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True,
                         env=env, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "tinyfam.last_token", out.stderr


def test_a_missing_plugin_module_is_one_clear_error(tmp_path):
    from ephys_gpt.training.config import ConfigError, load_config

    store = make_store(tmp_path / "chunks")
    cfg = {"imports": ["no_such_plugin.models"], "model_name": "GPT2MEG",
           "datasplitter": {"dataset_root": str(store)}, "save_dir": str(tmp_path / "run")}
    with pytest.raises(ConfigError, match=r"imports.*no_such_plugin\.models.*PYTHONPATH"):
        load_config(cfg)
