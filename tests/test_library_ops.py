"""The igq torch.library ops against brute-force references: exact codes, assignments and int32 sums,
gradients against an independent autograd reference, schema / fake-kernel / autograd checks (opcheck),
the zero policy, float32 assignment for low-precision inputs. Every test runs on each ``device``."""
import itertools
import math

import pytest
import torch

from igq_plugin import ops

# (shape, instance_dims): [B, N, C]; image-like tokens [B, H, W, C]; windows folded in front [B, nW, N, C];
# a 2-D input (one token per instance). Channel counts are not multiples of any tile.
LAYOUTS = [((2, 5, 16), 1), ((2, 3, 4, 12), 1), ((2, 3, 5, 8), 2), ((6, 10), 1)]
BITS = [2, 4, 8]
GROUPS = [1, 3, 8]


class _ExactRound(torch.autograd.Function):
    """round() with an identity gradient and an exact forward value (the straight-through estimator)."""

    @staticmethod
    def forward(ctx, t):
        return torch.round(t)

    @staticmethod
    def backward(ctx, grad):
        return grad


def _groups(groups, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    lo = -torch.rand(groups, generator=g) * 3 - 0.05
    hi = torch.rand(groups, generator=g) * 3 + 0.05
    if groups >= 3:
        lo[1] = 0.2  # a range that excludes 0: widened to [0, hi] by the zero policy
        hi[2] = -0.1  # and one entirely below 0
    return lo.to(device), hi.to(device)


def _activation(shape, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    spread = torch.logspace(-1, 0.7, shape[-1])
    return (torch.randn(shape, generator=g) * spread + 0.3 * torch.randn(shape[-1], generator=g)).to(device)


def _brute_codes(x, glo, ghi, bits, instance_dims):
    """Codes and assignment by explicit loops over instances, channels and groups (float32 scalars)."""
    xi = x.cpu().float().reshape(math.prod(x.shape[:instance_dims]), -1, x.shape[-1])
    scale, zero = ops.group_qparams(glo.cpu().float(), ghi.cpu().float(), bits)
    codes = torch.empty_like(xi)
    assign = torch.empty(xi.shape[0], xi.shape[2], dtype=torch.long)
    for i, c in itertools.product(range(xi.shape[0]), range(xi.shape[2])):
        lo, hi = xi[i, :, c].min(), xi[i, :, c].max()
        dists = [(lo - glo[g].cpu()) ** 2 + (hi - ghi[g].cpu()) ** 2 for g in range(glo.numel())]
        best = min(range(len(dists)), key=lambda g: (float(dists[g]), g))
        assign[i, c] = best
        for t in range(xi.shape[1]):
            q = torch.round(xi[i, t, c] / scale[best]) + zero[best]
            codes[i, t, c] = q.clamp(0, 2**bits - 1)
    return codes.reshape(x.shape), assign, scale, zero


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("groups", GROUPS)
def test_group_ops_match_brute_force(device, layout, bits, groups):
    shape, instance_dims = layout
    x = _activation(shape, device, seed=bits * 10 + groups)
    glo, ghi = _groups(groups, device, seed=groups)
    codes, assign = ops.group_quantize_codes(x, glo, ghi, bits, instance_dims)
    assert codes.dtype == torch.uint8 and assign.dtype == torch.int64 and codes.shape == x.shape
    brute_codes, brute_assign, scale, zero = _brute_codes(x, glo, ghi, bits, instance_dims)
    assert torch.equal(assign.cpu(), brute_assign)
    assert torch.equal(codes.cpu().float(), brute_codes)
    # the fake-quant op is exactly the dequantized codes
    xi_codes = codes.cpu().float().reshape(brute_assign.shape[0], -1, shape[-1])
    deq = (xi_codes - zero[brute_assign].unsqueeze(1)) * scale[brute_assign].unsqueeze(1)
    fq = ops.group_fake_quantize(x, glo, ghi, bits, instance_dims)
    assert fq.device == x.device and fq.dtype == x.dtype
    assert torch.equal(fq.cpu(), deq.reshape(shape))


@pytest.mark.parametrize("bits", BITS)
def test_zero_policy_zero_points_in_code_range_and_zero_exact(device, bits):
    lo = torch.tensor([0.5, -2.0, -3.0, 1e-3, -5.0], device=device)
    hi = torch.tensor([2.0, -0.5, 4.0, 1e-3, 5.0], device=device)
    scale, zero = ops.group_qparams(lo, hi, bits)
    assert bool((zero >= 0).all() and (zero <= 2**bits - 1).all())
    # 0.0 (a masked / padded channel) dequantizes to exactly 0 in every group
    zeros = torch.zeros(1, 4, 5, device=device)
    for g in range(5):
        codes = ops.quantize(zeros[..., g], scale[g], zero[g], 0, 2**bits - 1)
        assert bool((ops.dequantize(codes, scale[g], zero[g]) == 0).all())
    x = torch.zeros(3, 7, 5, device=device)
    assert bool((ops.group_fake_quantize(x, lo, hi, bits) == 0).all())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_inputs_assign_like_float32(device, dtype):
    x = _activation((3, 9, 24), device).to(dtype)
    glo, ghi = _groups(8, device)
    codes, assign = ops.group_quantize_codes(x, glo, ghi, 4)
    codes32, assign32 = ops.group_quantize_codes(x.float(), glo, ghi, 4)
    assert torch.equal(assign, assign32) and torch.equal(codes, codes32)
    y = ops.group_fake_quantize(x, glo, ghi, 4)
    assert y.dtype == dtype
    assert torch.equal(y, ops.group_fake_quantize(x.float(), glo, ghi, 4).to(dtype))


@pytest.mark.parametrize("layout", LAYOUTS[:3])
@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("groups", GROUPS)
def test_group_fake_quant_gradients_match_autograd_reference(device, layout, bits, groups):
    shape, instance_dims = layout
    x = _activation(shape, device, seed=bits)
    glo, ghi = _groups(groups, device, seed=bits)
    grad = torch.randn(shape, generator=torch.Generator().manual_seed(1)).to(device)

    x1, lo1, hi1 = (t.clone().requires_grad_() for t in (x, glo, ghi))
    out = ops.group_fake_quantize(x1, lo1, hi1, bits, instance_dims)
    (out * grad).sum().backward()

    # Independent reference: the quantizer written with autograd-visible ops (exact straight-through round,
    # clamp whose gradient passes on the closed code range), assignment computed separately and held fixed.
    x2, lo2, hi2 = (t.clone().requires_grad_() for t in (x, glo, ghi))
    qmax = 2**bits - 1
    lo_e, hi_e = lo2.clamp(max=0.0), hi2.clamp(min=0.0)
    scale = (hi_e - lo_e) / qmax
    zero = _ExactRound.apply(-lo_e / scale)
    _, assign = ops.group_quantize_codes(x, glo, ghi, bits, instance_dims)
    xi = x2.reshape(assign.shape[0], -1, shape[-1])
    s, z = scale[assign].unsqueeze(1), zero[assign].unsqueeze(1)
    q = _ExactRound.apply(xi / s) + z
    q = torch.where((q >= 0) & (q <= qmax), q, q.detach().clamp(0, qmax))
    ref = (s * (q - z)).reshape(shape)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-6)
    (ref * grad).sum().backward()
    torch.testing.assert_close(x1.grad, x2.grad, rtol=0, atol=1e-6)
    torch.testing.assert_close(lo1.grad, lo2.grad, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(hi1.grad, hi2.grad, rtol=1e-5, atol=1e-4)
    # clipped STE: no gradient reaches x outside its group's range
    codes, _ = ops.group_quantize_codes(x, glo, ghi, bits, instance_dims)
    raw = torch.round(xi.detach() / s.detach()) + z.detach()
    outside = ((raw < 0) | (raw > qmax)).reshape(shape)
    assert bool((x1.grad[outside] == 0).all())


@pytest.mark.parametrize("levels", ["uniform", "log_sqrt2", "tanq"])
@pytest.mark.parametrize("bits", [3, 4, 8])
@pytest.mark.parametrize("ghi", [(0.5,), (0.25, 0.6, 0.9), (0.1, 0.2, 0.3, 0.45, 0.6, 0.75, 0.9, 1.0)])
def test_softmax_row_op_matches_reference_and_gradients(device, levels, bits, ghi):
    a = torch.softmax(torch.randn(2, 3, 7, 9) * 3, dim=-1).to(device)
    ghi = torch.tensor(ghi, device=device)
    codes, assign, s = ops.softmax_group_quantize(a, ghi, bits, levels)
    u = a.amax(-1).cpu()
    brute = torch.tensor([min(range(ghi.numel()), key=lambda g: (abs(float(v) - float(ghi[g])), g)) for v in u.flatten()])
    assert torch.equal(assign.flatten().cpu(), brute)
    out = ops.softmax_group_fake_quantize(a, ghi, bits, levels)
    assert torch.equal(out, ops.dequantize_probs(codes, s, levels, bits))
    a1, u1 = a.clone().requires_grad_(), ghi.clone().requires_grad_()
    grad = torch.randn(a.shape).to(device)
    (ops.softmax_group_fake_quantize(a1, u1, bits, levels) * grad).sum().backward()
    # Independent reference: a_hat = u * y(a / u) with the level function passed straight through inside the
    # row's range (y = t + (table value - t), the difference detached) and the top level (1) above it.
    a2, u2 = a.clone().requires_grad_(), ghi.clone().requires_grad_()
    u_row = u2[assign].unsqueeze(-1)
    t = a2 / u_row
    level = (out / u_row).detach()
    inside = (a <= ghi[assign].unsqueeze(-1))
    ref = u_row * torch.where(inside, t + (level - t).detach(), level)
    torch.testing.assert_close(ref, out, rtol=1e-6, atol=1e-6)
    (ref * grad).sum().backward()
    torch.testing.assert_close(a1.grad, a2.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(u1.grad, u2.grad, rtol=1e-4, atol=1e-4)
    assert bool((a1.grad[~inside] == 0).all())


def _linear_case(device, bits, groups, w_bits, layout=((3, 9, 40), 1), seed=0):
    shape, instance_dims = layout
    x = _activation(shape, device, seed=seed)
    glo, ghi = _groups(groups, device, seed=seed)
    codes, assign = ops.group_quantize_codes(x, glo, ghi, bits, instance_dims)
    scale, zero = ops.group_qparams(glo, ghi, bits)
    w = torch.randn(11, shape[-1], generator=torch.Generator().manual_seed(seed)).to(device)
    w_scale, w_zero = ops.weight_qparams(w, w_bits)
    w_int = (ops.quantize_weight(w, w_scale, w_zero, w_bits) - w_zero[:, None]).to(torch.int8)
    bias = torch.randn(11).to(device)
    return x, glo, ghi, codes, assign, scale, zero.to(torch.int32), w_int, w_scale, bias


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("groups", GROUPS)
@pytest.mark.parametrize("layout", [((3, 9, 40), 1), ((2, 3, 5, 13), 2)])
def test_grouped_linear_int32_sums_exact_and_equal_fake_quant(device, bits, groups, layout):
    x, glo, ghi, codes, assign, scale, zero, w_int, w_scale, bias = _linear_case(device, bits, groups, 7, layout,
                                                                              seed=bits + groups)
    instance_dims = layout[1]
    out, partial = ops.grouped_linear_reference(codes, assign, scale, zero, w_int, w_scale, bias, instance_dims,
                                                partial_sums=True)
    assert partial.dtype == torch.int32
    # brute force: Python integers, one (instance, token, output) at a time
    ci = codes.cpu().reshape(assign.shape[0], -1, codes.shape[-1]).tolist()
    wi, zi, ai = w_int.cpu().tolist(), zero.cpu().tolist(), assign.cpu().tolist()
    pi = partial.cpu().tolist()
    for i, t in itertools.product(range(len(ci)), range(len(ci[0]))):
        for o in range(len(wi)):
            sums = [0] * scale.numel()
            for c, code in enumerate(ci[i][t]):
                g = ai[i][c]
                sums[g] += (code - zi[g]) * wi[o][c]
            assert [pi[g][i][t][o] for g in range(scale.numel())] == sums
    # the op (dispatcher) gives the reference's output; the fake-quant form agrees within float rounding
    op_out = ops.grouped_linear(codes, assign, scale, zero, w_int, w_scale, bias, instance_dims)
    assert op_out.dtype == torch.float32 and torch.equal(op_out, out)
    x_hat = ops.group_fake_quantize(x, glo, ghi, bits, instance_dims)
    y_fq = torch.nn.functional.linear(x_hat, w_int.float() * w_scale[:, None], bias)
    torch.testing.assert_close(out, y_fq, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("w_bits", [4, 7, 8])
def test_quant_linear_runs_as_grouped_linear(device, w_bits):
    """A calibrated QuantLinear's fake-quant forward equals igq::grouped_linear on its codes."""
    import igq_plugin as igq

    torch.manual_seed(w_bits)
    linear = torch.nn.Linear(24, 10).to(device)
    quantizer = igq.ActQuantizer(4, "igq", 24, 4, site="fc.input_quantizer")
    layer = igq.QuantLinear.from_float(linear, w_bits=w_bits, input_quantizer=quantizer).to(device)
    layer.calibrate_weight()
    x = _activation((5, 7, 24), device)
    quantizer.start_observer()
    layer(x)
    quantizer.fit()
    if w_bits == 8:  # asymmetric 8-bit codes minus zero point do not fit int8: a clear error, not a wrap
        with torch.no_grad():
            layer.weight[0, 0] = layer.weight[0].abs().max() * 10  # a one-sided channel
        layer.calibrate_weight()
        with pytest.raises(ValueError, match="outside int8"):
            layer.integer_weight()
        return
    w_int, w_scale = layer.integer_weight()
    codes, assign = ops.group_quantize_codes(x, quantizer.lo, quantizer.hi, 4)
    scale, zero = ops.group_qparams(quantizer.lo, quantizer.hi, 4)
    y_int = ops.grouped_linear(codes, assign, scale, zero.to(torch.int32), w_int, w_scale, layer.bias)
    with torch.no_grad():
        torch.testing.assert_close(y_int, layer(x), rtol=1e-5, atol=1e-5)


def test_grouped_linear_rejects_bad_inputs(device):
    x, glo, ghi, codes, assign, scale, zero, w_int, w_scale, bias = _linear_case(device, 4, 3, 4)
    with pytest.raises(TypeError, match="uint8 activation codes and int8 weight codes"):
        ops.grouped_linear(codes.float(), assign, scale, zero, w_int, w_scale, bias)
    with pytest.raises(ValueError, match="assignment must have shape"):
        ops.grouped_linear(codes, assign[:, :-1], scale, zero, w_int, w_scale, bias)
    with pytest.raises(ValueError, match="w_codes must be"):
        ops.grouped_linear(codes, assign, scale, zero, w_int[:, :-1], w_scale, bias)
    with pytest.raises(ValueError, match="group_scale and group_zero_point"):
        ops.grouped_linear(codes, assign, scale, zero[:-1], w_int, w_scale, bias)
    with pytest.raises(TypeError, match="int32 group zero points"):
        ops.grouped_linear(codes, assign, scale, zero.float(), w_int, w_scale, bias)
    with pytest.raises(ValueError, match="out_features"):
        ops.grouped_linear(codes, assign, scale, zero, w_int, w_scale[:-1], bias)
    with pytest.raises(ValueError, match="instance_dims"):
        ops.group_fake_quantize(x, glo, ghi, 4, instance_dims=3)


def test_opcheck_schemas_fake_kernels_and_autograd(device):
    """torch.library.opcheck: schema, fake (meta) kernel, autograd registration and AOT dispatch of every op."""
    x, glo, ghi, codes, assign, scale, zero, w_int, w_scale, bias = _linear_case(device, 4, 3, 4)
    a = torch.softmax(torch.randn(2, 2, 5, 5), -1).to(device)
    cases = [
        (torch.ops.igq.group_fake_quant.default, (x.requires_grad_(), glo.requires_grad_(), ghi, 4, 1)),
        (torch.ops.igq.group_quantize.default, (x.detach(), glo.detach(), ghi, 4, 1)),
        (torch.ops.igq.softmax_row_fake_quant.default, (a.requires_grad_(), torch.tensor([0.4, 1.0], device=device),
                                                        4, "tanq", 4.0)),
        (torch.ops.igq.grouped_linear.default, (codes, assign, scale, zero, w_int, w_scale, bias, 1)),
        (torch.ops.igq.grouped_linear.default, (codes, assign, scale, zero, w_int, w_scale, None, 1)),
    ]
    for op, args in cases:
        torch.library.opcheck(op, args)


def test_ops_export_as_graph_nodes_with_dynamic_batch(device):
    glo, ghi = _groups(3, device)

    class Site(torch.nn.Module):
        def forward(self, x):
            return ops.group_fake_quantize(x, glo, ghi, 4) * 2

    x = _activation((3, 6, 16), device)
    batch = torch.export.Dim("batch", min=2, max=64)
    ep = torch.export.export(Site(), (x,), dynamic_shapes={"x": {0: batch}})
    targets = {str(n.target) for n in ep.graph.nodes if n.op == "call_function"}
    assert "igq.group_fake_quant.default" in targets
    x5 = _activation((5, 6, 16), device, seed=3)
    assert torch.equal(ep.module()(x5), Site()(x5))
