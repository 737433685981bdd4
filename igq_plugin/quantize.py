"""igq.quantize(model, config, calibration_data): prepare -> calibrate -> convert, on a copy.

The three steps are public too, for flows that run calibration themselves:

    prepared = igq.prepare(model, cfg)       # a copy with quantizers in observing mode
    igq.calibrate(prepared, data)             # or run your own loop over prepared(x)
    qmodel = igq.convert(prepared)            # fit ranges, quantize weights (in place)
"""
from __future__ import annotations

import contextlib
import copy
import fnmatch
import itertools
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import nn

from . import ops
from .attention import attention_adapter_for, attention_channels
from ._inputs import check_batch, check_calibration_data, model_device, model_dtype, model_input, run_model, to_device
from .allocation.cost import SHAPES_ATTR, record_site_shapes
from .calibration import DEFAULT_QUANTILE, default_range_rule
from .config import CONFIG_ATTR, IGQConfig
from .modules import (ActQuantizer, QuantConv2d, QuantLinear, SoftmaxQuantizer, iter_quantizers,
                      set_input_error_weights, set_site_error_weights)
from .reparam import EXAMPLE_ATTR, REPARAM_ATTR, example_slice, reparameterize
from .rounding import round_weights
from .registry import Site, clear_sites, order_sites, register_site, sites

__all__ = ["prepare", "calibrate", "convert", "quantize", "CONFIG_ATTR", "adopt_hooks", "LayerSettings",
           "layer_settings", "act_quantizer_kwargs", "quantized_layer", "calibrate_and_convert", "convert_site",
           "weight_quant_kwargs", "attention_quantizer", "attention_quantizer_kwargs", "finish_quantization",
           "register_attention_sites", "matches"]

logger = logging.getLogger("igq_plugin")

def matches(name: str, patterns: tuple[str, ...]) -> bool:
    """Whether module name ``name`` matches one of the fnmatch ``patterns`` (skip / head / embed patterns)."""
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


_HOOK_DICTS = (
    "_forward_hooks", "_forward_hooks_with_kwargs", "_forward_hooks_always_called", "_forward_pre_hooks",
    "_forward_pre_hooks_with_kwargs", "_backward_hooks", "_backward_pre_hooks", "_state_dict_hooks",
    "_state_dict_pre_hooks", "_load_state_dict_pre_hooks", "_load_state_dict_post_hooks",
)
_HOOK_FLAGS = ("_is_full_backward_hook",)  # which kind of backward hooks _backward_hooks holds


def adopt_hooks(new: nn.Module, old: nn.Module) -> None:
    """Give ``new`` the module hooks registered on ``old`` (forward, backward, state-dict hooks).

    The hook handles the user holds keep working (they remove by id from the same dicts). An
    instance-level ``forward`` attribute (accelerate installs its hooks that way) is never copied:
    it would run the float module's forward.
    """
    for attr in _HOOK_DICTS:
        hooks = old.__dict__.get(attr)
        if hooks:
            new.__dict__[attr] = hooks
    for attr in _HOOK_FLAGS:
        if attr in old.__dict__:
            new.__dict__[attr] = old.__dict__[attr]
    if "forward" in old.__dict__ or hasattr(old, "_hf_hook"):
        logger.warning(
            "module %s has an instance-level forward / accelerate hook; its quantized replacement does not keep it "
            "(re-attach device-placement hooks to the quantized model)", type(old).__name__,
        )


def _set_child(root: nn.Module, name: str, child: nn.Module, undo: list) -> None:
    """Replace submodule ``name`` by ``child`` under every name that reaches the same module (a module
    shared by several parents is quantized once and used everywhere), moved to the replaced module's
    device (its new quantizer state is created on the CPU), keeping the replaced module's hooks.
    ``undo`` records (parent, attribute, old module) so a failed in-place prepare can put everything back."""
    old = root.get_submodule(name)
    tensor = next(itertools.chain(old.parameters(), old.buffers()), None)
    if tensor is not None:
        child.to(tensor.device)
    adopt_hooks(child, old)
    for other, module in root.named_modules(remove_duplicate=False):
        if module is old and other:
            parent_name, _, attr = other.rpartition(".")
            parent = root.get_submodule(parent_name) if parent_name else root
            undo.append((parent, attr, old))
            setattr(parent, attr, child)


