"""IGQ for NNCF users: ``quantize_igq`` (mirrors ``nncf.quantize``), an NNCF ``Algorithm``, NNCF-style configs.

::

    import nncf, igq_plugin as igq
    from igq_plugin.integrations.nncf import quantize_igq, ALLOWED_MODULES, register_sites

    calibration = nncf.Dataset(loader, lambda batch: batch[0])
    qmodel = quantize_igq(model, calibration, config=igq.IGQConfig(weight_bits=4, act_bits=4),
                          subset_size=4, ignored_scope=nncf.IgnoredScope(names=["head/linear/0"]))
    state = nncf.torch.get_config(qmodel); weights = qmodel.state_dict()        # NNCF's own save
    restored = nncf.torch.load_from_config(model, state, allowed_modules=ALLOWED_MODULES)
    restored.load_state_dict(weights); register_sites(restored)                 # bit-exact; igq.report works

How: the model (a copy) is wrapped with ``nncf.torch.function_hook.wrap_model`` and its NNCF graph is
built from the first calibration item. Every Linear (and the patch-embedding Conv2d) the IGQConfig
quantizes (``igq.layer_settings``) gets two pre-hooks on its op: the input quantizer (port 0, an
``igq.ActQuantizer``) and the weight quantizer (port 1, an ``igq.WeightQuantizer``). Every unfused
attention (``S = Q @ K^T -> softmax -> P; O = P @ V``; timm after ``fused_attn = False``, which is
set on the copy) gets Q and K hooks on the first matmul and the softmax-row and V hooks on the
second. The hooks are the core's quantizers (:mod:`.hooks`) and register their sites
(``igq.register_site``), so calibration, GPTQ rounding, group allocation, ``igq.report`` and
``igq_plugin.integrations.openvino.export_openvino`` run the core's flows unchanged.

``IgnoredScope`` is resolved on that graph: names and patterns are NNCF node names (e.g.
``blocks/0/attn/qkv/linear/0``; ``get_nncf_graph(model, example)`` lists them) and types are
NNCF op types (``linear``, ``matmul``, ``softmax``, ``conv2d``). An ignored linear / conv op keeps its
layer in float; an ignored Q K^T matmul keeps Q and K in float, an ignored softmax its rows, an ignored
P V matmul its V operand (and the softmax rows feeding it).
"""
from __future__ import annotations

import copy
import functools
import json
import logging
import os
from typing import Any, Optional, Union

import torch
from torch import nn

import igq_plugin as igq
from igq_plugin.calibration import ChannelRangeObserver
from igq_plugin.quantize import CONFIG_ATTR, matches
from igq_plugin.registry import clear_sites

from .. import require

require("nncf", "nncf")

import nncf  # noqa: E402
from nncf.torch.function_hook import get_hook_storage, is_wrapped, register_pre_function_hook, wrap_model  # noqa: E402
from nncf.torch.function_hook.nncf_graph.nncf_graph_builder import build_nncf_graph  # noqa: E402

from .hooks import HOOK_TYPES, IGQInputHook, IGQOperandHook, IGQSoftmaxHook, IGQWeightHook  # noqa: E402

__all__ = ["quantize_igq", "prepare_igq", "register_sites", "get_nncf_graph", "IGQAlgorithm",
           "create_compressed_model", "ALLOWED_MODULES", "COMPRESSION_KEYS", "HOOK_TYPES"]

logger = logging.getLogger("igq_plugin")

# nncf.torch.load_from_config(..., allowed_modules=ALLOWED_MODULES): where the IGQ hook classes live
ALLOWED_MODULES = ("igq_plugin.integrations.nncf.*",)

_TRANSPARENT = {"dropout", "to", "type", "contiguous", "clone", "float", "type_as", "identity", "detach"}
_SCORE_OPS = {"mul", "div", "add", "sub", "__truediv__", "__mul__", "__add__", "masked_fill", "to", "float",
              "type", "dropout"}
_TAGS = ("q", "k", "v", "softmax")


