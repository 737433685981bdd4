"""Instance-aware group quantization of activations (IGQ-ViT, DESIGN.md §1).

Layout conventions (pure functions, no state):
* A *channel site* is a tensor ``x`` of shape [*instance dims, *token dims, C]: the first
  ``instance_dims`` dimensions (default 1: [B, N, C]) index instances, the dimensions between
  them and the channels (last) are tokens. Per-instance ranges are taken over all token positions
  (e.g. Swin window attention: [B * windows, N, C], each window one instance; a patch-merging
  input [B, H, W, C]: each image one instance, H * W tokens; [B, C]: one token per instance).
* A *softmax site* is attention probabilities ``a`` of shape [..., N_q, N_k]; each row (one
  query token of one head of one instance) is assigned to a group by its maximum.

Group quantizers are static (calibrated ranges); only the assignment is per instance. The
assignment and the quantization arithmetic run in float32 whatever the input dtype, so a bf16
model assigns channels exactly like an fp32 kernel. These functions are the reference
implementations of the ``igq`` torch.library ops (:mod:`igq_plugin.ops.library`), which add
fake kernels and autograd; models call the ops.
"""
from __future__ import annotations

import math

import torch

from .levels import DEFAULT_TANQ_STEEPNESS, dequantize_probs, quantize_probs, softmax_row_scale
from .quant import asym_qparams, qrange, quantize

__all__ = [
    "as_instances",
    "channel_ranges",
    "assign_groups",
    "group_qparams",
    "group_quantize",
    "group_fake_quantize_reference",
    "group_quant_error",
    "row_maxima",
    "assign_rows",
    "softmax_group_quantize",
    "softmax_group_fake_quantize_reference",
]


def as_instances(x: torch.Tensor, instance_dims: int = 1) -> torch.Tensor:
    """View x [*instance dims, *token dims, C] as [I, T, C] (I, T: products of those dims; T = 1 without token dims)."""
    if isinstance(instance_dims, bool) or not isinstance(instance_dims, int) or not 1 <= instance_dims < max(x.dim(), 2):
        raise ValueError(
            f"instance_dims must be an int in [1, {max(x.dim() - 1, 1)}] for an activation of shape {tuple(x.shape)} "
            "(leading dims that index instances; the channel dim is last, the dims between are tokens)"
        )
    instances = math.prod(x.shape[:instance_dims])
    tokens = math.prod(x.shape[instance_dims:-1])
    return x.reshape(instances, tokens, x.shape[-1])


