"""MAC and bit-operation (BOP) counting per quantization site (DESIGN.md §1, Eq. 9-10).

Cost model: a b_w x b_a multiply-accumulate costs b_w * b_a BOPs. IGQ's grouping overhead is
counted in full-precision (FP32) scalar operations, each costing ``FP_OP_BOPS`` = 32 BOPs (the
operand width): per-channel min/max over the tokens, the assignment distances to every group,
and the full-precision sum of the g partial outputs of every output element.
"""
from __future__ import annotations

__all__ = [
    "FP_OP_BOPS",
    "linear_macs",
    "attention_macs",
    "mac_bops",
    "igq_linear_overhead_ops",
    "softmax_group_overhead_ops",
]

FP_OP_BOPS = 32


def linear_macs(tokens: int, in_features: int, out_features: int) -> int:
    """MACs of one Linear applied to ``tokens`` token vectors (per instance)."""
    return tokens * in_features * out_features


def attention_macs(heads: int, q_tokens: int, k_tokens: int, head_dim: int) -> int:
    """MACs of one of the two attention matmuls (Q K^T or A V) per instance."""
    return heads * q_tokens * k_tokens * head_dim


def mac_bops(macs: int, w_bits: int, a_bits: int) -> int:
    """BOPs of ``macs`` multiply-accumulates at the given operand widths."""
    return macs * w_bits * a_bits


def igq_linear_overhead_ops(tokens: int, in_features: int, out_features: int, groups: int) -> int:
    """FP32 ops IGQ adds to one Linear site per instance (0 for one group).

    min/max: 2 * tokens * C compares; assignment: 5 ops (2 sub, 2 mul, 1 add) + 1 compare per
    (channel, group); partial sums: (g - 1) adds per output element.
    """
    if groups <= 1:
        return 0
    minmax = 2 * tokens * in_features
    assign = 6 * in_features * groups
    partial_sums = (groups - 1) * tokens * out_features
    return minmax + assign + partial_sums


def softmax_group_overhead_ops(heads: int, q_tokens: int, k_tokens: int, groups: int) -> int:
    """FP32 ops of softmax row grouping per instance: row max + assignment (scale is per row)."""
    if groups <= 1:
        return 0
    return heads * q_tokens * k_tokens + 2 * heads * q_tokens * groups
