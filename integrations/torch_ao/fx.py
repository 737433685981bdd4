"""torch.ao FX flow: ``prepare_fx`` / ``prepare_qat_fx`` with an IGQ qconfig mapping, ``convert_igq_fx``.

* prepare_fx puts an :class:`IGQFakeQuantize` (a torch.ao ``FakeQuantizeBase``) wherever the
  qconfig mapping asks: Linear inputs (and outputs, which IGQ leaves in float), and with
  ``backend_config=get_igq_backend_config()`` the inputs of every matmul. Each one holds core
  quantizers, created on the first batch, when the shape is known. While observing, it passes
  values through unchanged.
* A matmul input's role is only known from the graph (Q, K^T, V or the softmax output of an
  unfused attention, see ``_graph``), which a fake-quant module does not see. So it observes the
  three candidate readings of its tensor (channels last, channels on axis -2, softmax rows) and
  :func:`convert_igq_fx` / :func:`fit_ranges` keep the one the graph says.
* ``convert_igq_fx`` replaces each kept fake-quant module by its core quantizer (whose forward is
  the ``igq::group_fake_quant`` / ``igq::softmax_row_fake_quant`` op), each fed Linear by an
  :class:`igq_plugin.QuantLinear`, registers every site (``igq.register_site``), drops the rest
  and calls ``igq.convert``: group ranges and weight quantizers are the core's, and GPTQ rounding
  and ``igq.report`` work through the sites. Persist a converted model with ``torch.export``
  (``igq.save`` / ``igq.load`` rebuild igq.prepare's module structure, not a traced graph's).
* QAT: ``prepare_qat_fx`` with the same mapping; run calibration batches, call
  :func:`fit_ranges` (fits the group ranges and makes them trainable parameters), train (weights
  are fake-quantized by :class:`IGQWeightFakeQuantize`, the core's per-channel rule), then
  ``convert_igq_fx``.
"""
from __future__ import annotations

import contextlib
import copy
import fnmatch
import inspect
import logging
import operator
from typing import Any, Optional

import torch
from torch import nn
from torch.ao.quantization import QConfig, QConfigMapping
from torch.ao.quantization.fake_quantize import FakeQuantizeBase
from torch.ao.quantization.observer import ObserverBase, PlaceholderObserver

import igq_plugin as igq
from igq_plugin import ops
from igq_plugin.attention import OperandQuantizer
from igq_plugin.config import CONFIG_ATTR
from igq_plugin.modules import note_group_clamp
from igq_plugin.quantize import matches

from . import _graph

logger = logging.getLogger("igq_plugin")

__all__ = ["IGQFakeQuantize", "IGQWeightFakeQuantize", "get_igq_qconfig", "get_igq_qconfig_mapping",
           "get_igq_backend_config", "prepare_igq_fx", "fit_ranges", "convert_igq_fx"]

_MATMUL_TYPES = (operator.matmul, torch.matmul, "matmul")


def _is_observer(module: nn.Module) -> bool:
    return isinstance(module, (FakeQuantizeBase, ObserverBase))


@contextlib.contextmanager
def _quiet_igq_log():
    core_logger = logging.getLogger("igq_plugin")
    level = core_logger.level
    core_logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        core_logger.setLevel(level)


