"""Per-output-channel weight quantizer with percentile clipping (DESIGN.md §1, "Weights").

Weights of shape [O, ...] (Linear [O, I], Conv [O, I, kh, kw]) get one asymmetric quantizer
per output channel on [P_eps, P_(100-eps)] of that channel's values (eps in percent).
"""
from __future__ import annotations

from typing import Optional

import torch

from .quant import asym_qparams, dequantize, fake_quantize, qrange, quantize

__all__ = [
    "WEIGHT_CLIPPINGS",
    "WEIGHT_ROUNDINGS",
    "default_weight_percentile",
    "weight_qparams",
    "mse_weight_qparams",
    "quantize_weight",
    "dequantize_weight",
    "fake_quantize_weight",
    "SOFT_ROUNDING_STRETCH",
    "soft_rounding_init",
    "soft_rounding_start",
    "SOFT_ROUNDING_CODE_MARGIN",
    "soft_rounding_h",
    "soft_quantize_weight",
    "soft_rounding_codes",
    "rounding_regularizer",
]


_QUANTILE_MAX_NUMEL = 2**24
WEIGHT_CLIPPINGS = ("percentile", "mse")  # fixed-percentile or MSE-optimal per-channel ranges
WEIGHT_ROUNDINGS = ("nearest", "gptq")  # round-to-nearest or GPTQ error compensation (igq_plugin.rounding)


def default_weight_percentile(bits: int) -> float:
    """eps (in percent) used when the config leaves it open: the paper's grid-searched values
    (5e-2 at 4 bits, 1e-3 at 6 bits); min-max (0) at 7-8 bits and 5e-2 below 4 bits."""
    if bits <= 4:
        return 5e-2
    if bits <= 6:
        return 1e-3
    return 0.0


def _flat(w: torch.Tensor) -> torch.Tensor:
    return w.detach().reshape(w.shape[0], -1)


