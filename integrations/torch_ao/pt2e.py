"""torchao pt2e flow: ``prepare_pt2e(torch.export.export(model, args).module(), IGQQuantizer(cfg))``,
calibrate by running, ``convert_pt2e``. QAT: ``prepare_qat_pt2e`` with the same quantizer.

* :meth:`IGQQuantizer.annotate` sees the whole exported graph, so every site is known exactly at
  annotation: the input of each ``aten.linear`` (and of the patch-embedding ``aten.conv2d``) the
  config quantizes (``igq.layer_settings`` on the layer's module name from ``nn_module_stack``),
  and the Q, K, V and softmax operands of each unfused attention (``_graph``).
* Each annotated edge gets an :class:`IGQObserver` (a torchao ``FakeQuantizeBase``) holding the
  site's core quantizer, created on the first batch. While observing it passes values through; in
  QAT, once :func:`fit_ranges` has fitted the ranges (after the calibration batches), it
  fake-quantizes with trainable ranges.
* ``convert_pt2e`` calls each observer's ``convert(model, node)``, which writes the site: the layer
  becomes a core :class:`igq_plugin.QuantLinear` / ``QuantConv2d`` with the quantizer inside it (as
  ``igq.quantize`` builds it), an attention operand a call of its quantizer module; the site is
  registered and converted by the core (``igq.convert_site``). Re-exporting the converted model with
  ``torch.export`` gives one ``igq::group_fake_quant`` / ``igq::softmax_row_fake_quant`` node per site.
"""
from __future__ import annotations

import logging
import operator
from typing import Any, Optional

import torch
from torch import nn
from torchao.quantization.pt2e import FakeQuantizeBase, ObserverBase
from torchao.quantization.pt2e.quantizer import QuantizationAnnotation, QuantizationSpec, Quantizer

import igq_plugin as igq
from igq_plugin.attention import OperandQuantizer
from igq_plugin.quantize import matches

from . import _graph
from .fx import WeightFakeQuantMixin, check_flow_config

logger = logging.getLogger("igq_plugin")

__all__ = ["IGQQuantizer", "IGQObserver", "IGQWeightObserver", "fit_ranges"]

_LINEAR = torch.ops.aten.linear.default
_CONV2D = torch.ops.aten.conv2d.default


def _is_observer(module: nn.Module) -> bool:
    return isinstance(module, (FakeQuantizeBase, ObserverBase))


def _layer_name(node: torch.fx.Node) -> str:
    stack = node.meta.get("nn_module_stack") or {}
    if stack:
        path, cls = list(stack.values())[-1]
        cls_name = cls if isinstance(cls, str) else f"{cls.__module__}.{cls.__qualname__}"
        if cls_name.rsplit(".", 1)[-1] in ("Linear", "Conv2d", "NonDynamicallyQuantizableLinear"):
            return path
        return f"{path}.{node.name}" if path else node.name
    return node.name


def _float_layer(gm: torch.fx.GraphModule, node: torch.fx.Node) -> nn.Module:
    """An nn.Linear / nn.Conv2d sharing the weight and bias of the ``aten.linear`` / ``aten.conv2d`` node."""
    def tensor(arg):
        if arg is None:
            return None
        while isinstance(arg, torch.fx.Node) and arg.op == "call_module" and \
                isinstance(gm.get_submodule(arg.target), IGQWeightObserver):
            arg = arg.args[0]
        if not (isinstance(arg, torch.fx.Node) and arg.op == "get_attr"):
            raise ValueError(f"'{node.name}': its weight is not a parameter of the model (a computed weight): "
                             "quantize this model with igq.quantize")
        return operator.attrgetter(arg.target)(gm)

    weight, bias = tensor(node.args[1]), tensor(node.args[2] if len(node.args) > 2 else None)
    if node.target is _LINEAR:
        layer = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
    else:
        given = list(node.args[3:7])
        stride, padding, dilation, groups = given + [1, 0, 1, 1][len(given):]
        layer = nn.Conv2d(weight.shape[1] * groups, weight.shape[0], tuple(weight.shape[2:]), stride, padding,
                          dilation, groups, bias=bias is not None, device="meta")
    layer.weight = weight if isinstance(weight, nn.Parameter) else nn.Parameter(weight, requires_grad=False)
    if bias is not None:
        layer.bias = bias if isinstance(bias, nn.Parameter) else nn.Parameter(bias, requires_grad=False)
    return layer


