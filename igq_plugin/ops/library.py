"""The ``igq`` torch.library ops: what modules call, torch.export records, backends lower and kernels implement.

Declared once here, each with a pure-PyTorch reference implementation (any device, no host
synchronisation, no Python loop over instances), a fake kernel (so torch.export and
torch.compile trace them without data) and, for the fake-quant ops, autograd:

``igq::group_fake_quant(x, group_lo, group_hi, bits, instance_dims=1) -> Tensor``
    x [*instances, *tokens, C] (the first ``instance_dims`` dims index instances). Per instance,
    each channel's (min, max) over its tokens picks the nearest group range (paper Eq. 5, ties to
    the lowest group, in float32); the channel is fake-quantized with that group's asymmetric
    ``bits``-bit quantizer (zero policy of :mod:`igq_plugin.ops.quant`). Output: x's dtype.
    Gradient: straight-through inside the assigned group's range, 0 outside (clipped STE); the
    group ranges get LSQ-style gradients (round() passed straight through, the assignment held
    fixed), so QAT can learn them.
``igq::group_quantize(x, group_lo, group_hi, bits, instance_dims=1) -> (codes uint8, assignment int64 [I, C])``
    The same quantization as integer codes: ``dequantize(codes, s[a], z[a])`` equals
    ``group_fake_quant(x)`` exactly (s, z from :func:`igq_plugin.ops.group_qparams`).
``igq::softmax_row_fake_quant(a, group_hi, bits, levels, steepness) -> Tensor``
    Attention probabilities a [..., N_q, N_k], rows grouped by their maximum, levels "uniform",
    "log_sqrt2" or "tanq" (:mod:`igq_plugin.ops.levels`). Gradient: straight-through where
    a <= u of the row's group, 0 above; group maxima get d a_hat / d u = (a_hat - a) / u inside,
    a_hat / u above.
``igq::grouped_linear(x_codes, assignment, group_scale, group_zero_point, w_codes, w_scale, bias, instance_dims=1) -> Tensor``
    The integer form of paper Eq. 7. x_codes uint8 [*instances, *tokens, C]; assignment int64
    [I, C]; group_scale float32 [G]; group_zero_point int32 [G]; w_codes int8 [O, C] (zero-point
    free, per-output-channel ``w_scale`` float32 [O]); bias float [O] or None. Semantics, which a
    CPU or GPU kernel must reproduce: per group g an int32 partial sum
    ``acc_g[i, t, o] = sum over c with a[i, c] = g of (x_codes[i, t, c] - z_g) * w_codes[o, c]``
    (exact: the reference accumulates integer products in float64, exact below 2**53, so it equals
    int32 accumulation whenever that does not overflow; C <= 65793 guarantees it), then the float32
    epilogue ``out = (sum over g in order 0..G-1 of float32(acc_g) * s_g) * w_scale + bias``.
    Output float32 [*instances, *tokens, O].
``igq::grid_fake_quant(x, scale, zero_point, qmin, qmax) -> Tensor``
    One static per-tensor fake quantization, ``torch.fake_quantize_per_tensor_affine``'s arithmetic
    (float32, result in x's dtype; no autograd): the re-coding of group-quantized values onto their
    common integer grid in a lowered model (:mod:`igq_plugin.lowering`). Its own op because torch's
    has no export kernel under dynamic shapes; backends convert it to their per-tensor quantize
    (OpenVINO: one FakeQuantize).
"""
from __future__ import annotations

from typing import Optional

import torch

from .groups import (
    as_instances,
    _instance_assignment,
    assign_rows,
    group_fake_quantize_reference,
    group_qparams,
    group_quantize,
    row_maxima,
    softmax_group_fake_quantize_reference,
)
from .levels import DEFAULT_TANQ_STEEPNESS, check_softmax_quantizer
from .quant import _MIN_SCALE, check_bits

__all__ = [
    "group_fake_quantize",
    "group_quantize_codes",
    "softmax_group_fake_quantize",
    "grouped_linear",
    "grouped_linear_reference",
    "group_fake_quant_grads",
    "softmax_row_fake_quant_grads",
    "MAX_GROUPED_LINEAR_CHANNELS",
    "grid_fake_quantize",
]

# Largest reduction length whose int32 partial sums cannot overflow: C * 255 * 128 < 2**31.
MAX_GROUPED_LINEAR_CHANNELS = (2**31 - 1) // (255 * 128)


# --- igq::group_fake_quant ------------------------------------------------------------------

@torch.library.custom_op("igq::group_fake_quant", mutates_args=())
def _group_fake_quant(x: torch.Tensor, group_lo: torch.Tensor, group_hi: torch.Tensor, bits: int,
                      instance_dims: int = 1) -> torch.Tensor:
    return group_fake_quantize_reference(x, group_lo, group_hi, bits, instance_dims)


