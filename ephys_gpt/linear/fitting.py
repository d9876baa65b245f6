"""Streaming ridge least squares for per-channel AR(p) and multichannel VAR(p).

The model (``x`` a (C, T) segment, ``t`` a sample, ``p`` the order)::

    AR:   x[c, t+1] = b[c] + sum_l a[l, c] * x[c, t-l+1]               (one regression per channel)
    VAR:  x[:, t+1] = b + sum_l A[l] @ z[:, t-l+1],   z = P @ x         (one regression, C outputs)

``P`` is the identity (all channels as given) or the leading ``K`` principal components of the
per-channel standardized training data (see :func:`fit_linear`). The intercept ``b`` is not
penalized; the coefficients get the ridge penalty ``lam * ||A||^2`` with

    lam = ridge * trace(G) / F,

``G`` the centered Gram matrix of the F lagged inputs, i.e. ``ridge`` times the summed
(n-weighted) average variance of one input: a dimensionless shrinkage that means the same in
tesla or in normalized units and at any sample count (``ridge=1e-4``: 0.01 % of the data's
own variance, enough to keep nearly collinear channels solvable, too little to bias a fit on
thousands of samples).

Fitting never materializes the lagged data: the sufficient statistics (``sum x``, ``sum y``,
``X'X``, ``X'y``, ``y'y``, all float64) are accumulated segment by segment from lagged
products of the segment itself (see :class:`_Accumulator`; long segments are read in blocks
of ``buffer_mb``), so memory is the statistics plus one block, whatever the data size.
Rows exist only where all ``p`` lags lie inside one segment, so no lag crosses a segment
boundary. Orders ``q <= p`` reuse the statistics of order ``p`` (the inputs are ordered lag by
lag, oldest first, so order ``q`` is the trailing block), which makes order selection one pass over the
training data and one over the validation data.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from tqdm.auto import tqdm

from ephys_gpt.linear.data import Segments, as_segments, segment_array
from ephys_gpt.linear.predictor import LinearPredictor
from ephys_gpt.validation import check_number, check_option

logger = logging.getLogger(__name__)

#: Default dimensionless ridge (see the module docstring).
DEFAULT_RIDGE = 1e-4
#: Default cap on a VAR's lagged inputs (order x channels) before it fits on principal
#: components: a 4096 x 4096 float64 Gram matrix is 134 MB and solves in seconds on a CPU.
DEFAULT_MAX_FEATURES = 4096
KINDS = ("ar", "var")
CRITERIA = ("val", "bic")


@dataclass
class LagStats:
    """Sufficient statistics of a lagged regression, for G independent groups.

    AR: one group per channel (F = p inputs, O = 1 output); VAR: one group (F = p*K inputs,
    O = C outputs). All float64; inputs and targets are taken after subtracting ``shift``.
    """

    n: int
    sx: torch.Tensor  # (G, F)
    sy: torch.Tensor  # (G, O)
    xx: torch.Tensor  # (G, F, F)
    xy: torch.Tensor  # (G, F, O)
    yy: torch.Tensor  # (G, O, O)


class _Accumulator:
    """Adds the lagged-regression statistics of one segment at a time to :class:`LagStats`.

    Inputs are ordered lag by lag, oldest first: input block ``j`` (K values) of row ``r`` is
    ``z[:, r + j]``, i.e. lag ``p - j``; the target is ``x[:, r + p]``. The Gram block
    ``(i, i + d)`` is ``M_d(i) = sum_r z[r + i] z[r + i + d]'``: it is computed once for
    ``i = 0`` (p products over all rows) and shifted to ``i > 0`` by adding the rows that enter
    and removing those that leave (a rank-one update each), so a segment costs about
    ``p K^2 n`` operations instead of the ``(p K)^2 n`` of forming ``X'X`` from the rows, and
    the lagged rows are never formed. Segments longer than a block (``buffer_mb``) are cut
    into blocks of rows that overlap by ``p`` samples.
    """

    def __init__(self, kind: str, order: int, n_channels: int, shift: np.ndarray,
                 projection: np.ndarray | None, device: torch.device, buffer_mb: float):
        self.kind, self.p, self.C = kind, order, n_channels
        self.dev = device
        self.shift = torch.as_tensor(shift, dtype=torch.float64, device=device)[:, None]
        self.proj = (None if projection is None else
                     torch.as_tensor(projection, dtype=torch.float64, device=device))
        K = n_channels if projection is None else projection.shape[0]
        G, self.K, n_out = (n_channels, 1, 1) if kind == "ar" else (1, K, n_channels)
        # rows per block: the block's z and x (float64) fit in buffer_mb
        self.rows = int(max(order + 1, buffer_mb * 2**20 // (8 * (K + n_channels))))
        F = order * self.K
        z = dict(dtype=torch.float64, device=device)
        self.stats = LagStats(0, torch.zeros((G, F), **z), torch.zeros((G, n_out), **z),
                              torch.zeros((G, F, F), **z), torch.zeros((G, F, n_out), **z),
                              torch.zeros((G, n_out, n_out), **z))

    def add(self, x: np.ndarray) -> int:
        """Add the rows of one (C, T) segment; returns how many (0 if T <= order)."""
        p = self.p
        n_rows = x.shape[1] - p
        for r0 in range(0, max(n_rows, 0), self.rows):
            m = min(self.rows, n_rows - r0)
            xt = torch.as_tensor(x[:, r0:r0 + m + p], dtype=torch.float64,
                                 device=self.dev) - self.shift
            zt = xt if self.proj is None else self.proj @ xt
            if self.kind == "ar":  # one group per channel, one input per lag
                self._add_block(zt[:, None, :], xt[:, None, :])
            else:
                self._add_block(zt[None], xt[None])
        return max(n_rows, 0)

    def _add_block(self, z: torch.Tensor, y: torch.Tensor) -> None:
        """Statistics of inputs ``z`` (G, K, L) and targets ``y`` (G, O, L): rows
        ``r = 0 .. L - p - 1`` with inputs ``z[..., r:r + p]`` and target ``y[..., r + p]``."""
        p, K, st = self.p, self.K, self.stats
        G, L = z.shape[0], z.shape[-1]
        n = L - p
        yt = y[..., p:]  # (G, O, n)
        st.n += n
        st.sy += yt.sum(-1)
        st.yy += yt @ yt.transpose(1, 2)
        xx = st.xx.view(G, p, K, p, K)
        sx = st.sx.view(G, p, K)
        xy = st.xy.view(G, p, K, -1)
        ytt = yt.transpose(1, 2).contiguous()  # (G, n, O)
        head = z[..., :n].transpose(1, 2).contiguous()  # (G, n, K)
        for j in range(p):
            zj = z[..., j:j + n]
            sx[:, j] += zj.sum(-1)
            xy[:, j] += zj @ ytt
        for d in range(p):
            base = (z[..., d:d + n] @ head).transpose(1, 2)  # M_d(0) = sum_r z[r] z[r + d]'
            m = p - 1 - d  # shifts i = 1 .. m
            if m:
                enter = torch.einsum("gks,gls->gskl", z[..., n:n + m], z[..., n + d:n + d + m])
                leave = torch.einsum("gks,gls->gskl", z[..., :m], z[..., d:d + m])
                blocks = torch.cat([base[:, None], base[:, None] + (enter - leave).cumsum(1)],
                                   dim=1)  # (G, m + 1, K, K): M_d(i), i = 0 .. m
            else:
                blocks = base[:, None]
            # blocks (i, i + d) form the d-th block diagonal: [g, k, l, i] = M_d(i)[k, l]
            xx.diagonal(offset=d, dim1=1, dim2=3).add_(blocks.permute(0, 2, 3, 1))
            if d:
                xx.diagonal(offset=-d, dim1=1, dim2=3).add_(blocks.permute(0, 3, 2, 1))


def _accumulate(kind: str, data: Any, order: int, n_channels: int, shift: np.ndarray,
                projection: np.ndarray | None, device: torch.device, buffer_mb: float,
                progress: bool, desc: str, what: str) -> LagStats:
    acc = _Accumulator(kind, order, n_channels, shift, projection, device, buffer_mb)
    lengths = []
    total = len(data) if hasattr(data, "__len__") else None
    for i, seg in enumerate(tqdm(data, total=total, desc=desc, disable=not progress,
                                 leave=False, unit="segment")):
        x = _checked(data, seg, i, n_channels, what)
        lengths.append(x.shape[1])
        acc.add(x)
    st = acc.stats
    if st.n == 0:
        raise ValueError(f"{what}: no segment is longer than the order {order} (segment "
                         f"lengths {sorted(set(lengths))[:10]}); an order-{order} model needs "
                         f"at least {order + 1} contiguous samples per segment: lower the "
                         "order or use longer windows")
    n_short = sum(n <= order for n in lengths)
    if n_short:
        logger.info("%s: %d of %d segment(s) are not longer than the order %d and add no row",
                    what, n_short, len(lengths), order)
    return st


def _checked(data: Any, seg: Any, i: int, n_channels: int | None, what: str) -> np.ndarray:
    if isinstance(data, Segments):
        return seg  # already float64, checked and labelled by Segments.read
    return segment_array(seg, i, n_channels, what)


def _first_segment(data: Any, what: str) -> np.ndarray:
    for i, seg in enumerate(data):
        return _checked(data, seg, i, None, what)
    raise ValueError(f"{what} holds no segment")


# -- solving -----------------------------------------------------------------------------------


def _sub(st: LagStats, F: int) -> LagStats:
    """The statistics of the last ``F`` inputs (the ``F / K`` most recent lags: a lower
    order)."""
    return LagStats(st.n, st.sx[:, -F:], st.sy, st.xx[:, -F:, -F:], st.xy[:, -F:], st.yy)


def _solve(st: LagStats, ridge: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Ridge solution: coefficients (G, F, O), intercepts (G, O), residual SSCP (G, O, O).

    Memory: the statistics plus one (G, F, F) matrix (the Cholesky factor overwrites it).
    """
    n = st.n
    mx, my = st.sx / n, st.sy / n
    xyc = st.xy - n * mx[:, :, None] * my[:, None, :]
    yyc = st.yy - n * my[:, :, None] * my[:, None, :]

    def regularized() -> tuple[torch.Tensor, torch.Tensor]:
        a = st.xx.clone().baddbmm_(mx[:, :, None], mx[:, None, :], alpha=-n)  # centred
        lam = ridge * torch.diagonal(a, dim1=1, dim2=2).sum(-1) / a.shape[-1]  # (G,)
        a.diagonal(dim1=1, dim2=2).add_(lam[:, None])
        return a, lam

    a, lam = regularized()
    info = torch.empty(a.shape[0], dtype=torch.int32, device=a.device)
    torch.linalg.cholesky_ex(a, out=(a, info))  # in place: a holds the factor
    if bool((info == 0).all()):
        coef = torch.cholesky_solve(xyc, a)
    else:  # singular (constant or duplicated inputs with ridge=0): minimum-norm solution
        logger.warning("the lagged Gram matrix is singular (constant or duplicated inputs); "
                       "using the minimum-norm least-squares solution (raise ridge to avoid)")
        del a
        a, lam = regularized()
        coef = torch.linalg.pinv(a, hermitian=True) @ xyc
    del a
    intercept = my - (coef * mx[:, :, None]).sum(1)
    # at the solution (Gc + lam I) B = Xy, so E'E = Y'Y - B'X'y - lam B'B (all centred)
    ct = coef.transpose(1, 2)
    ct_xy = ct @ xyc
    sscp = yyc - ct_xy - lam[:, None, None] * (ct @ coef)
    return coef, intercept, 0.5 * (sscp + sscp.transpose(1, 2))


