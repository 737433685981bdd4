"""The "mse" range rule: error op, sampling observer, per-site candidate selection; device placement."""
import pytest
import torch

import igq_plugin as igq
from igq_plugin import ops
from igq_plugin.calibration import (
    MSE_CANDIDATES,
    ChannelSampleObserver,
    fit_group_ranges,
    select_group_ranges,
)
from igq_plugin.modules import ActQuantizer, QuantLinear

from test_quantize import InstanceVaryingMLP, instance_varying_data


def _activations(n=24, tokens=20, c=48, seed=0):
    g = torch.Generator().manual_seed(seed)
    scale = torch.logspace(-2, 1, c) * torch.exp(torch.randn(n, 1, c, generator=g) * 0.6)
    x = torch.randn(n, tokens, c, generator=g) * scale
    x[:, 0, :4] *= 30  # a few outlier tokens: clipping them trades against resolution
    return x


@pytest.mark.parametrize("weighted", [False, True])
def test_group_quant_error_equals_fake_quant_error_with_every_token(weighted):
    x = _activations()
    lo, hi = ops.channel_ranges(x)
    glo, ghi = fit_group_ranges(lo, hi, 6, update="quantile", quantile=0.9)
    w = torch.rand(x.shape[-1]) if weighted else None
    err = (ops.group_fake_quantize(x, glo, ghi, 4) - x).pow(2)
    expected = (err * w).sum() if weighted else err.sum()
    got = ops.group_quant_error(x, lo, hi, glo, ghi, 4, w)
    torch.testing.assert_close(got, expected)


def test_group_quant_error_assigns_by_full_instance_ranges():
    x = _activations()
    lo, hi = ops.channel_ranges(x)
    glo, ghi = fit_group_ranges(lo, hi, 6, update="mean")
    part = x[:, 1:5]  # the outlier token is not in the sample, but it still decides the assignment
    full = (ops.group_fake_quantize(x, glo, ghi, 4) - x)[:, 1:5].pow(2).sum()
    torch.testing.assert_close(ops.group_quant_error(part, lo, hi, glo, ghi, 4), full)
    with pytest.raises(ValueError, match=r"samples \[B, K, C\]"):
        ops.group_quant_error(part, lo[:, :3], hi[:, :3], glo, ghi, 4)


@pytest.mark.parametrize("bits", [4, 6])
def test_select_group_ranges_returns_the_least_error_candidate(bits):
    x = _activations()
    lo, hi = ops.channel_ranges(x)
    w = torch.rand(x.shape[-1]) + 0.1
    chunks = [(x[:12], lo[:12], hi[:12]), (x[12:], lo[12:], hi[12:])]
    glo, ghi, rule = select_group_ranges(chunks, 6, bits, channel_weights=w)
    errors = {}
    for cand, q in MSE_CANDIDATES:
        clo, chi = fit_group_ranges(lo, hi, 6, update=cand, quantile=q or 0.99)  # same k-means, same refinement
        errors[(cand, q)] = float(ops.group_quant_error(x, lo, hi, clo, chi, bits, w))
        if (cand, q) == rule:
            assert torch.equal(clo, glo) and torch.equal(chi, ghi)
    assert errors[rule] == min(errors.values()), errors
    assert errors[rule] <= errors[("quantile", 0.99)] and errors[rule] <= errors[("envelope", None)]


def test_select_group_ranges_bad_input():
    x = _activations()
    lo, hi = ops.channel_ranges(x)
    with pytest.raises(ValueError, match="candidate rule"):
        select_group_ranges([(x, lo, hi)], 4, 4, candidates=(("median", None),))
    with pytest.raises(ValueError, match="chunks"):
        select_group_ranges([], 4, 4)
    with pytest.raises(ValueError, match="select_group_ranges"):
        fit_group_ranges(lo, hi, 4, update="mse")


def test_sample_observer_keeps_ranges_and_remaps_samples():
    x = _activations(n=5, tokens=40)
    obs = ChannelSampleObserver("site", tokens=16)
    obs.observe(x[:3])
    obs.observe(x[3:])
    (s0, lo0, hi0), (s1, _, _) = obs.chunks()
    assert s0.shape == (3, 16, x.shape[-1]) and s1.shape == (2, 16, x.shape[-1])
    assert bool((s0 >= lo0.unsqueeze(1)).all() and (s0 <= hi0.unsqueeze(1)).all())
    # each sampled token is a real token of its instance
    assert all(any(torch.equal(s0[0, k], x[0, t]) for t in range(40)) for k in range(16))
    scale, shift = torch.rand(x.shape[-1]) + 0.5, torch.randn(x.shape[-1])
    obs.remap(lambda lo, hi: (lo * scale + shift, hi * scale + shift))
    s0b, lo0b, _ = obs.chunks()[0]
    torch.testing.assert_close(s0b, s0 * scale + shift)
    torch.testing.assert_close(lo0b, lo0 * scale + shift)
    with pytest.raises(ValueError, match="tokens"):
        ChannelSampleObserver("site", tokens=0)


def test_mse_rule_end_to_end_sets_error_weights_and_chooses_per_site():
    model = InstanceVaryingMLP().eval()
    calib = instance_varying_data(16)
    cfg = igq.IGQConfig(weight_bits=4, act_bits=4, num_groups=4, range_update="mse")
    prepared = igq.prepare(model, cfg)
    sites = {n: m.input_quantizer for n, m in prepared.named_modules() if isinstance(m, QuantLinear)}
    assert all(isinstance(q.observer, ChannelSampleObserver) for q in sites.values())
    igq.calibrate(prepared, calib, progress=False)
    chunks = {n: q.observer.chunks() for n, q in sites.items()}
    qmodel = igq.convert(prepared, progress=False)
    for name, module in qmodel.named_modules():
        if not isinstance(module, QuantLinear):
            continue
        q = module.input_quantizer
        assert q.chosen_rule in MSE_CANDIDATES, name
        torch.testing.assert_close(q.error_weights, module.weight.detach().pow(2).sum(0))
        err = sum(float(ops.group_quant_error(s, lo, hi, q.lo, q.hi, 4, q.error_weights)) for s, lo, hi in chunks[name])
        lo_all = torch.cat([lo for _, lo, _ in chunks[name]])
        hi_all = torch.cat([hi for _, _, hi in chunks[name]])
        dlo, dhi = fit_group_ranges(lo_all, hi_all, 4)  # the default rule's ranges on the same statistics
        default = sum(float(ops.group_quant_error(s, lo, hi, dlo, dhi, 4, q.error_weights)) for s, lo, hi in chunks[name])
        assert err <= default * (1 + 1e-6), (name, err, default)
    out = qmodel(torch.cat(instance_varying_data(4, seed=1)))
    assert torch.isfinite(out).all()


def test_prepare_places_new_state_on_the_model_device():
    """Quantizer state is created on the CPU and must follow the model (checked with the meta device)."""
    model = InstanceVaryingMLP().to("meta")
    prepared = igq.prepare(model, igq.IGQConfig.igq_plus(4))
    devices = {t.device.type for t in [*prepared.parameters(), *prepared.buffers()]}
    assert devices == {"meta"}
    assert isinstance(prepared.fc1.input_quantizer, ActQuantizer)