class IGQObserver(FakeQuantizeBase):
    """The torchao observer / fake-quant of one IGQ site (see the module docstring).

    ``site``: the layer name (``kind="input"``) or attention scope; ``tag``: "q", "k", "v" or
    "softmax" for attention sites; ``quantizer_kwargs``: the ActQuantizer's settings of an input site;
    ``config``: the IGQConfig of attention sites; ``head_dim``: of the attention (for cost counting).
    QAT: after calibration batches, :func:`fit_ranges` fits the ranges and makes them trainable.
    """

    def __init__(self, kind: str = "input", site: str = "", tag: Optional[str] = None,
                 config: Optional[igq.IGQConfig] = None, quantizer_kwargs: Optional[dict] = None, head_dim: int = 0,
                 **_: Any) -> None:
        super().__init__()
        self.dtype = torch.uint8
        self.kind, self.site, self.tag = kind, site, tag
        self.config = config if config is not None else igq.IGQConfig()
        self.quantizer_kwargs = dict(quantizer_kwargs or {})
        self.quantizer: Optional[nn.Module] = None
        self.site_module: Optional[nn.Module] = None
        self.head_dim = head_dim

    def _start(self, x: torch.Tensor) -> None:
        if self.kind == "input":
            kwargs = self.quantizer_kwargs
            channels = x.shape[-1] if kwargs.get("scheme") != "layer" else None
            self.quantizer = self.site_module = igq.ActQuantizer(channels=channels, site=f"{self.site}.input_quantizer",
                                                                 **kwargs)
        elif self.tag == "softmax":
            self.quantizer = self.site_module = igq.attention_quantizer(self.config, self.site, "softmax")
        else:
            axis = _graph.OPERAND_AXIS[self.tag]
            heads = x.shape[1] if x.dim() == 4 else 1
            self.quantizer = igq.attention_quantizer(self.config, self.site, self.tag, heads * x.shape[axis])
            self.site_module = OperandQuantizer(self.quantizer, axis)
        self.site_module.to(x.device)
        self.quantizer.start_observer()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.quantizer is None:
            self._start(x)
        if not self.fake_quant_enabled[0]:
            return x
        return self.site_module(x)

    def calculate_qparams(self):
        raise RuntimeError("IGQObserver has per-instance group ranges, not one (scale, zero point): convert_pt2e "
                           "calls its convert()")

    def _site_name(self) -> str:
        return f"{self.site}.input_quantizer" if self.kind == "input" else f"{self.site}.{self.tag}_quantizer"

    def convert(self, model: torch.fx.GraphModule, observer_node: torch.fx.Node) -> None:
        """Write this site into the converted graph (called by torchao's convert_pt2e)."""
        if not model.meta.get("igq_checked_not_mixed"):
            _check_not_mixed(model)
            model.meta["igq_checked_not_mixed"] = True
        if self.quantizer is None:
            raise RuntimeError(f"IGQ site '{self._site_name()}' saw no calibration batch: run calibration data through "
                               "the prepared model before convert_pt2e")
        source = observer_node.args[0]
        cfg = self.config
        graph = model.graph
        if self.kind == "input":
            (user,) = observer_node.users  # one observer per annotated edge (see IGQQuantizer)
            layer = _float_layer(model, user)
            settings = igq.layer_settings(cfg, self.site, layer)
            new = igq.quantized_layer(layer, cfg, settings, input_quantizer=self.quantizer)
            _graph.set_module(model, self.site, new)
            with graph.inserting_before(user):
                call = graph.call_module(self.site, (source,))
            call.meta = dict(user.meta)
            user.replace_all_uses_with(call)
            params = [a for a in user.args[1:] if isinstance(a, torch.fx.Node)]
            graph.erase_node(user)
            graph.erase_node(observer_node)
            _erase_unused_attrs(graph, params)  # a weight observer left here is erased by its own convert
            kind = "linear_input" if isinstance(layer, nn.Linear) else "conv_input"
            igq.register_site(model, self._site_name(), kind, self.quantizer, self.site, weight_quantizer=new)
        else:
            path = self._site_name()
            _graph.set_module(model, path, self.site_module)
            with graph.inserting_before(observer_node):
                call = graph.call_module(path, (source,))
            call.meta = dict(observer_node.meta)
            observer_node.replace_all_uses_with(call)
            graph.erase_node(observer_node)
            igq.register_attention_sites(model, self.site, {self.tag: self.quantizer}, self.head_dim)
        self.quantizer.learn_ranges(False)  # QAT-trained ranges become buffers again (state-dict keys unchanged)
        igq.convert_site(igq.get_site(model, self._site_name()))
        graph.lint()
        model.recompile()