def _sse(st: LagStats, coef: torch.Tensor, intercept: torch.Tensor) -> float:
    """Summed squared error of (coef, intercept) on the data behind ``st``."""
    F = coef.shape[1]
    xx, xy, sx = st.xx[:, -F:, -F:], st.xy[:, -F:], st.sx[:, -F:]
    ct = coef.transpose(1, 2)  # (G, O, F)
    quad = torch.diagonal(ct @ xx @ coef, dim1=1, dim2=2)  # (G, O)
    cross = torch.diagonal(ct @ xy, dim1=1, dim2=2)
    yy = torch.diagonal(st.yy, dim1=1, dim2=2)
    b_sx = (ct @ sx[:, :, None])[..., 0]  # (G, O)
    sse = yy - 2 * cross - 2 * intercept * st.sy + quad + 2 * intercept * b_sx \
        + st.n * intercept ** 2
    return float(sse.sum())


def _bic(kind: str, sscp: torch.Tensor, n: int, n_coef_per_output: int) -> float:
    """Schwarz criterion per sample: log det of the residual covariance + log(n)/n x #coefs."""
    cov = sscp / n
    if kind == "ar":
        logdet = torch.log(torch.diagonal(cov, dim1=1, dim2=2).clamp_min(1e-300)).sum()
    else:
        sign, logdet = torch.linalg.slogdet(cov[0])
        if sign <= 0:
            logdet = torch.tensor(-math.inf)
    n_out = cov.shape[0] * cov.shape[-1]
    return float(logdet) + math.log(n) / n * n_coef_per_output * n_out


