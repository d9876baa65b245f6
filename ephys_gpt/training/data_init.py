"""Data-dependent initialization a model asks for before its first training step.

A model may start part of itself from a fit to the training split. Today one kind exists: a
model with a ``linear_init_request`` (``{"kind": "var" | "ar", "order": p}``, with
``"select": True`` to choose the order up to p on the validation split, or None) and a
``set_linear_path(coef, intercept)`` method (BENDRForecast's, NTD's and, with
``"tokens": True`` in the request and so also ``noise_std``, ``noise_corr`` (the errors'
correlation) and the data's ``steps``, the token models' ``linear_fit``: WavenetFullChannel,
GPT2MEG, STGPT2MEG) gets the ridge least-squares AR/VAR of
:mod:`ephys_gpt.linear` fitted on the training split — the same fit the eval runners report
as baselines. It runs only on a fresh start: a resumed
run continues from its checkpoint's weights.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from ephys_gpt.linear import fit_linear

logger = logging.getLogger(__name__)


def init_from_training_data(model: Any, train: Any, *, val: Any = None,
                            progress: bool = False) -> None:
    """Run every initialization ``model`` asks for on the ``train`` split (a chunk dataset).

    Parameters
    ----------
    model : the model about to be trained.
    train : the training split's dataset (read as contiguous segments, normalized units).
    val : the validation split, for a request with ``"select": True``: the order is the one
        in ``1..order`` with the smallest 1-step error there (BIC on the training data when
        there is none), and the lags above it are zero.
    progress : tqdm bars for the fit.
    """
    request = getattr(model, "linear_init_request", None)
    if not request:
        return
    name = type(model).__name__
    if not len(train):
        raise ValueError(f"{name}: linear_fit needs training windows to fit a "
                         f"{request['kind'].upper()}({request['order']}) on; the training "
                         "split is empty")
    p = int(request["order"])
    if request.get("select"):
        has_val = val is not None and len(val) > 0
        fitted = fit_linear(train, request["kind"], "auto", max_order=p,
                            val=val if has_val else None, progress=progress)
    else:
        fitted = fit_linear(train, request["kind"], p, progress=progress)
    coef = np.asarray(fitted.channel_coefficients())
    if coef.shape[0] < p:  # a selected lower order: the lags above it are zero
        coef = np.concatenate([coef, np.zeros((p - coef.shape[0], *coef.shape[1:]))])
    extra = {}
    if request.get("tokens"):  # a token model: the VAR's errors and the data's token codec
        sd = np.sqrt(np.diag(fitted.noise_cov))
        extra = {"noise_std": sd, "steps": train.steps,  # and the errors' correlation
                 "noise_corr": fitted.noise_cov / np.outer(sd, sd)}
    model.set_linear_path(coef, fitted.intercept, **extra)
    logger.info("%s: linear path starts at %s fitted on the training split (%d rows, "
                "%.1f s)%s", name, fitted.name, fitted.n_rows, fitted.fit_seconds or 0.0,
                f"; order chosen by {fitted.selection['criterion']} up to {p}"
                if fitted.selection else "")