# --------------------------------------------------------------------------------------------- inputs
def _model_input(item: Any, index: int) -> Any:
    """One nncf.Dataset inference item as the core's calibration batch (NNCF calls model(*tuple) / model(**dict))."""
    if isinstance(item, (tuple, list)):
        if len(item) != 1:
            raise ValueError(f"calibration item {index} is a {type(item).__name__} of {len(item)} values: IGQ calls "
                             "model(x) or model(**dict); make the nncf.Dataset transform return one tensor or a dict")
        item = item[0]
    if not isinstance(item, (torch.Tensor, dict)):
        raise TypeError(f"calibration item {index} is a {type(item).__name__}: the nncf.Dataset transform must return "
                        "the model input (a tensor, a 1-tuple or a dict of keyword arguments)")
    return item


def _check_subset_size(value: Any, field: str = "subset_size") -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{field} must be an int >= 1 (calibration items, batches for a DataLoader), got {value!r}")


def _calibration_items(dataset: Any, subset_size: int) -> list:
    if not isinstance(dataset, nncf.Dataset):
        raise TypeError(f"calibration_dataset must be an nncf.Dataset, got {type(dataset).__name__}: wrap your data "
                        "as nncf.Dataset(data_source, transform_func)")
    _check_subset_size(subset_size)
    items = []
    for index, item in enumerate(dataset.get_inference_data()):
        if index >= subset_size:
            break
        items.append(_model_input(item, index))
    if not items:
        raise ValueError("calibration_dataset is empty: give at least one item")
    return items


def _check_config(config: Optional[igq.IGQConfig]) -> igq.IGQConfig:
    config = igq.IGQConfig() if config is None else config
    if not isinstance(config, igq.IGQConfig):
        raise TypeError(f"config must be an igq_plugin.IGQConfig, got {type(config).__name__}")
    if config.reconstruct_iters:
        raise ValueError("IGQConfig.reconstruct_iters: block reconstruction calls each block alone, where NNCF's "
                         "hooks do not run; use igq.quantize for reconstruction")
    if config.reparam:
        raise ValueError("IGQConfig.reparam folds LayerNorm scales into the next layers' modules, which the NNCF flow "
                         "keeps as they are (its quantizers are hooks): use igq.quantize for reparam")
    return config


# ---------------------------------------------------------------------------------------------- graph
def get_nncf_graph(model: nn.Module, example_input: Any):
    """The NNCF graph of ``model`` on ``example_input`` (a tensor, or a dict of keyword arguments): its
    node names and types are what an ``nncf.IgnoredScope`` names."""
    return build_nncf_graph(model, example_input)


def _module_name(node, graph) -> Optional[str]:
    """The module whose weight an op uses (its port-1 input is the constant ``<module>.weight``)."""
    for edge in graph.get_input_edges(node):
        name = edge.from_node.node_name
        if edge.input_port_id == 1 and edge.from_node.node_type == "nncf_model_const" and name.endswith(".weight"):
            return name[: -len(".weight")]
    return None


def _walk_back_to_matmul(node, graph, depth: int = 4):
    for _ in range(depth):
        sources = [e.from_node for e in graph.get_input_edges(node) if e.from_node.node_type != "nncf_model_const"]
        if not sources:
            return None
        producer = sources[0]
        if producer.node_type == "matmul":
            return producer
        if producer.node_type not in _SCORE_OPS:
            return None
        node = producer
    return None


def _walk_forward_to_matmul(node, graph, depth: int = 4):
    for _ in range(depth):
        edges = graph.get_output_edges(node)
        if len(edges) != 1:
            return None
        consumer = edges[0].to_node
        if consumer.node_type == "matmul":
            return consumer if edges[0].input_port_id == 0 else None
        if consumer.node_type not in _TRANSPARENT:
            return None
        node = consumer
    return None


def _port_shape(node, graph, port: int) -> tuple:
    for edge in graph.get_input_edges(node):
        if edge.input_port_id == port:
            return tuple(edge.tensor_shape)
    return ()


def _scope(node_name: str) -> str:
    """The module scope of an op (``blocks/0/attn/matmul/0`` -> ``blocks.0.attn``)."""
    return node_name.rsplit("/", 2)[0].strip("/").replace("/", ".")


