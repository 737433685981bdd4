"""Grouped int8 GPU kernels (Triton) of the igq ops; the ``cuda`` extra (``pip install "igq_plugin[cuda]"``).

::

    import igq_plugin.integrations.cuda as igq_cuda    # registers the CUDA kernels of the igq ops
    codes, assignment = torch.ops.igq.group_quantize(x, group_lo, group_hi, 4)        # Triton on CUDA
    y = torch.ops.igq.grouped_linear(codes, assignment, s, z, w_codes, w_scale, bias)  # Triton on CUDA

Importing this module registers Triton implementations as the CUDA kernels of ``igq::group_quantize``
and ``igq::grouped_linear`` (``torch.library.register_kernel``), so every model, adapter and
``torch.export`` graph that calls those ops runs them on CUDA tensors without new code; CPU tensors
keep the reference. The kernels themselves are ``torch.library.triton_op`` ops (``igq_cuda::*``,
traceable by torch.compile through ``wrap_triton``) and run anywhere Triton runs, including its CPU
interpreter (``TRITON_INTERPRET=1``), which is how the tests check them without a GPU.

* :func:`group_quantize`: per-instance channel min / max, Eq. 5 assignment and codes in one launch,
  equal to ``igq::group_quantize`` (codes and assignment, exactly).
* :func:`grouped_linear`: the integer grouped Linear (paper Eq. 7): exact int32 partial sums per group
  over a per-instance permutation of the channels sorted by group (:func:`group_segments`, a stable sort
  in torch), then the reference's float32 epilogue: equal to ``igq::grouped_linear``.
* :func:`grid_quantize` + :func:`grid_linear`: groups on a common grid (``IGQConfig(act_grid=8)``):
  the activation kernel writes grid codes and the Linear is one int8 GEMM with the scales in its
  epilogue: two launches, the MACs of one GEMM.
* :func:`attention_pv`: post-softmax row codes times V codes, one int8 GEMM with the row scale and the
  V channel scales in the epilogue.
* :func:`int8_linears`: a copy of an ``igq.quantize`` model whose IGQ Linears run these kernels.
"""
from __future__ import annotations

import copy
import functools
import logging
from typing import Optional

import torch
from torch import nn

import igq_plugin as igq
from igq_plugin import ops
from igq_plugin.registry import clear_sites

from .. import require

triton = require("triton", "cuda")

from torch.library import triton_op, wrap_triton  # noqa: E402

from . import kernels  # noqa: E402

__all__ = ["MAX_ATTENTION_KEYS", "group_quantize", "grouped_linear", "group_segments", "grid_quantize", "grid_linear", "attention_pv",
           "grouped_linear_partials", "int8_linears", "Int8IGQLinear", "register_cuda_kernels"]

logger = logging.getLogger("igq_plugin")

# Largest key count whose int32 sums cannot overflow (sum over keys of p * v <= 255 * 255 * M, plus the shifts).
MAX_ATTENTION_KEYS = (2**31 - 1) // (256 * 256 * 2)

_QUANTIZE_BLOCK = dict(BT=16, BC=64)
_GEMM_BLOCK = dict(BM=64, BN=64, BK=32)
_NO_FMA = dict(enable_fp_fusion=False)  # the reference rounds every product and sum separately


_INTERPRETED = __import__("os").environ.get("TRITON_INTERPRET") == "1"  # what triton read when the kernels were defined


def _launch_options() -> dict:
    return {} if _INTERPRETED else dict(_NO_FMA)


def _check_device(*tensors: torch.Tensor) -> None:
    for t in tensors:
        if t.device.type != "cuda" and not _INTERPRETED:
            raise ValueError(f"the Triton kernels run on CUDA tensors, got a {t.device.type} tensor (on a CPU they run "
                             "through Triton's interpreter: set TRITON_INTERPRET=1 before importing this module; "
                             "or call the igq ops, whose CPU kernels are the references)")


# ------------------------------------------------------------------------------- activation side
def _instances(x: torch.Tensor, instance_dims: int) -> torch.Tensor:
    return ops.as_instances(x, instance_dims).contiguous()


