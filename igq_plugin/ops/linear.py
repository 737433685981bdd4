"""Reference integer grouped linear (paper Eq. 7).

    Y = sum_g s_g * s_w * ((X_q[:, C_g] - z_g) (W_q[:, C_g] - z_w)^T) + b

One integer matmul per group (exact, int64 accumulation), partial sums scaled and added
in full precision (float64 here). This is the arithmetic a grouped int8 kernel performs;
the fake-quant form X_hat W_hat^T + b must equal it (tests/test_ops.py).
"""
from __future__ import annotations

import torch

__all__ = ["int_grouped_linear"]


def int_grouped_linear(
    x_codes: torch.Tensor,
    assignment: torch.Tensor,
    group_scale: torch.Tensor,
    group_zero_point: torch.Tensor,
    w_codes: torch.Tensor,
    w_scale: torch.Tensor,
    w_zero_point: torch.Tensor,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """Integer grouped linear.

    x_codes: [B, ..., C] activation codes; assignment: [B, C] group of each channel of each
    instance; group_scale / group_zero_point: [G]; w_codes: [O, C] weight codes with per-output
    (w_scale, w_zero_point) [O]; bias: [O] or None. Returns float64 [B, ..., O].
    """
    batch, channels = x_codes.shape[0], x_codes.shape[-1]
    if assignment.shape != (batch, channels):
        raise ValueError(f"assignment must have shape {(batch, channels)}, got {tuple(assignment.shape)}")
    if w_codes.shape[1] != channels:
        raise ValueError(f"w_codes has {w_codes.shape[1]} input channels, activation has {channels}")
    xq = x_codes.reshape(batch, -1, channels).to(torch.int64)
    wq = (w_codes.to(torch.int64) - w_zero_point.to(torch.int64).unsqueeze(1)).t()  # [C, O]
    zp = group_zero_point.to(torch.int64)
    out = torch.zeros(xq.shape[0], xq.shape[1], wq.shape[1], dtype=torch.float64, device=xq.device)
    for g in range(group_scale.numel()):
        members = (assignment == g).unsqueeze(1)  # [B, 1, C]
        if not bool(members.any()):
            continue
        partial = torch.matmul(torch.where(members, xq - zp[g], 0), wq)  # exact int64 GEMM
        out += group_scale[g].double() * partial.double()
    out = out * w_scale.double()
    if bias is not None:
        out = out + bias.double()
    return out.reshape(*x_codes.shape[:-1], wq.shape[1])
