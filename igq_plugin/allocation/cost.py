"""Per-site MAC / BOP accounting of a prepared or quantized model (DESIGN.md §1, Eq. 9).

Shapes are recorded by forward hooks (:func:`record_site_shapes`; ``igq.calibrate`` does it on
its first batch and stores them on the model), so a report needs no extra forward pass. The
arithmetic (MACs, BOPs, grouping overhead) is in :mod:`igq_plugin.ops.bops`.

Sites and what they cost per instance:
* ``<linear>``: tokens x in x out MACs at w_bits x a_bits, plus IGQ's overhead for g > 1 groups
  (per-channel min/max, assignment, full-precision sum of g partial outputs), FP32 ops at 32 BOPs.
* ``<conv>`` (the patch embedding): its MACs at w_bits x a_bits.
* ``<attention>.qk``: Q K^T at q_bits x k_bits; ``<attention>.av``: A V at softmax_bits x v_bits
  plus the row-grouping overhead (row max, assignment) for g > 1 row groups.
* Linear layers left in float count at 32 x 32.
Not counted: IGQ grouping overhead of the Q/K/V operands under ``matmul_scheme="igq"`` (their
group count is not allocated either); the ``qk`` record shows one group.
"""
from __future__ import annotations

import contextlib
from dataclasses import asdict, dataclass
from typing import Any, Optional

import torch
from torch import nn

from .. import ops
from ..attention import QuantAttention
from ..modules import QuantConv2d, QuantLinear

__all__ = ["SiteCost", "CostReport", "record_site_shapes", "site_costs", "SHAPES_ATTR", "FP_BITS"]

SHAPES_ATTR = "igq_site_shapes"
FP_BITS = 32


@dataclass
class SiteCost:
    """Cost record of one site (per input instance)."""

    site: str
    kind: str  # "linear", "conv", "qk", "av", "float"
    groups: int
    w_bits: int
    a_bits: int
    macs: int
    shape: dict

    def overhead_ops(self, groups: Optional[int] = None) -> int:
        g = self.groups if groups is None else groups
        s = self.shape
        if self.kind == "linear":
            return s["instances"] * ops.igq_linear_overhead_ops(s["tokens"], s["in_features"], s["out_features"], g)
        if self.kind == "av":
            return s["instances"] * ops.softmax_group_overhead_ops(s["heads"], s["q_tokens"], s["k_tokens"], g)
        return 0

    def bops(self, groups: Optional[int] = None) -> int:
        """BOPs with ``groups`` groups (default: the site's current count)."""
        return ops.mac_bops(self.macs, self.w_bits, self.a_bits) + self.overhead_ops(groups) * ops.FP_OP_BOPS

    @property
    def fp_bops(self) -> int:
        return ops.mac_bops(self.macs, FP_BITS, FP_BITS)

    def to_dict(self) -> dict:
        d = asdict(self)
        d.pop("shape")
        d["bops"] = self.bops()
        return d


@dataclass
class CostReport:
    """Per-site costs of a model; ``total_bops`` against ``fp_bops`` (every site at 32 x 32 bits)."""

    sites: list

    @property
    def total_bops(self) -> int:
        return sum(s.bops() for s in self.sites)

    @property
    def fp_bops(self) -> int:
        return sum(s.fp_bops for s in self.sites)

    def to_dict(self) -> dict[str, Any]:
        return {
            "sites": [s.to_dict() for s in self.sites],
            "total_bops": self.total_bops,
            "fp_bops": self.fp_bops,
            "bops_fraction_of_fp": self.total_bops / max(self.fp_bops, 1),
        }

    def table(self) -> str:
        """A plain-text table (one row per site, then the total)."""
        rows = [("site", "kind", "groups", "w_bits", "a_bits", "MMACs", "GBOPs")]
        for s in self.sites:
            rows.append((s.site, s.kind, str(s.groups), str(s.w_bits), str(s.a_bits), f"{s.macs / 1e6:.2f}",
                         f"{s.bops() / 1e9:.3f}"))
        total = self.total_bops
        rows.append(("total", "", "", "", "", f"{sum(s.macs for s in self.sites) / 1e6:.2f}", f"{total / 1e9:.3f}"))
        rows.append(("FP32 (32x32 bits)", "", "", "", "", "", f"{self.fp_bops / 1e9:.3f}"))
        rows.append(("ratio to FP32", "", "", "", "", "", f"{total / max(self.fp_bops, 1):.4f}"))
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in rows]
        lines.insert(1, "-" * len(lines[0]))
        return "\n".join(lines)


def _first_tensor(args: tuple, kwargs: dict) -> Optional[torch.Tensor]:
    for value in (*args, *kwargs.values()):
        if isinstance(value, torch.Tensor):
            return value
    return None