@dataclass(frozen=True)
class LayerSettings:
    """What an IGQConfig gives one weighted layer (see :func:`layer_settings`)."""

    w_bits: int
    a_bits: int
    scheme: str  # of the layer's input quantizer
    groups: int
    block_site: bool  # a transformer-block layer (``act_percentile`` applies to its layer-wise input)


def layer_settings(cfg: IGQConfig, name: str, module: nn.Module) -> Optional[LayerSettings]:
    """The quantization ``cfg`` gives the Linear / Conv2d ``module`` named ``name``, or None when it stays
    float (``skip``, a Conv2d other than the patch embedding, or bits None). Patch embedding and head are
    layer-wise at ``embed_bits`` / ``head_bits``; other Linears get the block settings (bits from the first
    ``module_bits`` pattern their name matches). Every flow that
    swaps layers (igq.prepare, the framework adapters) asks this one function."""
    if matches(name, cfg.skip):
        return None
    for patterns, bits in ((cfg.embed_patterns, cfg.embed_bits), (cfg.head_patterns, cfg.head_bits)):
        if matches(name, patterns):
            return None if bits is None else LayerSettings(bits, bits, "layer", 1, block_site=False)
    if not isinstance(module, nn.Linear):
        return None  # only the patch-embedding convolution is quantized
    w_bits, a_bits = next((bits for pattern, bits in cfg.module_bits.items() if fnmatch.fnmatchcase(name, pattern)),
                          (cfg.weight_bits, cfg.act_bits))
    return LayerSettings(w_bits, a_bits, cfg.act_scheme, cfg.num_groups, block_site=True)


def range_rule(cfg: IGQConfig, bits: int) -> tuple[str, float]:
    """(range_update, range_quantile) of a site of ``bits`` bits: the config's fields, or where both are
    None the bit-aware default (igq_plugin.calibration.default_range_rule); a quantile alone means the
    "quantile" rule, a rule alone q = 0.99."""
    if cfg.range_update is None and cfg.range_quantile is None:
        return default_range_rule(bits)
    return (cfg.range_update or "quantile", cfg.range_quantile if cfg.range_quantile is not None else DEFAULT_QUANTILE)


def act_quantizer_kwargs(cfg: IGQConfig, bits: int, scheme: str, groups: int, *, block_site: bool = True,
                         operand: bool = False) -> dict:
    """Keyword arguments of the ActQuantizer of one site (all but ``channels`` and ``site``);
    ``act_percentile`` applies to layer-wise sites inside the blocks, ``act_grid`` to every site (an
    attention ``operand``: a signed 8-bit grid, as both inputs of its matmul are activations)."""
    percentile = cfg.act_percentile if block_site and scheme == "layer" else None
    grid = None if scheme == "channel" or cfg.act_grid is None else (8 if operand else cfg.act_grid)
    update, quantile = range_rule(cfg, bits)
    return dict(bits=bits, scheme=scheme, num_groups=groups, update=update, quantile=quantile,
                kmeans_iters=cfg.kmeans_iters, percentile=percentile, grid_bits=grid, grid_signed=operand)


def _act_quantizer(
    cfg: IGQConfig, bits: int, scheme: str, channels: Optional[int], groups: int, site: str, *, block_site: bool = True,
    operand: bool = False,
) -> ActQuantizer:
    return ActQuantizer(channels=channels, site=site, **act_quantizer_kwargs(cfg, bits, scheme, groups,
                                                                             block_site=block_site, operand=operand))


