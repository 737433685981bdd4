"""igq_plugin: instance-aware group quantization (IGQ-ViT) for vision transformers.

    import igq_plugin as igq
    qmodel = igq.quantize(model, igq.IGQConfig(weight_bits=4, act_bits=4, num_groups=8), calibration_data)

Importing this package imports torch (and numpy/scipy on demand) only; framework adapters live
in ``igq_plugin.integrations.<name>`` and import their framework lazily.
"""
from . import allocation, ops, qat
from .allocation import report
from .attention import QuantAttention, register_attention_adapter
from .calibration import fit_group_ranges, fit_row_groups
from .config import IGQConfig
from .modules import (
    ActQuantizer,
    QuantConv2d,
    QuantLinear,
    SoftmaxQuantizer,
    WeightQuantizer,
    disable_fake_quant,
    enable_fake_quant,
    iter_quantizers,
    sync_calibration_state,
)
from .quantize import (
    LayerSettings,
    act_quantizer_kwargs,
    adopt_hooks,
    attention_quantizer,
    attention_quantizer_kwargs,
    calibrate,
    calibrate_and_convert,
    convert,
    convert_site,
    finish_quantization,
    layer_settings,
    prepare,
    quantize,
    quantized_layer,
    register_attention_sites,
    weight_quant_kwargs,
)
from .registry import SITE_KINDS, Site, get_site, register_site, sites
from .reconstruct import reconstruct
from .reparam import reparameterize
from .rounding import round_weights
from .serialization import load, save

__version__ = "0.1.0"

__all__ = [
    "IGQConfig",
    "quantize",
    "prepare",
    "sites",
    "Site",
    "SITE_KINDS",
    "register_site",
    "get_site",
    "adopt_hooks",
    "convert_site",
    "calibrate_and_convert",
    "weight_quant_kwargs",
    "attention_quantizer",
    "attention_quantizer_kwargs",
    "finish_quantization",
    "register_attention_sites",
    "LayerSettings",
    "layer_settings",
    "act_quantizer_kwargs",
    "quantized_layer",
    "calibrate",
    "convert",
    "reparameterize",
    "reconstruct",
    "round_weights",
    "save",
    "load",
    "report",
    "ops",
    "qat",
    "allocation",
    "ActQuantizer",
    "SoftmaxQuantizer",
    "QuantLinear",
    "QuantConv2d",
    "WeightQuantizer",
    "QuantAttention",
    "register_attention_adapter",
    "iter_quantizers",
    "sync_calibration_state",
    "enable_fake_quant",
    "disable_fake_quant",
    "fit_group_ranges",
    "fit_row_groups",
    "__version__",
]
