"""IGQ for torch.ao FX: ``prepare_fx`` with an IGQ qconfig mapping, calibration by running, ``convert_igq_fx``.

    from torch.ao.quantization.quantize_fx import prepare_fx
    from igq_plugin.integrations.torch_ao import get_igq_qconfig_mapping, convert_igq_fx

    prepared = prepare_fx(model.eval(), get_igq_qconfig_mapping(cfg), example_inputs)
    for x in calibration_batches:
        prepared(x)                      # observers record per-instance channel ranges
    qmodel = convert_igq_fx(prepared)    # never convert_fx: it collapses the groups to one range

The adapter only converts and wires; all numerics are the core's:
* prepare_fx puts an :class:`IGQFakeQuantize` (a torch.ao ``FakeQuantizeBase``) wherever the
  qconfig asks. Each one holds a core :class:`igq_plugin.ActQuantizer`, created on the first
  batch, when the channel count is known. While observing, it passes values through unchanged.
* ``convert_igq_fx`` keeps the quantizers that feed a Linear (or the patch-embedding Conv2d),
  replaces each by its ActQuantizer (whose forward is the ``igq::group_fake_quant`` op), and
  drops the rest (torch.ao also observes outputs, which IGQ leaves in float). Each fed Linear
  becomes an :class:`igq_plugin.QuantLinear` with no input quantizer of its own, registered as a
  site (``igq.register_site``). Then ``igq.convert`` fits the group ranges and the weight
  quantizers, so ``igq.round_weights`` (GPTQ), ``igq.report`` and ``igq.save``'s site checks work
  unchanged.

Which sites: the inputs of every ``nn.Linear``, at the config's bits / scheme / groups. Modules
whose names match ``head_patterns`` / ``embed_patterns`` are quantized layer-wise at
``head_bits`` / ``embed_bits`` (the patch-embedding Conv2d included). Names matching ``skip``
stay float. Not reached by this flow yet: the Q, K, V operands and post-softmax attention
(igq.quantize quantizes them for timm models).

Calibration runs with float weights, as in torch.ao's post-training flow; igq.quantize calibrates
with the upstream weights already quantized, so the two flows' ranges differ slightly.
"""
from __future__ import annotations

import fnmatch
from typing import Any, Optional

import torch  # torch.ao ships with torch: no extra to install
from torch import nn
from torch.ao.quantization import QConfig, QConfigMapping
from torch.ao.quantization.fake_quantize import FakeQuantizeBase
from torch.ao.quantization.observer import ObserverBase, PlaceholderObserver

import igq_plugin as igq

__all__ = ["IGQFakeQuantize", "get_igq_qconfig", "get_igq_qconfig_mapping", "convert_igq_fx"]


class IGQFakeQuantize(FakeQuantizeBase):
    """A torch.ao fake-quant module that holds one core ActQuantizer (created on the first batch).

    ``quantizer_kwargs``: the ActQuantizer's bits, scheme, num_groups and calibration options.
    torch.ao requires a quint8 ``dtype`` and an ``activation_post_process``; the latter is a
    placeholder that does no work. ``calculate_qparams`` is never used by igq_plugin (``convert_fx``
    would use it, and would collapse the groups).
    """

    _KEYS = ("bits", "scheme", "num_groups", "update", "quantile", "kmeans_iters", "percentile")

    def __init__(self, **quantizer_kwargs: Any) -> None:
        super().__init__()
        self.dtype = torch.quint8
        self.activation_post_process = PlaceholderObserver(dtype=torch.quint8)
        # torch.ao adds its own keyword arguments (factory_kwargs): keep the quantizer's
        self.quantizer_kwargs = {k: v for k, v in quantizer_kwargs.items() if k in self._KEYS}
        self.quantizer: Optional[igq.ActQuantizer] = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.quantizer is None:
            kwargs = dict(self.quantizer_kwargs)
            channels = x.shape[-1] if kwargs.get("scheme") != "layer" else None
            self.quantizer = igq.ActQuantizer(channels=channels, **kwargs).to(x.device)
            self.quantizer.start_observer()
        if not self.fake_quant_enabled[0]:
            return x
        return self.quantizer(x)

    def calculate_qparams(self):
        raise RuntimeError("IGQFakeQuantize has per-instance group ranges, not one (scale, zero point): convert with "
                           "igq_plugin.integrations.torch_ao.convert_igq_fx, not torch.ao's convert_fx")