class IGQFakeQuantize(FakeQuantizeBase):
    """A torch.ao fake-quant module holding core quantizers (created on the first batch).

    ``role="input"``: a Linear / patch-embedding input; ``quantizer_kwargs`` are its ActQuantizer's
    (bits, scheme, groups, calibration options). ``role="matmul"``: a matmul input, quantized as the
    attention site the graph makes it (``config`` gives the settings; see the module docstring).
    torch.ao requires a quint8 ``dtype`` and an ``activation_post_process``; the latter is a
    placeholder that does no work. ``calculate_qparams`` is never used (``convert_fx`` would, and
    would collapse the groups).
    """

    # the ActQuantizer settings a qconfig may carry (torch.ao adds keyword arguments of its own)
    _KEYS = tuple(k for k in inspect.signature(igq.ActQuantizer).parameters if k not in ("channels", "site"))

    def __init__(self, role: str = "input", config: Optional[igq.IGQConfig] = None, **quantizer_kwargs: Any) -> None:
        super().__init__()
        if role not in ("input", "matmul"):
            raise ValueError(f"IGQFakeQuantize role must be 'input' or 'matmul', got {role!r}")
        self.dtype = torch.quint8
        self.activation_post_process = PlaceholderObserver(dtype=torch.quint8)
        self.role = role
        self.config = config if config is not None else igq.IGQConfig()
        # torch.ao adds its own keyword arguments (factory_kwargs): keep the quantizer's
        self.quantizer_kwargs = {k: v for k, v in quantizer_kwargs.items() if k in self._KEYS}
        self.quantizer: Optional[nn.Module] = None  # the site's registered quantizer
        self.site_module: Optional[nn.Module] = None  # what the graph calls after convert (quantizer or wrapper)
        self.candidates: Optional[nn.ModuleDict] = None  # matmul inputs before the graph says their role
        self.seen = False  # a batch came through (a matmul input that is no attention operand makes no quantizer)

    @property
    def observed(self) -> bool:
        return self.quantizer is not None or self.candidates is not None

    def _start(self, x: torch.Tensor) -> None:
        self.seen = True
        with _quiet_igq_log():  # most of these observe layer outputs, dropped at convert: no group-count notes
            self._create(x)

    def _create(self, x: torch.Tensor) -> None:
        if self.role == "input":
            kwargs = dict(self.quantizer_kwargs)
            channels = x.shape[-1] if kwargs.get("scheme") != "layer" else None
            self.quantizer = self.site_module = igq.ActQuantizer(channels=channels, **kwargs).to(x.device)
            self.quantizer.start_observer()
            return
        if x.dim() not in (3, 4):
            return  # not an attention operand: never bound, dropped at convert
        heads = x.shape[1] if x.dim() == 4 else 1
        candidates = {
            "last": OperandQuantizer(igq.attention_quantizer(self.config, "", "q", heads * x.shape[-1]), -1),
            "penultimate": OperandQuantizer(igq.attention_quantizer(self.config, "", "k", heads * x.shape[-2]), -2),
            "softmax": igq.attention_quantizer(self.config, "", "softmax"),
        }
        self.candidates = nn.ModuleDict(candidates).to(x.device)
        for module in self.candidates.values():
            (module.quantizer if isinstance(module, OperandQuantizer) else module).start_observer()
        self.shape = tuple(x.shape)

    def bind(self, tag: str, site: str) -> None:
        """Keep the candidate reading of site ``tag`` ("q", "k", "v", "softmax") named ``site``."""
        if self.site_module is None:
            key = {"q": "last", "v": "last", "k": "penultimate", "softmax": "softmax"}[tag]
            self.site_module = self.candidates[key]
            self.candidates = None
            self.quantizer = self.site_module.quantizer if isinstance(self.site_module, OperandQuantizer) \
                else self.site_module
        for q in (self.quantizer, getattr(self.quantizer, "observer", None)):
            if q is not None:
                q.site = site

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.fake_quant_enabled[0]:
            return x
        if self.site_module is not None:
            return self.site_module(x)
        if not self.observed:
            self._start(x)
            if self.site_module is not None:
                return self.site_module(x)
        if self.candidates is not None:
            for module in self.candidates.values():
                module(x)  # observing: returns x unchanged
        return x

    def calculate_qparams(self):
        raise RuntimeError("IGQFakeQuantize has per-instance group ranges, not one (scale, zero point): convert with "
                           "igq_plugin.integrations.torch_ao.convert_igq_fx, not torch.ao's convert_fx")


class WeightFakeQuantMixin:
    """Per-output-channel weight fake-quant by the core's clipping rule (``ops.clipped_weight_qparams``)
    on the current weights, straight-through gradients. Shared by the FX and pt2e flows."""

    def _init_weight_quant(self, w_bits: int, clipping: str, percentile: float) -> None:
        self.w_bits, self.clipping, self.percentile = ops.check_bits(w_bits, "w_bits"), clipping, percentile

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        if not self.fake_quant_enabled[0]:
            return w
        scale, zero_point = ops.clipped_weight_qparams(w.detach(), self.w_bits, self.clipping, self.percentile)
        return ops.fake_quantize_weight(w, scale, zero_point, self.w_bits)

    def extra_repr(self) -> str:
        return f"w_bits={self.w_bits}, clipping={self.clipping}, percentile={self.percentile:g}"