# ---------------------------------------------------------------------------------------------- hooks
def _layer_hooks(model: nn.Module, graph, cfg: igq.IGQConfig, ignored: set) -> list:
    plans, seen = [], set()
    for node in graph.get_all_nodes():
        if node.node_type not in ("linear", "conv2d") or node.node_name in ignored:
            continue
        name = _module_name(node, graph)
        if name is None:
            continue
        if name in seen:  # a layer called twice: its first call is the site (one weight quantizer per layer)
            logger.warning("layer '%s' is called more than once: only its first call (%s) is quantized", name,
                           next(p[2][0][0] for p in plans if p[0] == name))
            continue
        seen.add(name)
        try:
            layer = model.get_submodule(name)
        except AttributeError:
            continue
        if not isinstance(layer, (nn.Linear, nn.Conv2d)):
            continue
        settings = igq.layer_settings(cfg, name, layer)
        if settings is None:
            continue
        linear = isinstance(layer, nn.Linear)
        kind = "linear_input" if linear else "conv_input"
        act = IGQInputHook(name, kind, channels=layer.in_features if linear else None, site=f"{name}.input_quantizer",
                           **igq.act_quantizer_kwargs(cfg, settings.a_bits, settings.scheme, settings.groups,
                                                      block_site=settings.block_site))
        w = igq.weight_quant_kwargs(cfg, settings.w_bits)
        weight = IGQWeightHook(name, layer.weight.shape[0], w["w_bits"], w["percentile"], w["clipping"])
        plans.append((name, 0, [(node.node_name, 0, act), (node.node_name, 1, weight)]))
    return plans


def _attention_hooks(graph, cfg: igq.IGQConfig, ignored: set) -> list:
    if not cfg.quantize_attention:
        return []
    fused = [n.node_name for n in graph.get_all_nodes() if n.node_type == "scaled_dot_product_attention"]
    if fused:
        logger.warning("%d fused attention op(s) (scaled_dot_product_attention, e.g. %s): their Q, K, V and softmax "
                       "stay in full precision (IGQ quantizes the unfused Q @ K^T -> softmax -> P @ V; timm models "
                       "are unfused automatically, Hugging Face models need attn_implementation='eager')",
                       len(fused), fused[0])
    plans = []
    for softmax in graph.get_nodes_by_types(["softmax"]):
        qk, pv = _walk_back_to_matmul(softmax, graph), _walk_forward_to_matmul(softmax, graph)
        if qk is None or pv is None:
            continue
        scope = _scope(qk.node_name)
        if matches(scope, cfg.skip):
            continue
        q_shape = _port_shape(qk, graph, 0)
        if len(q_shape) not in (3, 4):
            continue
        heads, head_dim = (q_shape[1], q_shape[-1]) if len(q_shape) == 4 else (1, q_shape[-1])
        channels = heads * head_dim
        hooks = []
        for tag, node, port, axis in (("q", qk, 0, -1), ("k", qk, 1, -2), ("v", pv, 1, -1)):
            if node.node_name not in ignored:
                kwargs = igq.attention_quantizer_kwargs(cfg, tag)
                hooks.append((node.node_name, port, IGQOperandHook(scope, tag, axis, head_dim, channels=channels,
                                                                   site=f"{scope}.{tag}_quantizer", **kwargs)))
        if softmax.node_name not in ignored and pv.node_name not in ignored:
            hooks.append((pv.node_name, 0, IGQSoftmaxHook(scope, head_dim, site=f"{scope}.softmax_quantizer",
                                                          **igq.attention_quantizer_kwargs(cfg, "softmax"))))
        plans.append((scope, 1, hooks))
    return plans


def _ordered(model: nn.Module, plans: list) -> list:
    """Hooks in the order igq.prepare registers its sites (module order; an attention's sites after its
    layers), so flows that go site by site (GPTQ rounding) see the same order."""
    position = {name: i for i, (name, _) in enumerate(model.named_modules())}

    def key(plan):
        name, is_attention, _ = plan
        if is_attention:
            inside = [i for n, i in position.items() if n == name or n.startswith(name + ".")]
            return (max(inside) + 0.5 if inside else len(position), 0)
        return (position.get(name, len(position)), 0)

    return [hook for plan in sorted(plans, key=key) for hook in plan[2]]


