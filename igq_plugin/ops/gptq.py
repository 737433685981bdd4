"""Error-compensating weight rounding (GPTQ / OPTQ, Frantar et al., 2023) with quantized inputs.

A Linear y = W x is calibrated on N inputs. With float inputs X [N, C] and the inputs the
quantized model actually feeds it, X^ (IGQ-quantized, upstream error included), the objective is

    || X^ W^q^T - X W^T ||_F^2

over quantized weights W^q. Writing H = X^T^ X^ and W' = W (X^T X^) H^-1 (the float weights that
best map X^ to the float outputs), the objective is || X^ (W^q - W')^T ||^2 + const, so:

1. :func:`input_correlations` accumulates H = X^T^ X^ and X^T X^ over calibration batches;
2. :func:`compensated_target` gives W' (W itself when X^ = X);
3. :func:`gptq_quantize` rounds W' column by column, spreading every column's rounding error
   over the columns not yet rounded through the inverse Hessian (Cholesky form), with the
   per-output-channel quantizer (scale, zero point) fixed beforehand.

:func:`gptq_quantize` returns the result with the smaller error of GPTQ and plain round-to-nearest
under H, so it never does worse than rounding on its calibration inputs. Pure functions.
"""
from __future__ import annotations

import torch

from .quant import qrange

__all__ = ["input_correlations", "compensated_target", "hessian_error", "round_to_nearest", "gptq_quantize"]


def input_correlations(
    x_quant: torch.Tensor, x_float: torch.Tensor | None = None, state: tuple | None = None
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Accumulate (H = X^T^ X^, X^T X^, rows) over batches of inputs [..., C] (float64 sums).

    ``x_float`` None means the float inputs equal the quantized ones.
    """
    xq = x_quant.reshape(-1, x_quant.shape[-1]).double()
    xf = xq if x_float is None else x_float.reshape(-1, x_float.shape[-1]).double()
    if xf.shape != xq.shape:
        raise ValueError(f"x_float {tuple(xf.shape)} and x_quant {tuple(xq.shape)} must have the same shape")
    h, cross, rows = state if state is not None else (0.0, 0.0, 0)
    return h + xq.t() @ xq, cross + xf.t() @ xq, rows + xq.shape[0]


def _damped(h: torch.Tensor, damp: float) -> torch.Tensor:
    h = h.clone()
    diag = torch.diagonal(h)
    dead = diag <= 0  # channels that never fire: any weight is as good; keep them still
    diag[dead] = 1.0
    diag += damp * diag.mean()
    return h


def compensated_target(weight: torch.Tensor, h: torch.Tensor, cross: torch.Tensor, damp: float = 0.01) -> torch.Tensor:
    """W' = W (X^T X^) (X^T^ X^ + damping)^-1: float weights that best map X^ to X W^T ([O, C], float64)."""
    rhs = weight.double() @ cross  # [O, C]
    return torch.linalg.solve(_damped(h, damp), rhs.t()).t()


def hessian_error(weight_q: torch.Tensor, target: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """trace((W^q - W') H (W^q - W')^T) = || X^ (W^q - W')^T ||^2."""
    d = (weight_q.double() - target.double())
    return torch.einsum("oc,cd,od->", d, h.double(), d)


def round_to_nearest(weight: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, bits: int) -> torch.Tensor:
    """Dequantized per-output-channel rounding of ``weight`` [O, C] (scale, zero_point [O])."""
    qmin, qmax = qrange(bits)
    s, z = scale.reshape(-1, 1).to(weight.dtype), zero_point.reshape(-1, 1).to(weight.dtype)
    return (torch.clamp(torch.round(weight / s) + z, qmin, qmax) - z) * s


def gptq_quantize(
    target: torch.Tensor,
    h: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor,
    bits: int,
    *,
    damp: float = 0.01,
    block_size: int = 128,
) -> torch.Tensor:
    """GPTQ rounding of ``target`` [O, C] under Hessian ``h`` [C, C]; returns dequantized weights [O, C].

    Columns are processed in order in blocks of ``block_size`` (lazy batch updates). The result
    is the better (under ``h``) of GPTQ and round-to-nearest with the same quantizer.
    """
    if target.dim() != 2 or h.shape != (target.shape[1], target.shape[1]):
        raise ValueError(f"target must be [O, C] and h [C, C]; got {tuple(target.shape)} and {tuple(h.shape)}")
    w = target.double().clone()
    hd = _damped(h.double(), damp)
    # Upper Cholesky factor of H^-1: row j holds the update directions of column j.
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(hd)), upper=True)
    qmin, qmax = qrange(bits)
    s = scale.reshape(-1).double()
    z = zero_point.reshape(-1).double()
    out = torch.empty_like(w)
    cols = w.shape[1]
    for start in range(0, cols, block_size):
        end = min(start + block_size, cols)
        block = w[:, start:end].clone()
        errors = torch.empty_like(block)
        hblock = hinv[start:end, start:end]
        for j in range(end - start):
            col = block[:, j]
            q = (torch.clamp(torch.round(col / s) + z, qmin, qmax) - z) * s
            out[:, start + j] = q
            err = (col - q) / hblock[j, j]
            block[:, j + 1:] -= err.unsqueeze(1) * hblock[j, j + 1:].unsqueeze(0)
            errors[:, j] = err
        w[:, end:] -= errors @ hinv[start:end, end:]
    rtn = round_to_nearest(target.double(), s, z, bits)
    if float(hessian_error(rtn, target, h)) < float(hessian_error(out, target, h)):
        out = rtn
    return out.to(target.dtype)