class IGQWeightFakeQuantize(WeightFakeQuantMixin, FakeQuantizeBase):
    """Weight fake-quant of a Linear while calibrating (prepare_igq_fx, calibration_weights="quantized")
    and training (``prepare_qat_fx``). Not used by a plain post-training prepare_fx (weights are
    quantized by the core at convert)."""

    def __init__(self, w_bits: int = 8, clipping: str = "percentile", percentile: float = 0.0, **_: Any) -> None:
        super().__init__()
        self.dtype = torch.float  # torch.ao: this is not one of its own integer weight observers
        self.activation_post_process = PlaceholderObserver(dtype=torch.float)
        self._init_weight_quant(w_bits, clipping, percentile)

    def calculate_qparams(self):
        raise RuntimeError("IGQWeightFakeQuantize is converted by convert_igq_fx, not torch.ao's convert_fx")


def _qconfig(cfg: igq.IGQConfig, act_kwargs: dict, w_bits: int) -> QConfig:
    return QConfig(activation=IGQFakeQuantize.with_args(role="input", **act_kwargs),
                   weight=IGQWeightFakeQuantize.with_args(**igq.weight_quant_kwargs(cfg, w_bits)))


def check_flow_config(cfg: Optional[igq.IGQConfig], flow: str) -> igq.IGQConfig:
    """The config (default IGQConfig()) if the torch.ao flows can build it; a clear error otherwise."""
    cfg = igq.IGQConfig() if cfg is None else cfg
    if not isinstance(cfg, igq.IGQConfig):
        raise TypeError(f"cfg must be an igq_plugin.IGQConfig, got {type(cfg).__name__}")
    if cfg.reparam:
        raise ValueError(f"reparameterization (IGQConfig.reparam) is not part of the {flow} flow yet: use "
                         "igq.quantize, or reparam=None")
    if cfg.group_allocation is not None:
        raise ValueError(f"group allocation (IGQConfig.group_allocation) is not part of the {flow} flow yet: use "
                         "igq.quantize, or group_allocation=None")
    return cfg


def _check_cfg(cfg: Optional[igq.IGQConfig]) -> igq.IGQConfig:
    return check_flow_config(cfg, "torch.ao FX")


def get_igq_qconfig(cfg: Optional[igq.IGQConfig] = None, *, bits: Optional[int] = None, scheme: Optional[str] = None,
                    num_groups: Optional[int] = None) -> QConfig:
    """The QConfig of a transformer-block Linear under ``cfg`` (default IGQConfig()); ``bits`` /
    ``scheme`` / ``num_groups`` override the config's act_bits / act_scheme / num_groups."""
    cfg = _check_cfg(cfg)
    return _qconfig(cfg, igq.act_quantizer_kwargs(cfg, cfg.act_bits if bits is None else bits,
                                                  cfg.act_scheme if scheme is None else scheme,
                                                  cfg.num_groups if num_groups is None else num_groups),
                    cfg.weight_bits)


def _regex(patterns: tuple[str, ...]) -> Optional[str]:
    return "|".join(f"(?:{fnmatch.translate(p)})" for p in patterns) if patterns else None


