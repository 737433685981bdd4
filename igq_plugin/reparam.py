"""RepQ-ViT scale reparameterization of post-LayerNorm activations, on a calibrated prepared model.

    prepared = igq.prepare(model, cfg)           # cfg.reparam = "repq" or "mosf"
    igq.calibrate(prepared, data)                 # per-channel ranges of every Linear input
    igq.reparameterize(prepared)                  # fold scales (igq.quantize and igq.convert call it)
    qmodel = igq.convert(prepared)

Which Linears a LayerNorm feeds is found by running one example through the model with hooks
(a Linear-input site, ``igq.sites(model, "linear_input")``, whose quantizer's input *is* a
LayerNorm's output tensor; the fold changes that site's weight quantizer's weight and bias), so timm ViT/DeiT/DINOv2 blocks
(norm1 -> attn.qkv, norm2 -> mlp.fc1) and Hugging Face models (norm1 -> query, key, value) are
covered without per-architecture tables. In Swin blocks only norm2 -> mlp.fc1 qualifies: norm1's
output is shifted, padded and split into windows before qkv (zero padding would not survive the
fold), so it stays as it is. The float outputs on that example are compared
before and after folding; a LayerNorm output that also feeds something other than those
Linears changes them, and then nothing is folded and an error lists the candidate LayerNorms.
After folding, a layer-wise site holds its final quantizer (calibrated, not observing; an
``act_percentile`` does not apply to it), and "igq" / "channel" sites keep observing.
The math is :mod:`igq_plugin.ops.reparam`.
"""
from __future__ import annotations

import copy
import logging
import math
from collections.abc import Mapping
from typing import Any, Optional

import torch
from torch import nn

from . import ops
from ._inputs import run_model
from .config import CONFIG_ATTR, IGQConfig
from .modules import fake_quant_disabled
from .registry import Site, sites

__all__ = ["reparameterize", "find_layernorm_consumers", "EXAMPLE_ATTR", "REPARAM_ATTR"]

logger = logging.getLogger("igq_plugin")

EXAMPLE_ATTR = "_igq_example_input"  # a few calibration instances kept by igq.calibrate
REPARAM_ATTR = "igq_reparameterized"  # names of the LayerNorms folded
_EXAMPLE_INSTANCES = 4
_TARGETS = {"repq": ops.mean_target_scale, "mosf": ops.mosf_target_scale}


def example_slice(inputs: Any) -> Any:
    """A copy of the first few instances of a model input (Tensor or dict of Tensors) for later checks.

    In a dict, only tensors whose first dimension is the batch size are sliced.
    """
    if isinstance(inputs, torch.Tensor):
        return inputs[:_EXAMPLE_INSTANCES].detach().clone()
    if isinstance(inputs, Mapping):
        batch = next((v.shape[0] for v in inputs.values() if isinstance(v, torch.Tensor) and v.dim() > 0), None)
        return {k: v[:_EXAMPLE_INSTANCES].detach().clone()
                if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] == batch else v
                for k, v in inputs.items()}
    return inputs


def _flat_outputs(out: Any) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, Mapping):
        out = list(out.values())
    if isinstance(out, (list, tuple)):
        return [t for o in out for t in _flat_outputs(o)]
    return []


@torch.no_grad()
def find_layernorm_consumers(model: nn.Module, example: Any) -> dict[str, list[str]]:
    """{LayerNorm name: consumers (Linear names) of the Linear-input sites fed exactly that LayerNorm's output}.

    A LayerNorm whose output also feeds a Linear left in float (IGQConfig.skip) is left out.
    """
    return {norm: [s.consumer for s in found] for norm, found in _consumers_and_output(model, example)[0].items()}


