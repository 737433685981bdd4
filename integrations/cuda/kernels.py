"""Triton kernels of the igq ops (imported by :mod:`igq_plugin.integrations.cuda`; needs triton).

Three kernels, each the integer arithmetic of a reference op in :mod:`igq_plugin.ops.library`:

* ``_quantize_kernel``: the activation side of a quantized Linear in one launch. Per instance and
  channel block: channel min / max over the tokens, paper Eq. 5 assignment (first minimum, float32,
  no FMA contraction: the reference's rounding), then codes ``clamp(rint(x / s_a) + z_a, 0, 2^b - 1)``
  (IEEE division, round half to even), as ``igq::group_quantize``. On a common grid (``act_grid``)
  it writes the grid codes ``k_a (q - z_a) - v_min`` instead: one u8 tensor on one scale.
* ``_grouped_gemm_kernel``: ``igq::grouped_linear``. Per group g an exact int32 partial sum over the
  channels the instance assigns to g, read through a per-instance permutation that sorts channels by
  group (so each group is one contiguous K segment: about 1x the MACs of one GEMM, plus at most one
  partly filled K block per group), then the reference's float32 epilogue in the reference's order
  ``(sum_g float(acc_g) * s_g) * w_scale + bias``. u8 codes enter the int8 dot as ``q - 128``; the
  ``(128 - z_g) * sum(w)`` term restores ``sum (q - z_g) w`` exactly. One group and no permutation is
  a plain int8 GEMM with the epilogue fused (the common-grid path).
* ``_attention_pv_kernel``: post-softmax rows times V: u8 row codes x u8 V codes in one int8 GEMM
  (exact int32), per-row scale and per-channel V scale / zero point in the epilogue.
"""
from __future__ import annotations

import triton
import triton.language as tl

_MAGIC = 12582912.0  # 1.5 * 2**23: (v + M) - M rounds a float32 |v| < 2**22 to the nearest even integer


@triton.jit
def _rint(v):
    # round half to even (torch.round). |v| >= 2**22 is clamped to the code range by every caller.
    return (v + _MAGIC) - _MAGIC


@triton.jit
def _store(ptr, value, mask, DOWNCAST: tl.constexpr):
    if DOWNCAST:  # float16 / bfloat16 output: round to nearest even, as torch's .to() does
        value = value.to(ptr.dtype.element_ty, fp_downcast_rounding="rtne")
    tl.store(ptr, value, mask=mask)


@triton.jit
def _quantize_kernel(x_ptr, glo_ptr, ghi_ptr, scale_ptr, zp_ptr, mult_ptr, codes_ptr, assign_ptr,
                     T, C, G, qmax, grid_offset,
                     GRID: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr):
    i = tl.program_id(0)
    rc = tl.program_id(1) * BC + tl.arange(0, BC)
    cmask = rc < C
    base = x_ptr + i.to(tl.int64) * T * C
    lo = tl.full((BC,), float("inf"), tl.float32)
    hi = tl.full((BC,), float("-inf"), tl.float32)
    for t0 in range(0, T, BT):
        rt = t0 + tl.arange(0, BT)
        m = (rt[:, None] < T) & cmask[None, :]
        v = tl.load(base + rt[:, None] * C + rc[None, :], mask=m, other=0.0).to(tl.float32)
        lo = tl.minimum(lo, tl.min(tl.where(m, v, float("inf")), axis=0))
        hi = tl.maximum(hi, tl.max(tl.where(m, v, float("-inf")), axis=0))
    best = tl.zeros((BC,), tl.int32)
    best_d = tl.full((BC,), float("inf"), tl.float32)
    for g in range(G):
        dl = lo - tl.load(glo_ptr + g)
        dh = hi - tl.load(ghi_ptr + g)
        d = dl * dl + dh * dh
        better = d < best_d  # strict: ties keep the lowest group (torch.argmin)
        best = tl.where(better, g, best)
        best_d = tl.where(better, d, best_d)
    tl.store(assign_ptr + i.to(tl.int64) * C + rc, best.to(tl.int64), mask=cmask)
    s = tl.load(scale_ptr + best, mask=cmask, other=1.0)
    z = tl.load(zp_ptr + best, mask=cmask, other=0.0)
    if GRID:
        k = tl.load(mult_ptr + best, mask=cmask, other=0.0)
    out = codes_ptr + i.to(tl.int64) * T * C
    for t0 in range(0, T, BT):
        rt = t0 + tl.arange(0, BT)
        m = (rt[:, None] < T) & cmask[None, :]
        v = tl.load(base + rt[:, None] * C + rc[None, :], mask=m, other=0.0).to(tl.float32)
        q = tl.minimum(tl.maximum(_rint(tl.div_rn(v, s[None, :])) + z[None, :], 0.0), qmax)
        if GRID:
            q = k[None, :] * (q - z[None, :]) - grid_offset
        tl.store(out + rt[:, None] * C + rc[None, :], q.to(tl.uint8), mask=m)


