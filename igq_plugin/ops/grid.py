"""Common integer grid of a site's group quantizers (deployment on standard INT8 GEMMs).

Group g quantizes a channel to ``s_g * (q - z_g)`` with q in [0, L], L = 2^b - 1. When every step is
a whole multiple of one base step, ``s_g = k_g * s0``, each dequantized value is ``s0 * v`` with the
integer ``v = k_g * (q - z_g)`` in [-k_g z_g, k_g (L - z_g)]. The values of all groups then lie on one
integer grid: one static per-tensor quantizer of step s0 re-codes the group-quantized activation
exactly, and a standard u8 x i8 GEMM (one GEMM when the grid spans 8 bits, two when it spans 16:
high and low byte) computes the Linear. ``IGQConfig.act_grid`` makes calibration fit group ranges
that satisfy this (:func:`snap_to_grid`); the OpenVINO lowering reads the grid back
(:func:`grid_of`).

A *signed* grid (the operands of attention matmuls, where both inputs are activations) must also
fit [-2^(n-1), 2^(n-1) - 1]: the CPU kernels run such a matmul in INT8 only with a zero point of 0
(128 in u8 terms), so zero points move into that window when needed.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .quant import asym_qparams, asym_range

__all__ = ["GRID_BITS", "Grid", "grid_feasible", "fit_common_grid", "snap_to_grid", "grid_of", "grid_multipliers"]

GRID_BITS = (8, 16)  # the grids a deployment runs: one u8 GEMM, or two (high and low byte)


@dataclass(frozen=True)
class Grid:
    """A site's integer grid: value = step * v, v in [vmin, vmax]. ``exact``: the groups' values are on
    it (False: the grid approximates groups whose steps are not whole multiples of one base step)."""

    step: float
    vmin: int
    vmax: int
    exact: bool = True

    @property
    def span(self) -> int:
        return self.vmax - self.vmin

    def bits(self) -> int:
        """The integer bits the grid needs (8: one u8 GEMM; 16: two)."""
        return 8 if self.span <= 255 else 16


def _window(bits: int, grid_bits: int, signed: bool) -> tuple[int, int]:
    if signed:
        return -(2 ** (grid_bits - 1)), 2 ** (grid_bits - 1) - 1
    return 0, 2**grid_bits - 1


def grid_feasible(bits: int, grid_bits: int, signed: bool = False, groups: int = 2) -> bool:
    """Whether ``groups`` groups of ``bits`` bits always fit a ``grid_bits`` grid (with one step for all)."""
    levels = 2**bits - 1
    lo, hi = _window(bits, grid_bits, signed)
    if signed:  # a zero point z with -z >= lo and L - z <= hi exists
        return levels - hi <= -lo
    if groups == 1:  # one group is its own grid
        return levels <= hi
    return 2 * levels <= hi  # zero points anywhere in [0, L]: values span [-L, L]


def _check(bits: int, grid_bits: int, signed: bool, groups: int = 2) -> None:
    if grid_bits not in GRID_BITS:
        raise ValueError(f"grid_bits must be one of {GRID_BITS} (one or two u8 GEMMs), got {grid_bits!r}")
    if not grid_feasible(bits, grid_bits, signed, groups):
        kind = "a signed" if signed else "an"
        raise ValueError(f"{bits}-bit groups with arbitrary zero points do not fit {kind} {grid_bits}-bit grid: "
                         f"use a {max(GRID_BITS)}-bit grid or at most {7 if grid_bits == 8 else 15}-bit activations")


def _zero_window(k: torch.Tensor, levels: int, lo: int, hi: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero points z allowed for step multiples k on a signed window [lo, hi]: -k z >= lo, k (L - z) <= hi."""
    return torch.ceil(levels - hi / k), torch.floor(-lo / k)


