"""Uniform quantizer primitives: qparams, quantize, dequantize, fake-quantize.

Pure functions on tensors: no module state, no config objects. Codes are returned as
integer-valued tensors in the input's floating dtype (exact for |q| < 2**24), so the
same function serves the fake-quant path and the integer reference path.

Asymmetric b-bit quantizer on [lo, hi] (DESIGN.md §1):
    s = (hi - lo) / (2**b - 1),  z = round(-lo / s),
    q = clamp(round(x / s) + z, 0, 2**b - 1),  x_hat = s * (q - z).
Zero policy (what integer backends rely on): every range is widened to contain 0 before its
qparams are computed (lo <- min(lo, 0), hi <- max(hi, 0)), so the zero point is an integer code
in [0, 2**b - 1] (clamped there against float rounding) and 0.0 is represented exactly: a masked
or padded channel dequantizes to exactly 0 on an integer kernel. A range that lies away from
zero (a LayerNorm output with an offset) pays for this with a coarser step. Store z as int32.
"""
from __future__ import annotations

import torch

__all__ = [
    "MIN_BITS",
    "MAX_BITS",
    "check_bits",
    "qrange",
    "asym_qparams",
    "sym_qparams",
    "asym_range",
    "quantize",
    "dequantize",
    "fake_quantize",
]

MIN_BITS = 2
MAX_BITS = 8
# Smallest step size: a range of zero width (a constant channel) still gets a valid quantizer.
_MIN_SCALE = 1e-8


def check_bits(bits: int, name: str = "bits") -> int:
    """Return ``bits`` if it is an int in [MIN_BITS, MAX_BITS], else raise ValueError naming ``name``."""
    if isinstance(bits, bool) or not isinstance(bits, int):
        raise TypeError(f"{name} must be an int in [{MIN_BITS}, {MAX_BITS}], got {bits!r}")
    if not MIN_BITS <= bits <= MAX_BITS:
        raise ValueError(f"{name} must be in [{MIN_BITS}, {MAX_BITS}], got {bits}")
    return bits


def qrange(bits: int, signed: bool = False) -> tuple[int, int]:
    """Integer code range: [0, 2^b - 1] unsigned, [-2^(b-1), 2^(b-1) - 1] signed."""
    if signed:
        return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    return 0, 2**bits - 1


def asym_qparams(lo: torch.Tensor, hi: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point of the asymmetric quantizer on [min(lo, 0), max(hi, 0)] (broadcasting)."""
    lo = torch.as_tensor(lo).clamp(max=0.0)
    hi = torch.as_tensor(hi, dtype=lo.dtype, device=lo.device).clamp(min=0.0)
    # Multiply by the reciprocal rather than divide by 2^b - 1: the result is then the same on every
    # device (CUDA turns a division by a Python scalar into a multiplication by its reciprocal, the
    # CPU truly divides, and the two can differ in the last bit).
    scale = ((hi - lo) * (1.0 / (2**bits - 1))).clamp_min(_MIN_SCALE)
    zero_point = torch.round(-lo / scale).clamp(0, 2**bits - 1)
    return scale, zero_point


def asym_range(scale: torch.Tensor, zero_point: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The range [lo, hi] = [-z s, (2^b - 1 - z) s] whose asymmetric quantizer is (scale, zero_point)."""
    return -zero_point * scale, (2**bits - 1 - zero_point) * scale


def sym_qparams(amax: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and (zero) zero point of the signed symmetric quantizer on [-amax, amax]."""
    amax = torch.as_tensor(amax)
    scale = (amax.abs() * (1.0 / (2 ** (bits - 1) - 1))).clamp_min(_MIN_SCALE)
    return scale, torch.zeros_like(scale)


def quantize(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qmin: int, qmax: int) -> torch.Tensor:
    """Integer codes ``clamp(round(x / scale) + zero_point, qmin, qmax)`` in x's dtype."""
    return torch.clamp(torch.round(x / scale) + zero_point, qmin, qmax)


def dequantize(q: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor) -> torch.Tensor:
    """``scale * (q - zero_point)``."""
    return (q - zero_point) * scale


def fake_quantize(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qmin: int, qmax: int) -> torch.Tensor:
    """dequantize(quantize(x)); gradients pass straight through inside the range (STE)."""
    x_hat = dequantize(quantize(x, scale, zero_point, qmin, qmax), scale, zero_point)
    if x.requires_grad:
        # Straight-through estimator: identity gradient, forward value of x_hat.
        return x + (x_hat - x).detach()
    return x_hat