def get_igq_qconfig_mapping(cfg: Optional[igq.IGQConfig] = None) -> QConfigMapping:
    """A QConfigMapping for ``prepare_fx`` / ``prepare_qat_fx``: every nn.Linear under ``cfg``, the
    ``head_patterns`` / ``embed_patterns`` modules layer-wise at their bits (``skip`` modules are
    observed but left float by :func:`convert_igq_fx`, by the core's rule), and with
    ``quantize_attention`` the matmul inputs (pass ``backend_config=get_igq_backend_config()`` so
    that torch.ao observes the ``@`` operator)."""
    cfg = _check_cfg(cfg)
    mapping = QConfigMapping().set_object_type(nn.Linear, get_igq_qconfig(cfg))
    if cfg.quantize_attention:
        matmul = QConfig(activation=IGQFakeQuantize.with_args(role="matmul", config=cfg),
                         weight=PlaceholderObserver.with_args(dtype=torch.float))
        for op in _MATMUL_TYPES:
            mapping = mapping.set_object_type(op, matmul)
    for patterns, bits in ((cfg.embed_patterns, cfg.embed_bits), (cfg.head_patterns, cfg.head_bits)):
        regex = _regex(patterns)
        if regex:
            layer = None if bits is None else _qconfig(cfg, igq.act_quantizer_kwargs(cfg, bits, "layer", 1,
                                                                                     block_site=False), bits)
            mapping = mapping.set_module_name_regex(regex, layer)
    # ``skip`` is applied by convert_igq_fx / fit_ranges with the core's rule (each module's own name):
    # a torch.ao module-name qconfig of None would also leave every child of a matching module float.
    mapping.igq_config = cfg  # prepare_fx keeps a copy of the mapping on the model: convert_igq_fx reads it there
    return mapping


def get_igq_backend_config():
    """torch.ao's native BackendConfig plus the ``@`` operator and ``Tensor.matmul`` as observed patterns
    (native observes ``torch.matmul`` only), so the attention matmuls of timm / Hugging Face eager
    attention get IGQ sites. Pass it as ``prepare_fx(..., backend_config=get_igq_backend_config())``."""
    from torch.ao.quantization.backend_config import (BackendPatternConfig, DTypeConfig, ObservationType,
                                                      get_native_backend_config)

    config = get_native_backend_config()
    dtypes = [DTypeConfig(input_dtype=torch.quint8, output_dtype=torch.quint8)]
    for op in (operator.matmul, "matmul"):
        config.set_backend_pattern_config(
            BackendPatternConfig(op).set_dtype_configs(dtypes)
            .set_observation_type(ObservationType.OUTPUT_USE_DIFFERENT_OBSERVER_AS_INPUT))
    return config


class _ScopeTracer(torch.fx.Tracer):
    """A tracer that remembers which module it was inside when tracing failed."""

    def __init__(self) -> None:
        super().__init__()
        self.stack: list[tuple[str, str]] = []  # (not "scope": torch.fx.Tracer uses that name)
        self.failed_at: Optional[tuple[str, str]] = None

    def call_module(self, m, forward, args, kwargs):
        self.stack.append((self.path_of_module(m), type(m).__name__))
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            if self.failed_at is None:
                self.failed_at = self.stack[-1]
            raise
        finally:
            self.stack.pop()


def _untraceable(model: nn.Module) -> Optional[RuntimeError]:
    """A clear error naming the module torch.fx cannot trace (None when the model traces: the failure
    was not tracing)."""
    tracer = _ScopeTracer()
    try:
        tracer.trace(model)
        return None
    except Exception as trace_err:  # noqa: BLE001 - any failure of torch.fx tracing
        where = tracer.failed_at
        first = (str(trace_err).strip().splitlines() or [type(trace_err).__name__])[0]
    target = f"'{where[0]}' ({where[1]})" if where else f"the top-level forward of {type(model).__name__}"
    names = f"['{where[0]}']" if where else "[...]"
    return RuntimeError(
        f"torch.fx cannot trace {target}: {first}. Ways out: leave that module untraced (and in float) with "
        f"prepare_custom_config=PrepareCustomConfig().set_non_traceable_module_names({names}); or use the pt2e flow "
        "(prepare_pt2e(torch.export.export(model, args).module(), IGQQuantizer(cfg))); or igq.quantize(model, cfg, "
        "data), which needs no tracing")