@triton_op("igq_cuda::quantize", mutates_args=())
def _quantize(xi: torch.Tensor, group_lo: torch.Tensor, group_hi: torch.Tensor, scale: torch.Tensor,
              zero_point: torch.Tensor, multiplier: torch.Tensor, bits: int, grid_offset: int,
              grid: bool) -> tuple[torch.Tensor, torch.Tensor]:
    instances, tokens, channels = xi.shape
    codes = torch.empty(xi.shape, dtype=torch.uint8, device=xi.device)
    assignment = torch.empty((instances, channels), dtype=torch.int64, device=xi.device)
    launch = (instances, triton.cdiv(channels, _QUANTIZE_BLOCK["BC"]))
    wrap_triton(kernels._quantize_kernel)[launch](
        xi, group_lo, group_hi, scale, zero_point, multiplier, codes, assignment, tokens, channels,
        group_lo.shape[0], float(2**bits - 1), float(grid_offset), GRID=grid, **_QUANTIZE_BLOCK, **_launch_options())
    return codes, assignment


def _group_tensors(group_lo: torch.Tensor, group_hi: torch.Tensor, bits: int, device: torch.device):
    if group_lo.shape != group_hi.shape or group_lo.dim() != 1:
        raise ValueError(f"group_lo and group_hi must both be [G], got {tuple(group_lo.shape)} and "
                         f"{tuple(group_hi.shape)}")
    lo = group_lo.detach().to(device, torch.float32).contiguous()
    hi = group_hi.detach().to(device, torch.float32).contiguous()
    scale, zero_point = ops.group_qparams(lo, hi, bits)
    return lo, hi, scale.contiguous(), zero_point.float().contiguous()