def channel_ranges(x: torch.Tensor, instance_dims: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-instance per-channel (min, max) of x [*instance dims, *token dims, C] -> two tensors [I, C]."""
    return _token_ranges(as_instances(x, instance_dims))


def _token_ranges(xi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    # amin and amax separately: on CPU, torch.aminmax over a middle dim is ~10x slower (measured,
    # [8, 197, 768]: 1.4 ms vs 0.1 ms), and this runs at every site of every forward.
    return xi.amin(dim=1), xi.amax(dim=1)


_ASSIGN_CHUNK = 4096


def _nearest_group(lo: torch.Tensor, hi: torch.Tensor, group_lo: torch.Tensor, group_hi: torch.Tensor) -> torch.Tensor:
    dist = (lo.unsqueeze(-1) - group_lo) ** 2 + (hi.unsqueeze(-1) - group_hi) ** 2
    return torch.argmin(dist, dim=-1)  # argmin returns the first minimum: lowest group index


def assign_groups(
    lo: torch.Tensor, hi: torch.Tensor, group_lo: torch.Tensor, group_hi: torch.Tensor
) -> torch.Tensor:
    """Paper Eq. 5: a_c = argmin_g (l_c - l_g)^2 + (u_c - u_g)^2; ties go to the lowest g.

    lo, hi: [..., C] channel ranges; group_lo, group_hi: [G]. Returns int64 [..., C]. Computed in
    the inputs' dtype (the igq ops pass float32, whatever the model dtype).
    """
    if lo.numel() <= 2 * _ASSIGN_CHUNK or lo.device.type != "cpu":
        return _nearest_group(lo, hi, group_lo, group_hi)
    # Same arithmetic in cache-sized chunks (the [n, G] temporaries of one pass stay in L2): identical
    # results, about 3x faster on CPU for calibration-sized inputs (n ~ 50k channel ranges).
    flat_lo, flat_hi = lo.reshape(-1), hi.reshape(-1)
    out = torch.empty(flat_lo.shape, dtype=torch.long, device=lo.device)
    for start in range(0, flat_lo.numel(), _ASSIGN_CHUNK):
        part = slice(start, start + _ASSIGN_CHUNK)
        out[part] = _nearest_group(flat_lo[part], flat_hi[part], group_lo, group_hi)
    return out.reshape(lo.shape)


def group_qparams(group_lo: torch.Tensor, group_hi: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point of each group's asymmetric quantizer, [G] each (zero policy: ops.quant)."""
    return asym_qparams(group_lo, group_hi, bits)


def _instance_assignment(
    xi: torch.Tensor, group_lo: torch.Tensor, group_hi: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """float32 tokens, ranges and Eq. 5 assignment [I, C] of instances xi [I, T, C] (no host sync, no chunk loop)."""
    xf = xi.float()
    if group_lo.shape[0] == 1:  # one group (a layer-wise site): every channel is in it
        return xf, group_lo.float(), torch.zeros(xf.shape[0], xf.shape[2], dtype=torch.long, device=xf.device)
    lo, hi = _token_ranges(xf)
    return xf, group_lo.float(), _nearest_group(lo, hi, group_lo.float(), group_hi.float())


def group_quantize(
    x: torch.Tensor, group_lo: torch.Tensor, group_hi: torch.Tensor, bits: int, instance_dims: int = 1
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Assign every (instance, channel) of x [*instances, *tokens, C] to a group and quantize it (float32).

    Returns (codes shaped like x, float32 integer-valued; assignment [I, C] int64; group scale [G];
    group zero point [G]). The reference of ``igq::group_quantize``.
    """
    xf, _, assignment = _instance_assignment(as_instances(x, instance_dims), group_lo, group_hi)
    scale, zero_point = group_qparams(group_lo.float(), group_hi.float(), bits)
    s = scale[assignment].unsqueeze(1)  # [I, 1, C]
    z = zero_point[assignment].unsqueeze(1)
    qmin, qmax = qrange(bits)
    codes = quantize(xf, s, z, qmin, qmax).reshape(x.shape)
    return codes, assignment, scale, zero_point


def _assigned_fake_quantize(
    xi: torch.Tensor, assignment: torch.Tensor, group_lo: torch.Tensor, group_hi: torch.Tensor, bits: int
) -> torch.Tensor:
    """Tokens xi [I, T, C] quantized and dequantized with the groups of ``assignment`` [I, C]."""
    scale, zero_point = group_qparams(group_lo, group_hi, bits)
    s = scale[assignment].unsqueeze(1).to(xi.dtype)
    z = zero_point[assignment].unsqueeze(1).to(xi.dtype)
    qmin, qmax = qrange(bits)
    # dequantize(quantize(xi)) with the same arithmetic, in place on one temporary (no autograd here:
    # the ops own their gradients), which saves four activation-sized allocations per call.
    q = xi / s
    return q.round_().add_(z).clamp_(qmin, qmax).sub_(z).mul_(s)


def group_fake_quantize_reference(
    x: torch.Tensor, group_lo: torch.Tensor, group_hi: torch.Tensor, bits: int, instance_dims: int = 1
) -> torch.Tensor:
    """Forward of ``igq::group_fake_quant``: assignment and quantization in float32, result in x's dtype.

    No autograd handling: call :func:`group_fake_quantize` (the op) for gradients.
    """
    xf, _, assignment = _instance_assignment(as_instances(x, instance_dims), group_lo, group_hi)
    x_hat = _assigned_fake_quantize(xf, assignment, group_lo.float(), group_hi.float(), bits)
    return x_hat.to(x.dtype).reshape(x.shape)


def group_quant_error(
    samples: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, group_lo: torch.Tensor, group_hi: torch.Tensor,
    bits: int,
    channel_weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """Squared error of group quantization on sampled tokens, assigned as at inference.

    samples: [B, K, C], K tokens of each instance; lo, hi: [B, C], each instance's channel ranges
    over *all* its tokens (the assignment at inference uses them, not the sample's). Returns the
    sum of squared (fake-quantized - sample) as a 0-d tensor of samples' dtype, each channel's
    term multiplied by ``channel_weights`` [C] when given. With every token sampled and no
    weights this is exactly the error of :func:`group_fake_quantize`.
    """
    if samples.dim() != 3 or lo.shape != hi.shape or lo.shape != (samples.shape[0], samples.shape[2]):
        raise ValueError(
            f"expected samples [B, K, C] and lo, hi [B, C]; got {tuple(samples.shape)}, {tuple(lo.shape)}, "
            f"{tuple(hi.shape)}"
        )
    x_hat = _assigned_fake_quantize(samples, assign_groups(lo, hi, group_lo, group_hi), group_lo, group_hi, bits)
    err = (x_hat - samples).pow(2)
    if channel_weights is not None:
        err = err * channel_weights.to(err)
    return err.sum()


def row_maxima(a: torch.Tensor) -> torch.Tensor:
    """Maximum of each softmax row: a [..., N_q, N_k] -> [..., N_q]."""
    return a.amax(dim=-1)


def assign_rows(u: torch.Tensor, group_hi: torch.Tensor) -> torch.Tensor:
    """a_i = argmin_g |u_i - u_g| (ties -> lowest g). u: [...], group_hi: [G] -> int64 [...]."""
    return torch.argmin((u.unsqueeze(-1) - group_hi).abs(), dim=-1)


def _row_scale(
    a: torch.Tensor, group_hi: torch.Tensor, bits: int, levels: str
) -> tuple[torch.Tensor, torch.Tensor]:
    assignment = assign_rows(row_maxima(a), group_hi)
    return softmax_row_scale(levels, group_hi, bits)[assignment].unsqueeze(-1), assignment


def softmax_group_quantize(
    a: torch.Tensor, group_hi: torch.Tensor, bits: int, levels: str = "uniform",
    steepness: float = DEFAULT_TANQ_STEEPNESS,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Row-group quantization of attention probabilities a [..., N_q, N_k], in float32.

    ``levels``: "uniform" (unsigned uniform on [0, u_g]), "log_sqrt2" or "tanq" (see
    :mod:`igq_plugin.ops.levels`; ``steepness`` is TanQ's kappa). Returns (codes shaped like a,
    float32; row assignment [..., N_q]; per-row factor s [..., N_q, 1]); a_hat = s * level_table[codes].
    """
    af = a.float()
    s, assignment = _row_scale(af, group_hi.float(), bits, levels)
    return quantize_probs(af, s, levels, bits, steepness), assignment, s


def softmax_group_fake_quantize_reference(
    a: torch.Tensor, group_hi: torch.Tensor, bits: int, levels: str = "uniform",
    steepness: float = DEFAULT_TANQ_STEEPNESS,
) -> torch.Tensor:
    """Forward of ``igq::softmax_row_fake_quant`` (float32 arithmetic, result in a's dtype; no autograd)."""
    codes, _, s = softmax_group_quantize(a, group_hi, bits, levels, steepness)
    return dequantize_probs(codes, s, levels, bits, steepness).to(a.dtype)