def prepare_igq_fx(model: nn.Module, cfg: Optional[igq.IGQConfig] = None, example_inputs: tuple = (), *,
                   qat: bool = False, prepare_custom_config=None, backend_config=None) -> torch.fx.GraphModule:
    """``prepare_fx`` (``prepare_qat_fx`` with ``qat``) with :func:`get_igq_qconfig_mapping` and
    :func:`get_igq_backend_config`, plus what plain prepare_fx cannot do: weights fake-quantized while
    calibrating when ``cfg.calibration_weights == "quantized"`` (the default, as igq.quantize does; a
    plain prepare_fx model calibrates with float weights), and a clear error naming the module torch.fx
    cannot trace. It works on a copy: the user's model and its parameters are not modified, also not by
    QAT training (a plain prepare_fx shares the parameters with it)."""
    from torch.ao.quantization import quantize_fx

    cfg = _check_cfg(cfg)
    if not isinstance(example_inputs, tuple):
        raise TypeError(f"example_inputs must be a tuple of the model's inputs, got {type(example_inputs).__name__}")
    prepare = quantize_fx.prepare_qat_fx if qat else quantize_fx.prepare_fx
    model = copy.deepcopy(model)  # prepare_fx shares the parameters: QAT would train the user's model
    try:
        prepared = prepare(model, get_igq_qconfig_mapping(cfg), example_inputs,
                           prepare_custom_config=prepare_custom_config,
                           backend_config=backend_config or get_igq_backend_config())
    except Exception as err:
        clear = _untraceable(model) if prepare_custom_config is None else None
        if clear is not None:
            raise clear from err
        raise
    if cfg.calibration_weights == "quantized" or qat:
        for node in prepared.graph.nodes:
            module = prepared.get_submodule(node.target) if node.op == "call_module" else None
            if isinstance(module, IGQFakeQuantize) and module.role == "input":
                for name in _quantized_layers(prepared, node, cfg) or ():
                    _weight_fake_quant(prepared, cfg, name)
        prepared.recompile()
    return prepared


def _mapping_config(prepared: torch.fx.GraphModule) -> Optional[igq.IGQConfig]:
    attrs = prepared.meta.get("_observed_graph_module_attrs")
    cfg = getattr(getattr(attrs, "qconfig_mapping", None), "igq_config", None)
    return cfg if isinstance(cfg, igq.IGQConfig) else None


def _quantized_layers(gm: torch.fx.GraphModule, node: torch.fx.Node, cfg: igq.IGQConfig) -> Optional[list[str]]:
    """Names of the Linear / Conv2d modules whose input is ``node`` and that the config quantizes
    (igq.layer_settings), or None. torch.ao may share that observer with other users, e.g. a residual
    add, which keep the float tensor."""
    names = [user.target for user in node.users
             if user.op == "call_module" and user.args and user.args[0] is node
             and isinstance(gm.get_submodule(user.target), (nn.Linear, nn.Conv2d))
             and igq.layer_settings(cfg, user.target, gm.get_submodule(user.target)) is not None]
    return names or None


def _operand_role(node: torch.fx.Node, operands: dict) -> Optional[tuple[str, str]]:
    """(attention scope, tag) when every use of ``node`` is the same attention operand; else None."""
    roles = set()
    for user in node.users:
        for index, arg in enumerate(user.args[:2]):
            if arg is node:
                roles.add(operands.get((user, index)))
    return roles.pop() if len(roles) == 1 else None


