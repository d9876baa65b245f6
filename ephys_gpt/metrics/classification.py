"""Token and classification metrics built on torchmetrics.

Every metric here accumulates device-side counters (no host synchronisation in ``update``);
values are computed (and reduced across processes) only in ``compute``.
"""

from __future__ import annotations

import torch
from einops import rearrange
from torchmetrics import Metric, MetricCollection
from torchmetrics.classification import MulticlassAccuracy, MulticlassF1Score

TASKS = ("tokens", "classification")


def flatten_logits(logits: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Flatten logits ``(..., V)`` and targets ``(...)`` (or soft ``(..., V)``) to ``(N, V)``, ``(N,)``.

    Soft (mixup) targets are reduced to their most probable class.
    """
    if target.is_floating_point() and target.shape == logits.shape:
        target = target.argmax(-1)
    if target.shape != logits.shape[:-1]:
        raise ValueError(f"metrics: targets of shape {tuple(target.shape)} do not match logits "
                         f"{tuple(logits.shape)} (expected logits' shape without the last axis)")
    return rearrange(logits, "... v -> (...) v"), rearrange(target, "... -> (...)")


class TokenAccuracy(Metric):
    """Fraction of positions whose target is among the ``top_k`` highest logits.

    ``update(logits (..., V), target (...))``; cost O(N·k) memory (no one-hot over V), so it
    is cheap enough for every token of every batch.
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(self, top_k: int = 1, **kwargs):
        super().__init__(**kwargs)
        if int(top_k) < 1:
            raise ValueError(f"TokenAccuracy: top_k must be >= 1, got {top_k!r}")
        self.top_k = int(top_k)
        self.add_state("correct", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("total", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, logits: torch.Tensor, target: torch.Tensor) -> None:
        logits, target = flatten_logits(logits, target)
        k = min(self.top_k, logits.shape[-1])
        if k == 1:
            hit = logits.argmax(-1) == target
        else:
            hit = (logits.topk(k, dim=-1).indices == target[:, None]).any(-1)
        self.correct += hit.sum()
        self.total += target.numel()

    def compute(self) -> torch.Tensor:
        return self.correct.float() / self.total.clamp(min=1).float()


class _FlattenMixin:
    """Lets a (N, K)-vs-(N,) torchmetrics classifier take ``(..., K)`` logits / soft targets."""

    def update(self, logits: torch.Tensor, target: torch.Tensor) -> None:
        super().update(*flatten_logits(logits, target))


class ClassAccuracy(_FlattenMixin, MulticlassAccuracy):
    """``MulticlassAccuracy`` on flattened logits (micro average, optional top-k)."""


class ClassF1(_FlattenMixin, MulticlassF1Score):
    """``MulticlassF1Score`` on flattened logits."""


def build_metrics(task: str, *, num_classes: int | None = None, top_k: int = 5,
                  prefix: str | None = None) -> MetricCollection:
    """A metric collection for ``task`` (one of :data:`TASKS`).

    Parameters
    ----------
    task : str
        ``"tokens"`` (``acc``, ``top{k}_acc``) or ``"classification"`` (``acc``,
        ``top{k}_acc``, ``f1_micro``, ``f1_macro``).
    num_classes : int | None
        Number of classes; required for ``"classification"``.
    top_k : int
        The k of the top-k accuracy (clipped to ``num_classes``).
    prefix : str | None
        Prepended to every metric name (e.g. ``"val/"``).
    """
    if task == "tokens":
        metrics = {"acc": TokenAccuracy(top_k=1), f"top{top_k}_acc": TokenAccuracy(top_k=top_k)}
    elif task == "classification":
        if not isinstance(num_classes, int) or num_classes < 2:
            raise ValueError("build_metrics('classification') needs num_classes, an integer "
                             f">= 2; got {num_classes!r}")
        k = min(top_k, num_classes)
        common = {"num_classes": num_classes, "validate_args": False}
        metrics = {
            "acc": ClassAccuracy(average="micro", **common),
            f"top{k}_acc": ClassAccuracy(average="micro", top_k=k, **common),
            "f1_micro": ClassF1(average="micro", **common),
            "f1_macro": ClassF1(average="macro", **common),
        }
    else:
        raise ValueError(f"unknown metrics task {task!r}; valid tasks: {', '.join(TASKS)}")
    return MetricCollection(metrics, prefix=prefix, compute_groups=False)
