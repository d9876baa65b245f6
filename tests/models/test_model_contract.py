"""The model contract (DESIGN.md, contract 3), run for every registered model.

A model is covered the moment it is registered: nothing here names a model.
"""

from __future__ import annotations

import pytest
import torch

from ephys_gpt.models.pretrained import from_pretrained, save_pretrained
from ephys_gpt.models.registry import build_model, list_models

SPECS = list_models()
IDS = [s.name for s in SPECS]


def _tensors(out):
    """All floating tensors in a model output (tensor, tuple or dict)."""
    if isinstance(out, torch.Tensor):
        return [out] if out.is_floating_point() else []
    if isinstance(out, dict):
        out = list(out.values())
    if isinstance(out, (tuple, list)):
        return [t for o in out for t in _tensors(o)]
    return []


def _main(out) -> torch.Tensor:
    return _tensors(out)[0]


def _call(model, inputs):
    return model(*inputs) if isinstance(inputs, tuple) else model(inputs)


def _primary(inputs) -> torch.Tensor:
    return inputs[0] if isinstance(inputs, tuple) else inputs


def _with_primary(inputs, x):
    return (x, *inputs[1:]) if isinstance(inputs, tuple) else x


def _make(spec):
    torch.manual_seed(0)
    model = build_model(spec.name, spec.tiny_config)
    return model


def test_registry_is_not_empty():
    assert len(SPECS) > 0


@pytest.mark.parametrize("spec", SPECS, ids=IDS)
def test_has_tiny_config(spec):
    """Completeness: every registered model ships a tiny config for tests."""
    assert spec.tiny_config is not None, f"{spec.name} is registered without a tiny_config"


@pytest.mark.parametrize("spec", SPECS, ids=IDS)
def test_forward_shapes_finite_and_gradients(spec):
    model = _make(spec).train()
    inputs = model.example_inputs(batch_size=2)
    out = _call(model, inputs)
    tensors = _tensors(out)
    assert tensors, f"{spec.name} returned no floating tensor"
    main = tensors[0]
    assert main.shape[0] == 2, f"{spec.name}: batch dim lost, output shape {tuple(main.shape)}"
    for t in tensors:
        assert torch.isfinite(t).all(), f"{spec.name} produced non-finite values"
    loss = sum(t.float().pow(2).mean() for t in tensors if t.requires_grad)
    loss.backward()
    missing = [n for n, p in model.named_parameters()
               if p.requires_grad and (p.grad is None or not torch.isfinite(p.grad).all())]
    assert not missing, f"{spec.name}: parameters without a (finite) gradient: {missing[:10]}"


@pytest.mark.parametrize("spec", [s for s in SPECS if s.causal], ids=[s.name for s in SPECS if s.causal])
def test_causal_no_future_leak(spec):
    """Outputs up to time t do not change when inputs after t change (and, for real-valued
    inputs, receive no gradient from them)."""
    model = _make(spec).eval()
    inputs = model.example_inputs(batch_size=2)
    x = _primary(inputs)
    T = x.shape[-1]
    t = T // 2
    out = _main(_call(model, inputs))
    tdim = spec.output_time_dim % out.ndim
    T_out = out.shape[tdim]
    t_out = t * T_out // T  # outputs may be at a coarser rate than inputs
    x2 = x.clone()
    if x.is_floating_point():
        x2[..., t:] = torch.randn_like(x2[..., t:]) * 3
    else:
        hi = int(x.max().item()) + 1
        x2[..., t:] = (x2[..., t:] + 1 + torch.randint_like(x2[..., t:], hi)) % max(hi, 2)
    out2 = _main(_call(model, _with_primary(inputs, x2)))
    past, past2 = out.narrow(tdim, 0, t_out), out2.narrow(tdim, 0, t_out)
    assert torch.allclose(past, past2, atol=1e-5), (
        f"{spec.name}: outputs before t={t} changed when only inputs at >= t changed")
    if x.is_floating_point():
        xg = x.clone().requires_grad_(True)
        o = _main(_call(model, _with_primary(inputs, xg)))
        o.narrow(tdim, 0, t_out).sum().backward()
        leak = xg.grad[..., t:].abs().max().item()
        assert leak == 0.0, f"{spec.name}: gradient {leak} flows from future inputs to the past"


@pytest.mark.parametrize("spec", SPECS, ids=IDS)
def test_save_load_identical(spec, tmp_path):
    model = _make(spec).eval()
    inputs = model.example_inputs(batch_size=2)
    with torch.no_grad():
        ref = _tensors(_call(model, inputs))
    save_pretrained(model, tmp_path / "export")
    loaded = from_pretrained(tmp_path / "export").eval()
    with torch.no_grad():
        got = _tensors(_call(loaded, inputs))
    # Models with sampling in forward (e.g. diffusion noise) must reseed identically.
    assert len(ref) == len(got)
    for a, b in zip(ref, got):
        assert a.shape == b.shape
        if getattr(model, "stochastic_forward", False):
            continue
        assert torch.equal(a, b), f"{spec.name}: outputs differ after save/load"


GEN = [s for s in SPECS if s.generation]


@pytest.mark.parametrize("spec", GEN, ids=[s.name for s in GEN])
def test_generation_shape_and_cache(spec):
    model = _make(spec).eval()
    ctx = _primary(model.example_inputs(batch_size=2))
    steps = 5
    if spec.generation == "tokens":
        cached = model.generate(ctx, steps, temperature=0.0, use_cache=True)
        plain = model.generate(ctx, steps, temperature=0.0, use_cache=False)
    else:
        torch.manual_seed(0)
        cached = model.forecast(ctx, steps, use_cache=True)
        torch.manual_seed(0)
        plain = model.forecast(ctx, steps, use_cache=False)
    T = ctx.shape[-1]
    assert cached.shape[:-1] == ctx.shape[:-1] and cached.shape[-1] == T + steps
    assert torch.equal(cached[..., :T], ctx), f"{spec.name}: generate() altered the context"
    if spec.generation == "tokens":
        assert cached.dtype == torch.long
        assert torch.equal(cached, plain), f"{spec.name}: cached and uncached generation differ"
    else:
        assert torch.isfinite(cached).all()
        assert torch.allclose(cached, plain, atol=1e-4, rtol=1e-4), (
            f"{spec.name}: cached and uncached forecasts differ")