@triton.jit
def _grouped_gemm_kernel(x_ptr, perm_ptr, seg_ptr, zp_ptr, scale_ptr, w_ptr, wscale_ptr, bias_ptr, out_ptr,
                         T, C, O, G, stride_wo, stride_wc,
                         PERMUTED: tl.constexpr, HAS_BIAS: tl.constexpr, DOWNCAST: tl.constexpr,
                         BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    i = tl.program_id(0)
    rm = tl.program_id(1) * BM + tl.arange(0, BM)
    rn = tl.program_id(2) * BN + tl.arange(0, BN)
    mmask, nmask = rm < T, rn < O
    x_base = x_ptr + i.to(tl.int64) * T * C
    out = tl.zeros((BM, BN), tl.float32)
    for g in range(G):
        if PERMUTED:
            start = tl.load(seg_ptr + i * (G + 1) + g)
            end = tl.load(seg_ptr + i * (G + 1) + g + 1)
        else:
            start = 0
            end = C
        acc = tl.zeros((BM, BN), tl.int32)
        wsum = tl.zeros((BN,), tl.int32)
        for k0 in range(start, end, BK):
            rk = k0 + tl.arange(0, BK)
            kmask = rk < end
            if PERMUTED:
                ch = tl.load(perm_ptr + i.to(tl.int64) * C + rk, mask=kmask, other=0)
            else:
                ch = rk
            xq = tl.load(x_base + rm[:, None].to(tl.int64) * C + ch[None, :], mask=mmask[:, None] & kmask[None, :],
                         other=128)
            xs = (xq.to(tl.int32) - 128).to(tl.int8)
            w = tl.load(w_ptr + rn[None, :] * stride_wo + ch[:, None] * stride_wc,
                        mask=kmask[:, None] & nmask[None, :], other=0)
            acc += tl.dot(xs, w)
            wsum += tl.sum(w.to(tl.int32), axis=0)
        acc += (128 - tl.load(zp_ptr + g)) * wsum[None, :]
        out = out + acc.to(tl.float32) * tl.load(scale_ptr + g)
    out = out * tl.load(wscale_ptr + rn, mask=nmask, other=0.0)[None, :]
    if HAS_BIAS:
        out = out + tl.load(bias_ptr + rn, mask=nmask, other=0.0)[None, :]
    dst = out_ptr + i.to(tl.int64) * T * O + rm[:, None].to(tl.int64) * O + rn[None, :]
    _store(dst, out, mmask[:, None] & nmask[None, :], DOWNCAST)


@triton.jit
def _attention_pv_kernel(p_ptr, rscale_ptr, v_ptr, vscale_ptr, vzp_ptr, out_ptr, acc_ptr, N, M, D,
                         WRITE_ACC: tl.constexpr, DOWNCAST: tl.constexpr,
                         BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    b = tl.program_id(0)
    rm = tl.program_id(1) * BM + tl.arange(0, BM)
    rn = tl.program_id(2) * BN + tl.arange(0, BN)
    mmask, nmask = rm < N, rn < D
    p_base = p_ptr + b.to(tl.int64) * N * M
    v_base = v_ptr + b.to(tl.int64) * M * D
    acc = tl.zeros((BM, BN), tl.int32)
    psum = tl.zeros((BM,), tl.int32)
    vsum = tl.zeros((BN,), tl.int32)
    for k0 in range(0, M, BK):
        rk = k0 + tl.arange(0, BK)
        kmask = rk < M
        p = tl.load(p_base + rm[:, None] * M + rk[None, :], mask=mmask[:, None] & kmask[None, :], other=128)
        v = tl.load(v_base + rk[:, None] * D + rn[None, :], mask=kmask[:, None] & nmask[None, :], other=128)
        ps = p.to(tl.int32) - 128
        vs = v.to(tl.int32) - 128
        acc += tl.dot(ps.to(tl.int8), vs.to(tl.int8))
        psum += tl.sum(ps, axis=1)
        vsum += tl.sum(vs, axis=0)
    # sum_m p (v - z) = sum (ps + 128)(vs + 128) - z sum (ps + 128), over the M valid keys
    z = tl.load(vzp_ptr + b * D + rn, mask=nmask, other=0)
    total = acc + 128 * vsum[None, :] + 128 * psum[:, None] + 128 * 128 * M
    total -= z[None, :] * (psum[:, None] + 128 * M)
    if WRITE_ACC:
        tl.store(acc_ptr + b.to(tl.int64) * N * D + rm[:, None] * D + rn[None, :], total,
                 mask=mmask[:, None] & nmask[None, :])
    out = total.to(tl.float32) * tl.load(vscale_ptr + b * D + rn, mask=nmask, other=0.0)[None, :]
    out = out * tl.load(rscale_ptr + b.to(tl.int64) * N + rm, mask=mmask, other=0.0)[:, None]
    _store(out_ptr + b.to(tl.int64) * N * D + rm[:, None] * D + rn[None, :], out, mmask[:, None] & nmask[None, :],
           DOWNCAST)
