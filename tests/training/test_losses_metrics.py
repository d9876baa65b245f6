"""Losses (CrossEntropy, MSE) and torchmetrics collections."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ephys_gpt.losses.basic import MSE, CrossEntropy
from ephys_gpt.metrics import build_metrics
from ephys_gpt.models.output import ModelOutput as Out
from ephys_gpt.models.registry import build_loss, get_loss_spec


def test_losses_are_registered():
    assert get_loss_spec("CrossEntropy").cls is CrossEntropy
    assert isinstance(build_loss("MSE"), MSE)


def test_cross_entropy_matches_torch_over_all_positions():
    logits = torch.randn(2, 3, 5, 7)  # (B, C, T, V)
    target = torch.randint(0, 7, (2, 3, 5))
    got = CrossEntropy()(Out(logits), target)
    ref = F.cross_entropy(logits.permute(0, 3, 1, 2), target)
    assert torch.allclose(got, ref, atol=1e-6)


def test_cross_entropy_soft_targets_and_smoothing():
    logits = torch.randn(4, 6)
    target = torch.randint(0, 6, (4,))
    onehot = F.one_hot(target, 6).float()
    assert torch.allclose(CrossEntropy()(Out(logits), onehot), CrossEntropy()(Out(logits), target), atol=1e-6)
    mixed = 0.7 * onehot + 0.3 * F.one_hot((target + 1) % 6, 6).float()
    logp = logits.log_softmax(-1)
    assert torch.allclose(CrossEntropy()(Out(logits), mixed), -(mixed * logp).sum(-1).mean(), atol=1e-6)
    smooth = CrossEntropy(label_smoothing=0.1)(Out(logits), target)
    assert torch.allclose(smooth, F.cross_entropy(logits, target, label_smoothing=0.1), atol=1e-6)
    assert smooth > 0


def test_cross_entropy_is_float32_under_bf16():
    logits = torch.randn(2, 3, 4, 8).bfloat16()
    target = torch.randint(0, 8, (2, 3, 4))
    assert CrossEntropy()(Out(logits), target).dtype == torch.float32


def test_loss_shape_errors():
    with pytest.raises(ValueError, match="integer targets must have shape"):
        CrossEntropy()(Out(torch.randn(2, 3, 5)), torch.randint(0, 5, (2, 4)))
    with pytest.raises(ValueError, match="soft targets"):
        CrossEntropy()(Out(torch.randn(2, 5)), torch.rand(2, 4))
    with pytest.raises(ValueError, match="label_smoothing"):
        CrossEntropy(label_smoothing=1.5)
    with pytest.raises(ValueError, match="does not match"):
        MSE()(Out(torch.randn(2, 3, 5)), torch.randn(2, 3, 4))
    with pytest.raises(TypeError, match="ModelOutput"):
        MSE()(torch.randn(2), torch.randn(2))


def test_mse_value():
    a, b = torch.randn(2, 3, 5), torch.randn(2, 3, 5)
    assert torch.allclose(MSE()(Out(a), b), ((a - b) ** 2).mean())


def test_token_metrics_values():
    m = build_metrics("tokens", top_k=2, prefix="val/")
    logits = torch.tensor([[[0.1, 0.9, 0.0], [0.8, 0.1, 0.1]],
                           [[0.2, 0.3, 0.5], [0.5, 0.4, 0.1]]])  # (B=2, T=2, V=3)
    target = torch.tensor([[1, 2], [0, 1]])
    m.update(logits, target)
    out = m.compute()
    assert out["val/acc"].item() == pytest.approx(1 / 4)   # only (0, 0) right
    assert out["val/top2_acc"].item() == pytest.approx(2 / 4)  # + (1, 1)
    m.update(logits, target)  # accumulates across batches
    assert m.compute()["val/acc"].item() == pytest.approx(1 / 4)
    m.reset()
    m.update(logits[:1, :1], target[:1, :1])
    assert m.compute()["val/acc"].item() == 1.0


def test_classification_metrics_values():
    m = build_metrics("classification", num_classes=3, top_k=2)
    logits = torch.tensor([[3.0, 1.0, 0.0], [0.0, 3.0, 1.0], [3.0, 0.0, 1.0], [0.0, 1.0, 3.0]])
    target = torch.tensor([0, 1, 2, 2])
    m.update(logits, target)
    out = {k: v.item() for k, v in m.compute().items()}
    assert out["acc"] == pytest.approx(0.75)
    assert out["top2_acc"] == pytest.approx(1.0)
    assert out["f1_micro"] == pytest.approx(0.75)
    # per class F1: c0 = 2/3 (tp1 fp1), c1 = 1, c2 = 2/3 (tp1 fn1)
    assert out["f1_macro"] == pytest.approx((2 / 3 + 1 + 2 / 3) / 3)
    # soft (mixup) targets count as their most probable class
    m2 = build_metrics("classification", num_classes=3, top_k=2)
    m2.update(logits, F.one_hot(target, 3).float() * 0.8 + 0.05)
    assert m2.compute()["acc"].item() == pytest.approx(0.75)


def test_build_metrics_errors():
    with pytest.raises(ValueError, match="num_classes"):
        build_metrics("classification")
    with pytest.raises(ValueError, match="tokens, classification"):
        build_metrics("regression")
