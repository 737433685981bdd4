"""Quantization-aware training math (igq_plugin.qat): learned weight step sizes, the oscillation-aware
bin regularizer and the distillation losses. Pure tensor functions.

* :func:`lsq_fake_quantize_weight`: per-output-channel weight fake quantization whose step sizes are
  learned (LSQ, Esser et al. 2020): straight-through gradient to the latent weights inside the code
  range (zero outside, where the clamp holds them), and to each step size ``s`` the gradient of
  ``s (clamp(round(w / s) + z) - z)`` with the rounding held: ``round(w/s) - w/s`` inside the range,
  ``qmin - z`` / ``qmax - z`` where clamped; scaled by ``1 / sqrt(N * qmax)`` (N weights per step).
* :func:`bin_regularizer`: the oscillation-aware bin regularizer of variation-aware ViT QAT (Huang et
  al., 2023): for every quantization bin m, the squared distance of the latent weights in the bin to
  its level plus their variance, ``sum_m [mean_m((u - m)^2) + var_m(u)]``, in code units ``u = w/s + z``
  (so every layer counts alike, whatever its step size). It pulls latent weights to the centres of their
  bins, away from the rounding boundaries where they oscillate between two codes.
* :func:`distillation_loss`: "kl" (Hinton: T^2 KL(softmax(t/T) || softmax(s/T)), batch mean), "mse"
  (mean squared error) or "cosine" (1 - mean cosine over the last dimension), student against teacher.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .quant import qrange
from .weight import _per_channel

__all__ = ["DISTILLATION_LOSSES", "lsq_fake_quantize_weight", "bin_regularizer", "distillation_loss"]

DISTILLATION_LOSSES = ("kl", "mse", "cosine")
_MIN_STEP = 1e-8


def _grad_scale(t: torch.Tensor, g: float) -> torch.Tensor:
    """``t`` in the forward pass; its gradient times ``g`` in the backward pass."""
    return t.detach() + (t - t.detach()) * g


def lsq_fake_quantize_weight(w: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, bits: int) -> torch.Tensor:
    """Fake-quantized weights [O, ...] with learnable per-output-channel step sizes ``scale`` [O] (LSQ);
    the zero points [O] stay fixed integers. Forward value: ``ops.fake_quantize_weight``'s."""
    qmin, qmax = qrange(bits)
    g = 1.0 / math.sqrt(max(1, w[0].numel()) * qmax)
    s = _per_channel(_grad_scale(scale, g), w).clamp_min(_MIN_STEP)
    z = _per_channel(zero_point, w).detach()
    u = w / s + z
    r = torch.round(u.detach())
    inside = (r >= qmin) & (r <= qmax)  # the code range, decided on the rounded value (as the forward)
    codes = torch.where(inside, u + (r - u).detach(), r.clamp(qmin, qmax))
    return (codes - z) * s


def bin_regularizer(w: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, bits: int) -> torch.Tensor:
    """Oscillation-aware bin regularizer of latent weights w [O, ...] (module docstring); gradients reach
    w only (step sizes and zero points are held)."""
    qmin, qmax = qrange(bits)
    u = (w / _per_channel(scale, w).detach().clamp_min(_MIN_STEP) + _per_channel(zero_point, w).detach()).flatten()
    level = torch.clamp(torch.round(u.detach()), qmin, qmax)
    d = u - level
    index = (level - qmin).long()
    bins = qmax - qmin + 1
    count = torch.bincount(index, minlength=bins).to(u.dtype)
    total = torch.zeros(bins, dtype=u.dtype, device=u.device).index_add(0, index, d)
    squares = torch.zeros(bins, dtype=u.dtype, device=u.device).index_add(0, index, d * d)
    present = count > 0
    mse = squares[present] / count[present]
    mean = total[present] / count[present]
    return (mse + (mse - mean * mean)).sum()


def distillation_loss(student: torch.Tensor, teacher: torch.Tensor, kind: str = "kl",
                      temperature: float = 1.0) -> torch.Tensor:
    """Distillation loss of ``student`` outputs against ``teacher`` outputs [B, ..., C] (module docstring)."""
    if kind not in DISTILLATION_LOSSES:
        raise ValueError(f"distillation loss must be one of {DISTILLATION_LOSSES}, got {kind!r}")
    if student.shape != teacher.shape:
        raise ValueError(f"student outputs {tuple(student.shape)} and teacher outputs {tuple(teacher.shape)} differ")
    teacher = teacher.detach().to(student.dtype)
    if kind == "kl":
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature!r}")
        t = temperature
        log_p_student = F.log_softmax(student.flatten(0, -2) / t, dim=-1)
        log_p_teacher = F.log_softmax(teacher.flatten(0, -2) / t, dim=-1)
        kl = (log_p_teacher.exp() * (log_p_teacher - log_p_student)).sum(-1)
        return kl.mean() * t * t
    if kind == "mse":
        return F.mse_loss(student, teacher)
    return 1.0 - F.cosine_similarity(student.flatten(0, -2), teacher.flatten(0, -2), dim=-1).mean()