def _plan(prepared: torch.fx.GraphModule, cfg: igq.IGQConfig) -> tuple[list, list]:
    """Decide and validate, before anything changes: [(node, fake quant, ("layers", names) |
    ("operand", scope, tag))] to keep and [nodes] to drop."""
    fake_quants = [(n, prepared.get_submodule(n.target)) for n in prepared.graph.nodes
                   if n.op == "call_module" and isinstance(prepared.get_submodule(n.target), IGQFakeQuantize)]
    if not fake_quants:
        raise ValueError("no IGQFakeQuantize in this model: prepare it with prepare_fx(model, "
                         "get_igq_qconfig_mapping(cfg), example_inputs) first")
    mixed = [n for n in prepared.graph.nodes if n.op == "call_module" and _is_observer(prepared.get_submodule(n.target))
             and not isinstance(prepared.get_submodule(n.target), IGQFakeQuantize)]
    if mixed:
        raise ValueError(f"the model mixes torch.ao's own fake-quant / observers ({mixed[0].target}) with IGQ ones: "
                         "build the qconfig mapping with get_igq_qconfig_mapping only")
    operands = _graph.operand_sites(prepared, _is_observer) if cfg.quantize_attention else {}
    fq_nodes = {node for node, _ in fake_quants}
    observed_matmuls = {m for (m, index) in operands if m.args[index] in fq_nodes}
    kept, dropped = [], []
    for node, fq in fake_quants:
        operand = _operand_role(node, operands)
        if operand is not None and fq.role != "matmul":
            raise ValueError(
                f"'{node.target}' observes both a layer's output and the {operand[1]} operand of '{operand[0]}' "
                "(torch.ao shares one observer between them): put a float op between them, or quantize this model "
                "with igq.quantize or the pt2e flow")
        if operand is not None and matches(operand[0], cfg.skip):
            dropped.append(node)
            continue
        if operand is not None:
            if not fq.observed:
                if fq.seen:  # a matmul of tensors that are no [B, H, N, d] attention operands
                    dropped.append(node)
                    continue
                raise RuntimeError(f"'{node.target}' ({operand[1]} operand of '{operand[0]}') saw no calibration "
                                   "batch: run calibration data through the prepared model first")
            kept.append((node, fq, ("operand",) + operand))
            continue
        layers = _quantized_layers(prepared, node, cfg) if fq.role == "input" else None
        if layers is None:  # torch.ao also observes outputs (and other matmuls): IGQ keeps those in float
            dropped.append(node)
            continue
        if not fq.observed:
            raise RuntimeError(f"'{node.target}' (input of {', '.join(layers)}) saw no calibration batch: run "
                               "calibration data through the prepared model before convert_igq_fx")
        for name in layers:  # torch.ao may reuse the previous layer's output observer as this input's
            settings = igq.layer_settings(cfg, name, prepared.get_submodule(name))
            q = fq.quantizer
            if (q.bits, q.scheme) != (settings.a_bits, settings.scheme):
                raise ValueError(
                    f"the input of '{name}' is observed with {q.bits}-bit {q.scheme!r} ranges but the config gives it "
                    f"{settings.a_bits}-bit {settings.scheme!r} (torch.ao shares one observer between a layer's output "
                    "and the next layer's input): put a float op between them, or quantize this model with igq.quantize"
                )
        kept.append((node, fq, ("layers", layers)))
    _check_single_use(prepared, kept)
    functional = sorted({_graph.scope(n) or n.name for n in prepared.graph.nodes
                         if n.op == "call_function" and n.target is torch.nn.functional.linear})
    if functional:
        logger.warning("F.linear calls in %s stay in full precision: torch.fx traces into Linear subclasses and "
                       "functional linears, which the FX flow does not quantize (the pt2e flow and igq.quantize do)",
                       ", ".join(functional))
    if cfg.quantize_attention:
        unobserved = sorted({_graph.scope(m) or m.name for m in prepared.graph.nodes if _graph.is_matmul(m)
                             and _graph.attention_role(m, prepared, _is_observer) and m not in observed_matmuls})
        if unobserved:
            logger.warning("the attention matmuls of %s were not observed, so their Q, K, V and softmax sites stay in "
                           "float: pass backend_config=get_igq_backend_config() to prepare_fx", ", ".join(unobserved))
    return kept, dropped


def _check_single_use(prepared: torch.fx.GraphModule, kept: list) -> None:
    """A module that runs more than once in the graph (shared weights, recurrent blocks) would get one
    site per call under one name; igq.quantize gives it one quantizer for all its calls."""
    calls: dict[str, int] = {}
    for node in prepared.graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    keys = [(name, "layer") for _, _, role in kept if role[0] == "layers" for name in role[1]]
    keys += [(role[1], role[2]) for _, _, role in kept if role[0] == "operand"]
    seen: dict[tuple, int] = {}
    for key in keys:
        seen[key] = seen.get(key, 0) + 1
    repeated = sorted({name for (name, kind), count in seen.items() if count > 1 or calls.get(name, 1) > 1})
    if repeated:
        names = ", ".join(repr(r) for r in repeated[:3])
        raise ValueError(f"{names} run(s) more than once in the traced graph (shared or recurrent modules): the graph "
                         "flows would give each call its own site under one name. Quantize this model with "
                         "igq.quantize, which gives such a module one quantizer for all its calls")


