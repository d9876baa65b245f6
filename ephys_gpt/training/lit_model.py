"""``LitModel``: the Lightning wrapper that trains any registered model with a registered loss.

It builds the model and loss from the registries, optimizes with AdamW (no weight decay on
biases, norms and embeddings) under a per-step linear-warmup + cosine schedule, and logs the
loss and, for token and classification models, torchmetrics metrics. Every model returns a
:class:`~ephys_gpt.models.output.ModelOutput`: the loss compares it with the targets, the
model's auxiliary losses are added to it and logged by name, its metrics are logged. The step
does no host synchronisation: losses and metric counters stay on the device and Lightning
reduces them.

Hyperparameters saved in checkpoints are plain values only (names, dicts, lists, numbers), so
a ``.ckpt`` loads with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import lightning as L
import torch
from torch import nn

from ephys_gpt.metrics import build_metrics
from ephys_gpt.models.capabilities import Classifier
from ephys_gpt.models.output import ModelOutput
from ephys_gpt.models.registry import TOKEN_KINDS, build_loss, build_model, get_model_spec

logger = logging.getLogger(__name__)


def metrics_task(spec) -> str | None:
    """Which torchmetrics a model gets: ``classification`` for classifiers, ``tokens``
    (next-token accuracy) for models over mu-law tokens, None (the loss only) otherwise."""
    if spec.can(Classifier):
        return "classification"
    if spec.input_kind in TOKEN_KINDS:
        return "tokens"
    return None

_NORM_TYPES = (nn.LayerNorm, nn.GroupNorm, nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d,
               nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d, nn.LocalResponseNorm)
if hasattr(nn, "RMSNorm"):
    _NORM_TYPES = (*_NORM_TYPES, nn.RMSNorm)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW parameter groups: decay matrices/kernels, not biases, norms or embeddings.

    A parameter is exempt if it is 1-D (biases, norm gains, scalars), belongs to an
    ``nn.Embedding`` or a norm layer, or its name mentions an embedding (``emb``) — learned
    position/channel embeddings are often plain ``nn.Parameter`` tensors.
    """
    no_decay: set[int] = set()
    for mod in model.modules():
        if isinstance(mod, (nn.Embedding, *_NORM_TYPES)):
            no_decay.update(id(p) for p in mod.parameters(recurse=False))
    decay, keep = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.ndim < 2 or id(p) in no_decay or "emb" in name.lower():
            keep.append(p)
        else:
            decay.append(p)
    groups = [{"params": decay, "weight_decay": weight_decay},
              {"params": keep, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


class WarmupCosine:
    """LR multiplier: linear warmup over ``warmup`` steps, then cosine to ``min_ratio``.

    A plain callable object (its ``__dict__`` is what ``LambdaLR`` checkpoints), so the
    schedule resumes exactly and the checkpoint holds only numbers.
    """

    def __init__(self, warmup: int, total: int, min_ratio: float = 0.1, cosine: bool = True):
        self.warmup, self.total = int(warmup), max(int(total), 1)
        self.min_ratio, self.cosine = float(min_ratio), bool(cosine)

    def __call__(self, step: int) -> float:
        if self.warmup > 0 and step < self.warmup:
            return (step + 1) / self.warmup
        if not self.cosine:
            return 1.0
        span = max(self.total - self.warmup, 1)
        progress = min(max(step - self.warmup, 0) / span, 1.0)
        return self.min_ratio + (1.0 - self.min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def _call(model: nn.Module, inputs):
    """Models take the dataset's inputs: one tensor, or a tuple unpacked as arguments."""
    return model(*inputs) if isinstance(inputs, (tuple, list)) else model(inputs)


class LitModel(L.LightningModule):
    """Train a registered model with a registered loss.

    Parameters
    ----------
    model_name : str
        Registry name (``ephys-gpt list-models``).
    model_config : dict
        The model's keyword arguments.
    loss_name : str | None
        Registry name of the loss; default: the model's ``default_loss``.
    loss_config : dict | None
        The loss's keyword arguments.
    optim : dict | None
        The ``lightning`` block of the run config (see
        :class:`ephys_gpt.training.config.LightningConfig`): ``lr``, ``weight_decay``,
        ``betas``, ``eps``, ``scheduler``, ``warmup_steps``, ``min_lr_ratio``,
        ``total_steps``, ``compile``, ``metrics_top_k``.
    data_info : dict | None
        Dataset description kept with the checkpoint (``sfreq``, ``ch_names``, ``ch_types``,
        ``pos_2d``, ``steps``) so a checkpoint can be evaluated without the chunk store.
    run_config : dict | None
        The resolved run config (plain values), kept for :func:`~ephys_gpt.models.loading.load_model`.
    """

    def __init__(self, model_name: str, model_config: dict | None = None,
                 loss_name: str | None = None, loss_config: dict | None = None,
                 optim: dict | None = None, data_info: dict | None = None,
                 run_config: dict | None = None):
        super().__init__()
        from ephys_gpt.training.config import LightningConfig

        spec = get_model_spec(model_name)
        loss_name = loss_name or spec.default_loss
        if loss_name is None:
            raise ValueError(f"LitModel: model {model_name} has no default loss; pass loss_name")
        optim = LightningConfig.model_validate(optim or {}).model_dump()
        self.save_hyperparameters({
            "model_name": model_name, "model_config": dict(model_config or {}),
            "loss_name": loss_name, "loss_config": dict(loss_config or {}), "optim": optim,
            "data_info": dict(data_info or {}), "run_config": run_config,
        })
        self.model = build_model(model_name, model_config or {})
        self.loss_fn = build_loss(loss_name, loss_config or {})
        self.optim = optim
        self.task = metrics_task(spec)
        self._metrics_ready = False
        if optim["compile"]:
            # In-place compile keeps parameter names (checkpoints/exports stay loadable).
            self.model.compile()

    # ----------------------------------------------------------------- metrics
    def _num_classes(self, logits: torch.Tensor) -> int:
        cfg = self.hparams["model_config"]
        for key in ("num_classes", "n_classes"):
            if isinstance(cfg.get(key), int):
                return cfg[key]
        return int(logits.shape[-1])

    def _ensure_metrics(self, logits: torch.Tensor) -> None:
        """Build the metric collections once, when the class count is known."""
        if self._metrics_ready or self.task is None:
            return
        k = self.optim["metrics_top_k"]
        kw = {"num_classes": self._num_classes(logits)} if self.task == "classification" else {}
        self.train_metrics = build_metrics(self.task, top_k=k, prefix="train/", **kw).to(logits.device)
        self.val_metrics = build_metrics(self.task, top_k=k, prefix="val/", **kw).to(logits.device)
        self.test_metrics = build_metrics(self.task, top_k=k, prefix="test/", **kw).to(logits.device)
        self._metrics_ready = True

    def setup(self, stage: str) -> None:
        # Create metrics before the first step so every rank registers the same modules.
        if self.task is None or self._metrics_ready:
            return
        with torch.no_grad():
            was_training = self.model.training
            self.model.eval()
            out = _call(self.model, self.model.example_inputs(batch_size=1))
            self.model.train(was_training)
        self._ensure_metrics(out.prediction)

    # ----------------------------------------------------------------- steps
    def forward(self, inputs) -> ModelOutput:
        return _call(self.model, inputs)

    def _step(self, batch, stage: str) -> torch.Tensor:
        """One batch: the loss on the model's output plus its auxiliary losses, each logged
        by name (``<stage>/loss`` is the total that is optimized)."""
        inputs, targets = batch
        output = self(inputs)
        loss = self.loss_fn(output, targets)
        parts: dict[str, torch.Tensor] = {}
        if isinstance(loss, dict):  # a loss may report its own parts
            parts = {k: v for k, v in loss.items() if k != "loss"}
            loss = loss["loss"]
        if output.aux_losses:
            parts["objective"] = loss
            parts.update(output.aux_losses)
            loss = loss + output.total_aux_loss()
        bs = targets.shape[0] if isinstance(targets, torch.Tensor) else None
        # validation/test values are averaged over the ranks of a distributed run; so are the
        # training values when there is more than one rank (its epoch means are then global)
        on_step = stage == "train"
        sync = stage != "train" or (self._trainer is not None and self.trainer.world_size > 1)
        self.log(f"{stage}/loss", loss, on_step=on_step, on_epoch=True, prog_bar=True,
                 batch_size=bs, sync_dist=sync)
        for k, v in {**parts, **output.metrics}.items():
            self.log(f"{stage}/{k}", v.detach() if k in output.metrics else v,
                     on_step=on_step, on_epoch=True, batch_size=bs, sync_dist=sync)
        if self.task is not None and isinstance(targets, torch.Tensor):
            self._ensure_metrics(output.prediction)
            metrics = getattr(self, f"{stage}_metrics")
            metrics.update(output.prediction.detach(), targets)
            self.log_dict(metrics, on_step=False, on_epoch=True, batch_size=bs)
        return loss

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        return self._step(batch, "train")

    def validation_step(self, batch, batch_idx: int) -> torch.Tensor:
        return self._step(batch, "val")

    def test_step(self, batch, batch_idx: int) -> torch.Tensor:
        return self._step(batch, "test")

    # ----------------------------------------------------------------- optimizer
    def _total_steps(self) -> int:
        if self.optim["total_steps"]:
            return int(self.optim["total_steps"])
        try:
            est = self.trainer.estimated_stepping_batches
        except Exception:  # no trainer attached or no finite length
            est = math.inf
        if not math.isfinite(est):
            logger.warning("cannot estimate the number of training steps; the cosine schedule "
                           "uses lightning.total_steps=10000 (set it explicitly)")
            return 10_000
        return int(est)

    def configure_optimizers(self):
        o = self.optim
        opt = torch.optim.AdamW(param_groups(self.model, o["weight_decay"]), lr=o["lr"],
                                betas=tuple(o["betas"]), eps=o["eps"])
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, WarmupCosine(o["warmup_steps"], self._total_steps(), o["min_lr_ratio"],
                              cosine=o["scheduler"] == "cosine"))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step",
                                                   "frequency": 1}}

    def export_info(self) -> dict[str, Any]:
        """What :func:`ephys_gpt.models.pretrained.save_pretrained` stores beside the weights."""
        return dict(self.hparams["data_info"])
