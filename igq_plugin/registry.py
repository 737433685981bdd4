"""The registry of quantization sites: what every flow iterates instead of testing module classes.

A *site* is one quantized tensor: a Linear / patch-embedding input, a Q, K or V operand of the
attention matmuls, or post-softmax attention rows. Its record says what it is, which quantizer
module quantizes it, what it feeds and, for a weighted layer's input, the module that quantizes
that layer's weight:

    Site(name="blocks.0.attn.qkv.input_quantizer", kind="linear_input",
         quantizer=<ActQuantizer>, consumer="blocks.0.attn.qkv", weight_quantizer=<QuantLinear>)

Reparameterization, group allocation, GPTQ rounding, ``igq.report``, the "mse" range rule and
save/load read the registry of the model (``igq.sites(model)``). ``igq.prepare`` registers the
sites of the eager modules it swaps in; an adapter whose graph keeps quantizers apart from the
layers they feed (a torch.ao FX GraphModule, NNCF hooks) registers its own with
:func:`register_site` and gets those flows without new code.

The weight quantizer of a site is any module with the weight-quantizer API of
:class:`igq_plugin.QuantLinear`: ``weight``, ``bias``, ``w_bits``, ``weight_qparams_for``,
``calibrate_weight``, ``set_weight_codes``, ``quantized_weight``, ``weight_codes``,
``weight_fake_quant_enabled``, ``weight_is_calibrated``. The site's quantizer runs before that
module uses its weight in every forward (inside it, as in QuantLinear, or before it in the graph).

The registry is a plain attribute of the module it was registered on (not in the state_dict; on a
torch.fx GraphModule also an entry of its ``meta``, which torchao's convert_pt2e carries over to the
module it rebuilds; a plain ``GraphModule(gm, graph)`` starts with an empty meta and no sites);
``copy.deepcopy`` of the model copies it with the modules it points to, and :func:`sites` of a
container also lists the sites of a quantized model inside it (names prefixed).
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Optional

from torch import nn

__all__ = ["Site", "SITE_KINDS", "SITES_ATTR", "register_site", "sites", "get_site", "clear_sites", "order_sites"]

SITE_KINDS = ("linear_input", "conv_input", "matmul_operand", "softmax")
SITES_ATTR = "igq_sites"


@dataclass(eq=False)
class Site:
    """One quantization site (see the module docstring).

    name: unique key, by convention the quantizer's module name in the model.
    kind: one of SITE_KINDS.
    quantizer: the activation quantizer module (igq.ActQuantizer / igq.SoftmaxQuantizer API).
    consumer: name of the module or graph node the quantized tensor feeds (the Linear; for Q/K/V
        and softmax sites, the attention module whose matmuls they feed).
    weight_quantizer: for linear_input / conv_input, the module quantizing the fed layer's weight.
    info: facts the registrant knows, e.g. {"operand": "q"} for a matmul operand, {"head_dim": 64}
        for a softmax site (used for MAC counting).
    """

    name: str
    kind: str
    quantizer: nn.Module
    consumer: str
    weight_quantizer: Optional[nn.Module] = None
    info: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.kind not in SITE_KINDS:
            raise ValueError(f"site '{self.name}': kind must be one of {SITE_KINDS}, got {self.kind!r}")
        if not isinstance(self.quantizer, nn.Module):
            raise TypeError(f"site '{self.name}': quantizer must be an nn.Module, got {type(self.quantizer).__name__}")
        if self.weight_quantizer is not None and self.kind not in ("linear_input", "conv_input"):
            raise ValueError(f"site '{self.name}': only linear_input / conv_input sites feed a weight quantizer")

    def __repr__(self) -> str:
        return f"Site(name={self.name!r}, kind={self.kind!r}, consumer={self.consumer!r})"


def _stored(module: nn.Module) -> Optional[dict[str, Site]]:
    registry = module.__dict__.get(SITES_ATTR)
    meta = module.__dict__.get("meta")
    if registry is None and isinstance(meta, dict):
        registry = meta.get(SITES_ATTR)  # a rebuilt GraphModule (see _registry)
    return registry


def _registry(model: nn.Module) -> dict[str, Site]:
    registry = _stored(model)
    if registry is None:
        registry = {}
    model.__dict__[SITES_ATTR] = registry
    meta = model.__dict__.get("meta")
    if isinstance(meta, dict):  # a torch.fx GraphModule: graph passes that rebuild the module (torchao's
        meta[SITES_ATTR] = registry  # convert_pt2e) carry its meta over, not its other attributes
    return registry


def register_site(
    model: nn.Module, name: str, kind: str, quantizer: nn.Module, consumer: str, *,
    weight_quantizer: Optional[nn.Module] = None, info: Optional[dict[str, Any]] = None,
) -> Site:
    """Register a quantization site on the root ``model`` (replacing a site of the same name)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    site = Site(name, kind, quantizer, consumer, weight_quantizer, dict(info or {}))
    _registry(model)[name] = site
    return site


def sites(model: nn.Module, kind: Optional[str] = None) -> list[Site]:
    """The sites of ``model``, optionally of one kind: its own registry in registration order (module
    order for igq.prepare), then those of submodules that hold one (a quantized model wrapped in a
    container), with names and consumers prefixed by the submodule's name."""
    if kind is not None and kind not in SITE_KINDS:
        raise ValueError(f"kind must be one of {SITE_KINDS} or None, got {kind!r}")
    found = []
    for prefix, module in model.named_modules():
        for site in (_stored(module) or {}).values():
            if prefix:
                site = replace(site, name=f"{prefix}.{site.name}", consumer=f"{prefix}.{site.consumer}")
            found.append(site)
    return [s for s in found if kind is None or s.kind == kind]


def get_site(model: nn.Module, name: str) -> Site:
    by_name = {s.name: s for s in sites(model)}
    if name not in by_name:
        raise KeyError(f"no quantization site named '{name}'; registered: {sorted(by_name)[:10]}")
    return by_name[name]


def order_sites(model: nn.Module) -> None:
    """Reorder the registry by the position of each site's quantizer in ``model.named_modules()``
    (module order; sites whose quantizer is not a submodule keep their order, at the end)."""
    registry = _stored(model)
    if not registry:
        return
    position = {id(m): i for i, m in enumerate(model.modules())}
    ordered = sorted(registry.values(), key=lambda s: position.get(id(s.quantizer), len(position)))
    registry.clear()
    registry.update((s.name, s) for s in ordered)
    _registry(model)


def clear_sites(model: nn.Module) -> None:
    model.__dict__.pop(SITES_ATTR, None)
    meta = model.__dict__.get("meta")
    if isinstance(meta, dict):
        meta.pop(SITES_ATTR, None)
