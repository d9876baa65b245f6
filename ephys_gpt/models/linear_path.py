"""The fitted-VAR part that BENDRForecast, NTD and WavenetFullChannel share.

Each of these models may carry a VAR(p) over all channels (``linear_order: p``) that a
training run fits on its training split before the first step (``linear_fit: true``,
``ephys_gpt/training/data_init.py``) and hands to the model's ``set_linear_path``. This
module holds what their configs and ``set_linear_path`` check the same way:

- :func:`check_linear_config`: the ``linear_order`` / ``linear_fit`` / ``linear_select`` keys;
- :func:`linear_request`: what the training run fits for them (``linear_init_request``);
- :func:`fitted_var`: the coefficients and intercept, as tensors of the expected shapes;
- :func:`var_process_mean`: the mean of the process the VAR describes (lags before a window).
"""

from __future__ import annotations

import torch


def check_linear_config(name: str, order, fit, *, fit_required: bool, select=False) -> None:
    """Check a model config's ``linear_order`` (an integer >= 0), ``linear_fit`` (a bool,
    only with an order; with ``fit_required`` an order needs it: the VAR is not learned) and
    ``linear_select`` (a bool, only with ``linear_fit``: the order is chosen up to
    ``linear_order``)."""
    if not isinstance(select, bool):
        raise ValueError(f"{name}: linear_select must be true or false, got {select!r}")
    if select and not fit:
        raise ValueError(f"{name}: linear_select needs linear_fit: true (it chooses the order "
                         "of the VAR fitted on the training split)")
    if isinstance(order, bool) or not isinstance(order, int) or order < 0:
        raise ValueError(f"{name}: linear_order must be an integer >= 0 (0: none), got "
                         f"{order!r}")
    if not isinstance(fit, bool):
        raise ValueError(f"{name}: linear_fit must be true or false, got {fit!r}")
    if fit and not order:
        raise ValueError(f"{name}: linear_fit needs linear_order > 0 (the order of the VAR "
                         "fitted on the training split)")
    if fit_required and order and not fit:
        raise ValueError(f"{name}: linear_order > 0 needs linear_fit: true (the VAR is fitted "
                         "on the training split; it is not learned by gradient)")


def linear_request(order: int, fit: bool, select: bool, **extra) -> dict | None:
    """A model's ``linear_init_request`` for its config: None without ``linear_fit``, else a
    VAR of order ``linear_order`` (``"select": True``: the order with the smallest 1-step
    error on the validation split, up to ``linear_order``, the higher lags zero)."""
    if not fit:
        return None
    return {"kind": "var", "order": order, **({"select": True} if select else {}), **extra}


def fitted_var(owner: str, coef, intercept, order: int, n_channels: int,
               dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    """``coef`` (p, C, C) and ``intercept`` (C,) as ``dtype`` tensors, checked against the
    model's ``linear_order`` p and ``num_channels`` C and for finite values; ``owner``
    (e.g. ``"NTD.set_linear_path"``) starts the error message."""
    p, C = order, n_channels
    a = torch.as_tensor(coef, dtype=dtype)
    b = torch.as_tensor(intercept, dtype=dtype)
    if tuple(a.shape) != (p, C, C) or tuple(b.shape) != (C,):
        raise ValueError(f"{owner}: expected coef ({p}, {C}, {C}) and intercept ({C},) "
                         f"(linear_order, num_channels), got {tuple(a.shape)} and "
                         f"{tuple(b.shape)}")
    if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
        raise ValueError(f"{owner}: coef and intercept must be finite")
    return a, b


def var_process_mean(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The mean ``(I - sum_l a[l])^-1 b`` (C,) of the process a VAR describes (float64), or
    zeros, the centre of normalized data, where the VAR has no finite, moderate mean."""
    C = b.shape[0]
    mean = torch.linalg.solve(torch.eye(C, dtype=torch.float64) - a.double().sum(0), b.double())
    if not torch.isfinite(mean).all() or mean.abs().max() > 1e3:
        return torch.zeros(C, dtype=torch.float64)
    return mean
