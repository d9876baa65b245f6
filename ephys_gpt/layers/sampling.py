"""Sampling the next token from logits: temperature, top-k, top-p (nucleus), greedy.

Shared by every token-generating model so that ``generate(..., temperature, top_k, top_p,
generator)`` means the same thing everywhere. Shapes: logits ``(..., V)`` → tokens ``(...)``.
"""

from __future__ import annotations

import torch


def check_sampling_args(temperature: float, top_k: int | None, top_p: float | None) -> None:
    """Raise a ValueError naming the bad sampling argument (called once per ``generate``)."""
    if not isinstance(temperature, (int, float)) or temperature < 0:
        raise ValueError(f"temperature must be a number >= 0 (0 = greedy), got {temperature!r}")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"top_k must be None or an integer >= 1, got {top_k!r}")
    if top_p is not None and (not isinstance(top_p, (int, float)) or not 0.0 < top_p <= 1.0):
        raise ValueError(f"top_p must be None or a number in (0, 1], got {top_p!r}")


def filter_logits(logits: torch.Tensor, top_k: int | None = None,
                  top_p: float | None = None) -> torch.Tensor:
    """Mask (set to -inf) the logits that top-k / top-p sampling may not draw.

    Parameters
    ----------
    logits : Tensor (..., V)
        Unnormalized log-probabilities (already divided by the temperature).
    top_k : int | None
        Keep the ``top_k`` largest logits (all of them if ``top_k >= V``).
    top_p : float | None
        Keep the smallest set of most likely tokens whose probability mass is ``>= top_p``
        (the most likely token is always kept).

    Returns
    -------
    Tensor (..., V), a filtered copy of ``logits``.
    """
    check_sampling_args(1.0, top_k, top_p)
    V = logits.shape[-1]
    out = logits
    if top_k is not None and top_k < V:
        kth = torch.topk(out, top_k, dim=-1).values[..., -1:]
        out = out.masked_fill(out < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(out, dim=-1, descending=True)
        probs = torch.softmax(sorted_logits.float(), dim=-1)
        # mass strictly before each token: a token is kept while that mass is still < top_p,
        # which keeps exactly the smallest prefix reaching top_p (and always the first token).
        mass_before = torch.cumsum(probs, dim=-1) - probs
        drop_sorted = mass_before >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        out = out.masked_fill(drop, float("-inf"))
    return out


def sample_logits(logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None,
                  top_p: float | None = None, generator: torch.Generator | None = None,
                  uniforms: torch.Tensor | None = None) -> torch.Tensor:
    """Draw one token per row of ``logits``.

    Parameters
    ----------
    logits : Tensor (..., V)
    temperature : float
        Softmax temperature; ``0`` returns the argmax (greedy decoding, no randomness).
    top_k, top_p : see :func:`filter_logits`.
    generator : torch.Generator | None
        Source of randomness (on the logits' device) for reproducible sampling.
    uniforms : Tensor (..., 1) | None
        The uniform number in [0, 1) each row's inverse-CDF draw uses (default: independent
        ones from ``generator``). Each row's token keeps exactly its own distribution whatever
        the uniforms' joint law; dependent uniforms (a copula) make the rows' draws
        dependent, e.g. the channels of one time step (``TokenVARForecast.innovation_uniforms``).

    Returns
    -------
    Tensor (...), int64 token ids.
    """
    check_sampling_args(temperature, top_k, top_p)
    if temperature == 0:
        return logits.argmax(dim=-1)
    scaled = logits.float() / temperature
    if top_k is not None or top_p is not None:
        scaled = filter_logits(scaled, top_k=top_k, top_p=top_p)
    # Inverse-CDF draw: one uniform number per row (torch.multinomial draws one exponential
    # per vocabulary entry and checks its input with device asserts: several times slower
    # for the (C, V) rows of a decode step). u < 1 times the total mass lands strictly inside
    # the CDF, on a token of non-zero probability.
    cdf = torch.softmax(scaled, dim=-1).cumsum_(dim=-1)
    if uniforms is None:
        u = torch.rand(*cdf.shape[:-1], 1, generator=generator, device=cdf.device)
    else:  # below 1: u = 1 would land past the CDF, on the last token even if filtered out
        u = uniforms.to(cdf.device, cdf.dtype).clamp(0.0, 1.0 - torch.finfo(cdf.dtype).eps / 2)
    tokens = torch.searchsorted(cdf, u * cdf[..., -1:], right=True)
    return tokens.squeeze_(-1).clamp_(max=logits.shape[-1] - 1)