def _bind(kept: list) -> None:
    for node, fq, role in kept:
        if role[0] == "operand":
            _, attention, tag = role
            fq.bind(tag, f"{attention}.{tag}_quantizer")
        q = fq.quantizer  # the group-count note the quiet creation held back, for the sites that are kept
        wanted = fq.quantizer_kwargs.get("num_groups") if role[0] == "layers" else None
        if getattr(q, "scheme", None) == "igq" and wanted and q.channels is not None and q.channels < wanted:
            note_group_clamp(", ".join(role[1]), q.channels, wanted)


def fit_ranges(prepared: torch.fx.GraphModule, cfg: Optional[igq.IGQConfig] = None, *, learn: bool = True) -> None:
    """QAT: after calibration batches through a ``prepare_qat_fx`` (or ``prepare_qat_pt2e``) model, fit
    every site's group ranges (the core's fit) and, with ``learn``, make them trainable parameters.
    From then on the prepared model fake-quantizes; train it, then :func:`convert_igq_fx`. Fake-quant
    modules that are no IGQ site (layer outputs) stop doing anything; layers the config leaves float
    get their float module back."""
    if not any(isinstance(m, IGQFakeQuantize) for m in prepared.modules()):
        from . import pt2e  # a prepare_qat_pt2e model (torchao needed)

        if cfg is not None:
            raise ValueError("cfg is given to IGQQuantizer in the pt2e flow, not to fit_ranges")
        return pt2e.fit_ranges(prepared, learn=learn)
    cfg = _check_cfg(cfg or _mapping_config(prepared))
    kept, dropped = _plan(prepared, cfg)
    _bind(kept)
    for node in dropped:
        prepared.get_submodule(node.target).disable_fake_quant()
    for _, fq, role in kept:
        if fq.quantizer.observing:
            fq.quantizer.fit()
        fq.quantizer.learn_ranges(learn)
        for name in role[1] if role[0] == "layers" else ():
            _weight_fake_quant(prepared, cfg, name)
    _rewire_shared(prepared, kept)
    _float_unfed_layers(prepared, kept)


def _rewire_shared(prepared: torch.fx.GraphModule, kept: list) -> None:
    """An observer torch.ao shares between a Linear input and other users (a residual add): those users
    get the float tensor, as in igq.quantize, where the quantizer sits inside the Linear."""
    changed = False
    for node, _, role in kept:
        if role[0] == "layers":
            for user in list(node.users):
                if not (user.op == "call_module" and user.target in role[1] and user.args[0] is node):
                    user.replace_input_with(node, node.args[0])
                    changed = True
    if changed:
        prepared.recompile()


def _float_unfed_layers(prepared: torch.fx.GraphModule, kept: list) -> None:
    """torch.ao's QAT swap gave every Linear a weight fake-quant; those the config leaves float (skip, or
    not fed an IGQ site) get their float module back."""
    fed = {name for _, _, role in kept if role[0] == "layers" for name in role[1]}
    for name, module in list(prepared.named_modules()):
        if name not in fed and hasattr(module, "weight_fake_quant") and hasattr(module, "to_float"):
            float_module = module.to_float()
            igq.adopt_hooks(float_module, module)
            _graph.set_module(prepared, name, float_module)


def _weight_fake_quant(prepared: torch.fx.GraphModule, cfg: igq.IGQConfig, name: str) -> None:
    """Give layer ``name`` the weight fake-quant the core decides (igq.layer_settings), for calibration
    with quantized weights and for training. (torch.ao's QAT module swap resolves module-name patterns
    differently: a head would train with the block's weight bits, the patch-embedding convolution with
    float weights.)"""
    from torch.ao.nn import qat

    module = prepared.get_submodule(name)
    settings = igq.layer_settings(cfg, name, module)
    fake_quant = IGQWeightFakeQuantize(**igq.weight_quant_kwargs(cfg, settings.w_bits))
    if not hasattr(module, "weight_fake_quant"):
        qconfig = QConfig(activation=PlaceholderObserver.with_args(dtype=torch.float), weight=lambda **_: fake_quant)
        if type(module) is nn.Linear:
            new = qat.Linear(module.in_features, module.out_features, module.bias is not None, qconfig=qconfig)
        elif type(module) is nn.Conv2d:
            new = qat.Conv2d(module.in_channels, module.out_channels, module.kernel_size, module.stride,
                             module.padding, module.dilation, module.groups, module.bias is not None,
                             module.padding_mode, qconfig=qconfig)
        else:
            raise ValueError(f"'{name}' ({type(module).__name__}) has no weight fake-quant for training: quantize this "
                             "model with igq.quantize, or leave it float with IGQConfig(skip=...)")
        new.weight, new.bias = module.weight, module.bias
        _graph.set_module(prepared, name, new.to(module.weight.device))
        module = new
    module.weight_fake_quant = fake_quant.to(module.weight.device)


