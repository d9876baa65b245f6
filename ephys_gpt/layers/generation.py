"""The autoregressive token loop shared by every token-generating model.

A model supplies two functions and this module does the rest (sampling, the output buffer,
the context window, progress):

- ``prime(window (B, C, L), use_cache) -> logits (B, C, V)`` for the last step of
  ``window``; with ``use_cache`` it also resets and fills the model's caches/streaming state
  so that ``window`` is the cached past.
- ``step(tokens (B, C)) -> logits (B, C, V)``: feed one new step through the caches.

Bounded context (``window=n_positions``, for models with learned positions): the model
sees at most ``n_positions`` tokens. When the sequence outgrows the window, the window jumps
forward by ``stride`` so that it holds the last ``n_positions - stride + 1`` tokens, the
caches are re-primed from those (positions restart at 0), and cached steps resume until the
window is full again. Both the cached and the uncached path follow exactly this rule, so they
produce the same tokens. With ``stride=1`` the window always holds the last ``n_positions``
tokens (a full re-prime per step once past ``n_positions``); a larger stride re-primes once
every ``stride`` steps, at the price of a context that varies between
``n_positions - stride + 1`` and ``n_positions`` tokens.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from tqdm.auto import tqdm

from ephys_gpt.layers.sampling import check_sampling_args, sample_logits

PrimeFn = Callable[[torch.Tensor, bool], torch.Tensor]
StepFn = Callable[[torch.Tensor], torch.Tensor]


def window_start(length: int, start: int, window: int | None, stride: int) -> int:
    """Start of the context window for a sequence of ``length`` tokens whose window
    currently starts at ``start`` (see the module docstring)."""
    if window is None or length - start <= window:
        return start
    return length - max(1, window - stride + 1)


def check_token_context(context: torch.Tensor, num_channels: int, name: str) -> None:
    """Validate a ``generate`` context: int64 ``(B, C, T)`` with ``C == num_channels``, T >= 1."""
    if not isinstance(context, torch.Tensor):
        raise TypeError(f"{name}.generate: context must be a torch.Tensor, got {type(context).__name__}")
    if context.dtype != torch.long or context.dim() != 3:
        raise ValueError(f"{name}.generate: context must be int64 tokens (B, C, T), got "
                         f"{context.dtype} of shape {tuple(context.shape)}")
    if context.shape[1] != num_channels or context.shape[2] < 1:
        raise ValueError(f"{name}.generate: context must have C={num_channels} channels and at "
                         f"least one step, got shape {tuple(context.shape)}")


@torch.no_grad()
def generate_tokens(context: torch.Tensor, steps: int, *, prime: PrimeFn, step: StepFn,
                    use_cache: bool = True, window: int | None = None, stride: int = 1,
                    temperature: float = 1.0, top_k: int | None = None,
                    top_p: float | None = None, generator: torch.Generator | None = None,
                    uniforms=None, progress: bool = False,
                    desc: str = "generate") -> torch.Tensor:
    """Extend ``context (B, C, T0)`` by ``steps`` sampled tokens → ``(B, C, T0 + steps)``.

    ``use_cache=False`` recomputes every step from the token window with ``prime`` (the
    reference the cached path must match). See the module docstring for ``window``/``stride``.
    ``uniforms(generator) -> (B, C, 1)``: the uniform numbers of each step's draws (see
    :func:`~ephys_gpt.layers.sampling.sample_logits`; default independent ones).
    """
    check_sampling_args(temperature, top_k, top_p)
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ValueError(f"steps must be an integer >= 0, got {steps!r}")
    if window is not None and window < 1:
        raise ValueError(f"window must be None or >= 1, got {window}")
    if stride < 1:
        raise ValueError(f"stride must be >= 1, got {stride}")
    if generator is not None and generator.device.type != context.device.type:
        raise ValueError(f"generator is on {generator.device} but the context is on "
                         f"{context.device}; create it with torch.Generator(device=...) on the "
                         "model's device")
    B, C, T0 = context.shape
    seq = context.new_empty(B, C, T0 + steps)
    seq[..., :T0] = context
    if steps == 0:
        return seq
    length = T0
    start = window_start(length, 0, window, stride)
    logits = prime(seq[..., start:length], use_cache)
    for i in tqdm(range(steps), desc=desc, disable=not progress, leave=False):
        u = None if uniforms is None or temperature == 0 else uniforms(generator)
        tok = sample_logits(logits, temperature, top_k, top_p, generator, u)  # (B, C)
        seq[..., length] = tok
        length += 1
        if i == steps - 1:
            break
        new_start = window_start(length, start, window, stride)
        if use_cache and new_start == start:
            logits = step(tok)
        else:
            start = new_start
            logits = prime(seq[..., start:length], use_cache)
    return seq