# -- the public entry --------------------------------------------------------------------------


def _check_order(order: Any, name: str = "order") -> int:
    if isinstance(order, bool) or not isinstance(order, (int, np.integer)) or order < 1:
        raise ValueError(f"{name} must be an integer >= 1 (the number of past samples "
                         f"used), got {order!r}")
    return int(order)


def _projection(data: Any, n_components: int, n_channels: int, shift: np.ndarray,
                device: torch.device, progress: bool, what: str) -> tuple[np.ndarray, float]:
    """Leading principal components of the per-channel standardized data: (K, C), and the
    fraction of the standardized variance they explain."""
    s1 = torch.zeros(n_channels, dtype=torch.float64, device=device)
    s2 = torch.zeros((n_channels, n_channels), dtype=torch.float64, device=device)
    n = 0
    total = len(data) if hasattr(data, "__len__") else None
    for i, seg in enumerate(tqdm(data, total=total, desc="VAR: principal components",
                                 disable=not progress, leave=False, unit="segment")):
        x = torch.as_tensor(_checked(data, seg, i, n_channels, what) - shift[:, None],
                            device=device)
        s1 += x.sum(1)
        s2 += x @ x.T
        n += x.shape[1]
    mean = s1 / n
    cov = s2 / n - mean[:, None] * mean[None, :]
    std = torch.sqrt(torch.diagonal(cov).clamp_min(0))
    std = torch.where(std > 0, std, torch.ones_like(std))
    corr = cov / std[:, None] / std[None, :]
    evals, evecs = torch.linalg.eigh(corr)
    top = torch.argsort(evals, descending=True)[:n_components]
    proj = (evecs[:, top].T / std[None, :]).cpu().numpy()  # z = V' D^-1/2 x
    explained = float(evals[top].clamp_min(0).sum() / evals.clamp_min(0).sum())
    return proj, explained


