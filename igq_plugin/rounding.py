"""Error-compensating (GPTQ) weight rounding of a converted model, with the quantized model's inputs.

    qmodel = igq.convert(prepared)                  # activation ranges fitted
    igq.round_weights(qmodel, calibration_data)      # igq.quantize does this with weight_rounding="gptq"

Every Linear-input site's weight (``igq.sites(model, "linear_input")``: QuantLinear, or any
registered weight quantizer) is rounded once, in the order the forward pass reaches it, so each
layer sees the inputs the quantized model really feeds it: the outputs of layers already rounded,
through every activation quantizer on the way (IGQ groups included). One pass over the
calibration data, concatenated into one batch: a forward hook on each site's input quantizer
takes its output (X^) and, before the layer uses its weight, replaces the weight codes by
:func:`igq_plugin.ops.gptq_quantize` of W under the Hessian X^T^ X^, with the per-output-channel
quantizer refitted by the layer's clipping rule. Later layers then see this layer's new outputs.

``compensate=True`` first runs a float pass (all fake quantization off) and rounds the target
W' = W (X^T X^) (X^T^ X^)^-1 instead, the float weights that best map X^ to the float outputs
X W^T (upstream error compensation; it keeps the float inputs of every layer in memory, about
1 GB for DINOv2-S on 32 images). On DINOv2-S W4A4 it lowered the feature cosine (0.72 vs 0.82 with
W), so it is off by default: least squares on heavily quantized inputs shrinks the weights.

The codes are stored in the buffer ``weight_int`` with their quantizer in ``weight_scale`` /
``weight_zero_point`` (igq.save / igq.load round-trip them); ``weight`` keeps the float weights,
so disabling fake quantization still gives the float model. A layer called more than once per
forward (shared weights) is rounded on its first call's inputs (a warning names it). The
patch-embedding convolution keeps round-to-nearest. The math is :mod:`igq_plugin.ops.gptq`.
"""
from __future__ import annotations

import logging
from collections import Counter
from typing import Any

import torch
from torch import nn

from . import ops
from ._inputs import concat_inputs, model_device, run_model, to_device
from .modules import fake_quant_disabled, iter_quantizers
from .registry import sites

__all__ = ["round_weights", "ROUNDED_ATTR"]

logger = logging.getLogger("igq_plugin")

ROUNDED_ATTR = "igq_gptq_rounded"  # names of the layers whose weights GPTQ rounded


@torch.no_grad()
def round_weights(
    model: nn.Module,
    calibration_data: Any,
    *,
    damp: float = 0.1,
    block_size: int = 128,
    compensate: bool = False,
    progress: bool = True,
) -> list[str]:
    """GPTQ-round the weights of every Linear-input site of a converted model in place; returns the layer names.

    ``damp``: diagonal damping of the Hessian, as a fraction of its mean diagonal. Layers whose
    weight fake quantization is disabled are left alone; activation quantizers that are disabled
    pass float inputs (so with all of them off this is plain GPTQ, W4A16). On any error the
    weights and weight quantizers are restored.
    """
    if not 0.0 <= damp < 1e3:
        raise ValueError(f"damp must be a fraction >= 0 of the mean Hessian diagonal (e.g. 0.1), got {damp!r}")
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"block_size must be an int >= 1, got {block_size!r}")
    observing = [name for name, q in iter_quantizers(model) if q.observing]
    if observing:
        raise RuntimeError(
            f"{len(observing)} quantizer(s) are still observing (e.g. '{observing[0]}'): call igq.convert() "
            "before round_weights, which needs the fitted activation quantizers"
        )
    site_of = {
        s.consumer: s for s in sites(model, "linear_input")
        if s.weight_quantizer is not None and s.weight_quantizer.weight_fake_quant_enabled
        and s.weight_quantizer.weight_is_calibrated
    }
    layers = {name: s.weight_quantizer for name, s in site_of.items()}
    if not layers:
        raise ValueError("model has no Linear-input site with a calibrated weight quantizer: quantize it with igq first")
    inputs = to_device(concat_inputs(calibration_data), model_device(model))

    float_inputs: dict[str, torch.Tensor] = {}
    if compensate:
        def keep_float(name):
            def hook(_quantizer, args):
                float_inputs.setdefault(name, args[0].detach())
            return hook

        handles = [s.quantizer.register_forward_pre_hook(keep_float(n)) for n, s in site_of.items()]
        try:
            with fake_quant_disabled(model):
                run_model(model, inputs)
        finally:
            for h in handles:
                h.remove()
    calls: Counter = Counter()

    saved = {n: (m.weight_int, m.weight_scale.clone(), m.weight_zero_point.clone()) for n, m in layers.items()}
    rounded: list[str] = []
    from tqdm.auto import tqdm

    bar = tqdm(total=len(layers), desc="igq gptq", unit="layer", disable=not progress)

    def round_layer(name):
        def hook(_quantizer, _args, x_quant):  # the quantizer runs before its layer uses the weight
            calls[name] += 1
            if calls[name] > 1:
                return
            module = layers[name]
            x_float = float_inputs.pop(name) if compensate else None
            h, cross, _ = ops.input_correlations(x_quant, x_float)
            weight = module.weight
            target = ops.compensated_target(weight, h, cross, damp) if compensate else weight.double()
            scale, zero_point = module.weight_qparams_for(target)
            new = ops.gptq_quantize(target, h, scale, zero_point, module.w_bits, damp=damp, block_size=block_size)
            module.set_weight_codes(ops.quantize_weight(new, scale, zero_point, module.w_bits), scale, zero_point)
            rounded.append(name)
            bar.update(1)
        return hook

    handles = [s.quantizer.register_forward_hook(round_layer(n)) for n, s in site_of.items()]
    try:
        run_model(model, inputs)
    except BaseException:
        for n, (codes, s, z) in saved.items():
            m = layers[n]
            m.weight_int = codes
            m.weight_scale.copy_(s)
            m.weight_zero_point.copy_(z)
        raise
    finally:
        for h in handles:
            h.remove()
        bar.close()
        float_inputs.clear()
    shared = sorted(n for n, c in calls.items() if c > 1)
    if shared:
        logger.warning("GPTQ rounded layers called more than once per forward on their first call's inputs: %s",
                       ", ".join(shared))
    setattr(model, ROUNDED_ATTR, rounded)
    return rounded