def _consumers_and_output(model: nn.Module, example: Any) -> tuple[dict[str, list[Site]], Any]:
    """The LayerNorm -> Linear-input site edges and the float output of the same forward pass."""
    outputs: dict[int, tuple[str, torch.Tensor]] = {}
    consumers: dict[str, list[Site]] = {}
    handles = []

    def norm_hook(name):
        def hook(_module, _args, out):
            outputs[id(out)] = (name, out)  # the tensor is kept alive, so its id is not reused
        return hook

    unfoldable: set[str] = set()

    def linear_hook(site: Optional[Site]):
        def hook(_module, args):
            if args and id(args[0]) in outputs and outputs[id(args[0])][1] is args[0]:
                norm = outputs[id(args[0])][0]
                if site is None:
                    unfoldable.add(norm)
                elif site not in consumers.setdefault(norm, []):
                    consumers[norm].append(site)
        return hook

    foldable = [s for s in sites(model, "linear_input") if s.weight_quantizer is not None]
    for site in foldable:
        handles.append(site.quantizer.register_forward_pre_hook(linear_hook(site)))
    for name, module in model.named_modules():
        if isinstance(module, nn.LayerNorm):
            handles.append(module.register_forward_hook(norm_hook(name)))
        elif isinstance(module, nn.Linear):  # a float Linear (a quantized one's input is its site's quantizer output)
            handles.append(module.register_forward_pre_hook(linear_hook(None)))
    try:
        with fake_quant_disabled(model):
            result = run_model(model, example)
    finally:
        for h in handles:
            h.remove()
    if unfoldable & set(consumers):
        logger.info("LayerNorm output(s) also feeding a float Linear are not reparameterized: %s",
                    ", ".join(sorted(unfoldable & set(consumers))))
    return {norm: names for norm, names in consumers.items() if norm not in unfoldable}, result