def _qconfig(quantizer_kwargs: dict) -> QConfig:
    return QConfig(activation=IGQFakeQuantize.with_args(**quantizer_kwargs),
                   weight=PlaceholderObserver.with_args(dtype=torch.float))  # weights: the core's, at convert


def get_igq_qconfig(cfg: Optional[igq.IGQConfig] = None, *, bits: Optional[int] = None, scheme: Optional[str] = None,
                    num_groups: Optional[int] = None) -> QConfig:
    """The QConfig of a transformer-block Linear input under ``cfg`` (default IGQConfig()); ``bits`` /
    ``scheme`` / ``num_groups`` override the config's act_bits / act_scheme / num_groups."""
    cfg = igq.IGQConfig() if cfg is None else cfg
    if not isinstance(cfg, igq.IGQConfig):
        raise TypeError(f"cfg must be an igq_plugin.IGQConfig, got {type(cfg).__name__}")
    return _qconfig(igq.act_quantizer_kwargs(cfg, cfg.act_bits if bits is None else bits,
                                             cfg.act_scheme if scheme is None else scheme,
                                             cfg.num_groups if num_groups is None else num_groups))


def _regex(patterns: tuple[str, ...]) -> Optional[str]:
    return "|".join(f"(?:{fnmatch.translate(p)})" for p in patterns) if patterns else None


def get_igq_qconfig_mapping(cfg: Optional[igq.IGQConfig] = None) -> QConfigMapping:
    """A QConfigMapping for ``prepare_fx`` / ``prepare_qat_fx``: every nn.Linear input under ``cfg``, the
    ``head_patterns`` / ``embed_patterns`` modules layer-wise at their bits, ``skip`` modules float."""
    cfg = igq.IGQConfig() if cfg is None else cfg
    mapping = QConfigMapping().set_object_type(nn.Linear, get_igq_qconfig(cfg))
    for patterns, bits in ((cfg.embed_patterns, cfg.embed_bits), (cfg.head_patterns, cfg.head_bits)):
        regex = _regex(patterns)
        if regex:
            layer = None if bits is None else _qconfig(igq.act_quantizer_kwargs(cfg, bits, "layer", 1, block_site=False))
            mapping = mapping.set_module_name_regex(regex, layer)
    if cfg.skip:
        mapping = mapping.set_module_name_regex(_regex(cfg.skip), None)
    mapping.igq_config = cfg  # prepare_fx keeps a copy of the mapping on the model: convert_igq_fx reads it there
    return mapping


def _mapping_config(prepared: torch.fx.GraphModule) -> Optional[igq.IGQConfig]:
    attrs = prepared.meta.get("_observed_graph_module_attrs")
    cfg = getattr(getattr(attrs, "qconfig_mapping", None), "igq_config", None)
    return cfg if isinstance(cfg, igq.IGQConfig) else None


def _fed_layers(gm: torch.fx.GraphModule, node: torch.fx.Node) -> Optional[list[str]]:
    """Names of the Linear / Conv2d modules whose input is ``node``, or None if it feeds anything else."""
    names = []
    for user in node.users:
        if user.op != "call_module" or not user.args or user.args[0] is not node:
            return None
        module = gm.get_submodule(user.target)
        if not isinstance(module, (nn.Linear, nn.Conv2d)):
            return None
        names.append(user.target)
    return names or None