@_group_fake_quant.register_fake
def _(x, group_lo, group_hi, bits, instance_dims=1):
    return torch.empty_like(x)


def group_fake_quant_grads(
    x: torch.Tensor, group_lo: torch.Tensor, group_hi: torch.Tensor, bits: int, instance_dims: int, grad: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(d/dx, d/dgroup_lo, d/dgroup_hi) of ``sum(grad * group_fake_quant(x))`` (see the module docstring).

    With q = round(x / s) + z (s, z of the assigned group, range widened to contain 0) and
    Q = 2^b - 1: inside 0 <= q <= Q, x_hat = s round(x / s); below, x_hat = -s z; above,
    x_hat = s (Q - z); s = (hi - lo) / Q and z = round(-lo / s) with round() straight-through.
    """
    qmax = 2**bits - 1
    xf, _, assignment = _instance_assignment(as_instances(x.detach(), instance_dims), group_lo, group_hi)
    g = as_instances(grad, instance_dims).float()
    lo_f, hi_f = group_lo.detach().float(), group_hi.detach().float()
    scale, zero = group_qparams(lo_f, hi_f, bits)  # the forward's quantizers
    lo_e = lo_f.clamp(max=0.0)  # the widened range's lower end
    live = ((hi_f.clamp(min=0.0) - lo_e) * (1.0 / qmax) >= _MIN_SCALE).float()  # the step floor has no gradient
    s = scale[assignment].unsqueeze(1)
    z = zero[assignment].unsqueeze(1)
    lo_c = lo_e[assignment].unsqueeze(1)
    t = xf / s
    r = torch.round(t)
    q = r + z
    below, above = q < 0, q > qmax
    inside = ~(below | above)
    grad_x = torch.where(inside, g, 0.0).to(x.dtype).reshape(x.shape)
    # d x_hat / d s, the z = round(-lo / s) path included; and d x_hat / d lo at fixed s (through z only).
    d_s = torch.where(inside, r - t, torch.where(below, -z - lo_c / s, qmax - z - lo_c / s))
    d_lo = torch.where(inside, 0.0, 1.0)
    per_hi = (g * d_s).sum(1) / qmax  # [I, C]
    per_lo = (g * (d_lo - d_s / qmax)).sum(1)
    flat = assignment.reshape(-1)
    grad_hi = torch.zeros_like(hi_f).index_add_(0, flat, per_hi.reshape(-1)) * live * (group_hi >= 0).float()
    grad_lo = torch.zeros_like(lo_e).index_add_(0, flat, per_lo.reshape(-1)) * live * (group_lo <= 0).float()
    return grad_x, grad_lo.to(group_lo.dtype), grad_hi.to(group_hi.dtype)


def _gfq_setup(ctx, inputs, output):
    x, group_lo, group_hi, bits, instance_dims = inputs
    ctx.save_for_backward(x, group_lo, group_hi)
    ctx.bits, ctx.instance_dims = bits, instance_dims


def _gfq_backward(ctx, grad):
    x, group_lo, group_hi = ctx.saved_tensors
    gx, glo, ghi = group_fake_quant_grads(x, group_lo, group_hi, ctx.bits, ctx.instance_dims, grad)
    return gx, glo, ghi, None, None


_group_fake_quant.register_autograd(_gfq_backward, setup_context=_gfq_setup)


def group_fake_quantize(
    x: torch.Tensor, group_lo: torch.Tensor, group_hi: torch.Tensor, bits: int, instance_dims: int = 1
) -> torch.Tensor:
    """``torch.ops.igq.group_fake_quant``: fake-quantize x with instance-aware groups (module docstring)."""
    check_bits(bits)
    return torch.ops.igq.group_fake_quant(x, group_lo, group_hi, bits, instance_dims)


# --- igq::grid_fake_quant -------------------------------------------------------------------

@torch.library.custom_op("igq::grid_fake_quant", mutates_args=())
def _grid_fake_quant(x: torch.Tensor, scale: float, zero_point: int, qmin: int, qmax: int) -> torch.Tensor:
    return torch.fake_quantize_per_tensor_affine(x.float(), scale, zero_point, qmin, qmax).to(x.dtype)


@_grid_fake_quant.register_fake
def _(x, scale, zero_point, qmin, qmax):
    return torch.empty_like(x)


def grid_fake_quantize(x: torch.Tensor, scale: float, zero_point: int, qmin: int, qmax: int) -> torch.Tensor:
    """``torch.ops.igq.grid_fake_quant``: per-tensor fake quantization with a static (scale, zero_point)."""
    if not (qmin <= zero_point <= qmax and qmax - qmin <= 255 and scale > 0):
        raise ValueError(f"grid_fake_quant needs scale > 0, qmin <= zero_point <= qmax and at most 256 levels; "
                         f"got scale={scale}, zero_point={zero_point}, [{qmin}, {qmax}]")
    return torch.ops.igq.grid_fake_quant(x, float(scale), int(zero_point), int(qmin), int(qmax))


# --- igq::group_quantize --------------------------------------------------------------------

@torch.library.custom_op("igq::group_quantize", mutates_args=())
def _group_quantize(x: torch.Tensor, group_lo: torch.Tensor, group_hi: torch.Tensor, bits: int,
                    instance_dims: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    codes, assignment, _, _ = group_quantize(x, group_lo, group_hi, bits, instance_dims)
    return codes.to(torch.uint8), assignment


@_group_quantize.register_fake
def _(x, group_lo, group_hi, bits, instance_dims=1):
    instances = 1
    for d in x.shape[:instance_dims]:
        instances = instances * d
    return (torch.empty(x.shape, dtype=torch.uint8, device=x.device),
            x.new_empty((instances, x.shape[-1]), dtype=torch.int64))


def group_quantize_codes(
    x: torch.Tensor, group_lo: torch.Tensor, group_hi: torch.Tensor, bits: int, instance_dims: int = 1
) -> tuple[torch.Tensor, torch.Tensor]:
    """``torch.ops.igq.group_quantize``: (uint8 codes shaped like x, assignment int64 [I, C])."""
    check_bits(bits)
    return torch.ops.igq.group_quantize(x, group_lo, group_hi, bits, instance_dims)


# --- igq::softmax_row_fake_quant ------------------------------------------------------------

@torch.library.custom_op("igq::softmax_row_fake_quant", mutates_args=())
def _softmax_row_fake_quant(a: torch.Tensor, group_hi: torch.Tensor, bits: int, levels: str,
                            steepness: float) -> torch.Tensor:
    return softmax_group_fake_quantize_reference(a, group_hi, bits, levels, steepness)


@_softmax_row_fake_quant.register_fake
def _(a, group_hi, bits, levels, steepness):
    return torch.empty_like(a)


def softmax_row_fake_quant_grads(
    a: torch.Tensor, group_hi: torch.Tensor, bits: int, levels: str, steepness: float, grad: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(d/da, d/dgroup_hi) of ``sum(grad * softmax_row_fake_quant(a))`` (see the module docstring)."""
    af = a.detach().float()
    u = group_hi.detach().float()
    assignment = assign_rows(row_maxima(af), u)
    u_row = u.clamp_min(1e-8)[assignment].unsqueeze(-1)
    a_hat = softmax_group_fake_quantize_reference(af, u, bits, levels, steepness)
    g = grad.float()
    inside = af <= u_row
    grad_a = torch.where(inside, g, 0.0).to(a.dtype)
    d_u = torch.where(inside, (a_hat - af) / u_row, a_hat / u_row)
    per_row = (g * d_u).sum(-1).reshape(-1)
    grad_u = torch.zeros_like(u).index_add_(0, assignment.reshape(-1), per_row) * (u >= 1e-8).float()
    return grad_a, grad_u.to(group_hi.dtype)


def _srfq_setup(ctx, inputs, output):
    a, group_hi, bits, levels, steepness = inputs
    ctx.save_for_backward(a, group_hi)
    ctx.args = (bits, levels, steepness)


def _srfq_backward(ctx, grad):
    a, group_hi = ctx.saved_tensors
    ga, gu = softmax_row_fake_quant_grads(a, group_hi, *ctx.args, grad)
    return ga, gu, None, None, None


_softmax_row_fake_quant.register_autograd(_srfq_backward, setup_context=_srfq_setup)


def softmax_group_fake_quantize(
    a: torch.Tensor, group_hi: torch.Tensor, bits: int, levels: str = "uniform",
    steepness: float = DEFAULT_TANQ_STEEPNESS,
) -> torch.Tensor:
    """``torch.ops.igq.softmax_row_fake_quant``: fake-quantize attention probabilities by static row groups."""
    check_bits(bits)
    check_softmax_quantizer(levels, steepness)
    return torch.ops.igq.softmax_row_fake_quant(a, group_hi, bits, levels, float(steepness))


# --- igq::grouped_linear --------------------------------------------------------------------

def _check_grouped_linear(x_codes, assignment, group_scale, group_zero_point, w_codes, w_scale, bias, instance_dims):
    # dtypes and shapes only: checking values (zero points in [0, 255], assignment in [0, G)) would
    # need a host synchronisation; igq_plugin produces them in range.
    if x_codes.dtype != torch.uint8 or w_codes.dtype != torch.int8:
        raise TypeError(f"grouped_linear needs uint8 activation codes and int8 weight codes, got {x_codes.dtype} "
                        f"and {w_codes.dtype}")
    if group_zero_point.dtype != torch.int32 or assignment.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"grouped_linear needs int32 group zero points and an int32 / int64 assignment, got "
                        f"{group_zero_point.dtype} and {assignment.dtype}")
    xi_shape = as_instances(x_codes, instance_dims).shape
    channels = x_codes.shape[-1]
    if tuple(assignment.shape) != (xi_shape[0], channels):
        raise ValueError(f"assignment must have shape {(xi_shape[0], channels)} (instances, channels), got "
                         f"{tuple(assignment.shape)}")
    if w_codes.dim() != 2 or w_codes.shape[1] != channels:
        raise ValueError(f"w_codes must be [out_features, {channels}], got {tuple(w_codes.shape)}")
    if channels > MAX_GROUPED_LINEAR_CHANNELS:
        raise ValueError(f"grouped_linear accumulates in int32: at most {MAX_GROUPED_LINEAR_CHANNELS} input "
                         f"channels, got {channels}")
    if group_scale.dim() != 1 or group_zero_point.shape != group_scale.shape:
        raise ValueError(f"group_scale and group_zero_point must both be [G], got {tuple(group_scale.shape)} and "
                         f"{tuple(group_zero_point.shape)}")
    if w_scale.shape != (w_codes.shape[0],) or (bias is not None and bias.shape != (w_codes.shape[0],)):
        raise ValueError(f"w_scale and bias must be [{w_codes.shape[0]}] (out_features), got "
                         f"{tuple(w_scale.shape)} and {None if bias is None else tuple(bias.shape)}")