def quantized_layer(module: nn.Module, cfg: IGQConfig, settings: LayerSettings,
                    input_quantizer: Optional[ActQuantizer] = None) -> nn.Module:
    """The QuantLinear / QuantConv2d that replaces ``module`` under ``settings`` (weight bits, clipping and
    percentile from ``cfg``), with ``input_quantizer`` inside it (None: the input is quantized elsewhere)."""
    w = weight_quant_kwargs(cfg, settings.w_bits)
    if isinstance(module, nn.Linear):
        return QuantLinear.from_float(module, w_bits=w["w_bits"], weight_percentile=w["percentile"],
                                      weight_clipping=w["clipping"], input_quantizer=input_quantizer)
    return QuantConv2d(module, w_bits=w["w_bits"], weight_percentile=w["percentile"], weight_clipping=w["clipping"],
                       input_quantizer=input_quantizer)


def weight_quant_kwargs(cfg: IGQConfig, w_bits: int) -> dict:
    """The weight quantizer of a ``w_bits`` layer under ``cfg``: {"w_bits", "clipping", "percentile"}
    (``ops.clipped_weight_qparams``'s rule; percentile default by bits)."""
    pct = cfg.weight_percentile if cfg.weight_percentile is not None else ops.default_weight_percentile(w_bits)
    return {"w_bits": w_bits, "clipping": cfg.weight_clipping, "percentile": pct}


ATTENTION_SITES = ("q", "k", "v", "softmax")


def attention_quantizer_kwargs(cfg: IGQConfig, tag: str) -> dict:
    """Keyword arguments (all but ``channels`` and ``site``) of the quantizer ``cfg`` gives attention site
    ``tag`` (one of ATTENTION_SITES): a SoftmaxQuantizer's for "softmax", an ActQuantizer's otherwise."""
    if tag == "softmax":
        update, quantile = range_rule(cfg, cfg.effective_softmax_bits)
        return dict(bits=cfg.effective_softmax_bits, num_groups=cfg.effective_softmax_groups, update=update,
                    quantile=quantile, kmeans_iters=cfg.kmeans_iters, levels=cfg.softmax_quantizer,
                    steepness=cfg.tanq_steepness)
    if tag not in ATTENTION_SITES:
        raise ValueError(f"attention site tag must be one of {ATTENTION_SITES}, got {tag!r}")
    return act_quantizer_kwargs(cfg, cfg.act_bits, cfg.matmul_scheme, cfg.num_groups, operand=True)


def attention_quantizer(cfg: IGQConfig, attention: str, tag: str, channels: Optional[int] = None) -> nn.Module:
    """The quantizer ``cfg`` gives site ``tag`` (one of ATTENTION_SITES) of the attention module (or
    scope) ``attention``: Q, K and V operands at act_bits / matmul_scheme over ``channels`` = H*d,
    post-softmax rows at the softmax bits, groups and levels. Every flow (igq.prepare, the adapters) asks this."""
    site = f"{attention}.{tag}_quantizer"
    kwargs = attention_quantizer_kwargs(cfg, tag)
    if tag == "softmax":
        return SoftmaxQuantizer(site=site, **kwargs)
    return ActQuantizer(channels=channels, site=site, **kwargs)


def register_attention_sites(model: nn.Module, attention: str, quantizers: dict[str, nn.Module], head_dim: int) -> None:
    """Register the Q / K / V / softmax quantizers (keyed by tag) of ``attention`` as sites of ``model``."""
    for tag, quantizer in quantizers.items():
        kind = "softmax" if tag == "softmax" else "matmul_operand"
        info = {"head_dim": head_dim} if tag == "softmax" else {"operand": tag, "head_dim": head_dim}
        register_site(model, f"{attention}.{tag}_quantizer", kind, quantizer, attention, info=info)


