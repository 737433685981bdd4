"""Pure ops: quantizer algebra, exact group assignment, softmax rows, BOPs (the igq torch.library ops: test_library_ops.py)."""
import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from igq_plugin import ops

BITS = list(range(2, 9))


def brute_force_assign(lo, hi, glo, ghi):
    out = torch.empty(lo.shape, dtype=torch.long)
    for idx in itertools.product(*[range(s) for s in lo.shape]):
        best, best_g = None, None
        for g in range(glo.numel()):
            d = (float(lo[idx]) - float(glo[g])) ** 2 + (float(hi[idx]) - float(ghi[g])) ** 2
            if best is None or d < best:  # strict: ties keep the lowest g
                best, best_g = d, g
        out[idx] = best_g
    return out


@pytest.mark.parametrize("groups", [1, 3, 8])
def test_assign_groups_matches_brute_force(groups):
    lo = -torch.rand(5, 17) * 4
    hi = torch.rand(5, 17) * 4
    glo, ghi = -torch.rand(groups) * 4, torch.rand(groups) * 4
    assert torch.equal(ops.assign_groups(lo, hi, glo, ghi), brute_force_assign(lo, hi, glo, ghi))


def test_assign_groups_ties_go_to_lowest_group():
    # integer-valued ranges produce exact distance ties
    lo = torch.randint(-3, 1, (4, 30)).double()
    hi = torch.randint(0, 4, (4, 30)).double()
    glo = torch.tensor([-1.0, -2.0, -1.0, 0.0, -2.0]).double()
    ghi = torch.tensor([1.0, 2.0, 1.0, 3.0, 2.0]).double()  # duplicated groups tie everywhere
    got = ops.assign_groups(lo, hi, glo, ghi)
    assert torch.equal(got, brute_force_assign(lo, hi, glo, ghi))
    assert not bool((got == 2).any()) and not bool((got == 4).any())


def test_channel_ranges_per_instance():
    x = torch.randn(3, 5, 7, 11)
    lo, hi = ops.channel_ranges(x)
    assert lo.shape == (3, 11)
    assert torch.equal(lo, x.reshape(3, -1, 11).amin(1)) and torch.equal(hi, x.reshape(3, -1, 11).amax(1))


ranges = st.tuples(st.floats(-50, 50), st.floats(1e-2, 100)).map(lambda t: (t[0], t[0] + t[1]))


@settings(max_examples=200, deadline=None)
@given(bits=st.sampled_from(BITS), rng=ranges, u=st.lists(st.floats(0, 1), min_size=1, max_size=64))
def test_asymmetric_quantizer_algebra(bits, rng, u):
    lo, hi = rng
    scale, zp = ops.asym_qparams(torch.tensor(lo, dtype=torch.float64), torch.tensor(hi, dtype=torch.float64), bits)
    qmin, qmax = ops.qrange(bits)
    # representable interval of the grid, and the calibrated interval [lo, hi]
    g_lo, g_hi = float(scale * (qmin - zp)), float(scale * (qmax - zp))
    x = torch.tensor([g_lo + t * (g_hi - g_lo) for t in u], dtype=torch.float64)
    q = ops.quantize(x, scale, zp, qmin, qmax)
    assert bool((q >= qmin).all() and (q <= qmax).all()) and torch.equal(q, q.round())
    x_hat = ops.dequantize(q, scale, zp)
    assert bool(((x - x_hat).abs() <= scale / 2 * (1 + 1e-9)).all())  # inside the grid: error <= s/2
    assert torch.equal(ops.fake_quantize(x_hat, scale, zp, qmin, qmax), x_hat)  # idempotent
    order = torch.argsort(x)
    assert bool((q[order].diff() >= 0).all())  # monotone
    # inside the calibrated range the zero-point rounding costs at most one more half step
    xr = torch.tensor([lo + t * (hi - lo) for t in u], dtype=torch.float64)
    err = (ops.fake_quantize(xr, scale, zp, qmin, qmax) - xr).abs()
    assert bool((err <= scale * (1 + 1e-9)).all())