def fit_linear(data: Any, kind: Literal["ar", "var"], order: int | Literal["auto"] = "auto", *,
               val: Any = None, orders: Sequence[int] | None = None, max_order: int = 30,
               criterion: Literal["val", "bic"] = "val", ridge: float = DEFAULT_RIDGE,
               n_components: int | Literal["auto"] | None = "auto",
               max_features: int = DEFAULT_MAX_FEATURES, device: str | torch.device = "cpu",
               buffer_mb: float = 64.0, progress: bool = False) -> LinearPredictor:
    """Fit a per-channel AR(p) (``kind="ar"``) or a multichannel VAR(p) (``kind="var"``).

    Parameters
    ----------
    data : chunk dataset, list of (C, T) arrays, or (N, C, T) array
        Training data. A dataset is read as :class:`~ephys_gpt.linear.data.Segments`
        (contiguous runs of its windows; token data decoded to normalized units). Each array
        is one contiguous segment; no lag crosses from one to the next.
    order : int or "auto"
        The model order p (samples of history), or ``"auto"``: chosen among ``orders``.
    val : same kinds as ``data``, optional
        Validation data for ``criterion="val"``.
    orders : list of int, optional
        Candidate orders for ``order="auto"`` (default ``1..max_order``).
    criterion : "val" or "bic"
        ``val``: the smallest mean squared 1-step error on ``val`` (falls back to ``bic``
        when no ``val`` is given); ``bic``: the Schwarz criterion on the training data
        (log det of the residual covariance + log(n)/n x number of coefficients; per channel
        and summed for AR). All candidates are fitted on the same rows (those with
        ``max(orders)`` samples of history), as order comparisons require.
    ridge : float
        Dimensionless ridge (module docstring), >= 0.
    n_components : int, "auto" or None
        VAR only. Inputs are the lags of all C channels (None), of the leading
        ``n_components`` principal components of the standardized data (int), or (``auto``)
        all channels while ``order x C <= max_features`` and otherwise
        ``max_features // order`` components. The outputs are always all C channels.
    device : torch device for the accumulation (float64).
    buffer_mb : the data read at a time: longer segments are cut into blocks of rows of
        about this size (bounded memory whatever the segment length).
    progress : tqdm progress bars.

    Returns
    -------
    LinearPredictor
        With ``selection`` (the candidate orders and their scores) when ``order="auto"``.
    """
    check_option(kind, KINDS, "kind")
    check_option(criterion, CRITERIA, "criterion")
    check_number(ridge, "ridge", low=0.0)
    check_number(buffer_mb, "buffer_mb", low=0.0, low_inclusive=False)
    check_number(max_features, "max_features", low=1, integer=True)
    device = torch.device(device)
    t0 = time.perf_counter()
    cands = _candidate_orders(order, orders, max_order)
    p_max = max(cands)
    data = as_segments(data, "data")
    first = _first_segment(data, "data")
    C = first.shape[0]
    shift = first.mean(axis=1)  # centring for float64 accuracy; undone in the intercept
    projection, explained = _input_projection(kind, n_components, data, p_max, C, shift,
                                              max_features, device, progress)

    def accumulate(segments: Segments, what: str, label: str) -> LagStats:
        return _accumulate(kind, segments, p_max, C, shift, projection, device, buffer_mb,
                           progress, f"{kind.upper()}({p_max}) {what}", label)

    st = accumulate(data, "fit", "data")
    per_lag = 1 if kind == "ar" else (C if projection is None else projection.shape[0])
    best, selection = cands[0], None
    if len(cands) > 1:
        best, selection = _select_order(kind, cands, st, per_lag, ridge, criterion, val,
                                        accumulate)
    coef, icpt, sscp = _solve(_sub(st, best * per_lag), ridge)
    model = _to_predictor(kind, best, coef, icpt, sscp, st, shift, projection, ridge)
    model.selection = selection
    model.explained_variance = explained
    model.fit_seconds = time.perf_counter() - t0
    logger.info("fitted %s on %d rows in %.2f s", model.name, st.n, model.fit_seconds)
    return model