def _swap_attention(model: nn.Module, cfg: IGQConfig, undo: list) -> None:
    unknown: dict[str, list[str]] = {}
    for name, module in list(model.named_modules()):
        adapter = attention_adapter_for(module)
        if adapter is None and name and "attention" in type(module).__name__.lower() and not matches(name, cfg.skip):
            if not any("attention" in type(m).__name__.lower() for m in module.children()):  # innermost only
                unknown.setdefault(f"{type(module).__module__}.{type(module).__qualname__}", []).append(name)
        if adapter is None or not name or matches(name, cfg.skip):
            continue
        channels = attention_channels(module)
        quantizers = {tag: attention_quantizer(cfg, name, tag, channels) for tag in ATTENTION_SITES}
        new = adapter(module, {f"{tag}_quantizer": q for tag, q in quantizers.items()})
        _set_child(model, name, new, undo)
        register_attention_sites(model, name, quantizers, channels // module.num_heads)
    for cls, names in unknown.items():
        logger.warning(
            "attention class %s has no igq attention adapter: the Q, K, V operands and post-softmax attention of %s "
            "stay in full precision (its Linears are quantized); register one with igq.register_attention_adapter",
            cls, ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else ""),
        )


def _swap_layers(model: nn.Module, cfg: IGQConfig, undo: list) -> list[str]:
    """Replace Linear / patch-embedding Conv2d modules; returns names of layers left in float."""
    left_float = []
    for name, module in list(model.named_modules()):
        if not isinstance(module, (nn.Linear, nn.Conv2d)) or not name:
            continue
        settings = layer_settings(cfg, name, module)
        if settings is None:
            left_float.append(name)
            continue
        base = nn.Linear if isinstance(module, nn.Linear) else nn.Conv2d
        if type(module).forward is not base.forward:
            logger.warning("%s '%s' overrides forward: left in full precision (quantizing it would drop its own "
                           "forward)", type(module).__name__, name)
            left_float.append(name)
            continue
        parent_name = name.rpartition(".")[0]
        if isinstance(model.get_submodule(parent_name) if parent_name else model, nn.MultiheadAttention):
            logger.warning("'%s' belongs to nn.MultiheadAttention, which computes its projections inside "
                           "F.multi_head_attention_forward: left in full precision", name)
            left_float.append(name)
            continue
        site = f"{name}.input_quantizer"
        channels = module.in_features if isinstance(module, nn.Linear) else None
        quantizer = _act_quantizer(cfg, settings.a_bits, settings.scheme, channels, settings.groups, site,
                                   block_site=settings.block_site)
        new = quantized_layer(module, cfg, settings, quantizer)
        _set_child(model, name, new, undo)
        kind = "linear_input" if isinstance(module, nn.Linear) else "conv_input"
        register_site(model, site, kind, quantizer, name, weight_quantizer=new)
    return left_float


def _check_config(config: Any) -> None:
    if not isinstance(config, IGQConfig):
        raise TypeError(f"config must be an igq_plugin.IGQConfig, got {type(config).__name__}")


