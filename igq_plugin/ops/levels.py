"""Post-softmax quantizers: uniform, log-sqrt(2) (RepQ-ViT) and TanQ (DopQ-ViT).

Every quantizer maps a probability ``a`` on a row range [0, u] (u: the static range of the
row's group; one group = one range for the whole tensor) to a b-bit code k in [0, 2^b - 1],
and back by a level table: ``a_hat = s * table[k]``. The table has exactly 2^b entries, so
codes are true b-bit codes and an integer A.V expands them with a 2^b-entry lookup.

``"uniform"``  s = u / (2^b - 1), table[k] = k: levels evenly spaced on [0, u].
``"log_sqrt2"`` s = u, table[k] = 2^(-k/2) for k < 2^b - 1 and table[2^b - 1] = 0:
    k = round(-2 log2(a / u)) (rounding in the log domain, as RepQ-ViT does), values above u
    clip to u, values whose k would reach 2^b - 1 become 0. RepQ-ViT's reference keeps 2^b
    powers of sqrt(2) *and* zero (2^b + 1 values); here the last code is zero so the codes
    fit in b bits.
``"tanq"``     s = u, table[k] = 1/2 + arctan(kappa (2k / (2^b - 1) - 1)) / (2 arctan kappa):
    the quantization function is the tangent y = (1 + tan((2t - 1) arctan kappa) / kappa) / 2
    of t = a / u, rounded on a uniform grid in y. Levels are dense near 0 *and* near 1 (the
    few large attention probabilities that carry most of the output) and sparse in the
    middle; ``kappa`` (steepness) -> 0 gives the uniform quantizer. DopQ-ViT (Yang et al.,
    2024) introduces a tangent quantizer with this property; its exact formula was not
    available offline, so this parameterization is igq_plugin's own.
"""
from __future__ import annotations

import functools
import math

import torch

from .quant import asym_qparams, quantize

__all__ = [
    "SOFTMAX_QUANTIZERS",
    "DEFAULT_TANQ_STEEPNESS",
    "check_softmax_quantizer",
    "softmax_level_table",
    "softmax_row_scale",
    "quantize_probs",
    "dequantize_probs",
]

SOFTMAX_QUANTIZERS = ("uniform", "log_sqrt2", "tanq")
DEFAULT_TANQ_STEEPNESS = 4.0  # best of 2, 3, 4, 8, 16, 32 on DINOv2-S W4A4 (benchmarks/results/softmax_levels.md)


def check_softmax_quantizer(kind: str, steepness: float = DEFAULT_TANQ_STEEPNESS) -> None:
    if kind not in SOFTMAX_QUANTIZERS:
        raise ValueError(f"softmax quantizer must be one of {SOFTMAX_QUANTIZERS}, got {kind!r}")
    if isinstance(steepness, bool) or not isinstance(steepness, (int, float)) or not 0 < steepness < 1e6:
        raise ValueError(f"TanQ steepness must be a positive number, got {steepness!r}")


def softmax_level_table(kind: str, bits: int, steepness: float = DEFAULT_TANQ_STEEPNESS) -> torch.Tensor:
    """The 2^b dequantized values (float64, before the per-row factor s) of codes 0 .. 2^b - 1."""
    check_softmax_quantizer(kind, steepness)
    return torch.tensor(_level_values(kind, bits, float(steepness)), dtype=torch.float64)


@functools.lru_cache(maxsize=64)
def _level_values(kind: str, bits: int, steepness: float) -> tuple[float, ...]:
    # Cached as Python floats, not as a tensor: a tensor constant created outside a trace cannot
    # be used inside torch.export / torch.compile's fake mode; torch.tensor(values) can.
    n = 2**bits
    k = torch.arange(n, dtype=torch.float64)
    if kind == "uniform":
        table = k
    elif kind == "log_sqrt2":
        table = torch.pow(2.0, -k / 2)
        table[-1] = 0.0
    else:
        y = 2 * k / (n - 1) - 1
        table = 0.5 + torch.atan(steepness * y) / (2 * math.atan(steepness))
    return tuple(table.tolist())


def softmax_row_scale(kind: str, row_hi: torch.Tensor, bits: int) -> torch.Tensor:
    """Per-row factor s of the level table for rows of range [0, row_hi]."""
    if kind == "uniform":
        return asym_qparams(torch.zeros_like(row_hi), row_hi, bits)[0]  # unsigned uniform on [0, u]
    return row_hi.clamp_min(1e-8)


def quantize_probs(
    a: torch.Tensor, s: torch.Tensor, kind: str, bits: int, steepness: float = DEFAULT_TANQ_STEEPNESS
) -> torch.Tensor:
    """Codes (integer-valued, a's dtype) of probabilities ``a`` with per-row factor ``s`` (broadcasting)."""
    top = 2**bits - 1
    if kind == "uniform":
        return quantize(a, s, 0.0, 0, top)
    t = (a / s).clamp(0.0, 1.0)
    if kind == "log_sqrt2":
        k = torch.round(-2.0 * torch.log2(t))  # t = 0 -> +inf -> zero code
        return torch.clamp(k, 0, top)
    y = (1.0 + torch.tan((2.0 * t - 1.0) * math.atan(steepness)) * (1.0 / steepness)) * 0.5
    return torch.clamp(torch.round(y * top), 0, top)


def dequantize_probs(
    codes: torch.Tensor, s: torch.Tensor, kind: str, bits: int, steepness: float = DEFAULT_TANQ_STEEPNESS
) -> torch.Tensor:
    """``s * table[codes]``."""
    if kind == "uniform":
        return codes * s  # table[k] = k
    table = torch.tensor(_level_values(kind, bits, float(steepness)), dtype=torch.float64,
                         device=codes.device).to(codes.dtype)
    return s * table[codes.long()]
