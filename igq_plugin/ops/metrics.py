"""Fidelity metrics of a quantized output against its full-precision reference."""
from __future__ import annotations

import torch

__all__ = ["sqnr_db", "cosine"]


def sqnr_db(ref: torch.Tensor, out: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio of ``out`` against ``ref`` in dB (float64 accumulation)."""
    noise = (ref.double() - out.double()).pow(2).sum().clamp_min(1e-30)
    return float(10 * torch.log10(ref.double().pow(2).sum() / noise))


def cosine(ref: torch.Tensor, out: torch.Tensor) -> float:
    """Cosine similarity of the flattened tensors."""
    return float(torch.nn.functional.cosine_similarity(ref.flatten().double(), out.flatten().double(), dim=0))
