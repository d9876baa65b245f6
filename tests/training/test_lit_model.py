"""LitModel: optimizer groups, schedule, a host-sync-free step, precision and metrics."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from ephys_gpt.models.registry import get_model_spec
from ephys_gpt.training.lit_model import LitModel, WarmupCosine, param_groups

TINY = dict(get_model_spec("GPT2MEG").tiny_config)
NO_TRAINER = pytest.mark.filterwarnings("ignore:You are trying to `self.log\\(\\)`")


def test_param_groups_exempt_biases_norms_embeddings():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.tok = nn.Embedding(10, 4)
            self.pos_emb = nn.Parameter(torch.zeros(8, 4))
            self.norm = nn.LayerNorm(4)
            self.proj = nn.Linear(4, 4)

    net = Net()
    groups = param_groups(net, 0.1)
    decay = {id(p) for p in groups[0]["params"]}
    keep = {id(p) for p in groups[1]["params"]}
    assert groups[0]["weight_decay"] == 0.1 and groups[1]["weight_decay"] == 0.0
    assert decay == {id(net.proj.weight)}
    assert keep == {id(net.tok.weight), id(net.pos_emb), id(net.norm.weight), id(net.norm.bias),
                    id(net.proj.bias)}


def test_warmup_cosine_schedule():
    f = WarmupCosine(warmup=4, total=14, min_ratio=0.1)
    assert f(0) == pytest.approx(0.25) and f(3) == pytest.approx(1.0)
    assert f(4) == pytest.approx(1.0)
    assert f(9) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert f(14) == pytest.approx(0.1) and f(100) == pytest.approx(0.1)
    assert [f(s) for s in range(4, 15)] == sorted((f(s) for s in range(4, 15)), reverse=True)
    assert WarmupCosine(0, 10, cosine=False)(7) == 1.0


def test_optimizer_and_scheduler():
    lit = LitModel("GPT2MEG", TINY, optim={"lr": 2e-3, "warmup_steps": 3, "total_steps": 10,
                                           "weight_decay": 0.05})
    conf = lit.configure_optimizers()
    opt, sched = conf["optimizer"], conf["lr_scheduler"]["scheduler"]
    assert isinstance(opt, torch.optim.AdamW)
    assert conf["lr_scheduler"]["interval"] == "step"
    assert {g["weight_decay"] for g in opt.param_groups} == {0.05, 0.0}
    n_opt = sum(p.numel() for g in opt.param_groups for p in g["params"])
    assert n_opt == sum(p.numel() for p in lit.model.parameters())
    assert opt.param_groups[0]["lr"] == pytest.approx(2e-3 / 3)  # first warmup step
    for _ in range(3):
        opt.step()
        sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(2e-3)


def test_hparams_are_plain_values():
    lit = LitModel("GPT2MEG", TINY, data_info={"sfreq": 100.0, "ch_names": ["a", "b", "c"]})
    hp = dict(lit.hparams)
    assert hp["model_name"] == "GPT2MEG" and hp["loss_name"] == "CrossEntropy"
    assert hp["optim"]["lr"] == pytest.approx(3e-4)

    def plain(v):
        if isinstance(v, dict):
            return all(isinstance(k, str) and plain(x) for k, x in v.items())
        if isinstance(v, list):
            return all(plain(x) for x in v)
        return v is None or isinstance(v, (str, int, float, bool))

    assert plain(hp)


def test_invalid_optim_options_rejected():
    with pytest.raises(ValueError, match="lr"):
        LitModel("GPT2MEG", TINY, optim={"lr": -1})


@NO_TRAINER
def test_training_step_has_no_host_sync(monkeypatch):
    """The step must not call .item()/.cpu()/.tolist() (each would stall a GPU)."""
    lit = LitModel("GPT2MEG", TINY)
    lit.setup("fit")
    x = lit.model.example_inputs(batch_size=2)
    batch = (x[:, :, :-1], x[:, :, 1:])

    def forbidden(*a, **k):
        raise AssertionError("host synchronisation inside the training step")

    for name in ("item", "cpu", "tolist", "numpy"):
        monkeypatch.setattr(torch.Tensor, name, forbidden)
    loss = lit.training_step(batch, 0)
    monkeypatch.undo()
    assert loss.ndim == 0 and loss.requires_grad and torch.isfinite(loss)
    loss.backward()
    assert all(p.grad is not None for p in lit.model.parameters())
    # the step updated the token metrics (accuracy counters live on the device)
    assert lit.train_metrics["acc"].total.item() == batch[1].numel()


@NO_TRAINER
def test_bf16_autocast_step_is_finite():
    lit = LitModel("GPT2MEG", TINY)
    x = lit.model.example_inputs(batch_size=2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = lit.training_step((x[:, :, :-1], x[:, :, 1:]), 0)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)


def test_compile_flag_compiles_in_place(monkeypatch):
    called = []
    monkeypatch.setattr(nn.Module, "compile", lambda self, *a, **k: called.append(type(self)))
    lit = LitModel("GPT2MEG", TINY, optim={"compile": True})
    assert called == [type(lit.model)]
    # parameter names are unchanged (exports and checkpoints stay loadable)
    assert all(k.startswith("model.") and "_orig_mod" not in k for k in lit.state_dict())