def _unfuse_attention(model: nn.Module) -> None:
    for module in model.modules():
        if hasattr(module, "fused_attn"):
            module.fused_attn = False  # fused SDPA hides the softmax and the matmuls the hooks sit on (timm)


def _igq_hooks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    if not is_wrapped(model):
        return []
    return [(name, hook) for name, hook in get_hook_storage(model).named_hooks() if isinstance(hook, HOOK_TYPES)]


def _op_of(hook_key: str) -> str:
    """The op name of a hook-storage key "pre_hooks.<op name, '.' as ':'>__<port>.<index>"."""
    return hook_key.split(".", 1)[1].rsplit("__", 1)[0].replace(":", ".")


def _check_exclusive(model: nn.Module, op_name: str) -> None:
    """Lowering moves IGQ's input quantizer into the layer: refuse when other NNCF hooks sit on that input."""
    prefix = f"pre_hooks.{op_name.replace('.', ':')}__0."
    others = sorted({type(h).__name__ for k, h in get_hook_storage(model).named_hooks()
                     if k.startswith(prefix) and not isinstance(h, HOOK_TYPES)})
    if others:
        raise ValueError(f"'{op_name}' has other NNCF hooks on its input ({', '.join(others)}, e.g. SmoothQuant's "
                         "scale): lowering would run them after IGQ's quantizer. Export a model quantized by "
                         "quantize_igq / IGQAlgorithm alone")


def register_sites(model: nn.Module) -> nn.Module:
    """Register the sites of the IGQ hooks of an NNCF-wrapped ``model`` (in place; returned): each weight
    hook is bound to its layer, each input hook paired with it, and timm attention is switched to its
    unfused forward (``fused_attn = False``: the attention hooks sit on its matmuls). Called by
    :func:`prepare_igq`. Call it after ``nncf.torch.load_from_config`` + ``load_state_dict`` on a fresh
    model: without it a timm model runs fused attention and skips the attention hooks."""
    hooks = _igq_hooks(model)
    _unfuse_attention(model)
    if not hooks:
        raise ValueError("the model has no IGQ hooks: quantize it with quantize_igq, or restore it with "
                         "nncf.torch.load_from_config(model, config, allowed_modules=ALLOWED_MODULES)")
    weights = {}
    for key, hook in hooks:
        if isinstance(hook, IGQWeightHook):
            hook.__dict__["check_lowering"] = functools.partial(_check_exclusive, model, _op_of(key))
            try:
                layer = model.get_submodule(hook.consumer)
            except AttributeError:
                raise ValueError(f"the IGQ weight hook of '{hook.consumer}' has no such layer in this model: restore "
                                 "the NNCF config into the model class it was saved from") from None
            hook.bind(layer)
            weights[hook.consumer] = hook
    clear_sites(model)
    for _, hook in hooks:
        if isinstance(hook, IGQWeightHook):
            continue
        record = hook.site_record()
        quantizer = hook.quantizer if isinstance(hook, IGQOperandHook) else hook
        igq.register_site(model, record["name"], record["kind"], quantizer, record["consumer"],
                          weight_quantizer=weights.get(record["consumer"]) if isinstance(hook, IGQInputHook) else None,
                          info=record["info"])
    return model


def _ignored_nodes(ignored_scope: Optional[nncf.IgnoredScope], graph) -> set:
    if ignored_scope is None:
        return set()
    if not isinstance(ignored_scope, nncf.IgnoredScope):
        raise TypeError(f"ignored_scope must be an nncf.IgnoredScope, got {type(ignored_scope).__name__}")
    from nncf.scopes import get_ignored_node_names_from_ignored_scope

    return set(get_ignored_node_names_from_ignored_scope(ignored_scope, graph, strict=ignored_scope.validate))