@contextlib.contextmanager
def record_site_shapes(model: nn.Module, shapes: dict):
    """Fill ``shapes`` (module name -> per-image shape facts) from the forward passes run inside.

    The batch size is read from the model's own input; a site whose leading dimension holds
    several rows per image (Swin windows) records them as ``instances`` (IGQ's per-instance
    ranges are per row there), tokens per instance as ``tokens``.
    """
    handles = []
    batch = {"size": None}

    def on_model(module, args, kwargs):
        t = _first_tensor(args, kwargs)
        batch["size"] = int(t.shape[0]) if t is not None and t.dim() > 0 else 1

    def per_image(t: torch.Tensor) -> int:
        """Rows of the leading dimension per image (1 unless e.g. windows are folded into it)."""
        lead = int(t.shape[0]) if t.dim() > 1 else 1
        size = batch["size"] or lead
        return max(1, lead // size) if lead % size == 0 else 1

    def on_linear(name):
        def hook(module, args, output):
            x = args[0]
            lead = int(x.shape[0]) if x.dim() > 1 else 1
            shapes[name] = {"kind": "linear", "instances": per_image(x), "tokens": int(x.numel() // (lead * x.shape[-1])),
                            "in_features": int(x.shape[-1]), "out_features": int(output.shape[-1])}
        return hook

    def on_conv(name):
        def hook(module, args, output):
            k = module.weight[0].numel()  # in_channels / groups * kh * kw
            shapes[name] = {"kind": "conv", "macs": int(output[0].numel() * k * per_image(output))}
        return hook

    def on_softmax(name, attention):
        def hook(module, args, output):
            a = args[0]  # [B * windows, H, N, M]
            heads, q_tokens, k_tokens = (int(d) for d in a.shape[-3:])
            channels = attention.qkv.out_features // 3 if hasattr(attention, "qkv") else None
            head_dim = getattr(attention, "head_dim", None) or (channels // heads if channels else None)
            if head_dim is None:
                raise ValueError(f"attention '{name}': cannot tell its head dimension for BOP counting")
            shapes[name] = {"kind": "attention", "instances": per_image(a), "heads": heads, "q_tokens": q_tokens,
                            "k_tokens": k_tokens, "head_dim": int(head_dim)}
        return hook

    try:
        handles.append(model.register_forward_pre_hook(on_model, with_kwargs=True))
        for name, module in model.named_modules():
            if isinstance(module, (QuantLinear, nn.Linear)):
                handles.append(module.register_forward_hook(on_linear(name)))
            elif isinstance(module, QuantConv2d):
                handles.append(module.register_forward_hook(on_conv(name)))
            elif isinstance(module, QuantAttention) and getattr(module, "softmax_quantizer", None) is not None:
                handles.append(module.softmax_quantizer.register_forward_hook(on_softmax(name, module)))
        yield shapes
    finally:
        for h in handles:
            h.remove()


def _groups(quantizer) -> int:
    return quantizer.num_groups if quantizer is not None and getattr(quantizer, "scheme", "igq") == "igq" else 1


def site_costs(model: nn.Module, shapes: Optional[dict] = None) -> CostReport:
    """Cost records of every site of a prepared / quantized model, from recorded ``shapes``."""
    shapes = getattr(model, SHAPES_ATTR, None) if shapes is None else shapes
    if not shapes:
        raise ValueError(
            "no site shapes recorded on this model: pass example_input (one batch) so one forward pass can "
            "measure them, or calibrate it with igq.calibrate / igq.quantize"
        )
    records = []
    for name, module in model.named_modules():
        facts = shapes.get(name)
        if facts is None:
            continue
        if isinstance(module, QuantLinear):
            q = module.input_quantizer
            a_bits = q.bits if q is not None else FP_BITS
            macs = facts["instances"] * ops.linear_macs(facts["tokens"], facts["in_features"], facts["out_features"])
            records.append(SiteCost(name, "linear", _groups(q), module.w_bits, a_bits, macs, facts))
        elif isinstance(module, QuantConv2d):
            q = module.input_quantizer
            records.append(SiteCost(name, "conv", 1, module.w_bits, q.bits if q is not None else FP_BITS,
                                    facts["macs"], facts))
        elif isinstance(module, nn.Linear):
            macs = facts["instances"] * ops.linear_macs(facts["tokens"], facts["in_features"], facts["out_features"])
            records.append(SiteCost(name, "float", 1, FP_BITS, FP_BITS, macs, facts))
        elif isinstance(module, QuantAttention):
            macs = facts["instances"] * ops.attention_macs(facts["heads"], facts["q_tokens"], facts["k_tokens"],
                                                           facts["head_dim"])

            def bits(q):
                return q.bits if q is not None else FP_BITS

            records.append(SiteCost(f"{name}.qk", "qk", 1, bits(module.k_quantizer), bits(module.q_quantizer), macs, facts))
            records.append(SiteCost(f"{name}.av", "av", _groups(module.softmax_quantizer), bits(module.v_quantizer),
                                    bits(module.softmax_quantizer), macs, facts))
    return CostReport(records)
