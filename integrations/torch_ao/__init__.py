"""IGQ for torch.ao: the FX flow (``prepare_fx`` with an IGQ qconfig mapping) and the pt2e flow
(``torch.export`` + :class:`IGQQuantizer` with torchao's ``prepare_pt2e`` / ``convert_pt2e``).

FX (torch.ao ships with torch)::

    from torch.ao.quantization.quantize_fx import prepare_fx
    from igq_plugin.integrations.torch_ao import get_igq_qconfig_mapping, get_igq_backend_config, convert_igq_fx

    prepared = prepare_fx(model.eval(), get_igq_qconfig_mapping(cfg), example_inputs,
                          backend_config=get_igq_backend_config())   # backend_config: attention matmuls too
    for x in calibration_batches:
        prepared(x)                      # observers record per-instance channel ranges
    qmodel = convert_igq_fx(prepared)    # never convert_fx: it collapses the groups to one range

pt2e (needs ``torchao``)::

    from torchao.quantization.pt2e.quantize_pt2e import prepare_pt2e, convert_pt2e
    from igq_plugin.integrations.torch_ao import IGQQuantizer

    prepared = prepare_pt2e(torch.export.export(model.eval(), example_inputs).module(), IGQQuantizer(cfg))
    for x in calibration_batches:
        prepared(x)
    qmodel = convert_pt2e(prepared)      # the observers write the igq quantizers and QuantLinears

Both flows only convert and wire: the quantizers, the group-range fit, the weight quantizers and
the site records are the core's (``igq.layer_settings``, ``igq.attention_quantizer``,
``igq.quantized_layer``, ``igq.register_site``), so GPTQ rounding and ``igq.report`` work on the
converted models; they persist through ``torch.export`` (``torch.export.save`` / ``load``).

Sites each flow reaches: the input of every nn.Linear (head / patch embedding layer-wise at their
bits, ``skip`` float; the patch-embedding Conv2d too) and, with ``quantize_attention``, the Q, K,
V operands and post-softmax rows of every *unfused* attention in the traced graph (timm:
``fused_attn = False``; Hugging Face: eager attention). A fused ``scaled_dot_product_attention``
hides Q K^T and the softmax: its operands stay float (both flows say so in a warning). The FX flow
needs ``backend_config=get_igq_backend_config()`` for the attention matmuls written with ``@``.
"""
from __future__ import annotations

from .fx import (IGQFakeQuantize, IGQWeightFakeQuantize, convert_igq_fx, fit_ranges, get_igq_backend_config,
                 get_igq_qconfig, get_igq_qconfig_mapping, prepare_igq_fx)

__all__ = ["IGQFakeQuantize", "IGQWeightFakeQuantize", "get_igq_qconfig", "get_igq_qconfig_mapping",
           "get_igq_backend_config", "prepare_igq_fx", "fit_ranges", "convert_igq_fx", "IGQQuantizer", "IGQObserver"]


def __getattr__(name: str):
    if name in ("IGQQuantizer", "IGQObserver"):  # torchao is imported only when the pt2e flow is used
        from .. import require

        require("torchao", "torchao")  # a clear ImportError naming the extra when torchao is missing
        from . import pt2e

        return getattr(pt2e, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