def prepare(model: nn.Module, config: IGQConfig, *, observe: bool = True, inplace: bool = False,
            attention: bool = True) -> nn.Module:
    """A quantization-ready copy of ``model``; ``model`` itself is never modified (unless ``inplace``).

    Known attention modules are replaced by quantized adapters, every Linear (and the patch
    embedding Conv2d) by a quantized module, each registered as a site (:mod:`igq_plugin.registry`).
    With ``observe=True`` every quantizer records ranges on the next forward passes;
    ``observe=False`` leaves them uncalibrated (for loading a checkpoint).

    ``inplace=True`` swaps the modules into ``model`` itself and returns it (for frameworks that
    own the model, e.g. a Hugging Face quantizer). The model may live on the meta device: weight
    quantizers of meta weights are left uncalibrated; call ``calibrate_weight()`` on each site's
    weight quantizer once real weights are loaded (igq.convert does it for any that are still
    uncalibrated). Module hooks of replaced modules are kept. If it fails, the model is left as it was.

    ``attention=False`` leaves the attention modules to the caller: an adapter that adds the Q, K, V
    and softmax sites its own way (the Hugging Face quantizer, through transformers' attention interface).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    _check_config(config)
    if sites(model) or any(True for _ in iter_quantizers(model)):
        raise ValueError(
            f"model {type(model).__name__} already has igq quantizers (it was prepared or quantized): quantizing it "
            "again would mix old and new settings. Re-quantize from the float model (keep a copy of it, or rebuild it "
            "and load its float weights)"
        )
    prepared = model if inplace else copy.deepcopy(model)
    undo: list = []  # (parent, attribute, replaced module): a failed in-place prepare leaves the model as it was
    fused = [(m, m.fused_attn) for m in prepared.modules() if hasattr(m, "fused_attn")]
    was_training = prepared.training
    try:
        prepared.eval()
        for module, _ in fused:
            module.fused_attn = False  # fused SDPA hides the softmax
        if config.quantize_attention and attention:
            _swap_attention(prepared, config, undo)
        left_float = _swap_layers(prepared, config, undo)
        order_sites(prepared)
        quantizers = list(iter_quantizers(prepared))
        if not quantizers:
            raise ValueError(
                f"model {type(model).__name__} has no quantizable layer: no nn.Linear (or patch-embedding Conv2d) "
                f"outside the skip patterns {list(config.skip)}"
            )
        _calibrate_weights(prepared, force=True)
    except BaseException:
        if inplace:
            for parent, attr, old in reversed(undo):
                setattr(parent, attr, old)
            for module, flag in fused:
                module.fused_attn = flag
            prepared.train(was_training)
        clear_sites(prepared)
        raise
    if left_float:
        logger.info("layers kept in full precision: %s", ", ".join(left_float))
    if observe:
        for _, quantizer in quantizers:
            quantizer.start_observer()
    setattr(prepared, CONFIG_ATTR, config)
    return prepared


def _calibrate_weights(model: nn.Module, force: bool = False) -> None:
    """Fit the weight quantizer of every site whose weights are real (not meta); with ``force=False``
    only those not calibrated yet (weights loaded after an in-place prepare on the meta device)."""
    for site in sites(model):
        wq = site.weight_quantizer
        if wq is not None and not wq.weight.is_meta and (force or not wq.weight_is_calibrated):
            wq.calibrate_weight()


@contextlib.contextmanager
def _float_weights(model: nn.Module):
    """Weight fake-quantization of every site off inside the block (IGQConfig.calibration_weights="float")."""
    modules = [s.weight_quantizer for s in sites(model) if s.weight_quantizer is not None]
    flags = [m.weight_fake_quant_enabled for m in modules]
    for module in modules:
        module.weight_fake_quant_enabled = False
    try:
        yield
    finally:
        for module, flag in zip(modules, flags):
            module.weight_fake_quant_enabled = flag


@torch.no_grad()
def calibrate(prepared: nn.Module, calibration_data: Any, *, progress: bool = True) -> int:
    """Run calibration data through a prepared model; returns the number of batches seen.

    Weight quantizers still uncalibrated (weights loaded after an in-place prepare on the meta
    device) are fitted first, so activations are observed downstream of quantized weights (unless
    the prepared config has ``calibration_weights="float"``).
    """
    check_calibration_data(calibration_data)
    _calibrate_weights(prepared)
    batches = [calibration_data] if isinstance(calibration_data, torch.Tensor) else calibration_data
    device = model_device(prepared)
    total = len(batches) if hasattr(batches, "__len__") else None
    seen = 0
    from tqdm.auto import tqdm

    shapes: dict = {}
    dtype, first_shape = model_dtype(prepared), None
    config = getattr(prepared, CONFIG_ATTR, None)
    float_weights = isinstance(config, IGQConfig) and config.calibration_weights == "float"
    for index, batch in enumerate(tqdm(batches, total=total, desc="igq calibrate", unit="batch", disable=not progress)):
        raw = model_input(batch, index)
        first_shape = check_batch(raw, index, dtype, first_shape)
        inputs = to_device(raw, device)
        if index == 0:
            setattr(prepared, EXAMPLE_ATTR, example_slice(inputs))  # for reparameterize's checks
        # The first batch also records per-instance site shapes (MACs / BOPs for igq.report and allocation).
        with record_site_shapes(prepared, shapes) if index == 0 else contextlib.nullcontext(), \
                _float_weights(prepared) if float_weights else contextlib.nullcontext():
            try:
                run_model(prepared, inputs)
            except (RuntimeError, ValueError, TypeError, AssertionError, IndexError) as err:
                if index > 0 or "calibration" in str(err):  # later batches, and igq's own calibration errors
                    raise
                shape = tuple(inputs.shape) if isinstance(inputs, torch.Tensor) else sorted(inputs)
                raise ValueError(
                    f"the model failed on calibration batch 0 (input {shape}): {type(err).__name__}: "
                    f"{str(err).splitlines()[0] if str(err) else ''}. Give batches shaped as the model's inputs "
                    "(e.g. [B, 3, H, W] images at the model's resolution)"
                ) from err
        seen += 1
    if seen == 0:
        raise ValueError("calibration_data is empty: give at least one batch (the paper uses 32 images)")
    setattr(prepared, SHAPES_ATTR, shapes)
    return seen


@torch.no_grad()
def convert_site(site: Site) -> None:
    """What :func:`convert` does, for one registered site (for flows that convert site by site, e.g.
    torchao's convert_pt2e): calibrate its weight quantizer if needed, set the "mse" error weights,
    fit its ranges. A site that saw no calibration batch is an error."""
    wq = site.weight_quantizer
    if wq is not None and not wq.weight.is_meta and not wq.weight_is_calibrated:
        wq.calibrate_weight()
    set_site_error_weights(site)
    quantizer = site.quantizer
    if quantizer.observing:
        if quantizer.observer.num_instances == 0:
            raise RuntimeError(f"site '{site.name}' saw no calibration batch: run calibration data through the "
                               "prepared model before converting it")
        quantizer.fit()


@torch.no_grad()
def convert(prepared: nn.Module, *, progress: bool = True) -> nn.Module:
    """Fit static ranges of every observing quantizer (in place) and return the model.

    With IGQConfig.reparam set, post-LayerNorm scales are folded first (:func:`igq.reparameterize`)
    unless that was already done.
    """
    from tqdm.auto import tqdm

    config = getattr(prepared, CONFIG_ATTR, None)
    if isinstance(config, IGQConfig) and config.reparam and getattr(prepared, REPARAM_ATTR, None) is None:
        reparameterize(prepared)

    _calibrate_weights(prepared)
    set_input_error_weights(prepared)
    observing = [(n, q) for n, q in iter_quantizers(prepared) if q.observing]
    never_run = [n for n, q in observing if q.observer.num_instances == 0]
    for name, quantizer in tqdm(observing, desc="igq fit ranges", unit="site", disable=not progress):
        if name in never_run:
            quantizer.observer = None
            continue
        quantizer.fit()
    prepared.__dict__.pop(EXAMPLE_ATTR, None)  # calibration instances are not part of the quantized model
    if never_run:
        logger.warning(
            "%d site(s) saw no calibration activations and stay uncalibrated (calling them raises): %s",
            len(never_run), ", ".join(never_run),
        )
    return prepared


def quantize(
    model: nn.Module,
    config: Optional[IGQConfig] = None,
    calibration_data: Any = None,
    *,
    head: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
    progress: bool = True,
) -> nn.Module:
    """Quantize a copy of ``model`` with ``config`` (default IGQConfig()) calibrated on ``calibration_data``.

    calibration_data: a Tensor batch, an iterable of Tensors, of (input, label) tuples or of dicts
    of keyword arguments, or a DataLoader. The user's ``model`` is never modified.
    With ``config.weight_rounding == "gptq"`` the weights are then rounded by
    :func:`igq_plugin.rounding.round_weights` on the same data (one more pass, as one batch).
    With ``config.group_allocation == "bop"`` the calibration data is run once more per site and
    candidate to measure sensitivities (see :func:`igq_plugin.allocation.allocate`); ``head``
    (features -> logits) is the task head their KL is taken through, for a backbone model.
    """
    config = IGQConfig() if config is None else config
    _check_config(config)
    check_calibration_data(calibration_data)
    if head is not None and config.group_allocation is None:
        raise ValueError("head is only used by group allocation: set IGQConfig(group_allocation='bop') or drop head")
    return calibrate_and_convert(prepare(model, config), calibration_data, head=head, progress=progress)


def calibrate_and_convert(prepared: nn.Module, calibration_data: Any, *,
                          head: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
                          progress: bool = True) -> nn.Module:
    """Everything :func:`quantize` does after :func:`prepare`, on a prepared model whose quantizers observe
    (in place; returned): calibrate, reparameterize (``reparam``), allocate groups (``group_allocation``),
    convert, GPTQ-round (``weight_rounding``), as the prepared model's config says. For flows that prepare
    the model their own way (the Hugging Face quantizer prepares it inside from_pretrained)."""
    config = getattr(prepared, CONFIG_ATTR, None)
    if not isinstance(config, IGQConfig):
        raise ValueError("this model was not prepared by igq.prepare (it carries no IGQConfig)")
    check_calibration_data(calibration_data)
    reuses = config.group_allocation is not None or config.weight_rounding == "gptq" or config.reconstruct_iters > 0
    if reuses and not isinstance(calibration_data, torch.Tensor):
        calibration_data = list(calibration_data)  # run again: sensitivities, GPTQ
    calibrate(prepared, calibration_data, progress=progress)
    return finish_quantization(prepared, calibration_data, head=head, progress=progress)


def finish_quantization(prepared: nn.Module, calibration_data: Any = None, *,
                        head: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
                        progress: bool = True) -> nn.Module:
    """What :func:`calibrate_and_convert` does once the quantizers have observed the calibration data (in
    place; returned): reparameterize (``reparam``), allocate groups (``group_allocation``), convert,
    GPTQ-round (``weight_rounding``), reconstruct blocks (``reconstruct_iters``). For flows whose framework ran the calibration pass (an NNCF
    pipeline). ``calibration_data`` is needed only by allocation and GPTQ rounding."""
    config = getattr(prepared, CONFIG_ATTR, None)
    if not isinstance(config, IGQConfig):
        raise ValueError("this model was not prepared by igq.prepare (it carries no IGQConfig)")
    needs = [f for f, on in (("group_allocation", config.group_allocation is not None),
                             ("weight_rounding='gptq'", config.weight_rounding == "gptq"),
                             ("reconstruct_iters", config.reconstruct_iters > 0)) if on]
    if needs and calibration_data is None:
        raise ValueError(f"IGQConfig {', '.join(needs)} runs the calibration data again: give calibration_data")
    if config.reparam:
        reparameterize(prepared)  # before allocation, so sensitivities see the final quantizers
    if config.group_allocation == "bop":
        from .allocation import allocate

        allocate(prepared, calibration_data, config, head=head, progress=progress)
    qmodel = convert(prepared, progress=progress)
    if config.weight_rounding == "gptq":
        round_weights(qmodel, calibration_data, damp=config.gptq_damp, progress=progress)
    if config.reconstruct_iters > 0:
        from .reconstruct import reconstruct

        reconstruct(qmodel, calibration_data, iters=config.reconstruct_iters, progress=progress)
    return qmodel