def grouped_linear_reference(
    x_codes: torch.Tensor, assignment: torch.Tensor, group_scale: torch.Tensor, group_zero_point: torch.Tensor,
    w_codes: torch.Tensor, w_scale: torch.Tensor, bias: Optional[torch.Tensor] = None, instance_dims: int = 1,
    *, partial_sums: bool = False,
):
    """Reference of ``igq::grouped_linear`` (module docstring); ``partial_sums=True`` also returns the
    int32 partial sums [G, I, T, O] that a kernel must reproduce exactly."""
    _check_grouped_linear(x_codes, assignment, group_scale, group_zero_point, w_codes, w_scale, bias, instance_dims)
    xi = as_instances(x_codes, instance_dims)
    exact = torch.float64  # integer products and their sums are exact in float64 below 2**53
    centred = xi.to(exact) - group_zero_point.to(exact)[assignment].unsqueeze(1)  # [I, T, C]
    w = w_codes.to(exact).t()  # [C, O]
    out = torch.zeros(xi.shape[0], xi.shape[1], w.shape[1], dtype=torch.float32, device=x_codes.device)
    partials = []
    for g in range(group_scale.shape[0]):  # G static groups; instances are batched
        members = (assignment == g).unsqueeze(1)
        acc = torch.matmul(torch.where(members, centred, 0.0), w).to(torch.int32)
        if partial_sums:
            partials.append(acc)
        out = out + acc.to(torch.float32) * group_scale[g].to(torch.float32)
    out = out * w_scale.to(torch.float32)
    if bias is not None:
        out = out + bias.to(torch.float32)
    out = out.reshape(*x_codes.shape[:-1], w.shape[1])
    return (out, torch.stack(partials)) if partial_sums else out


