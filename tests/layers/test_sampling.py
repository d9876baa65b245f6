"""Sampling: greedy, temperature, top-k, top-p, generator reproducibility, argument errors."""

from __future__ import annotations

import pytest
import torch

from ephys_gpt.layers.sampling import filter_logits, sample_logits


def test_temperature_zero_is_argmax():
    logits = torch.randn(4, 3, 10)
    assert torch.equal(sample_logits(logits, temperature=0.0), logits.argmax(-1))


def test_top_k_one_equals_greedy_at_any_temperature():
    logits = torch.randn(64, 20)
    g = torch.Generator().manual_seed(1)
    got = sample_logits(logits, temperature=5.0, top_k=1, generator=g)
    assert torch.equal(got, logits.argmax(-1))


def test_top_k_only_draws_the_k_best():
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.9, -1.0]]).expand(2000, 5)
    g = torch.Generator().manual_seed(0)
    draws = sample_logits(logits, temperature=10.0, top_k=2, generator=g)
    assert set(draws.unique().tolist()) == {1, 3}


def test_top_p_keeps_smallest_set_reaching_p():
    probs = torch.tensor([0.5, 0.25, 0.15, 0.1])
    logits = probs.log()[None]
    # 0.5 < 0.6 -> need the second token too (0.75 >= 0.6); the third is dropped
    kept = torch.isfinite(filter_logits(logits, top_p=0.6))[0]
    assert kept.tolist() == [True, True, False, False]
    # exactly reaching p with the first two tokens keeps just those two
    kept = torch.isfinite(filter_logits(logits, top_p=0.75))[0]
    assert kept.tolist() == [True, True, False, False]
    # a tiny p keeps only the most likely token
    kept = torch.isfinite(filter_logits(logits, top_p=0.01))[0]
    assert kept.tolist() == [True, False, False, False]
    assert torch.isfinite(filter_logits(logits, top_p=1.0)).all()


def test_top_p_works_on_unsorted_vocabularies():
    probs = torch.tensor([0.1, 0.5, 0.15, 0.25])
    kept = torch.isfinite(filter_logits(probs.log()[None], top_p=0.7))[0]
    assert kept.tolist() == [False, True, False, True]


def test_sampled_frequencies_follow_temperature():
    logits = torch.tensor([[2.0, 0.0]]).expand(20000, 2)
    g = torch.Generator().manual_seed(0)
    hot = sample_logits(logits, temperature=1.0, generator=g).float().mean().item()
    cold = sample_logits(logits, temperature=0.5, generator=g).float().mean().item()
    # P(token 1) = sigmoid(-2/T): 0.119 at T=1, 0.018 at T=0.5
    assert abs(hot - 0.119) < 0.015
    assert abs(cold - 0.018) < 0.006


def test_generator_makes_sampling_reproducible():
    logits = torch.randn(8, 3, 50)
    a = sample_logits(logits, generator=torch.Generator().manual_seed(7), top_p=0.9)
    b = sample_logits(logits, generator=torch.Generator().manual_seed(7), top_p=0.9)
    assert a.shape == (8, 3) and a.dtype == torch.long
    assert torch.equal(a, b)


@pytest.mark.parametrize("kwargs, match", [
    ({"temperature": -1.0}, "temperature"),
    ({"top_k": 0}, "top_k"),
    ({"top_k": 2.5}, "top_k"),
    ({"top_p": 0.0}, "top_p"),
    ({"top_p": 1.5}, "top_p"),
])
def test_bad_arguments_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        sample_logits(torch.randn(2, 5), **kwargs)


def test_draws_follow_the_probabilities_and_never_hit_a_zero():
    """One uniform number per row against the CDF: frequencies match the probabilities, and
    tokens of probability 0 (in the middle or at the end of the vocabulary, or filtered out
    by top-k) are never drawn."""
    probs = torch.tensor([0.2, 0.0, 0.5, 0.3, 0.0])
    logits = probs.log().expand(40000, 5)
    g = torch.Generator().manual_seed(3)
    draws = sample_logits(logits, generator=g)
    freq = torch.bincount(draws, minlength=5).float() / draws.numel()
    assert freq[1] == 0 and freq[4] == 0
    assert torch.allclose(freq, probs, atol=0.01)
    top2 = sample_logits(logits, top_k=2, generator=g)
    assert set(top2.unique().tolist()) == {2, 3}


def test_given_uniforms_are_the_inverse_cdf_draws():
    """``uniforms`` replace the generator's numbers one for one: the same numbers give the
    same tokens, each row's token is where its uniform falls in its CDF (so any joint law of
    the uniforms keeps every row's own distribution)."""
    logits = torch.randn(6, 3, 8)
    u = torch.rand(6, 3, 1, generator=torch.Generator().manual_seed(4))
    own = sample_logits(logits, 0.7, generator=torch.Generator().manual_seed(4))
    assert torch.equal(sample_logits(logits, 0.7, uniforms=u), own)
    cdf = torch.softmax(logits / 0.7, -1).cumsum(-1)
    assert torch.equal(own, (cdf <= u * cdf[..., -1:]).sum(-1))
    probs = torch.tensor([0.2, 0.0, 0.5, 0.3])
    edges = sample_logits(probs.log().expand(3, 4), uniforms=torch.tensor([[0.0], [0.5], [1 - 1e-7]]))
    assert edges.tolist() == [0, 2, 3]
    # a uniform of 1 (a copula's Phi(z) rounds to 1 in float32 for z > 5.4) stays inside the
    # CDF: never a token that top-k or top-p filtered out
    ones = torch.ones(3, 1)
    last_out = torch.tensor([0.3, 0.0, 0.5, 0.2]).log().expand(3, 4)
    assert sample_logits(last_out, top_k=2, uniforms=ones).tolist() == [2] * 3
    assert sample_logits(torch.tensor([[2.0, 1.0, 0.0, -5.0]]), top_p=0.5,
                         uniforms=torch.ones(1, 1)).tolist() == [0]
