"""Weights written before the attention stack was merged still load, and give the same
outputs: ``legacy_outputs/legacy_<model>.safetensors`` hold a tiny model's state dict (with
the former parameter names), inputs, and the outputs the former code computed from them
(``forward``; BENDRForecast's cached ``forecast``, the token models' greedy ``generate``).
They were written by the code of commit 3f4460d (a separate rotary transformer stack for
BENDRForecast and CNNLSTM then, SDPA attention everywhere)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from ephys_gpt.models.registry import build_model

HERE = Path(__file__).parent / "legacy_outputs"
MODELS = ["BENDRForecast", "CNNLSTM", "GPT2MEG", "STGPT2MEG"]


@pytest.mark.parametrize("name", MODELS)
def test_former_weights_load_and_reproduce_former_outputs(name):
    path = HERE / f"legacy_{name}.safetensors"
    with safe_open(str(path), "pt") as f:
        config = json.loads(f.metadata()["config"])
    stored = load_file(str(path))
    model = build_model(name, config).eval()
    model.load_state_dict({k[len("state."):]: v for k, v in stored.items()
                           if k.startswith("state.")})  # strict: every name must match
    inputs = [stored[f"input.{i}"] for i in range(3) if f"input.{i}" in stored]
    with torch.no_grad():
        out = model(*inputs).prediction
    assert torch.allclose(out, stored["output"], atol=1e-5)
    if "forecast" in stored:
        assert torch.allclose(model.forecast(inputs[0], 9), stored["forecast"], atol=1e-5)
    if "generate" in stored:
        assert torch.equal(model.generate(inputs[0][..., :10], 12, temperature=0.0),
                           stored["generate"])