def group_quantize(x: torch.Tensor, group_lo: torch.Tensor, group_hi: torch.Tensor, bits: int,
                   instance_dims: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """``igq::group_quantize`` in one Triton launch: (uint8 codes shaped like x, int64 assignment [I, C])."""
    _check_device(x)
    ops.check_bits(bits)
    lo, hi, scale, zero_point = _group_tensors(group_lo, group_hi, bits, x.device)
    codes, assignment = _quantize(_instances(x, instance_dims), lo, hi, scale, zero_point, scale, bits, 0, False)
    return codes.reshape(x.shape), assignment


def grid_quantize(x: torch.Tensor, group_lo: torch.Tensor, group_hi: torch.Tensor, bits: int, grid: ops.Grid,
                  instance_dims: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Group-quantize x and write its codes on the site's common grid: (uint8 ``v - grid.vmin`` shaped like x,
    assignment [I, C]); the dequantized value is ``grid.step * (code + grid.vmin)``. Needs an exact grid
    of at most 8 bits (``ops.grid_of``; ``IGQConfig(act_grid=8)``)."""
    _check_device(x)
    ops.check_bits(bits)
    if grid.span > 255:
        raise ValueError(f"grid_quantize writes one byte per value: the grid spans {grid.span} levels (> 255); "
                         "use group_quantize + grouped_linear")
    lo, hi, scale, zero_point = _group_tensors(group_lo, group_hi, bits, x.device)
    multiplier = ops.grid_multipliers(scale, grid).to(x.device)
    codes, assignment = _quantize(_instances(x, instance_dims), lo, hi, scale, zero_point, multiplier, bits,
                                  grid.vmin, True)
    return codes.reshape(x.shape), assignment


# ---------------------------------------------------------------------------------------- GEMMs
def group_segments(assignment: torch.Tensor, num_groups: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(perm int32 [I, C]: channels sorted by group, stable; seg int32 [I, G + 1]: group g is
    perm[i, seg[i, g]:seg[i, g + 1]]) of an assignment [I, C]. Three small torch ops, no host sync."""
    perm = torch.argsort(assignment, dim=1, stable=True).to(torch.int32)
    counts = torch.zeros(assignment.shape[0], num_groups, dtype=torch.int32, device=assignment.device)
    counts.scatter_add_(1, assignment.long(), torch.ones_like(assignment, dtype=torch.int32))
    seg = torch.zeros(assignment.shape[0], num_groups + 1, dtype=torch.int32, device=assignment.device)
    seg[:, 1:] = torch.cumsum(counts, dim=1)
    return perm.contiguous(), seg


@triton_op("igq_cuda::gemm", mutates_args=())
def _gemm(xi: torch.Tensor, perm: torch.Tensor, seg: torch.Tensor, zero_point: torch.Tensor, scale: torch.Tensor,
          w_codes: torch.Tensor, w_scale: torch.Tensor, bias: Optional[torch.Tensor], permuted: bool,
          out_dtype: torch.dtype) -> torch.Tensor:
    instances, tokens, channels = xi.shape
    out_features = w_codes.shape[0]
    out = torch.empty((instances, tokens, out_features), dtype=out_dtype, device=xi.device)
    launch = (instances, triton.cdiv(tokens, _GEMM_BLOCK["BM"]), triton.cdiv(out_features, _GEMM_BLOCK["BN"]))
    wrap_triton(kernels._grouped_gemm_kernel)[launch](
        xi, perm, seg, zero_point, scale, w_codes, w_scale, bias if bias is not None else w_scale, out,
        tokens, channels, out_features, scale.shape[0], w_codes.stride(0), w_codes.stride(1),
        PERMUTED=permuted, HAS_BIAS=bias is not None, DOWNCAST=out_dtype != torch.float32,
        **_GEMM_BLOCK, **_launch_options())
    return out


def grouped_linear(x_codes: torch.Tensor, assignment: torch.Tensor, group_scale: torch.Tensor,
                   group_zero_point: torch.Tensor, w_codes: torch.Tensor, w_scale: torch.Tensor,
                   bias: Optional[torch.Tensor] = None, instance_dims: int = 1, *,
                   out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``igq::grouped_linear`` with Triton: [*instances, *tokens, O] in ``out_dtype`` (float32: equal to the
    reference; float16 / bfloat16: its float32 result rounded once)."""
    ops.library._check_grouped_linear(x_codes, assignment, group_scale, group_zero_point, w_codes, w_scale, bias,
                                      instance_dims)
    _check_device(x_codes, w_codes)
    if out_dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"out_dtype must be float32, float16 or bfloat16, got {out_dtype}")
    perm, seg = group_segments(assignment, group_scale.shape[0])
    out = _gemm(_instances(x_codes, instance_dims), perm, seg, group_zero_point.to(torch.int32).contiguous(),
                group_scale.float().contiguous(), w_codes, w_scale.float().contiguous(),
                None if bias is None else bias.float().contiguous(), True, out_dtype)
    return out.reshape(*x_codes.shape[:-1], w_codes.shape[0])


@functools.lru_cache(maxsize=256)
def _grid_constants(vmin: int, step: float, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(unused permutation, zero point -vmin, scale step) of the one-group GEMM on a grid: made once per grid and
    device, not on every call (a host-to-device copy each)."""
    return (torch.zeros(1, dtype=torch.int32, device=device), torch.tensor([-vmin], dtype=torch.int32, device=device),
            torch.tensor([step], dtype=torch.float32, device=device))


def grid_linear(grid_codes: torch.Tensor, grid: ops.Grid, w_codes: torch.Tensor, w_scale: torch.Tensor,
                bias: Optional[torch.Tensor] = None, *, out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The Linear on :func:`grid_quantize` codes: one int8 GEMM, ``grid.step * w_scale`` and bias in its epilogue."""
    if grid_codes.dtype != torch.uint8 or w_codes.dtype != torch.int8 or w_codes.shape[1] != grid_codes.shape[-1]:
        raise ValueError(f"grid_linear needs uint8 codes [..., C] and int8 weights [O, C]; got {grid_codes.dtype} "
                         f"{tuple(grid_codes.shape)} and {w_codes.dtype} {tuple(w_codes.shape)}")
    _check_device(grid_codes, w_codes)
    if w_scale.shape != (w_codes.shape[0],) or (bias is not None and bias.shape != (w_codes.shape[0],)):
        raise ValueError(f"w_scale and bias must be [{w_codes.shape[0]}] (out_features), got {tuple(w_scale.shape)} "
                         f"and {None if bias is None else tuple(bias.shape)}")
    lead = grid_codes.shape[0] if grid_codes.dim() > 2 else 1  # instances on the launch grid's first axis
    xi = grid_codes.reshape(lead, -1, grid_codes.shape[-1]).contiguous()
    empty, zero_point, scale = _grid_constants(grid.vmin, grid.step, grid_codes.device)
    out = _gemm(xi, empty, empty, zero_point, scale, w_codes, w_scale.float().contiguous(),
                None if bias is None else bias.float().contiguous(), False, out_dtype)
    return out.reshape(*grid_codes.shape[:-1], w_codes.shape[0])


def grouped_linear_partials(x_codes: torch.Tensor, assignment: torch.Tensor, group_zero_point: torch.Tensor,
                            w_codes: torch.Tensor, instance_dims: int = 1) -> torch.Tensor:
    """The kernel's int32 partial sums [G, I, T, O] (each group alone, scale 1: ``float(acc_g)`` of the
    epilogue), to compare exactly with ``grouped_linear_reference(..., partial_sums=True)``."""
    num_groups = group_zero_point.shape[0]
    parts = []
    for g in range(num_groups):
        scale = torch.zeros(num_groups, dtype=torch.float32, device=x_codes.device)
        scale[g] = 1.0
        ones = torch.ones(w_codes.shape[0], dtype=torch.float32, device=x_codes.device)
        out = grouped_linear(x_codes, assignment, scale, group_zero_point, w_codes, ones, None, instance_dims)
        parts.append(out.reshape(-1, x_codes.shape[-2] if x_codes.dim() > 1 else 1, w_codes.shape[0]))
    return torch.stack(parts)


# ------------------------------------------------------------------------------------ attention
@triton_op("igq_cuda::attention_pv", mutates_args=())
def _attention_pv(p: torch.Tensor, row_scale: torch.Tensor, v: torch.Tensor, v_scale: torch.Tensor,
                  v_zero_point: torch.Tensor, out_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    batch, queries, keys = p.shape
    dim = v.shape[-1]
    out = torch.empty((batch, queries, dim), dtype=out_dtype, device=p.device)
    acc = torch.empty((batch, queries, dim), dtype=torch.int32, device=p.device)
    launch = (batch, triton.cdiv(queries, _GEMM_BLOCK["BM"]), triton.cdiv(dim, _GEMM_BLOCK["BN"]))
    wrap_triton(kernels._attention_pv_kernel)[launch](
        p, row_scale, v, v_scale, v_zero_point, out, acc, queries, keys, dim, WRITE_ACC=True,
        DOWNCAST=out_dtype != torch.float32,
        BM=_GEMM_BLOCK["BM"], BN=_GEMM_BLOCK["BN"], BK=_GEMM_BLOCK["BK"], **_launch_options())
    return out, acc


def attention_pv(p_codes: torch.Tensor, row_scale: torch.Tensor, v_codes: torch.Tensor, v_scale: torch.Tensor,
                 v_zero_point: torch.Tensor, *, out_dtype: torch.dtype = torch.float32,
                 return_int: bool = False):
    """Quantized attention probabilities times quantized V as one int8 GEMM.

    p_codes uint8 [..., N, M] (post-softmax row codes, e.g. ``ops.softmax_group_quantize``), row_scale
    [..., N] (their row scale); v_codes uint8 [..., M, D] with per-channel scale / zero point [..., D]
    (V's group scale and zero point gathered by its assignment). Returns ``row_scale * v_scale *
    sum_m p (v - z)`` [..., N, D] (and the exact int32 sums with ``return_int``)."""
    if p_codes.dtype != torch.uint8 or v_codes.dtype != torch.uint8:
        raise TypeError(f"attention_pv needs uint8 codes, got {p_codes.dtype} and {v_codes.dtype}")
    _check_device(p_codes, v_codes)
    lead = p_codes.shape[:-2]
    if v_codes.shape[:-2] != lead or v_codes.shape[-2] != p_codes.shape[-1]:
        raise ValueError(f"shapes do not chain: p {tuple(p_codes.shape)}, v {tuple(v_codes.shape)}")
    n, m, d = p_codes.shape[-2], p_codes.shape[-1], v_codes.shape[-1]
    if tuple(row_scale.shape) != tuple(p_codes.shape[:-1]):
        raise ValueError(f"row_scale must be [..., N] = {tuple(p_codes.shape[:-1])}, got {tuple(row_scale.shape)}")
    if tuple(v_scale.shape) != (*lead, d) or tuple(v_zero_point.shape) != (*lead, d):
        raise ValueError(f"v_scale and v_zero_point must be [..., D] = {(*lead, d)}, got {tuple(v_scale.shape)} and "
                         f"{tuple(v_zero_point.shape)}")
    if m > MAX_ATTENTION_KEYS:
        raise ValueError(f"attention_pv accumulates in int32: at most {MAX_ATTENTION_KEYS} keys, got {m}")
    out, acc = _attention_pv(p_codes.reshape(-1, n, m).contiguous(), row_scale.reshape(-1, n).float().contiguous(),
                             v_codes.reshape(-1, m, d).contiguous(), v_scale.reshape(-1, d).float().contiguous(),
                             v_zero_point.reshape(-1, d).to(torch.int32).contiguous(), out_dtype)
    out = out.reshape(*lead, n, d)
    return (out, acc.reshape(*lead, n, d)) if return_int else out


# ----------------------------------------------------------------------- op registration, models
def register_cuda_kernels() -> None:
    """Make the Triton kernels the CUDA implementations of igq::group_quantize and igq::grouped_linear
    (done on import; idempotent)."""
    if getattr(register_cuda_kernels, "done", False):
        return

    @torch.library.register_kernel("igq::group_quantize", "cuda")
    def _(x, group_lo, group_hi, bits, instance_dims=1):
        return group_quantize(x, group_lo, group_hi, bits, instance_dims)

    @torch.library.register_kernel("igq::grouped_linear", "cuda")
    def _(x_codes, assignment, group_scale, group_zero_point, w_codes, w_scale, bias, instance_dims=1):
        return grouped_linear(x_codes, assignment, group_scale, group_zero_point, w_codes, w_scale, bias,
                              instance_dims)

    register_cuda_kernels.done = True


class Int8IGQLinear(nn.Module):
    """A quantized Linear running the integer kernels: activation kernel (codes, assignment), then the
    grouped GEMM (or, on an exact 8-bit common grid, the grid codes and one int8 GEMM)."""

    def __init__(self, layer: nn.Module, quantizer: igq.ActQuantizer, out_dtype: Optional[torch.dtype] = None) -> None:
        super().__init__()
        if quantizer.scheme == "channel":
            raise ValueError(f"site '{quantizer.site}': static per-channel ranges have no integer kernel")
        w_codes, w_scale = layer.integer_weight()
        self.register_buffer("w_codes", w_codes.contiguous())
        self.register_buffer("w_scale", w_scale.contiguous())
        self.register_buffer("bias", None if layer.bias is None else layer.bias.detach().float())
        self.register_buffer("lo", quantizer.lo.detach().float().clone())
        self.register_buffer("hi", quantizer.hi.detach().float().clone())
        self.bits, self.instance_dims, self.out_dtype = quantizer.bits, quantizer.instance_dims, out_dtype
        grid = ops.grid_of(self.lo, self.hi, self.bits, max_bits=8) if quantizer.num_groups > 1 else None
        self.grid = grid if grid is not None and grid.exact and grid.span <= 255 else None
        scale, zero_point = ops.group_qparams(self.lo, self.hi, self.bits)
        self.register_buffer("scale", scale)
        self.register_buffer("zero_point", zero_point.to(torch.int32))
        # what the activation kernel reads, prepared once (no host work per call)
        self.register_buffer("zero_point_f", zero_point.float())
        self.register_buffer("multiplier", ops.grid_multipliers(scale, self.grid) if self.grid is not None else scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_device(x)
        dtype = self.out_dtype or x.dtype
        xi = _instances(x, self.instance_dims)
        on_grid = self.grid is not None
        codes, assignment = _quantize(xi, self.lo, self.hi, self.scale, self.zero_point_f, self.multiplier, self.bits,
                                      self.grid.vmin if on_grid else 0, on_grid)
        codes = codes.reshape(x.shape)
        if on_grid:
            return grid_linear(codes, self.grid, self.w_codes, self.w_scale, self.bias, out_dtype=dtype)
        return grouped_linear(codes, assignment, self.scale, self.zero_point, self.w_codes, self.w_scale, self.bias,
                              self.instance_dims, out_dtype=dtype)


def int8_linears(qmodel: nn.Module, out_dtype: Optional[torch.dtype] = None) -> nn.Module:
    """A copy of a quantized model (``igq.quantize``: its Linears are ``igq.QuantLinear`` with their input
    quantizer inside) whose IGQ / layer-wise Linears run :class:`Int8IGQLinear`; attention and the patch
    embedding keep their fake-quant modules. Weights must be <= 7 bits (int8 codes without zero points)."""
    out = copy.deepcopy(qmodel)
    replaced, kept = 0, []
    for site in igq.sites(out, "linear_input"):
        layer = site.weight_quantizer
        if getattr(layer, "input_quantizer", None) is not site.quantizer:
            kept.append(site.consumer)  # a quantizer outside its layer (FX graphs, NNCF hooks): not converted here
            continue
        if layer.w_bits > 7:
            kept.append(site.consumer)  # 8-bit asymmetric weight codes need not fit int8 (e.g. the 8-bit head)
            continue
        out.set_submodule(site.consumer, Int8IGQLinear(layer, site.quantizer, out_dtype))
        replaced += 1
    if not replaced:
        raise ValueError("no IGQ Linear to convert: quantize the model with igq.quantize first (weights <= 7 bits)")
    if kept:
        logger.info("int8_linears kept %d Linear(s) in fake quantization: %s", len(kept), ", ".join(kept))
    clear_sites(out)
    return out


register_cuda_kernels()