def _insert(model: nn.Module, cfg: igq.IGQConfig, example_input: Any, ignored_scope) -> None:
    """Wrap ``model`` (in place), insert the IGQ hooks, register the sites, calibrate the weight quantizers."""
    _unfuse_attention(model)
    graph = get_nncf_graph(model, example_input)
    ignored = _ignored_nodes(ignored_scope, graph)
    hooks = _ordered(model, _layer_hooks(model, graph, cfg, ignored) + _attention_hooks(graph, cfg, ignored))
    if not hooks:
        raise ValueError(f"model {type(model).__name__} has no quantizable op: no Linear / patch-embedding Conv2d "
                         f"outside the skip patterns {list(cfg.skip)} and the ignored scope")
    wrap_model(model)
    for op_name, port, hook in hooks:
        register_pre_function_hook(model, op_name, port, hook)
    register_sites(model)
    for site in igq.sites(model):
        if site.weight_quantizer is not None:
            site.weight_quantizer.calibrate_weight()
    setattr(model, CONFIG_ATTR, cfg)


def prepare_igq(model: nn.Module, example_input: Any, config: Optional[igq.IGQConfig] = None, *,
                ignored_scope: Optional[nncf.IgnoredScope] = None, observe: bool = True) -> nn.Module:
    """An NNCF-wrapped copy of ``model`` with IGQ hooks (module docstring), quantizers observing the next
    forward passes (``observe``): run calibration data through it, then ``igq.convert`` (or
    ``igq.finish_quantization``). :func:`quantize_igq` is prepare + calibrate + convert."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    cfg = _check_config(config)
    if igq.sites(model) or _igq_hooks(model):
        raise ValueError(f"model {type(model).__name__} already has igq quantizers: quantize the float model")
    prepared = copy.deepcopy(model).eval()
    _insert(prepared, cfg, example_input, ignored_scope)
    if observe:
        for _, quantizer in igq.iter_quantizers(prepared):
            quantizer.start_observer()
    return prepared


def quantize_igq(
    model: nn.Module,
    calibration_dataset: "nncf.Dataset",
    *,
    config: Optional[igq.IGQConfig] = None,
    subset_size: int = 300,
    ignored_scope: Optional[nncf.IgnoredScope] = None,
    model_type: Optional["nncf.ModelType"] = nncf.ModelType.TRANSFORMER,
    fast_bias_correction: Optional[bool] = None,
    progress: bool = True,
) -> nn.Module:
    """IGQ post-training quantization with ``nncf.quantize``'s arguments; returns a quantized, NNCF-wrapped
    copy (``model`` is not changed).

    calibration_dataset: ``nncf.Dataset``; its transform returns the model input (a tensor, a 1-tuple or a
        dict of keyword arguments). The first ``subset_size`` items are used (batches, for a DataLoader).
    config: the IGQConfig (default IGQConfig()); every IGQ flow (GPTQ rounding, group allocation) applies.
    ignored_scope: ``nncf.IgnoredScope`` of NNCF node names, regex patterns and op types (module docstring).
    model_type: ``nncf.ModelType.TRANSFORMER`` or None; IGQ quantizes the sites the config names either way.
    fast_bias_correction: IGQ has no bias-correction step; None or False.

    As with every NNCF model, the hooks run in ``qmodel(x)`` only (NNCF wraps ``forward``): another entry
    point (timm's ``forward_features``) runs unquantized; quantize a module whose ``forward`` is it.
    """
    if model_type not in (None, nncf.ModelType.TRANSFORMER):
        raise ValueError(f"model_type must be nncf.ModelType.TRANSFORMER or None (IGQ is for transformers), got "
                         f"{model_type!r}")
    if fast_bias_correction:
        raise ValueError("fast_bias_correction=True: IGQ has no bias-correction step (its static group ranges are "
                         "fitted to the calibration data); pass None or False")
    cfg = _check_config(config)
    items = _calibration_items(calibration_dataset, subset_size)
    prepared = prepare_igq(model, items[0], cfg, ignored_scope=ignored_scope)
    return igq.calibrate_and_convert(prepared, items, progress=progress)


# ---------------------------------------------------------------------------------- NNCF Algorithm
def _algorithm_base():
    from nncf.quantization.algorithms.algorithm import Algorithm

    return Algorithm


class IGQAlgorithm(_algorithm_base()):
    """IGQ as an NNCF ``Algorithm``, for an NNCF ``Pipeline`` (e.g. after ``SmoothQuant``)::

        from nncf.quantization.algorithms.pipeline import Pipeline
        from nncf.quantization.algorithms.smooth_quant.algorithm import SmoothQuant
        from nncf.torch.function_hook import wrap_model
        from nncf.torch.function_hook.nncf_graph.nncf_graph_builder import GraphModelWrapper

        model = GraphModelWrapper(wrap_model(copy.deepcopy(model)), example_input=x)
        pipeline = Pipeline([[SmoothQuant(subset_size=32)], [IGQAlgorithm(igq.IGQConfig(), subset_size=32)]])
        qmodel = pipeline.run(model, nncf.Dataset(batches)).model

    ``get_statistic_points`` inserts the IGQ hooks into the model (in place, observing) and asks NNCF for
    per-instance per-channel min / max (``MinReducer`` / ``MaxReducer`` over the token axes, kept per
    sample) at every Linear-input site whose range rule needs only ranges; the other sites (attention
    operands, softmax rows, sample-based rules) observe in the same NNCF calibration pass through their
    own hooks. ``apply`` gives NNCF's statistics to those sites and fits every range (igq.finish_quantization).
    NNCF's Pipeline does not pass the dataset to ``apply``: configs that run the data again (GPTQ rounding,
    group allocation) need ``calibration_dataset`` here.
    """

    KEY = "IGQAlgorithm"

    def __init__(self, config: Optional[igq.IGQConfig] = None, *, subset_size: int = 300,
                 ignored_scope: Optional[nncf.IgnoredScope] = None,
                 calibration_dataset: Optional["nncf.Dataset"] = None, progress: bool = True) -> None:
        self.config = _check_config(config)
        _check_subset_size(subset_size)
        self.subset_size = subset_size
        self.ignored_scope = ignored_scope
        self.calibration_dataset = calibration_dataset
        self.progress = progress
        self._collected: dict[str, nn.Module] = {}  # NNCF node name -> hook fed by NNCF's statistics

    @property
    def available_backends(self):
        from nncf.common.utils.backend import BackendType

        return [BackendType.TORCH]

    @staticmethod
    def _module(model):
        return getattr(model, "model", model)  # a GraphModelWrapper holds the nn.Module

    def _prepare(self, model) -> nn.Module:
        module = self._module(model)
        if not _igq_hooks(module):
            example = getattr(model, "example_input", None)
            if example is None:
                raise ValueError("IGQAlgorithm needs the model's example input: pass a GraphModelWrapper(model, "
                                 "example_input=...) to the pipeline")
            _insert(module, self.config, example, self.ignored_scope)
            for _, quantizer in igq.iter_quantizers(module):
                quantizer.start_observer()
            if hasattr(model, "reset_graph"):
                model.reset_graph()
        return module

    def get_statistic_points(self, model, graph):
        from nncf.common.graph.transformations.commands import TargetType
        from nncf.common.tensor_statistics.statistic_point import StatisticPoint, StatisticPointsContainer
        from nncf.common.tensor_statistics.collectors import (MaxReducer, MinReducer, NoopAggregator, ShapeReducer,
                                                              TensorCollector)
        from nncf.torch.graph.transformations.commands import PTTargetPoint

        module = self._prepare(model)
        container = StatisticPointsContainer()
        self._collected = {}
        nodes = {n.node_name: n for n in graph.get_all_nodes()}
        for name, hook in _igq_hooks(module):
            observer = getattr(hook, "observer", None)
            if not isinstance(hook, IGQInputHook) or type(observer) is not ChannelRangeObserver:
                continue
            op_name = _op_of(name)
            shape = _port_shape(nodes[op_name], graph, 0) if op_name in nodes else ()
            if len(shape) != 3 or hook.instance_dims != 1:
                continue  # [B, N, C] only; other layouts observe through the hook itself
            collector = TensorCollector()
            collector.register_statistic_branch("lo", MinReducer(axes=(1,)), NoopAggregator(self.subset_size))
            collector.register_statistic_branch("hi", MaxReducer(axes=(1,)), NoopAggregator(self.subset_size))
            point = PTTargetPoint(TargetType.OPERATOR_PRE_HOOK, op_name, input_port_id=0)
            container.add_statistic_point(StatisticPoint(point, collector, self.KEY))
            hook.fake_quant_enabled = False  # NNCF observes this site: the hook passes through during the pass
            self._collected[op_name] = hook
        if not self._collected:  # NNCF runs its calibration pass only for statistic points: ask for one
            node = next(n for n in graph.get_all_nodes() if n.node_type in ("linear", "matmul", "conv2d"))
            collector = TensorCollector()
            collector.register_statistic_branch("shape", ShapeReducer(), NoopAggregator(self.subset_size))
            point = PTTargetPoint(TargetType.OPERATOR_PRE_HOOK, node.node_name, input_port_id=0)
            container.add_statistic_point(StatisticPoint(point, collector, self.KEY))
        return container

    def apply(self, model, graph, statistic_points=None, dataset=None):
        """Fit the ranges from the statistics of :meth:`get_statistic_points`; called on its own (no statistics,
        hooks not inserted yet) it inserts the hooks and runs the calibration pass over ``dataset`` itself."""
        fresh = not _igq_hooks(self._module(model))
        data = dataset if dataset is not None else self.calibration_dataset
        items = _calibration_items(data, self.subset_size) if data is not None else None
        if fresh and items is None:  # checked before the model changes
            raise ValueError("IGQAlgorithm.apply without its statistics needs the calibration data: pass "
                             "dataset=nncf.Dataset(...) or run it in an nncf Pipeline")
        module = self._prepare(model)
        if fresh:
            igq.calibrate(module, items, progress=self.progress)
        elif self._collected:
            if statistic_points is None:
                raise ValueError("IGQAlgorithm.apply needs the statistics of its get_statistic_points (run it in an "
                                 "nncf Pipeline)")
            for algorithm, point, collector in statistic_points.get_tensor_collectors():
                hook = self._collected.get(point.target_point.target_node_name)
                if algorithm != self.KEY or hook is None:
                    continue
                stats = collector.get_statistics()
                for lo, hi in zip(stats["lo"], stats["hi"]):
                    lo, hi = lo.data, hi.data
                    hook.observer.add_ranges(lo.reshape(-1, lo.shape[-1]), hi.reshape(-1, hi.shape[-1]))
                hook.fake_quant_enabled = True
        igq.finish_quantization(module, items, progress=self.progress)
        if hasattr(model, "reset_graph"):
            model.reset_graph()
        return model


# ------------------------------------------------------------------------- NNCF-style config files
COMPRESSION_KEYS = {
    "algorithm": "must be \"igq\"",
    "weight_bits": "IGQConfig.weight_bits",
    "activation_bits": "IGQConfig.act_bits",
    "num_groups": "IGQConfig.num_groups",
    "ignored_scopes": "NNCF node names; \"{re}<regex>\" for a pattern (NNCF 2.x syntax)",
    "ignored_types": "NNCF op types (linear, matmul, softmax, conv2d)",
    "subset_size": "calibration items (default 300)",
    "initializer": "{\"range\": {\"num_init_samples\": N}} (NNCF 2.x: N samples, i.e. N / batch size items)",
    "igq": "any other IGQConfig fields, e.g. {\"act_grid\": 8, \"softmax_quantizer\": \"tanq\"}",
}
TOP_LEVEL_KEYS = ("input_info", "compression")


def _compression_section(config: dict) -> dict:
    unknown = sorted(set(config) - set(TOP_LEVEL_KEYS))
    if unknown:
        raise ValueError(f"unknown config key(s) {unknown}; valid top-level keys: {list(TOP_LEVEL_KEYS)}")
    section = config.get("compression")
    if isinstance(section, list):
        if len(section) != 1:
            raise ValueError(f"'compression' lists {len(section)} algorithms; IGQ runs one: give one dict")
        section = section[0]
    if not isinstance(section, dict):
        raise ValueError("the config needs a 'compression' dict, e.g. {\"algorithm\": \"igq\", \"weight_bits\": 4}")
    unknown = sorted(set(section) - set(COMPRESSION_KEYS))
    if unknown:
        valid = "; ".join(f"{k}: {v}" for k, v in COMPRESSION_KEYS.items())
        raise ValueError(f"unknown 'compression' key(s) {unknown}; valid keys: {valid}")
    if section.get("algorithm") != "igq":
        raise ValueError(f"compression.algorithm must be \"igq\", got {section.get('algorithm')!r}")
    return section


def _check_input_info(info: Any, first: Any) -> None:
    if info is None:
        return
    entries = info if isinstance(info, list) else [info]
    if len(entries) != 1 or not isinstance(entries[0], dict) or "sample_size" not in entries[0]:
        raise ValueError("input_info must be {\"sample_size\": [B, C, H, W]} (one model input)")
    size = list(entries[0]["sample_size"])
    if isinstance(first, torch.Tensor) and list(first.shape[1:]) != size[1:]:
        raise ValueError(f"input_info.sample_size {size} does not match the calibration data, shaped "
                         f"{list(first.shape)} (sizes after the batch dimension must agree)")


def create_compressed_model(model: nn.Module, config: Union[dict, str, os.PathLike],
                            dataset: "nncf.Dataset", *, progress: bool = True) -> nn.Module:
    """Quantize ``model`` with IGQ from an NNCF 2.x-style config (a dict or a JSON file path)::

        {"input_info": {"sample_size": [1, 3, 224, 224]},
         "compression": {"algorithm": "igq", "weight_bits": 4, "activation_bits": 4, "num_groups": 8,
                         "ignored_scopes": ["head/linear/0", "{re}.*attn/softmax.*"], "subset_size": 32,
                         "igq": {"act_grid": 8}}}

    Returns the quantized model (NNCF 2.x returned a controller too; IGQ has nothing to control). The
    same call as ``quantize_igq(model, dataset, config=..., subset_size=..., ignored_scope=...)``;
    every key is validated (an unknown one is an error listing the valid ones)."""
    if isinstance(config, (str, os.PathLike)):
        with open(config) as f:
            config = json.load(f)
    if not isinstance(config, dict):
        raise TypeError(f"config must be a dict or a JSON file path, got {type(config).__name__}")
    section = _compression_section(config)
    if not isinstance(section.get("igq", {}), dict):
        raise ValueError(f"compression.igq must be a dict of IGQConfig fields, got {section['igq']!r}")
    fields = dict(section.get("igq", {}))
    for key, field in (("weight_bits", "weight_bits"), ("activation_bits", "act_bits"), ("num_groups", "num_groups")):
        if key in section:
            if field in fields:
                raise ValueError(f"compression.{key} and compression.igq.{field} both given: give one")
            fields[field] = section[key]
    cfg = igq.IGQConfig.from_dict(fields)
    subset_size = section.get("subset_size", 300)
    if "initializer" in section:
        try:
            samples = section["initializer"]["range"]["num_init_samples"]
        except (KeyError, TypeError):
            raise ValueError("compression.initializer must be {\"range\": {\"num_init_samples\": N}}") from None
        if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
            raise ValueError(f"compression.initializer.range.num_init_samples must be an int >= 1, got {samples!r}")
        batch = dataset.get_batch_size() if isinstance(dataset, nncf.Dataset) else None
        subset_size = -(-samples // batch) if batch else samples  # NNCF 2.x counted samples, not batches
    _check_subset_size(subset_size, "compression.subset_size")
    names, patterns = [], []
    if not isinstance(section.get("ignored_scopes", []), list):
        raise ValueError(f"compression.ignored_scopes must be a list of node names / \"{{re}}\" patterns, got "
                         f"{section['ignored_scopes']!r}")
    for entry in section.get("ignored_scopes", []):
        if not isinstance(entry, str):
            raise ValueError(f"compression.ignored_scopes entries are strings, got {entry!r}")
        (patterns.append(entry[4:]) if entry.startswith("{re}") else names.append(entry))
    types = section.get("ignored_types", [])
    if not isinstance(types, list) or not all(isinstance(t, str) for t in types):
        raise ValueError(f"compression.ignored_types must be a list of NNCF op types (e.g. [\"softmax\"]), got {types!r}")
    scope = nncf.IgnoredScope(names=names, patterns=patterns, types=types) if names or patterns or types else None
    items = _calibration_items(dataset, subset_size)
    _check_input_info(config.get("input_info"), items[0])
    return quantize_igq(model, dataset, config=cfg, subset_size=subset_size, ignored_scope=scope, progress=progress)