def convert_igq_fx(prepared: torch.fx.GraphModule, cfg: Optional[igq.IGQConfig] = None, *,
                   progress: bool = True) -> torch.fx.GraphModule:
    """Convert a calibrated ``prepare_fx`` / ``prepare_qat_fx`` GraphModule (in place; returned).

    ``cfg``: the IGQConfig given to :func:`get_igq_qconfig_mapping` (weight bits and clipping);
    default: the one the mapping recorded, else IGQConfig().
    """
    if not isinstance(prepared, torch.fx.GraphModule):
        raise TypeError(f"convert_igq_fx takes the GraphModule returned by prepare_fx, got {type(prepared).__name__}")
    fake_quants = [(n, prepared.get_submodule(n.target)) for n in prepared.graph.nodes
                   if n.op == "call_module" and isinstance(prepared.get_submodule(n.target), IGQFakeQuantize)]
    if not fake_quants:
        raise ValueError("no IGQFakeQuantize in this model: prepare it with prepare_fx(model, "
                         "get_igq_qconfig_mapping(cfg), example_inputs) first")
    cfg = cfg or _mapping_config(prepared) or igq.IGQConfig()
    if cfg.reparam:
        raise ValueError("reparameterization (IGQConfig.reparam) is not part of the FX flow yet: use igq.quantize, or "
                         "reparam=None")
    mixed = [n for n in prepared.graph.nodes if n.op == "call_module"
             and isinstance(prepared.get_submodule(n.target), (FakeQuantizeBase, ObserverBase))
             and not isinstance(prepared.get_submodule(n.target), IGQFakeQuantize)]
    if mixed:
        raise ValueError(f"the model mixes torch.ao's own fake-quant / observers ({mixed[0].target}) with IGQ ones: "
                         "build the qconfig mapping with get_igq_qconfig_mapping only")
    kept, dropped, consumers = [], [], {}
    for node, fq in fake_quants:  # decide and validate everything before the graph changes
        layers = _fed_layers(prepared, node)
        if layers is not None:  # layers the config leaves float are not fed a quantizer
            layers = [name for name in layers if igq.layer_settings(cfg, name, prepared.get_submodule(name))] or None
        if layers is None:  # torch.ao also observes outputs: IGQ keeps those in float
            dropped.append(node)
            continue
        if fq.quantizer is None:
            raise RuntimeError(f"'{node.target}' (input of {', '.join(layers)}) saw no calibration batch: run "
                               "calibration data through the prepared model before convert_igq_fx")
        for name in layers:  # torch.ao may reuse the previous layer's output observer as this input's
            settings = igq.layer_settings(cfg, name, prepared.get_submodule(name))
            bits, scheme = settings.a_bits, settings.scheme
            q = fq.quantizer
            if (q.bits, q.scheme) != (bits, scheme):
                raise ValueError(
                    f"the input of '{name}' is observed with {q.bits}-bit {q.scheme!r} ranges but the config gives it "
                    f"{bits}-bit {scheme!r} (torch.ao shares one observer between a layer's output and the next "
                    "layer's input): put a float op between them, or quantize this model with igq.quantize"
                )
        kept.append((node, fq))
        consumers[node.target] = layers
    for node in dropped:
        node.replace_all_uses_with(node.args[0])
        prepared.graph.erase_node(node)
        prepared.delete_submodule(node.target)
    for node, fq in kept:
        quantizer = fq.quantizer
        prepared.delete_submodule(node.target)
        prepared.add_submodule(node.target, quantizer)  # the graph calls the core quantizer (igq op) directly
        for name in consumers[node.target]:
            module = prepared.get_submodule(name)
            new = igq.quantized_layer(module, cfg, igq.layer_settings(cfg, name, module))
            kind = "linear_input" if isinstance(module, nn.Linear) else "conv_input"
            igq.adopt_hooks(new, module)
            parent, _, attr = name.rpartition(".")
            setattr(prepared.get_submodule(parent) if parent else prepared, attr, new)
            quantizer.site = f"{name}.input_quantizer"
            igq.register_site(prepared, f"{name}.input_quantizer", kind, quantizer, name, weight_quantizer=new)
    prepared.graph.lint()
    prepared.recompile()
    setattr(prepared, "igq_config", cfg)
    return igq.convert(prepared, progress=progress)
