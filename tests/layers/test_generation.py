"""The shared generation loop: window rule, when caches are re-primed, argument checks."""

from __future__ import annotations

import pytest
import torch

from ephys_gpt.layers.generation import check_token_context, generate_tokens, window_start


def test_window_start_rule():
    assert window_start(5, 0, None, 1) == 0          # unbounded
    assert window_start(8, 0, 8, 2) == 0             # still fits
    assert window_start(9, 0, 8, 2) == 2             # jump by 2: keep the last 8 - 2 + 1 = 7
    assert window_start(9, 0, 8, 1) == 1             # stride 1: always the last 8 tokens
    assert window_start(100, 0, 8, 8) == 99          # stride >= window keeps one token


class Recorder:
    """A fake model: next token = (sum of the window) % V; records prime/step calls."""

    V = 7

    def __init__(self):
        self.primes, self.steps, self.window = [], 0, None

    def prime(self, window, cached):
        self.primes.append(window.shape[-1])
        self.window = window.clone()
        return self.logits(window.sum(-1))

    def step(self, tok):
        self.steps += 1
        self.window = torch.cat([self.window, tok[..., None]], -1)
        return self.logits(self.window.sum(-1))

    def logits(self, s):
        return torch.nn.functional.one_hot(s % self.V, self.V).float()


def test_cached_loop_reprimes_only_when_the_window_slides():
    ctx = torch.randint(0, 7, (2, 3, 5))
    a, b = Recorder(), Recorder()
    cached = generate_tokens(ctx, 12, prime=a.prime, step=a.step, use_cache=True, window=8,
                             stride=3, temperature=0.0)
    plain = generate_tokens(ctx, 12, prime=b.prime, step=b.step, use_cache=False, window=8,
                            stride=3, temperature=0.0)
    assert torch.equal(cached, plain) and cached.shape == (2, 3, 17)
    assert torch.equal(cached[..., :5], ctx)
    # context of 5 fills to 8, then the window keeps the last 6 tokens every 3 steps (at
    # lengths 9, 12, 15); the other 8 of the 11 transitions are single cached steps
    assert a.primes == [5, 6, 6, 6] and a.steps == 8
    assert len(b.primes) == 12 and b.steps == 0
    # the fake model's rule holds for the window it was shown
    seq = cached
    start = 0
    for t in range(5, 17):
        start = window_start(t, start, 8, 3)
        assert torch.equal(seq[..., t], seq[..., start:t].sum(-1) % 7)


def test_zero_steps_and_bad_arguments():
    ctx = torch.zeros(1, 2, 3, dtype=torch.long)
    r = Recorder()
    assert torch.equal(generate_tokens(ctx, 0, prime=r.prime, step=r.step), ctx)
    with pytest.raises(ValueError, match="steps"):
        generate_tokens(ctx, -1, prime=r.prime, step=r.step)
    with pytest.raises(ValueError, match="top_p"):
        generate_tokens(ctx, 2, prime=r.prime, step=r.step, top_p=2.0)
    with pytest.raises(ValueError, match="generator"):
        generate_tokens(ctx.to("meta"), 2, prime=r.prime, step=r.step,
                        generator=torch.Generator())


def test_context_checks():
    with pytest.raises(ValueError, match="int64"):
        check_token_context(torch.zeros(1, 2, 3), 2, "M")
    with pytest.raises(ValueError, match="C=4"):
        check_token_context(torch.zeros(1, 2, 3, dtype=torch.long), 4, "M")
    with pytest.raises(TypeError):
        check_token_context([[1]], 2, "M")
