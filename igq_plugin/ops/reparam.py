"""Scale reparameterization of post-LayerNorm activations (RepQ-ViT; DopQ-ViT's MOSF).

A per-channel asymmetric quantizer (s_c, z_c) of a LayerNorm output x is turned into one
layer-wise quantizer (s~, z~) by folding per-channel factors into the LayerNorm affine and the
next Linear (Li et al., RepQ-ViT, ICCV 2023):

    r1 = s / s~,  r2 = z - z~          (z and z~ integers, so r2 is an integer)
    x~ = (x + s * r2) / r1              -> LayerNorm:  gamma~ = gamma / r1,  beta~ = (beta + s * r2) / r1
    W x + b = W~ x~ + b~                -> Linear:     W~ = W diag(r1),      b~ = b - W (s * r2)

and round(x~ / s~) + z~ = round(x / s_c) + z_c exactly, so the layer-wise quantizer on x~ is the
per-channel quantizer on x. The target scale s~ only sets the common scale of x~; RepQ-ViT uses
the mean of s, DopQ-ViT the MAD-guided choice :func:`mosf_target_scale`. All functions are pure.
"""
from __future__ import annotations

import torch

from .quant import asym_qparams

__all__ = [
    "reparam_channel_qparams",
    "reparam_target_zero_point",
    "reparam_factors",
    "fold_layernorm",
    "fold_linear",
    "reparam_ranges",
    "mean_target_scale",
    "mosf_target_scale",
]

# A channel narrower than this fraction of the median channel width (e.g. a constant channel) is
# widened to it: its scale would otherwise be the 1e-8 floor and r1 ~ 1e-8 would wreck the fold.
_MIN_RELATIVE_WIDTH = 1e-3


def reparam_channel_qparams(lo: torch.Tensor, hi: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel (scale, zero point) [C] of calibration ranges [C] at ``bits``, degenerate channels widened."""
    width = hi - lo
    floor = width.median() * _MIN_RELATIVE_WIDTH
    if float(floor) <= 0:
        floor = torch.clamp(width.max() * _MIN_RELATIVE_WIDTH, min=1e-6)
    return asym_qparams(lo, torch.maximum(hi, lo + floor), bits)


def reparam_target_zero_point(zero_point: torch.Tensor, bits: int) -> torch.Tensor:
    """RepQ-ViT's layer-wise zero point: the rounded mean of the channel zero points (clipped to the
    code range first, so no single far-off channel moves it). Any integer keeps the fold exact."""
    return torch.round(zero_point.clamp(0, 2**bits - 1).mean())


def reparam_factors(
    scale: torch.Tensor, zero_point: torch.Tensor, target_scale: torch.Tensor, target_zero_point: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(r1, r2) of the per-channel quantizer (scale, zero_point) [C] onto (target_scale, target_zero_point)."""
    if bool((scale <= 0).any()) or float(target_scale) <= 0:
        raise ValueError("reparameterization needs positive scales")
    return scale / target_scale, zero_point - target_zero_point


def fold_layernorm(
    weight: torch.Tensor, bias: torch.Tensor, r1: torch.Tensor, r2: torch.Tensor, scale: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """New LayerNorm affine (gamma~, beta~) so the LayerNorm outputs x~ = (x + scale * r2) / r1."""
    return weight / r1, (bias + scale * r2) / r1


def fold_linear(
    weight: torch.Tensor, bias: torch.Tensor | None, r1: torch.Tensor, r2: torch.Tensor, scale: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """New (W~, b~) of a Linear [O, C] fed by x~, with W~ x~ + b~ = W x + b (b~ is created if bias is None)."""
    shift = scale * r2  # x = r1 * x~ - shift
    new_bias = -(weight.double() @ shift.double())
    if bias is not None:
        new_bias = new_bias + bias.double()
    return weight * r1, new_bias.to(weight.dtype)


def reparam_ranges(
    lo: torch.Tensor, hi: torch.Tensor, r1: torch.Tensor, r2: torch.Tensor, scale: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Ranges [..., C] of x mapped to ranges of x~ (r1 > 0, so min stays min)."""
    shift = scale * r2
    return (lo + shift) / r1, (hi + shift) / r1


def mean_target_scale(scale: torch.Tensor) -> torch.Tensor:
    """RepQ-ViT's layer-wise scale: the mean of the per-channel scales."""
    return scale.mean()


def mosf_target_scale(scale: torch.Tensor, threshold: float = 3.0) -> torch.Tensor:
    """DopQ-ViT's MAD-guided scale: the mean of the channel scales that are not outliers.

    A channel is an outlier when its scale lies more than ``threshold`` median absolute
    deviations from the median of the scales; the mean of the others is robust to the few
    huge post-LayerNorm channels that pull RepQ-ViT's plain mean up.
    """
    median = scale.median()
    mad = (scale - median).abs().median()
    if float(mad) == 0.0:
        return median
    inliers = (scale - median).abs() <= threshold * mad
    return scale[inliers].mean()