def fit_common_grid(
    scale: torch.Tensor, zero_point: torch.Tensor, bits: int, grid_bits: int, signed: bool = False
) -> tuple[float, torch.Tensor, torch.Tensor]:
    """Base step s0, step multiples k [G] (integers >= 1) and zero points [G] whose groups fit one grid.

    Candidates are s0 = s_g / m (every group g, m = 1, 2, ...); among those whose groups fit the
    ``grid_bits`` grid, the one whose ranges move least: sum_g ((lo'_g - lo_g)^2 + (hi'_g - hi_g)^2) /
    (hi_g - lo_g)^2 (Eq. 5's distance, relative to each group's width). Zero points change only on a
    signed grid, clamped into the window the grid allows.
    """
    s = scale.detach().double().flatten()
    z = zero_point.detach().double().flatten()
    _check(bits, grid_bits, signed, s.numel())
    levels = 2**bits - 1
    lo, hi = _window(bits, grid_bits, signed)
    max_multiple = (hi - lo) // levels + 1  # no group can use a larger k
    m = torch.arange(1, max_multiple + 1, dtype=torch.float64)
    cand = (s[:, None] / m[None, :]).flatten()  # [G * M]
    k = torch.clamp(torch.round(s[None, :] / cand[:, None]), min=1.0)  # [n, G]
    if signed:
        zlo, zhi = _zero_window(k, levels, lo, hi)
        ok = (zlo <= zhi).all(1)
        zc = torch.minimum(torch.maximum(z[None, :], zlo), zhi)
    else:
        zc = z[None, :].expand_as(k)
        vmin = (-k * zc).amin(1)
        vmax = (k * (levels - zc)).amax(1)
        ok = (vmax - vmin) <= hi - lo
    if not bool(ok.any()):  # cannot happen when grid_feasible: the largest step as s0 gives k = 1 everywhere
        raise ValueError(f"no common {grid_bits}-bit grid for steps {s.tolist()}")
    step = k * cand[:, None]
    moved = (-zc * step + z * s).pow(2) + ((levels - zc) * step - (levels - z) * s).pow(2)
    cost = (moved / (levels * s).pow(2)).sum(1)
    cost = torch.where(ok, cost, torch.full_like(cost, math.inf))
    best = int(torch.argmin(cost))
    return float(cand[best]), k[best], zc[best]


def snap_to_grid(
    group_lo: torch.Tensor, group_hi: torch.Tensor, bits: int, grid_bits: int, signed: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Group ranges [G] moved onto one common grid (:func:`fit_common_grid`): each step becomes k_g s0,
    each range [-z_g k_g s0, (L - z_g) k_g s0]. Returns (lo, hi) in the inputs' dtype and device."""
    # the qparams the igq ops compute (float32), so zero points round as they will at inference
    scale, zero_point = asym_qparams(group_lo.detach().float(), group_hi.detach().float(), bits)
    s0, k, z = fit_common_grid(scale, zero_point, bits, grid_bits, signed)
    lo, hi = asym_range(k * s0, z, bits)
    return lo.to(group_lo), hi.to(group_hi)


def grid_of(group_lo: torch.Tensor, group_hi: torch.Tensor, bits: int, *, tol: float = 1e-3,
            max_bits: int = 16) -> Grid:
    """The integer grid of a site's groups, for lowering: exact when every group step is a whole
    multiple of one base step s_min / m, closely enough that re-coding moves no value by more than
    ``tol`` of its group's step (float32 qparams make snapped steps whole multiples only to ~1e-7);
    otherwise the finest grid of at most
    ``max_bits`` (``exact=False``: re-coding onto it rounds again, by at most half its step).
    The qparams are those the igq ops use (float32)."""
    scale, zero_point = asym_qparams(group_lo.detach().float(), group_hi.detach().float(), bits)
    s, z = scale.double(), zero_point.double()
    levels = 2**bits - 1
    reach = torch.maximum(z, levels - z).clamp_min(1.0)  # the largest |q - z| of each group
    s_min = float(s.min())
    cap = 2**max_bits - 1
    for m in range(1, cap + 1):
        ratio = s * m / s_min
        k = torch.round(ratio)
        vmin, vmax = int((-k * z).min()), int((k * (levels - z)).max())
        if vmax - vmin > cap:
            break
        moved = (ratio - k).abs() * reach  # grid steps a group's largest code moves by when re-coded
        if bool((moved <= 0.1).all()) and bool((moved / ratio <= tol).all()):
            return Grid(s_min / m, vmin, vmax, exact=True)
    # Not on one grid: the finest step whose span (rounded outward) fits max_bits.
    lo, hi = float((-s * z).min()), float((s * (levels - z)).max())
    step = (hi - lo) / (cap - 2)
    vmin, vmax = int(math.floor(lo / step)), int(math.ceil(hi / step))
    if vmax - vmin > cap:  # cannot happen: the span is at most cap - 2 steps before rounding outward
        raise AssertionError(f"grid span {vmax - vmin} exceeds {cap}")
    return Grid(step, vmin, vmax, exact=False)


def grid_multipliers(scale: torch.Tensor, grid: Grid, tol: float = 1e-3) -> torch.Tensor:
    """The whole multiples k_g = s_g / grid.step [G] (float32) of group scales on an exact ``grid``: a code q of
    group g sits at grid value k_g (q - z_g). ValueError when the groups are not on it (within ``tol`` of a step)."""
    ratio = scale.double() / grid.step
    k = torch.round(ratio)
    if not grid.exact or bool(((ratio - k).abs() > tol).any()):
        raise ValueError("the groups are not on one exact grid: quantize with IGQConfig(act_grid=8), or use the "
                         "grouped path (group_quantize + grouped_linear)")
    return k.float().contiguous()
