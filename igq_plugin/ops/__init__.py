"""Pure tensor functions of igq_plugin: no module state, no config objects.

Everything an integration or kernel needs to reproduce the core's arithmetic lives here.
"""
from .bops import (
    FP_OP_BOPS,
    attention_macs,
    igq_linear_overhead_ops,
    linear_macs,
    mac_bops,
    softmax_group_overhead_ops,
)
from .groups import (
    assign_groups,
    assign_rows,
    channel_ranges,
    group_fake_quantize,
    group_quant_error,
    group_qparams,
    group_quantize,
    row_maxima,
    softmax_group_fake_quantize,
    softmax_group_quantize,
)
from .gptq import compensated_target, gptq_quantize, hessian_error, input_correlations, round_to_nearest
from .levels import (
    DEFAULT_TANQ_STEEPNESS,
    SOFTMAX_QUANTIZERS,
    check_softmax_quantizer,
    dequantize_probs,
    quantize_probs,
    softmax_level_table,
    softmax_row_scale,
)
from .linear import int_grouped_linear
from .metrics import cosine, sqnr_db
from .quant import (
    MAX_BITS,
    MIN_BITS,
    asym_qparams,
    asym_range,
    check_bits,
    dequantize,
    fake_quantize,
    qrange,
    quantize,
    sym_qparams,
)
from .reparam import (
    fold_layernorm,
    fold_linear,
    mean_target_scale,
    mosf_target_scale,
    reparam_channel_qparams,
    reparam_factors,
    reparam_ranges,
    reparam_target_zero_point,
)
from .weight import WEIGHT_CLIPPINGS, WEIGHT_ROUNDINGS, default_weight_percentile, dequantize_weight, fake_quantize_weight, mse_weight_qparams, quantize_weight, weight_qparams

__all__ = [name for name in dir() if not name.startswith("_")]
