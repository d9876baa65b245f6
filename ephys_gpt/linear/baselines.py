"""The linear baselines an eval runner reports: typed options and one call that fits them.

A runner embeds :class:`LinearBaselineOptions` in its options (e.g. a ``linear`` field) and
does, with the training / validation datasets of its split::

    baselines = fit_linear_baselines(splits.train, splits.val, opts.linear, progress=True)
    for model in baselines:                     # per-channel AR(p), then VAR(p)
        pred = model.predict_next(x)            # continuous (B, C, T): out[..., t] ~ x[..., t+1]
        tok = model.predict_next_tokens(x_tok, steps_per_row)   # token models
        fut = model.forecast(x[..., :T - N], N)                  # N-step curves
        gen = model.simulate(n_new, context=ctx)                 # free-running PSD/covariance
    summary["linear_baselines"] = {m.name: m.summary() for m in baselines}
"""

from __future__ import annotations

import logging
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from ephys_gpt.linear.data import Segments
from ephys_gpt.linear.fitting import DEFAULT_MAX_FEATURES, DEFAULT_RIDGE, fit_linear
from ephys_gpt.linear.predictor import LinearPredictor

logger = logging.getLogger(__name__)


class LinearBaselineOptions(BaseModel):
    """Options of the linear AR/VAR baselines (see docs/evaluation.md)."""

    model_config = ConfigDict(extra="forbid")

    kinds: list[Literal["ar", "var"]] = Field(
        ["ar", "var"], description="baselines fitted: per-channel AR and/or multichannel VAR")
    ar_order: int | Literal["auto"] = Field(
        "auto", description="AR order p, or auto: chosen by `criterion` among `orders`")
    var_order: int | Literal["auto"] = Field(
        "auto", description="VAR order p, or auto: chosen by `criterion` among `orders`")
    orders: list[int] | None = Field(
        None, description="candidate orders for auto; default 1..max_order")
    max_order: int = Field(30, ge=1, description="largest candidate order (default list)")
    criterion: Literal["val", "bic"] = Field(
        "val", description="order selection: 1-step MSE on the validation split (val; BIC "
                           "when it is empty) or the Schwarz criterion on training data")
    ridge: float = Field(DEFAULT_RIDGE, ge=0, description="dimensionless ridge: times the "
                                                          "mean input variance")
    var_n_components: int | Literal["auto"] | None = Field(
        "auto", description="VAR inputs: all channels (null), this many principal "
                            "components, or auto (all while order x channels <= "
                            "var_max_features)")
    var_max_features: int = Field(DEFAULT_MAX_FEATURES, ge=1,
                                  description="cap on a VAR's lagged inputs for auto")
    max_train_samples: int | None = Field(
        None, ge=1, description="read at most about this many training samples (whole "
                                "contiguous segments spread over the split)")
    max_val_samples: int | None = Field(None, ge=1, description="the same for validation")

    @field_validator("orders")
    @classmethod
    def _orders(cls, v):
        if v is not None and (not v or any(o < 1 for o in v)):
            raise ValueError(f"orders must be a non-empty list of integers >= 1, got {v}")
        return sorted(set(v)) if v is not None else v

    @field_validator("ar_order", "var_order")
    @classmethod
    def _order(cls, v):
        if v != "auto" and v < 1:
            raise ValueError(f"an order must be an integer >= 1 or 'auto', got {v}")
        return v


def fit_linear_baselines(train: Any, val: Any = None,
                         options: LinearBaselineOptions | dict | None = None, *,
                         device: str = "cpu", progress: bool = False) -> list[LinearPredictor]:
    """Fit the baselines of ``options`` on the ``train`` dataset (orders chosen on ``val``).

    ``train``/``val``: chunk datasets (read as contiguous segments; token data decoded to
    normalized units) or lists of (C, T) arrays. Returns the models in ``options.kinds``
    order; each knows its ``name`` (``AR(12)``, ``VAR(10)``...) and ``summary()``.
    """
    opts = (options if isinstance(options, LinearBaselineOptions)
            else LinearBaselineOptions.model_validate(options or {}))
    train_data = _segments(train, opts.max_train_samples, "train")
    val_data = _segments(val, opts.max_val_samples, "val")
    out = []
    for kind in opts.kinds:
        order = opts.ar_order if kind == "ar" else opts.var_order
        kw: dict[str, Any] = {}
        if kind == "var":
            kw = {"n_components": opts.var_n_components, "max_features": opts.var_max_features}
        out.append(fit_linear(train_data, kind, order, val=val_data, orders=opts.orders,
                              max_order=opts.max_order, criterion=opts.criterion,
                              ridge=opts.ridge, device=device, progress=progress, **kw))
    return out


def _segments(data: Any, max_samples: int | None, what: str) -> Any:
    if data is None:
        return None
    if hasattr(data, "indices") and hasattr(data, "metas"):
        if len(data) == 0:
            if what == "train":
                raise ValueError("the training split has no windows: cannot fit the linear "
                                 "baselines")
            return None
        return Segments(data, max_samples=max_samples)
    return data