def _channel_qparams(found: list[Site], norm_name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel (scale, zero point) of the LayerNorm output from its consumers' observers."""
    lo = hi = None
    bits = None
    for site in found:
        q = site.quantizer
        if q.observer is None or q.observer.num_instances == 0:
            raise RuntimeError(
                f"reparameterization of '{norm_name}' needs calibration ranges at site '{q.site}': run "
                "igq.calibrate(prepared, data) first (reparameterize before igq.convert)"
            )
        l, h = q.observer.ranges()
        l, h = l.amin(0), h.amax(0)
        lo = l if lo is None else torch.minimum(lo, l)
        hi = h if hi is None else torch.maximum(hi, h)
        if bits is not None and q.bits != bits:
            raise ValueError(f"the Linears after '{norm_name}' quantize their input at different bits; "
                             "reparameterization needs one bit width per LayerNorm output")
        bits = q.bits
    return ops.reparam_channel_qparams(lo.double(), hi.double(), bits)


@torch.no_grad()
def reparameterize(
    prepared: nn.Module, example_input: Any = None, *, target: Optional[str] = None, rtol: float = 1e-3
) -> list[str]:
    """Fold per-channel scales of post-LayerNorm activations into the LayerNorms and their Linears (in place).

    prepared: a calibrated model from igq.prepare (observers still recording). example_input:
    an input to find the LayerNorm -> Linear edges and check the float outputs on (default:
    the first instances igq.calibrate kept). target: "repq" (mean scale) or "mosf" (MAD-guided);
    default: the model's IGQConfig.reparam, else "repq". Afterwards every folded site's
    activation is x~ = (x + s r2) / r1: a layer-wise site gets the exact layer-wise quantizer
    (s~, z~); "igq" and "channel" sites refit their ranges on x~ (observed ranges are mapped
    exactly). Weight quantizers of the folded Linears are recalibrated. Returns the LayerNorm names.
    """
    config = getattr(prepared, CONFIG_ATTR, None)
    if target is None:
        target = config.reparam if isinstance(config, IGQConfig) and config.reparam else "repq"
    if target not in _TARGETS:
        raise ValueError(f"target must be one of {sorted(_TARGETS)}, got {target!r}")
    if getattr(prepared, REPARAM_ATTR, None) is not None:
        raise RuntimeError("this model is already reparameterized")
    if example_input is None:
        example_input = getattr(prepared, EXAMPLE_ATTR, None)
        if example_input is None:
            raise ValueError(
                "reparameterize needs an example input: run igq.calibrate(prepared, data) (it keeps a few "
                "instances) or pass example_input="
            )
    with torch.no_grad():
        pairs, out = _consumers_and_output(prepared, example_input)
    reference = [t.detach().clone() for t in _flat_outputs(out)]
    norms = dict(prepared.named_modules())
    plans = []  # everything that can fail runs before any parameter changes
    for norm_name, found in pairs.items():
        norm = norms[norm_name]
        if norm.weight is None:
            logger.warning("LayerNorm '%s' has no affine weight: its output is not reparameterized", norm_name)
            continue
        scale, zero_point = _channel_qparams(found, norm_name)
        target_scale = _TARGETS[target](scale)
        target_zero = ops.reparam_target_zero_point(zero_point, found[0].quantizer.bits)
        r1, r2 = ops.reparam_factors(scale, zero_point, target_scale, target_zero)
        device = norm.weight.device
        plans.append((norm_name, norm, found, r1.to(device), r2.to(device), scale.to(device), target_scale, target_zero))
    saved = [(module, attr, None if getattr(module, attr) is None else getattr(module, attr).detach().clone())
             for _, norm, found, *_ in plans for module in [norm, *(s.weight_quantizer for s in found)]
             for attr in ("weight", "bias")]
    quantizers = [site.quantizer for _, _, found, *_ in plans for site in found]
    saved_quantizers = [(q, q.lo.clone(), q.hi.clone(), q.is_calibrated, q.observer, copy.copy(q.observer))
                        for q in quantizers]
    try:
        _fold(plans)
        with fake_quant_disabled(prepared):
            folded = _flat_outputs(run_model(prepared, example_input))
        if not folded or len(folded) != len(reference):
            raise RuntimeError("reparameterize could not compare the model's outputs (no tensor outputs)")
        worst = max(float((a - b).norm() / b.norm().clamp_min(1e-12)) for a, b in zip(folded, reference))
        if not math.isfinite(worst) or worst > rtol:
            raise RuntimeError(
                f"reparameterization changed the float outputs (relative error {worst:.2e} > {rtol:g}): the output "
                f"of some LayerNorm in {sorted(pairs)} also feeds something other than Linear layers (e.g. a residual "
                "add). Nothing was changed; skip the Linears after that LayerNorm (IGQConfig.skip) or set reparam=None"
            )
        for _, _, found, r1, r2, scale, target_scale, target_zero in plans:
            for site in found:
                _retarget_quantizer(site.quantizer, r1, r2, scale, target_scale, target_zero)
                site.weight_quantizer.calibrate_weight()
    except BaseException:
        for module, attr, value in saved:
            if value is None:
                setattr(module, attr, None)
            else:
                getattr(module, attr).data.copy_(value)
        for q, lo, hi, calibrated, observer, observer_copy in saved_quantizers:
            q.lo, q.hi = lo, hi
            q.mark_calibrated(calibrated)
            q.observer = observer
            if observer is not None:
                observer.__dict__.update(observer_copy.__dict__)  # undo a remap
        for layer in {id(s.weight_quantizer): s.weight_quantizer for _, _, found, *_ in plans for s in found}.values():
            layer.calibrate_weight()
        raise
    names = [plan[0] for plan in plans]
    setattr(prepared, REPARAM_ATTR, names)
    logger.info("reparameterized %d LayerNorm outputs (%s scale): %s", len(names), target, ", ".join(names))
    return names


def _fold(plans) -> None:
    for _, norm, found, r1, r2, scale, _, _ in plans:
        beta = norm.bias.double() if norm.bias is not None else torch.zeros_like(scale)
        gamma, beta = ops.fold_layernorm(norm.weight.double(), beta, r1, r2, scale)
        _assign(norm, "weight", gamma)
        _assign(norm, "bias", beta)
        for linear in (s.weight_quantizer for s in found):
            bias = None if linear.bias is None else linear.bias.double()
            weight, bias = ops.fold_linear(linear.weight.double(), bias, r1, r2, scale)
            _assign(linear, "weight", weight)
            _assign(linear, "bias", bias)


def _assign(module: nn.Module, attr: str, value: torch.Tensor) -> None:
    current = getattr(module, attr)
    if current is None:
        ref = module.weight
        setattr(module, attr, nn.Parameter(value.to(ref.dtype).to(ref.device), requires_grad=ref.requires_grad))
    else:
        current.data.copy_(value.to(current.dtype))


def _retarget_quantizer(q: nn.Module, r1, r2, scale, target_scale, target_zero) -> None:
    if q.scheme == "layer":
        lo, hi = ops.asym_range(target_scale, target_zero, q.bits)
        q.load_ranges(lo.reshape(1).float(), hi.reshape(1).float())  # (s~, z~): the per-channel quantizer on x
        q.observer = None
        return
    r1, r2, scale = (t.cpu() for t in (r1, r2, scale))  # observers keep their statistics on the CPU
    q.observer.remap(lambda lo, hi: ops.reparam_ranges(lo.double(), hi.double(), r1, r2, scale))