def convert_igq_fx(prepared: torch.fx.GraphModule, cfg: Optional[igq.IGQConfig] = None, *,
                   calibration_data: Any = None, progress: bool = True) -> torch.fx.GraphModule:
    """Convert a calibrated (or QAT-trained) ``prepare_fx`` / ``prepare_qat_fx`` GraphModule (in place; returned).

    ``cfg``: the IGQConfig given to :func:`get_igq_qconfig_mapping` (weight bits and clipping);
    default: the one the mapping recorded, else IGQConfig(). ``calibration_data``: with
    ``weight_rounding="gptq"``, the batches the weights are GPTQ-rounded on (``igq.round_weights``),
    as igq.quantize does after fitting the ranges.
    """
    if not isinstance(prepared, torch.fx.GraphModule):
        raise TypeError(f"convert_igq_fx takes the GraphModule returned by prepare_fx, got {type(prepared).__name__}")
    cfg = _check_cfg(cfg or _mapping_config(prepared))
    if cfg.weight_rounding == "gptq" and calibration_data is None:
        raise ValueError("weight_rounding='gptq' rounds the weights on calibration data after the ranges are fitted: "
                         "pass it, convert_igq_fx(prepared, calibration_data=batches)")
    if calibration_data is not None and cfg.weight_rounding != "gptq":
        raise ValueError("calibration_data is only used by weight_rounding='gptq': drop it, or set "
                         "IGQConfig(weight_rounding='gptq')")
    kept, dropped = _plan(prepared, cfg)
    _bind(kept)
    for node in dropped:
        node.replace_all_uses_with(node.args[0])
        prepared.graph.erase_node(node)
        prepared.delete_submodule(node.target)
    _rewire_shared(prepared, kept)
    _float_unfed_layers(prepared, kept)
    head_dims = {role[1]: fq.shape[-1] for _, fq, role in kept if role[0] == "operand" and role[2] == "q"}
    for node, fq, role in kept:
        prepared.delete_submodule(node.target)
        prepared.add_submodule(node.target, fq.site_module)  # the graph calls the core quantizer (igq op) directly
        fq.quantizer.learn_ranges(False)  # QAT-trained ranges become buffers again (state-dict keys unchanged)
        if role[0] == "operand":
            _, attention, tag = role
            igq.register_attention_sites(prepared, attention, {tag: fq.quantizer}, head_dims.get(attention, 0))
            continue
        for name in role[1]:
            module = prepared.get_submodule(name)
            new = igq.quantized_layer(module, cfg, igq.layer_settings(cfg, name, module))
            igq.adopt_hooks(new, module)
            _graph.set_module(prepared, name, new)
            kind = "linear_input" if isinstance(module, nn.Linear) else "conv_input"
            fq.quantizer.site = f"{name}.input_quantizer"
            igq.register_site(prepared, f"{name}.input_quantizer", kind, fq.quantizer, name, weight_quantizer=new)
    prepared.graph.lint()
    prepared.recompile()
    setattr(prepared, CONFIG_ATTR, cfg)
    igq.convert(prepared, progress=progress)
    if cfg.weight_rounding == "gptq":
        data = calibration_data if isinstance(calibration_data, torch.Tensor) else list(calibration_data)
        igq.round_weights(prepared, data, damp=cfg.gptq_damp, progress=progress)
    return prepared
