"""Per-site MAC / BOP accounting of a prepared or quantized model (DESIGN.md §1, Eq. 9).

Shapes are recorded by forward hooks (:func:`record_site_shapes`; ``igq.calibrate`` does it on
its first batch and stores them on the model), so a report needs no extra forward pass. The
arithmetic (MACs, BOPs, grouping overhead) is in :mod:`igq_plugin.ops.bops`.

Sites (``igq.sites``) and what they cost per instance:
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
from ..registry import sites

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


def _module_order(model: nn.Module) -> dict[str, int]:
    return {name: i for i, (name, _) in enumerate(model.named_modules())}


@contextlib.contextmanager
def record_site_shapes(model: nn.Module, shapes: dict):
    """Fill ``shapes`` (consumer name -> per-image shape facts) from the forward passes run inside.

    Hooks sit on the registered sites (igq.sites: Linear-input and softmax quantizers, the
    patch-embedding convolution) and on Linears left in float. The batch size is read from the
    model's own input; a site whose leading dimension holds several rows per image (Swin
    windows) records them as ``instances`` (IGQ's per-instance ranges are per row there), tokens
    per instance as ``tokens``.
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

    def linear_facts(x: torch.Tensor, out_features: int) -> dict:
        lead = int(x.shape[0]) if x.dim() > 1 else 1
        return {"kind": "linear", "instances": per_image(x), "tokens": int(x.numel() // (lead * x.shape[-1])),
                "in_features": int(x.shape[-1]), "out_features": int(out_features)}

    def on_linear_site(site):
        def hook(_quantizer, args, _output):
            shapes[site.consumer] = linear_facts(args[0], site.weight_quantizer.weight.shape[0])
        return hook

    def on_float_linear(name):
        def hook(module, args, output):
            shapes[name] = linear_facts(args[0], output.shape[-1])
        return hook

    def on_conv(name):
        def hook(module, args, output):
            k = module.weight[0].numel()  # in_channels / groups * kh * kw
            shapes[name] = {"kind": "conv", "macs": int(output[0].numel() * k * per_image(output))}
        return hook

    def on_softmax(site):
        def hook(_quantizer, args, _output):
            a = args[0]  # [B * windows, H, N, M]
            heads, q_tokens, k_tokens = (int(d) for d in a.shape[-3:])
            head_dim = site.info.get("head_dim")
            if head_dim is None:
                raise ValueError(f"softmax site '{site.name}' has no info['head_dim'] for MAC counting")
            shapes[site.consumer] = {"kind": "attention", "instances": per_image(a), "heads": heads,
                                     "q_tokens": q_tokens, "k_tokens": k_tokens, "head_dim": int(head_dim)}
        return hook

    try:
        handles.append(model.register_forward_pre_hook(on_model, with_kwargs=True))
        registered = sites(model)
        consumers = {s.consumer for s in registered}
        for site in registered:
            if site.kind == "linear_input" and site.weight_quantizer is not None:
                handles.append(site.quantizer.register_forward_hook(on_linear_site(site)))
            elif site.kind == "conv_input" and site.weight_quantizer is not None:
                handles.append(site.weight_quantizer.register_forward_hook(on_conv(site.consumer)))
            elif site.kind == "softmax":
                handles.append(site.quantizer.register_forward_hook(on_softmax(site)))
        for name, module in model.named_modules():
            if isinstance(module, nn.Linear) and name not in consumers:
                handles.append(module.register_forward_hook(on_float_linear(name)))
        yield shapes
    finally:
        for h in handles:
            h.remove()


def _groups(quantizer) -> int:
    return quantizer.num_groups if quantizer is not None and getattr(quantizer, "scheme", "igq") == "igq" else 1


def _bits(quantizer) -> int:
    return quantizer.bits if quantizer is not None else FP_BITS


def site_costs(model: nn.Module, shapes: Optional[dict] = None) -> CostReport:
    """Cost records of every site of a prepared / quantized model (igq.sites), from recorded ``shapes``."""
    if shapes is None:  # recorded by calibration on the model, or on quantized models inside it (prefixed)
        shapes = {}
        for prefix, module in model.named_modules():
            recorded = module.__dict__.get(SHAPES_ATTR) or {}
            shapes.update({f"{prefix}.{k}" if prefix else k: v for k, v in recorded.items()})
    if not shapes:
        raise ValueError(
            "no site shapes recorded on this model: pass example_input (one batch) so one forward pass can "
            "measure them, or calibrate it with igq.calibrate / igq.quantize"
        )
    records = []  # (consumer, record)
    registered = sites(model)
    operands: dict[str, dict[str, nn.Module]] = {}
    for site in registered:
        if site.kind == "matmul_operand":
            operands.setdefault(site.consumer, {})[site.info.get("operand")] = site.quantizer
    for site in registered:
        facts = shapes.get(site.consumer)
        if facts is None:
            continue
        q, wq = site.quantizer, site.weight_quantizer
        if site.kind == "linear_input" and wq is not None:
            macs = facts["instances"] * ops.linear_macs(facts["tokens"], facts["in_features"], facts["out_features"])
            records.append((site.consumer, SiteCost(site.consumer, "linear", _groups(q), wq.w_bits, q.bits, macs, facts)))
        elif site.kind == "conv_input" and wq is not None:
            records.append((site.consumer, SiteCost(site.consumer, "conv", 1, wq.w_bits, q.bits, facts["macs"], facts)))
        elif site.kind == "softmax":
            macs = facts["instances"] * ops.attention_macs(facts["heads"], facts["q_tokens"], facts["k_tokens"],
                                                           facts["head_dim"])
            mm = operands.get(site.consumer, {})
            records.append((site.consumer, SiteCost(f"{site.consumer}.qk", "qk", 1, _bits(mm.get("k")),
                                                    _bits(mm.get("q")), macs, facts)))
            records.append((site.consumer, SiteCost(f"{site.consumer}.av", "av", _groups(q), _bits(mm.get("v")),
                                                    q.bits, macs, facts)))
    consumers = {s.consumer for s in registered}
    for name, module in model.named_modules():
        facts = shapes.get(name)
        if isinstance(module, nn.Linear) and name not in consumers and facts is not None and facts["kind"] == "linear":
            macs = facts["instances"] * ops.linear_macs(facts["tokens"], facts["in_features"], facts["out_features"])
            records.append((name, SiteCost(name, "float", 1, FP_BITS, FP_BITS, macs, facts)))
    order = _module_order(model)
    records.sort(key=lambda r: order.get(r[0], len(order)))  # stable: qk before av
    return CostReport([r for _, r in records])
