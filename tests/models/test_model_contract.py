"""The model contract (DESIGN.md, contract 3), run for every registered model and for each of
its declared capabilities.

A model is covered the moment it is registered: nothing here names a model.
"""

from __future__ import annotations

import pytest
import torch

from ephys_gpt.models.capabilities import (
    CAPABILITIES,
    Classifier,
    DensityModel,
    Forecaster,
    Sampler,
    TokenGenerator,
    Tokenizer,
)
from ephys_gpt.models.output import ModelOutput
from ephys_gpt.models.pretrained import from_pretrained, save_pretrained
from ephys_gpt.models.registry import build_model, list_models

SPECS = list_models()
IDS = [s.name for s in SPECS]


def _with(capability):
    specs = [s for s in SPECS if s.can(capability)]
    return pytest.mark.parametrize("spec", specs, ids=[s.name for s in specs])


def _call(model, inputs) -> ModelOutput:
    out = model(*inputs) if isinstance(inputs, tuple) else model(inputs)
    assert isinstance(out, ModelOutput), (
        f"{type(model).__name__}.forward must return a ModelOutput, got {type(out).__name__}")
    return out


def _primary(inputs) -> torch.Tensor:
    return inputs[0] if isinstance(inputs, tuple) else inputs


def _with_primary(inputs, x):
    return (x, *inputs[1:]) if isinstance(inputs, tuple) else x


def _make(spec):
    torch.manual_seed(0)
    return build_model(spec.name, spec.tiny_config)


def test_registry_is_not_empty():
    assert len(SPECS) > 0


@pytest.mark.parametrize("spec", SPECS, ids=IDS)
def test_has_tiny_config_and_known_capabilities(spec):
    """Completeness: every registered model ships a tiny config for tests and declares only
    known capabilities."""
    assert spec.tiny_config is not None, f"{spec.name} is registered without a tiny_config"
    assert all(c in CAPABILITIES for c in spec.capabilities)


@pytest.mark.parametrize("spec", SPECS, ids=IDS)
def test_forward_shapes_finite_and_gradients(spec):
    model = _make(spec).train()
    inputs = model.example_inputs(batch_size=2)
    out = _call(model, inputs)
    assert out.prediction.shape[0] == 2, (
        f"{spec.name}: batch dim lost, prediction shape {tuple(out.prediction.shape)}")
    for name, t in [("prediction", out.prediction), *out.aux_losses.items(),
                    *out.metrics.items()]:
        assert torch.isfinite(t).all(), f"{spec.name}: {name} is not finite"
    for name, t in [*out.aux_losses.items(), *out.metrics.items()]:
        assert t.ndim == 0, f"{spec.name}: {name} should be a scalar, has shape {tuple(t.shape)}"
    loss = out.prediction.float().pow(2).mean()
    if out.target is not None and out.target.is_floating_point():  # its own target (diffusion)
        loss = (out.prediction.float() - out.target.float()).pow(2).mean()
    elif out.target is not None:  # codes of its tokenizer: logits (..., K) and codes (...)
        assert out.target.shape == out.prediction.shape[:-1]
        loss = torch.nn.functional.cross_entropy(
            out.prediction.float().flatten(0, -2), out.target.flatten())
    for t in out.extras.values():
        loss = loss + t.float().pow(2).mean()
    if out.aux_losses:
        loss = loss + out.total_aux_loss()
    loss.backward()
    missing = [n for n, p in model.named_parameters()
               if p.requires_grad and (p.grad is None or not torch.isfinite(p.grad).all())]
    assert not missing, f"{spec.name}: parameters without a (finite) gradient: {missing[:10]}"


CAUSAL = [s for s in SPECS if s.causal]