def _erase_unused_attrs(graph: torch.fx.Graph, nodes: list) -> None:
    for node in nodes:
        if node.op == "get_attr" and not node.users:
            graph.erase_node(node)


class IGQWeightObserver(WeightFakeQuantMixin, FakeQuantizeBase):
    """Weight fake-quant of an IGQ layer while calibrating (``calibration_weights="quantized"``) and
    training (QAT): the core's per-channel rule on the current weights. ``convert`` removes it (the
    layer's core QuantLinear quantizes its weight from then on)."""

    def __init__(self, w_bits: int = 8, clipping: str = "percentile", percentile: float = 0.0, **_: Any) -> None:
        super().__init__()
        self.dtype = torch.int8
        self._init_weight_quant(w_bits, clipping, percentile)

    def calculate_qparams(self):
        raise RuntimeError("IGQWeightObserver is removed by its convert(), not turned into qparams")

    def convert(self, model: torch.fx.GraphModule, observer_node: torch.fx.Node) -> None:
        source = observer_node.args[0]
        observer_node.replace_all_uses_with(source)
        model.graph.erase_node(observer_node)
        _erase_unused_attrs(model.graph, [source])
        model.recompile()


def _head_dim(q: torch.fx.Node) -> int:
    value = q.meta.get("val")
    return int(value.shape[-1]) if isinstance(value, torch.Tensor) else 0


def fit_ranges(prepared: torch.fx.GraphModule, *, learn: bool = True) -> None:
    """QAT (``prepare_qat_pt2e``): after the calibration batches, fit every site's ranges (the core's
    fit) and, with ``learn``, make them trainable; the model then fake-quantizes. Train, then convert_pt2e."""
    observers = [m for m in prepared.modules() if isinstance(m, IGQObserver)]
    if not observers:
        raise ValueError("no IGQObserver in this model: prepare it with prepare_qat_pt2e(exported, IGQQuantizer(cfg))")
    for observer in observers:
        if observer.quantizer is None:
            raise RuntimeError(f"IGQ site '{observer._site_name()}' saw no calibration batch: run calibration data "
                               "through the prepared model first")
    for observer in observers:
        if observer.quantizer.observing:
            observer.quantizer.fit()
        observer.quantizer.learn_ranges(learn)


