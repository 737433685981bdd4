"""Pure tensor functions of igq_plugin: no module state, no config objects.

Everything an integration or kernel needs to reproduce the core's arithmetic lives here, and the
``igq`` torch.library ops (:mod:`igq_plugin.ops.library`: group_fake_quant, group_quantize,
softmax_row_fake_quant, grouped_linear) are declared here, on import.
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
    as_instances,
    assign_rows,
    channel_ranges,
    group_fake_quantize_reference,
    group_quant_error,
    group_qparams,
    group_quantize,
    row_maxima,
    softmax_group_fake_quantize_reference,
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
from .library import (
    MAX_GROUPED_LINEAR_CHANNELS,
    group_fake_quant_grads,
    group_fake_quantize,
    group_quantize_codes,
    grouped_linear,
    grid_fake_quantize,
    grouped_linear_reference,
    softmax_group_fake_quantize,
    softmax_row_fake_quant_grads,
)
from .grid import GRID_BITS, Grid, fit_common_grid, grid_feasible, grid_multipliers, grid_of, snap_to_grid
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
from .qat import DISTILLATION_LOSSES, bin_regularizer, distillation_loss, lsq_fake_quantize_weight
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
from .weight import WEIGHT_CLIPPINGS, WEIGHT_ROUNDINGS, SOFT_ROUNDING_CODE_MARGIN, SOFT_ROUNDING_STRETCH, clipped_weight_qparams, default_weight_percentile, dequantize_weight, fake_quantize_weight, mse_weight_qparams, quantize_weight, rounding_regularizer, soft_quantize_weight, soft_rounding_codes, soft_rounding_h, soft_rounding_init, soft_rounding_start, weight_qparams

__all__ = [name for name in dir() if not name.startswith("_")]