@pytest.mark.parametrize("mode", ["eval", "train"])
@pytest.mark.parametrize("spec", CAUSAL, ids=[s.name for s in CAUSAL])
def test_causal_no_future_leak(spec, mode):
    """Outputs up to time t do not change when inputs after t change (and, for real-valued
    inputs, receive no gradient from them), at several split points, in train mode too (no
    statistics pooled over time)."""
    model = _make(spec).train(mode == "train")
    inputs = model.example_inputs(batch_size=2)
    x = _primary(inputs)
    T = x.shape[-1]
    for t in sorted({1, T // 3, T // 2, T - 1}):
        torch.manual_seed(1)
        out = _call(model, inputs).prediction
        tdim = spec.output_time_dim % out.ndim
        t_out = t * out.shape[tdim] // T  # outputs may be at a coarser rate than inputs
        if t_out == 0:
            continue
        x2 = x.clone()
        if x.is_floating_point():
            x2[..., t:] = torch.randn_like(x2[..., t:]) * 3
        else:
            hi = int(x.max().item()) + 1
            x2[..., t:] = (x2[..., t:] + 1 + torch.randint_like(x2[..., t:], hi)) % max(hi, 2)
        torch.manual_seed(1)
        out2 = _call(model, _with_primary(inputs, x2)).prediction
        past, past2 = out.narrow(tdim, 0, t_out), out2.narrow(tdim, 0, t_out)
        assert torch.allclose(past, past2, atol=1e-5), (
            f"{spec.name} ({mode} mode): outputs before t={t} changed when only inputs at "
            f">= t changed")
        if x.is_floating_point():
            xg = x.clone().requires_grad_(True)
            torch.manual_seed(1)
            o = _call(model, _with_primary(inputs, xg)).prediction
            o.narrow(tdim, 0, t_out).sum().backward()
            # no gradient at all: the output reaches the input only through discrete codes
            leak = 0.0 if xg.grad is None else xg.grad[..., t:].abs().max().item()
            assert leak == 0.0, (f"{spec.name} ({mode} mode): gradient {leak} flows from "
                                 f"inputs at >= {t} to earlier outputs")


@pytest.mark.parametrize("spec", SPECS, ids=IDS)
def test_save_load_identical(spec, tmp_path):
    model = _make(spec).eval()
    inputs = model.example_inputs(batch_size=2)
    torch.manual_seed(2)
    with torch.no_grad():
        ref = _call(model, inputs).tensors()
    save_pretrained(model, tmp_path / "export")
    loaded = from_pretrained(tmp_path / "export").eval()
    torch.manual_seed(2)  # models that draw noise in forward (diffusion) reseed identically
    with torch.no_grad():
        got = _call(loaded, inputs).tensors()
    assert len(ref) == len(got)
    for a, b in zip(ref, got):
        assert a.shape == b.shape
        assert torch.equal(a, b), f"{spec.name}: outputs differ after save/load"


# -- capabilities -------------------------------------------------------------------------------

@_with(TokenGenerator)
def test_token_generation_shape_and_cache(spec):
    model = _make(spec).eval()
    ctx = _primary(model.example_inputs(batch_size=2))
    steps = 5
    cached = model.generate(ctx, steps, temperature=0.0, use_cache=True)
    plain = model.generate(ctx, steps, temperature=0.0, use_cache=False)
    T = ctx.shape[-1]
    assert cached.shape[:-1] == ctx.shape[:-1] and cached.shape[-1] == T + steps
    assert cached.dtype == ctx.dtype  # tokens, or images for a model over image codes
    assert torch.equal(cached[..., :T], ctx), f"{spec.name}: generate() altered the context"
    assert torch.equal(cached, plain), f"{spec.name}: cached and uncached generation differ"
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    s1 = model.generate(ctx, steps, temperature=1.0, generator=g1)
    s2 = model.generate(ctx, steps, temperature=1.0, generator=g2)
    assert torch.equal(s1, s2), f"{spec.name}: sampling is not reproducible from a generator"


@_with(Forecaster)
def test_forecast_shape_and_cache(spec):
    model = _make(spec).eval()
    inputs = model.example_inputs(batch_size=2)
    ctx = _primary(inputs)
    steps = 5
    torch.manual_seed(0)
    cached = model.forecast(ctx, steps, use_cache=True)
    torch.manual_seed(0)
    plain = model.forecast(ctx, steps, use_cache=False)
    T = ctx.shape[-1]
    assert cached.shape[:-1] == ctx.shape[:-1] and cached.shape[-1] == T + steps
    assert torch.equal(cached[..., :T], ctx), f"{spec.name}: forecast() altered the past"
    assert torch.isfinite(cached).all()
    assert torch.allclose(cached, plain, atol=1e-4, rtol=1e-4), (
        f"{spec.name}: cached and uncached forecasts differ")


@_with(Sampler)
def test_unconditional_samples_have_the_data_shape(spec):
    model = _make(spec).eval()
    x = _primary(model.example_inputs(batch_size=2))
    torch.manual_seed(0)
    out = model.sample(3, x.shape[-1])
    assert out.shape == (3, *x.shape[1:])
    assert torch.isfinite(out).all()


@_with(Tokenizer)
def test_tokenizer_codes_in_range_and_round_trip_shape(spec):
    model = _make(spec).eval()
    x = _primary(model.example_inputs(batch_size=2))
    with torch.no_grad():
        codes = model.encode(x)
        assert codes.dtype == torch.long
        assert int(codes.min()) >= 0 and int(codes.max()) < model.codebook_size
        x_hat = model.decode(codes)
    assert x_hat.shape == x.shape and torch.isfinite(x_hat).all()


@_with(DensityModel)
def test_density_log_likelihood_finite_and_samples_shaped(spec):
    model = _make(spec).eval()
    x = _primary(model.example_inputs(batch_size=2))
    with torch.no_grad():
        ll = model.log_likelihood(x)
        assert ll.shape == (2,) and torch.isfinite(ll).all()
        torch.manual_seed(0)
        s = model.sample(2)
    assert s.shape == x.shape and torch.isfinite(s).all()


@_with(Classifier)
def test_classifier_logits_per_class(spec):
    model = _make(spec).eval()
    inputs = model.example_inputs(batch_size=2)
    with torch.no_grad():
        logits = _call(model, inputs).prediction
    assert logits.shape == (2, spec.tiny_config["num_classes"])