def _candidate_orders(order: Any, orders: Sequence[int] | None, max_order: int) -> list[int]:
    """The orders to fit: ``[order]``, or for ``order="auto"`` the sorted ``orders``
    (default ``1..max_order``)."""
    if order != "auto":
        return [_check_order(order)]
    cands = (sorted({_check_order(o, "orders[]") for o in orders}) if orders is not None
             else list(range(1, _check_order(max_order, "max_order") + 1)))
    if not cands:
        raise ValueError("orders must list at least one candidate order")
    return cands


def _input_projection(kind: str, n_components: Any, data: Segments, p_max: int, C: int,
                      shift: np.ndarray, max_features: int, device: torch.device,
                      progress: bool) -> tuple[np.ndarray | None, float | None]:
    """A VAR's input projection onto leading principal components (``n_components``, see
    :func:`fit_linear`) and the share of variance it keeps; ``(None, None)`` for all channels."""
    if kind != "var":
        if n_components not in (None, "auto"):
            raise ValueError("n_components applies to kind='var' only (a per-channel AR has "
                             "no channel mixing to reduce)")
        return None, None
    if n_components == "auto":
        n_components = None if p_max * C <= max_features else max(1, max_features // p_max)
        if n_components is not None:
            logger.info("VAR(%d) on %d channels would have %d lagged inputs (> "
                        "max_features=%d): fitting on the %d leading principal components",
                        p_max, C, p_max * C, max_features, n_components)
    if n_components is None:
        return None, None
    check_number(n_components, "n_components", low=1, high=C, integer=True)
    projection, explained = _projection(data, int(n_components), C, shift, device, progress,
                                        "data")
    logger.info("VAR inputs: %d principal components explain %.1f%% of the standardized "
                "variance", n_components, 100 * explained)
    return projection, explained


def _select_order(kind: str, cands: list[int], st: LagStats, per_lag: int, ridge: float,
                  criterion: str, val: Any, accumulate) -> tuple[int, dict]:
    """The best of ``cands`` by validation MSE (when ``val`` is given; mean over rows and the
    C outputs, ``st.sy.numel()`` = C for AR and VAR alike) or BIC, all fitted on the same rows
    ``st``; returns it and the selection record."""
    name = kind.upper()
    use_val = criterion == "val" and val is not None
    if criterion == "val" and val is None:
        logger.info("%s order selection: no validation data given; using BIC", name)
    vst = accumulate(as_segments(val, "val"), "validation", "val") if use_val else None
    scores = []
    for q in cands:
        coef, icpt, sscp = _solve(_sub(st, q * per_lag), ridge)
        scores.append(_sse(_sub(vst, q * per_lag), coef, icpt) / (vst.n * st.sy.numel())
                      if use_val else _bic(kind, sscp, st.n, q * per_lag))
    best = cands[int(np.argmin(scores))]
    selection = {"criterion": "val_mse" if use_val else "bic", "orders": cands,
                 "scores": scores, "chosen": best,
                 "n_rows": st.n, "n_val_rows": vst.n if vst is not None else None}
    logger.info("%s order selection (%s over %s..%s): p = %d", name, selection["criterion"],
                cands[0], cands[-1], best)
    return best, selection


def _to_predictor(kind: str, p: int, coef: torch.Tensor, icpt: torch.Tensor,
                  sscp: torch.Tensor, st: LagStats, shift: np.ndarray,
                  projection: np.ndarray | None, ridge: float) -> LinearPredictor:
    """Solved blocks → a :class:`LinearPredictor` in the data's own (unshifted) units."""
    coef, icpt, sscp = (t.cpu().numpy() for t in (coef, icpt, sscp))
    n = st.n
    my = st.sy.cpu().numpy() / n
    if kind == "ar":
        a = coef[:, ::-1, 0].T  # (p, C); inputs were oldest first
        b = icpt[:, 0] + shift - a.sum(0) * shift
        noise = np.diag(sscp[:, 0, 0] / n)
        mean = my[:, 0] + shift
    else:
        C = icpt.shape[1]
        K = coef.shape[1] // p
        a = coef[0].reshape(p, K, C)[::-1].transpose(0, 2, 1)  # (p, C, K): a[l-1] = A_l
        zshift = shift if projection is None else projection @ shift
        b = icpt[0] + shift - a.sum(0) @ zshift
        noise = sscp[0] / n
        mean = my[0] + shift
    return LinearPredictor(kind=kind, coef=a, intercept=b, noise_cov=noise, mean=mean,
                           projection=projection, ridge=ridge, n_rows=n)