@settings(max_examples=100, deadline=None)
@given(bits=st.sampled_from(BITS), amax=st.floats(1e-2, 100), u=st.lists(st.floats(-1, 1), min_size=1, max_size=64))
def test_symmetric_quantizer_algebra(bits, amax, u):
    scale, zp = ops.sym_qparams(torch.tensor(amax, dtype=torch.float64), bits)
    qmin, qmax = ops.qrange(bits, signed=True)
    x = torch.tensor(u, dtype=torch.float64) * amax
    q = ops.quantize(x, scale, zp, qmin, qmax)
    assert bool((q >= qmin).all() and (q <= qmax).all())
    assert bool(((ops.dequantize(q, scale, zp) - x).abs() <= scale / 2 * (1 + 1e-9)).all())


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_group_fake_quantize_equals_dequantized_codes(bits):
    x = torch.randn(4, 10, 24) * torch.logspace(-2, 1, 24)
    glo, ghi = torch.tensor([-0.05, -1.0, -20.0]), torch.tensor([0.05, 1.0, 20.0])
    codes, assign, scale, zp = ops.group_quantize(x, glo, ghi, bits)
    assert bool((codes >= 0).all() and (codes <= 2**bits - 1).all())
    lo, hi = ops.channel_ranges(x)
    assert torch.equal(assign, ops.assign_groups(lo, hi, glo, ghi))
    manual = (codes - zp[assign].unsqueeze(1)) * scale[assign].unsqueeze(1)
    assert torch.equal(ops.group_fake_quantize(x, glo, ghi, bits), manual)
    assert torch.equal(ops.group_fake_quantize_reference(x, glo, ghi, bits), manual)


@pytest.mark.parametrize("bits", [3, 4, 8])
def test_softmax_row_groups(bits):
    a = torch.softmax(torch.randn(2, 3, 7, 7) * 3, dim=-1)
    ghi = torch.tensor([0.3, 0.6, 1.0])
    codes, assign, s = ops.softmax_group_quantize(a, ghi, bits)
    assert bool((codes >= 0).all() and (codes <= 2**bits - 1).all())
    u = a.amax(-1)
    brute = torch.tensor([min(range(3), key=lambda g: (abs(float(v) - float(ghi[g])), g)) for v in u.flatten()])
    assert torch.equal(assign.flatten(), brute)
    a_hat = ops.softmax_group_fake_quantize(a, ghi, bits)
    assert torch.equal(a_hat, codes * s)
    covered = (u <= ghi[assign]).unsqueeze(-1).expand_as(a)  # rows inside their group's range
    assert bool(((a_hat - a).abs()[covered] <= (s / 2 * (1 + 1e-6)).expand_as(a)[covered]).all())


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_weight_quantizer_min_max_uses_full_code_range(bits):
    w = torch.randn(8, 50)
    scale, zp = ops.weight_qparams(w, bits, 0.0)
    codes = ops.quantize_weight(w, scale, zp, bits)
    assert torch.equal(codes.amin(1), torch.zeros(8)) and torch.equal(codes.amax(1), torch.full((8,), 2.0**bits - 1))
    err = (ops.fake_quantize_weight(w, scale, zp, bits) - w).abs()
    assert bool((err <= scale.unsqueeze(1) * (1 + 1e-5)).all())


def test_weight_percentile_clips_outliers():
    w = torch.randn(4, 10000)
    w[:, 0] = 100.0
    s_mm, _ = ops.weight_qparams(w, 4, 0.0)
    s_p, _ = ops.weight_qparams(w, 4, 0.05)
    assert bool((s_p < s_mm / 5).all())
    with pytest.raises(ValueError, match="percentile"):
        ops.weight_qparams(w, 4, 60.0)


def test_weight_ops_on_conv_weights():
    w = torch.randn(6, 3, 4, 4)
    scale, zp = ops.weight_qparams(w, 8)
    assert scale.shape == (6,)
    assert ops.fake_quantize_weight(w, scale, zp, 8).shape == w.shape


def test_check_bits():
    for bad in (1, 9, 0):
        with pytest.raises(ValueError, match="weight_bits"):
            ops.check_bits(bad, "weight_bits")
    with pytest.raises(TypeError):
        ops.check_bits(4.0, "bits")


def test_bop_counting():
    macs = ops.linear_macs(197, 192, 768)
    assert macs == 197 * 192 * 768
    assert ops.mac_bops(macs, 4, 4) == macs * 16
    assert ops.igq_linear_overhead_ops(197, 192, 768, 1) == 0
    over8 = ops.igq_linear_overhead_ops(197, 192, 768, 8)
    assert over8 == 2 * 197 * 192 + 6 * 192 * 8 + 7 * 197 * 768
    assert ops.igq_linear_overhead_ops(197, 192, 768, 16) > over8
    assert ops.attention_macs(3, 197, 197, 64) == 3 * 197 * 197 * 64
    assert ops.softmax_group_overhead_ops(3, 197, 197, 1) == 0