@torch.library.custom_op("igq::grouped_linear", mutates_args=())
def _grouped_linear(x_codes: torch.Tensor, assignment: torch.Tensor, group_scale: torch.Tensor,
                    group_zero_point: torch.Tensor, w_codes: torch.Tensor, w_scale: torch.Tensor,
                    bias: Optional[torch.Tensor], instance_dims: int = 1) -> torch.Tensor:
    return grouped_linear_reference(x_codes, assignment, group_scale, group_zero_point, w_codes, w_scale, bias,
                                    instance_dims)


@_grouped_linear.register_fake
def _(x_codes, assignment, group_scale, group_zero_point, w_codes, w_scale, bias, instance_dims=1):
    return x_codes.new_empty((*x_codes.shape[:-1], w_codes.shape[0]), dtype=torch.float32)


def grouped_linear(
    x_codes: torch.Tensor, assignment: torch.Tensor, group_scale: torch.Tensor, group_zero_point: torch.Tensor,
    w_codes: torch.Tensor, w_scale: torch.Tensor, bias: Optional[torch.Tensor] = None, instance_dims: int = 1,
) -> torch.Tensor:
    """``torch.ops.igq.grouped_linear``: the integer grouped linear (module docstring); float32 output."""
    _check_grouped_linear(x_codes, assignment, group_scale, group_zero_point, w_codes, w_scale, bias, instance_dims)
    return torch.ops.igq.grouped_linear(x_codes, assignment, group_scale, group_zero_point, w_codes, w_scale, bias,
                                        instance_dims)