def weight_qparams(w: torch.Tensor, bits: int, percentile: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point [O] of each output channel's quantizer; eps = ``percentile`` (percent)."""
    if not 0.0 <= percentile < 50.0:
        raise ValueError(f"weight percentile must be in [0, 50) percent, got {percentile}")
    flat = _flat(w).float()
    if percentile == 0.0:
        lo, hi = torch.aminmax(flat, dim=1)
    else:
        q = torch.tensor([percentile / 100.0, 1.0 - percentile / 100.0], dtype=flat.dtype, device=flat.device)
        rows = max(1, _QUANTILE_MAX_NUMEL // flat.shape[1])  # torch.quantile caps its input size
        lo, hi = torch.cat([torch.quantile(chunk, q, dim=1) for chunk in flat.split(rows)], dim=1)
    return asym_qparams(lo, hi, bits)


def mse_weight_qparams(
    w: torch.Tensor, bits: int, *, grid: int = 80, min_ratio: float = 0.3
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-output-channel (scale, zero point) [O] minimizing the channel's squared rounding error.

    Candidates shrink each channel's [min, max] by ratios 1 .. ``min_ratio`` (``grid`` steps); the
    ratio 1 (min-max) is among them, so the error is never above min-max rounding.
    """
    if not 0.0 < min_ratio <= 1.0 or grid < 1:
        raise ValueError(f"need 0 < min_ratio <= 1 and grid >= 1, got min_ratio={min_ratio}, grid={grid}")
    flat = _flat(w).float()
    lo0, hi0 = torch.aminmax(flat, dim=1)
    lo0, hi0 = lo0.clamp(max=0.0), hi0.clamp(min=0.0)  # keep zero representable
    qmin, qmax = qrange(bits)
    best_err = torch.full_like(lo0, float("inf"))
    best_scale, best_zero = asym_qparams(lo0, hi0, bits)
    for ratio in torch.linspace(1.0, min_ratio, grid).tolist():
        scale, zero_point = asym_qparams(lo0 * ratio, hi0 * ratio, bits)
        err = (fake_quantize(flat, scale[:, None], zero_point[:, None], qmin, qmax) - flat).pow(2).sum(1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_scale = torch.where(better, scale, best_scale)
        best_zero = torch.where(better, zero_point, best_zero)
    return best_scale, best_zero


def clipped_weight_qparams(w: torch.Tensor, bits: int, clipping: str = "percentile",
                           percentile: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-output-channel (scale, zero point) by the clipping rule ``clipping`` ("percentile": clip at
    ``percentile`` percent; "mse": the MSE-optimal range). What every weight quantizer uses."""
    if clipping == "mse":
        return mse_weight_qparams(w, bits)
    if clipping != "percentile":
        raise ValueError(f"weight clipping must be one of {WEIGHT_CLIPPINGS}, got {clipping!r}")
    return weight_qparams(w, bits, percentile)


def _per_channel(t: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return t.to(w.dtype).reshape((-1,) + (1,) * (w.dim() - 1))


def quantize_weight(w: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, bits: int) -> torch.Tensor:
    """Integer codes (in w's dtype) of w with per-output-channel (scale, zero_point)."""
    qmin, qmax = qrange(bits)
    return quantize(w, _per_channel(scale, w), _per_channel(zero_point, w), qmin, qmax)


def dequantize_weight(codes: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Weights in ``dtype`` from integer codes [O, ...] and per-output-channel (scale, zero_point)."""
    w = codes.to(dtype)
    return dequantize(w, _per_channel(scale, w), _per_channel(zero_point, w))


def fake_quantize_weight(w: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, bits: int) -> torch.Tensor:
    """Dequantized weights with per-output-channel (scale, zero_point)."""
    qmin, qmax = qrange(bits)
    return fake_quantize(w, _per_channel(scale, w), _per_channel(zero_point, w), qmin, qmax)


# AdaRound's rectified sigmoid h(v) = clamp(sigmoid(v) (zeta - gamma) + gamma, 0, 1): stretched past [0, 1] so
# it reaches exactly 0 and 1 (Nagel et al., 2020).
SOFT_ROUNDING_STRETCH = (-0.1, 1.1)


def soft_rounding_h(v: torch.Tensor) -> torch.Tensor:
    """The rounding offset in [0, 1] of soft-rounding variables ``v`` (AdaRound's rectified sigmoid)."""
    gamma, zeta = SOFT_ROUNDING_STRETCH
    return torch.clamp(torch.sigmoid(v) * (zeta - gamma) + gamma, 0.0, 1.0)


def soft_rounding_init(w: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Variables v with h(v) = frac(w / s): the soft rounding starts at the float weights."""
    ratio = w / _per_channel(scale, w)
    return _soft_rounding_inverse(ratio - torch.floor(ratio))


def _rounding_base(w: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """floor(w / s): the lower choice of AdaRound's pair when no codes are given."""
    return torch.floor(w.detach() / _per_channel(scale, w))


def _soft_rounding_inverse(h: torch.Tensor) -> torch.Tensor:
    gamma, zeta = SOFT_ROUNDING_STRETCH
    h = h.clamp(1e-4, 1 - 1e-4)
    return -torch.log((zeta - gamma) / (h - gamma) - 1.0)


# How far past 1/2 soft rounding that starts from given codes leans toward them where the float weight
# itself lies nearer the other choice (so the hard codes at the start are exactly the given ones).
SOFT_ROUNDING_CODE_MARGIN = 0.05


def soft_rounding_start(w: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor,
                        codes: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(base, v) for learned rounding between ``base`` and ``base + 1`` (integers, w's dtype, before the
    zero point) with variables ``v``.

    Without ``codes``: base = floor(w / s) and h(v) = frac(w / s), AdaRound's start at the float weights.
    With ``codes`` (integer codes including the zero point, e.g. GPTQ's): the pair holds the given code
    (base = code - z where w / s >= code - z, else code - z - 1) and h(v) starts at w / s - base, pushed to
    at least ``SOFT_ROUNDING_CODE_MARGIN`` past 1/2 on the side of the code, so the hard rounding at the
    start reproduces ``codes`` exactly and the regularizer / loss may still move each weight either way.
    """
    if codes is None:
        return _rounding_base(w, scale), soft_rounding_init(w, scale)
    if codes.shape != w.shape:
        raise ValueError(f"codes have shape {tuple(codes.shape)}, the weight {tuple(w.shape)}")
    ratio = w / _per_channel(scale, w)
    target = codes.to(w.dtype) - _per_channel(zero_point, w)
    up = ratio < target  # the code is the upper choice of its pair
    base = torch.where(up, target - 1, target)
    frac = (ratio - base).clamp(0.0, 1.0)
    half = 0.5 + SOFT_ROUNDING_CODE_MARGIN
    h = torch.where(up, frac.clamp_min(half), frac.clamp_max(1.0 - half))
    return base, _soft_rounding_inverse(h)


def soft_quantize_weight(w: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, bits: int,
                         v: torch.Tensor, hard: bool = False, base: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Weights rounded down or up by learned variables ``v`` (shape of w):
    ``s (clamp(base + h(v) + z) - z)``, base = floor(w / s) unless given (``soft_rounding_start``); ``hard``
    rounds up where h(v) >= 0.5 (the codes igq.reconstruct keeps). Gradients reach v, not w."""
    s, z = _per_channel(scale, w), _per_channel(zero_point, w)
    if hard:
        return (soft_rounding_codes(w, scale, zero_point, bits, v, base) - z) * s
    qmin, qmax = qrange(bits)
    base = _rounding_base(w, scale) if base is None else base
    return (torch.clamp(base + soft_rounding_h(v) + z, qmin, qmax) - z) * s


def soft_rounding_codes(w: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, bits: int,
                        v: torch.Tensor, base: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The integer codes (w's dtype) learned rounding variables ``v`` choose: base (default floor(w / s))
    plus one where h(v) >= 0.5, plus the zero point, clamped to the code range."""
    qmin, qmax = qrange(bits)
    up = (soft_rounding_h(v) >= 0.5).to(w.dtype)
    base = _rounding_base(w, scale) if base is None else base
    return torch.clamp(base + up + _per_channel(zero_point, w), qmin, qmax)


def rounding_regularizer(v: torch.Tensor, beta: float) -> torch.Tensor:
    """AdaRound's sum(1 - |2 h(v) - 1|^beta): pushes every h(v) to 0 or 1 as beta anneals down."""
    return (1.0 - (2.0 * soft_rounding_h(v) - 1.0).abs().pow(beta)).sum()