class IGQQuantizer(Quantizer):
    """A torchao pt2e Quantizer that annotates the IGQ sites of ``config`` (default IGQConfig()).

    Weights are fake-quantized while calibrating when ``config.calibration_weights == "quantized"``
    (the default, as igq.quantize does) and while training with ``is_qat=True`` (prepare_qat_pt2e)."""

    def __init__(self, config: Optional[igq.IGQConfig] = None, *, is_qat: bool = False) -> None:
        super().__init__()
        self.is_qat = bool(is_qat)
        config = check_flow_config(config, "pt2e")
        if config.weight_rounding == "gptq":
            raise ValueError("weight_rounding='gptq' needs calibration data after convert_pt2e, which takes none: use "
                             "weight_rounding='nearest' here and call igq.round_weights(qmodel, data) on the converted "
                             "model")
        self.config = config

    @staticmethod
    def _spec(**kwargs) -> QuantizationSpec:
        return QuantizationSpec(dtype=torch.uint8, observer_or_fake_quant_ctr=IGQObserver.with_args(**kwargs))

    def annotate(self, model: torch.fx.GraphModule) -> torch.fx.GraphModule:
        cfg = self.config
        edges: dict[torch.fx.Node, dict] = {}
        names: set[str] = set()
        for node in model.graph.nodes:
            if node.op != "call_function" or node.target not in (_LINEAR, _CONV2D):
                continue
            name = _layer_name(node)
            if matches(name, cfg.skip):
                continue
            layer = _float_layer(model, node)
            settings = igq.layer_settings(cfg, name, layer)
            if settings is None:
                continue
            if name in names:
                raise _reused(name)
            names.add(name)
            kwargs = igq.act_quantizer_kwargs(cfg, settings.a_bits, settings.scheme, settings.groups,
                                              block_site=settings.block_site)
            edges.setdefault(node, {})[node.args[0]] = self._spec(kind="input", site=name, quantizer_kwargs=kwargs)
            if cfg.calibration_weights == "quantized" or self.is_qat:  # weights fake-quantized while observing
                weight = IGQWeightObserver.with_args(**igq.weight_quant_kwargs(cfg, settings.w_bits))
                edges[node][node.args[1]] = QuantizationSpec(dtype=torch.int8, observer_or_fake_quant_ctr=weight)
        if cfg.quantize_attention:
            operands = _graph.operand_sites(model, _is_observer)
            head_dims = {scope: _head_dim(matmul.args[0])
                         for (matmul, _), (scope, tag) in operands.items() if tag == "q"}
            tags = [(scope, tag) for scope, tag in operands.values()]
            for key in set(tags):
                if tags.count(key) > 1:
                    raise _reused(key[0])
            for (matmul, index), (scope, tag) in operands.items():
                if matches(scope, cfg.skip):
                    continue
                edges.setdefault(matmul, {})[matmul.args[index]] = self._spec(
                    kind="attention", site=scope, tag=tag, config=cfg, head_dim=head_dims.get(scope, 0))
            fused = sorted({_graph.scope(n) or n.name for n in model.graph.nodes if n.op == "call_function"
                            and n.target is torch.ops.aten.scaled_dot_product_attention.default})
            if fused:
                logger.warning(
                    "fused scaled_dot_product_attention in %s hides Q K^T and the softmax: their Q, K, V and softmax "
                    "sites stay in float (export the model with unfused attention, e.g. timm fused_attn = False)",
                    ", ".join(fused))
        for node, input_map in edges.items():
            previous = node.meta.get("quantization_annotation")
            if previous is not None and getattr(previous, "_annotated", False):
                raise ValueError(f"'{_graph.scope(node) or node.name}' ({node.name}) is already annotated by another "
                                 "quantizer: an IGQ site cannot mix with other quantizers' observers. Leave it to one "
                                 "quantizer (IGQConfig(skip=...) leaves it to the other)")
            for arg in input_map:
                producer = arg.meta.get("quantization_annotation")
                other = producer.output_qspec if producer is not None else None
                if other is not None and not _is_igq_spec(other):
                    raise _mixed(node, f"the output of {arg.name}")
            # no implicit sharing: an observer per edge, as each layer has its own input quantizer in igq.quantize
            node.meta["quantization_annotation"] = QuantizationAnnotation(input_qspec_map=input_map, _annotated=True,
                                                                          allow_implicit_sharing=False)
        return model

    def validate(self, model: torch.fx.GraphModule) -> None:
        _check_not_mixed(model)


def _reused(name: str) -> ValueError:
    return ValueError(f"'{name}' runs more than once in the exported graph (a shared or recurrent module): the graph "
                      "flows would give each call its own site under one name. Quantize this model with igq.quantize, "
                      "which gives such a module one quantizer for all its calls")


def _mixed(node: torch.fx.Node, other: str) -> ValueError:
    return ValueError(f"the input of '{_graph.scope(node) or node.name}' ({node.name}) is also observed by another "
                      f"quantizer ({other}): one tensor gets one quantizer. Leave the site to one of them "
                      "(IGQConfig(skip=...) leaves it to the other)")


def _check_not_mixed(model: torch.fx.GraphModule) -> None:
    """No IGQ observer may read a tensor another quantizer observes (its observer, or the dequantize its
    convert wrote): checked over the whole graph before the first IGQ site is converted."""
    for node in model.graph.nodes:
        if node.op != "call_module" or not isinstance(model.get_submodule(node.target), IGQObserver):
            continue
        source = node.args[0]
        if not isinstance(source, torch.fx.Node):
            continue
        other = source.op == "call_module" and _is_observer(model.get_submodule(source.target)) and not \
            isinstance(model.get_submodule(source.target), (IGQObserver, IGQWeightObserver))
        if other or (source.op == "call_function" and "dequantize" in str(source.target)):
            user = next(iter(node.users), node)
            raise _mixed(user, source.name)


def _is_igq_spec(spec) -> bool:
    ctr = getattr(spec, "observer_or_fake_quant_ctr", None)
    cls = getattr(getattr(ctr, "p", None), "func", ctr)
    return isinstance(cls, type) and issubclass(cls, (IGQObserver, IGQWeightObserver))
