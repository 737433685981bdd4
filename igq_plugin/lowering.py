"""Integer lowering of a quantized model: every registered site as standard INT8 GEMM patterns.

``lower(qmodel)`` returns a copy in which the igq ops are replaced by plain aten arithmetic and
torch's own fake-quant ops, the pattern INT8 backends (OpenVINO's low-precision transformations,
torch.ao lowering) recognise and run on integer kernels:

* A Linear / patch-embedding input site: the IGQ assignment and group quantization (paper Eq. 5,
  the core's reference arithmetic in float32), then **one static per-tensor re-coding** onto the
  site's common integer grid (:mod:`igq_plugin.ops.grid`): ``fake_quantize_per_tensor_affine`` with
  the base step s0. The group-quantized values lie on that grid, so the re-coding changes nothing
  and the GEMM sees one u8 activation tensor. A grid wider than 8 bits is split into a high and a
  low byte: two GEMMs with the same weights, and the grid offset s0 * vmin * rowsum(W) folded into
  the bias.
* The weights: ``fake_quantize_per_channel_affine`` on the dequantized weights (exact), as i8 with
  zero point 0 when the codes minus their zero points fit [-128, 127] (always for <= 7 bits; a
  4-bit weight is a 256-level i8 weight whose codes use 16 levels), else as u8 with the per-channel
  zero points.
* Q, K, V operands: their quantizer, then a signed re-coding (zero point 0 in i8) when the groups
  lie on a signed 8-bit grid (``IGQConfig(act_grid=...)`` fits them so; 4-bit layer-wise operands
  always do), so both matmul inputs are INT8. Heads of fewer than 16 channels keep Q K^T in float.
* Post-softmax rows (uniform levels): the row-group codes as one u8 tensor times the per-row scale,
  which the backend moves past the P V matmul, so it runs INT8 (other levels stay float).
* A per-tensor model (every site one group, e.g. ``act_scheme="layer"``): its 8-bit sites (and uniform
  post-softmax) are plain static FakeQuantizes, the standard INT8 graph (OpenVINO then fuses each
  attention into one INT8 kernel); sites of fewer bits keep the quantize-dequantize ops before their
  re-coding. Plain FakeQuantizes round a rare element apart from torch's arithmetic; with any grouped
  site the exact arithmetic is kept, because a last-bit difference upstream can flip an Eq. 5 assignment.
* Ranges learned after calibration (QAT) are not snapped again: such a model lowers onto the approximate
  16-bit grid unless its ranges are refitted with ``act_grid``.

Sites whose groups are not on one grid (``act_grid=None``) are re-coded onto the finest 16-bit
grid, which rounds again by at most half its step (:func:`lowering_report` lists them); the result
is then no longer bit-equal to the fake-quant model. The lowered model is a plain torch model:
``torch.export`` it, or convert it with a backend's converter.
"""
from __future__ import annotations

import copy
import logging
import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from . import ops
from .modules import ActQuantizer, SoftmaxQuantizer
from .registry import clear_sites, sites

__all__ = ["lower", "lowering_report", "SiteLowering", "LoweredLinear", "LoweredConv2d"]

logger = logging.getLogger("igq_plugin")

LOWERING_ATTR = "igq_lowering"  # list of SiteLowering on the lowered model
MIN_INT8_REDUCTION = 16  # an activation x activation int8 matmul needs at least this reduction length


@dataclass(frozen=True)
class SiteLowering:
    """How one site was lowered: its grid (None for post-softmax rows), how many GEMMs its weighted
    layer runs (0: an attention operand or softmax site), and whether the matmul it feeds gets an
    integer input (``integer``; False: the backend runs that matmul in float)."""

    site: str
    kind: str
    grid: Optional[ops.Grid]
    gemms: int
    integer: bool = True


def _recode(x: torch.Tensor, grid: ops.Grid, signed: bool = False) -> torch.Tensor:
    """Exact re-coding of values on ``grid`` (span <= 255) as one per-tensor quantized tensor."""
    if signed:
        return ops.grid_fake_quantize(x, grid.step, 0, -128, 127)
    return ops.grid_fake_quantize(x, grid.step, -grid.vmin, 0, 255)


def _byte_split(x: torch.Tensor, grid: ops.Grid) -> tuple[torch.Tensor, torch.Tensor]:
    """x = s0 * (vmin + 256 h + l): the low and high bytes as per-tensor quantized tensors (offset excluded)."""
    u = (torch.round(x / grid.step) - grid.vmin).clamp(0, grid.span)
    high = torch.floor(u / 256.0)
    low = u - 256.0 * high
    return (ops.grid_fake_quantize(low * grid.step, grid.step, 0, 0, 255),
            ops.grid_fake_quantize(high * (256.0 * grid.step), 256.0 * grid.step, 0, 0, 255))


def _weight_fq(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """(i8 weight operand as float, per-channel scale, zero-point correction or None) of a weight quantizer.

    The weight is ``s * (q - z)``. When the codes minus their zero points fit [-128, 127] (always for
    <= 7 bits) that is the i8 operand. Otherwise (8-bit asymmetric) the operand is ``s * (q - 128)`` and
    ``s * (128 - z)`` [O] the correction: W x = s (q - 128) x + s (128 - z) * sum(x), an exact split into
    an i8 GEMM and a per-token sum (the CPU plugin runs u8 weights with zero points as a float GEMM)."""
    scale = module.weight_scale.detach().float()
    zero = module.weight_zero_point.detach().float().round()
    codes = module.weight_codes().detach().float()
    shape = (-1,) + (1,) * (codes.dim() - 1)
    centred = codes - zero.reshape(shape)
    if float(centred.min()) >= -128 and float(centred.max()) <= 127:
        return centred * scale.reshape(shape), scale, None
    return (codes - 128.0) * scale.reshape(shape), scale, scale * (128.0 - zero)


class _LoweredWeight(nn.Module):
    """Shared state of a lowered weighted layer: weight fake-quant constants and the input grid."""

    def _init_weight(self, module: nn.Module, input_quantizer: Optional[nn.Module], grid: Optional[ops.Grid]) -> None:
        weight, scale, correction = _weight_fq(module)
        self.register_buffer("weight", weight)
        self.register_buffer("weight_scale", scale)
        self.register_buffer("weight_zero_point", torch.zeros(scale.shape, dtype=torch.int32))
        self.register_buffer("correction", correction)  # None: the weight is i8 as it is
        bias = module.bias.detach().float() if module.bias is not None else None
        self.register_buffer("bias", bias)
        self.input_quantizer = input_quantizer
        self.grid = grid

    def quantized_weight(self) -> torch.Tensor:
        """The i8 weight operand (fake-quantized, exact: the values are on the grid already)."""
        return torch.fake_quantize_per_channel_affine(self.weight, self.weight_scale, self.weight_zero_point, 0,
                                                      -128, 127)

    def _offset_bias(self, w_sum: torch.Tensor) -> torch.Tensor:
        """Bias plus the grid offset s0 * vmin * rowsum(W) of a byte-split input."""
        offset = (self.grid.step * self.grid.vmin) * w_sum
        return offset if self.bias is None else self.bias + offset

    def _sums(self, x: torch.Tensor) -> torch.Tensor:
        """What each output sums x over (the zero-point correction's multiplicand), broadcastable to the output."""
        raise NotImplementedError

    def _run(self, x: torch.Tensor, op) -> torch.Tensor:
        dtype = x.dtype
        if self.input_quantizer is not None:
            x = self.input_quantizer(x)
        x = x.float()
        w = self.quantized_weight()
        if self.grid is None or getattr(self.input_quantizer, "single", None) is not None:
            out = op(x, w, self.bias)  # the input quantizer is this grid's FakeQuantize itself
        elif self.grid.span <= 255:
            out = op(_recode(x, self.grid), w, self.bias)
        else:
            low, high = _byte_split(x, self.grid)
            out = op(low, w, self.offset_bias) + op(high, w, None)
        if self.correction is not None:
            out = out + self._sums(x) * self._correction_view()
        return out.to(dtype)


class LoweredLinear(_LoweredWeight):
    """A quantized Linear as u8 x i8 GEMM patterns (see the module docstring)."""

    def __init__(self, module: nn.Module, input_quantizer: Optional[nn.Module], grid: Optional[ops.Grid]) -> None:
        super().__init__()
        linear = getattr(module, "quantized_layer", None) or module  # a WeightQuantizer: its layer has the sizes
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self._init_weight(module, input_quantizer, grid)
        if grid is not None and grid.span > 255:
            # the split drops the offset from the GEMM inputs (the correction sums the whole input itself)
            self.register_buffer("offset_bias", self._offset_bias(self.weight.double().sum(1).float()))

    def _sums(self, x: torch.Tensor) -> torch.Tensor:
        return x.sum(-1, keepdim=True)

    def _correction_view(self) -> torch.Tensor:
        return self.correction

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._run(x, F.linear)


class LoweredConv2d(_LoweredWeight):
    """A quantized Conv2d (patch embedding) as u8 x i8 convolution patterns."""

    def __init__(self, module: nn.Module, input_quantizer: Optional[nn.Module], grid: Optional[ops.Grid]) -> None:
        super().__init__()
        conv = getattr(module, "quantized_layer", None) or module  # a WeightQuantizer: its layer has the geometry
        self.stride, self.padding, self.dilation, self.groups = conv.stride, conv.padding, conv.dilation, conv.groups
        self._init_weight(module, input_quantizer, grid)
        if grid is not None and grid.span > 255:
            raise ValueError("a convolution input needs a grid of at most 8 bits (it is layer-wise: always true "
                             "for <= 8-bit inputs)")
        self.kernel_size = tuple(module.weight.shape[2:])
        if self.correction is not None and (self.groups != 1 or tuple(self.dilation) != (1, 1)):
            raise ValueError("a grouped or dilated convolution with 8-bit asymmetric weights cannot be lowered: "
                             "quantize its weights to <= 7 bits")

    def _sums(self, x: torch.Tensor) -> torch.Tensor:
        """Sum of each receptive field over channels and kernel window (zero padding adds 0): [B, 1, H', W']."""
        pooled = F.avg_pool2d(x.sum(1, keepdim=True), self.kernel_size, self.stride, self.padding,
                              count_include_pad=True)
        return pooled * float(self.kernel_size[0] * self.kernel_size[1])

    def _correction_view(self) -> torch.Tensor:
        return self.correction.reshape(1, -1, 1, 1)

    def _conv(self, x, w, b):
        return F.conv2d(x, w, b, self.stride, self.padding, self.dilation, self.groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._run(x, self._conv)


def _single_fq(group_lo: torch.Tensor, group_hi: torch.Tensor, bits: int, signed: bool = False) -> Optional[tuple]:
    """(scale, zero point, qmin, qmax) of the one static per-tensor FakeQuantize that equals a one-group
    quantizer (torch's fake-quant arithmetic; ties may round apart), or None with several groups.
    Signed: the i8 form, only when the zero point is mid-range (an 8-bit operand on a signed grid)."""
    if group_lo.numel() != 1:
        return None
    scale, zero = ops.asym_qparams(group_lo.detach().float(), group_hi.detach().float(), bits)
    scale, zero = float(scale), int(zero)
    top = 2**bits - 1
    if not signed:
        return scale, zero, 0, top
    if bits == 8 and zero == 128:
        return scale, 0, -128, 127
    return None


class _LoweredActQuantizer(ActQuantizer):
    """An ActQuantizer whose forward is the core's reference arithmetic in plain aten ops (no igq op),
    optionally followed by a signed re-coding (attention operands). A one-group (layer-wise) site is one
    static FakeQuantize, as any per-tensor INT8 model has."""

    signed_grid: Optional[ops.Grid] = None
    single: Optional[tuple] = None  # (scale, zero point, qmin, qmax) of a one-group site

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._require_calibrated()
        if self.scheme == "channel":
            raise RuntimeError(f"site '{self.site}' uses static per-channel ranges: not deployable")
        if self.single is not None:
            return ops.grid_fake_quantize(x.float(), *self.single).to(x.dtype)
        out = ops.group_fake_quantize_reference(x, self.lo, self.hi, self.bits, self.instance_dims)
        if self.signed_grid is not None:
            out = _recode(out.float(), self.signed_grid, signed=True).to(x.dtype)
        return out


class _LoweredSoftmaxQuantizer(SoftmaxQuantizer):
    """Uniform row groups as ``row_scale * codes``, the codes one u8 tensor (zero point 0): a backend
    moves the per-row scale past the P V matmul (diag(s) P V = diag(s) (P V)) and runs it INT8; one
    group is a plain FakeQuantize. Other levels: the core's reference arithmetic (the matmul stays float)."""

    single: Optional[tuple] = None

    def forward(self, a: torch.Tensor) -> torch.Tensor:
        self._require_calibrated()
        if self.levels != "uniform":
            return ops.softmax_group_fake_quantize_reference(a, self.hi, self.bits, self.levels, self.steepness)
        if self.single is not None:  # one static quantizer on [0, u]: a plain FakeQuantize
            return ops.grid_fake_quantize(a.float(), *self.single).to(a.dtype)
        codes, _, row_scale = ops.softmax_group_quantize(a, self.hi, self.bits, self.levels, self.steepness)
        return (ops.grid_fake_quantize(codes, 1.0, 0, 0, 255) * row_scale).to(a.dtype)


def _as_lowered(quantizer: nn.Module, cls: type) -> nn.Module:
    """The same quantizer (state shared with the copy it came from) with the lowered forward."""
    lowered = cls.__new__(cls)
    lowered.__dict__.update(quantizer.__dict__)
    return lowered


def _grid(quantizer: ActQuantizer, *, max_bits: int = 16) -> ops.Grid:
    if quantizer.scheme == "channel":
        raise ValueError(f"site '{quantizer.site}' uses static per-channel ranges (act_scheme / matmul_scheme "
                         "'channel'), a reference that no integer kernel runs: quantize with 'igq' or 'layer'")
    return ops.grid_of(quantizer.lo, quantizer.hi, quantizer.bits, max_bits=max_bits)


def _signed_grid(grid: ops.Grid) -> Optional[ops.Grid]:
    return grid if grid.exact and grid.vmin >= -128 and grid.vmax <= 127 else None


def lower(model: nn.Module) -> nn.Module:
    """A copy of the quantized ``model`` with every registered site lowered (module docstring).

    The copy's outputs equal the fake-quant model's when every grid is exact (``act_grid`` set, or
    layer-wise sites); :func:`lowering_report` says, per site, which grid and how many GEMMs.
    """
    found = sites(model)
    if not found:
        raise ValueError("the model has no quantization sites: quantize it first (igq.quantize, or an adapter's "
                         "convert), then lower it")
    for site in found:
        if not getattr(site.quantizer, "is_calibrated", False):
            raise ValueError(f"site '{site.name}' is not calibrated: calibrate and convert the model before lowering")
        if not getattr(site.quantizer, "fake_quant_enabled", True):
            raise ValueError(f"site '{site.name}' has fake quantization disabled: enable it (igq.enable_fake_quant) "
                             "before lowering, or skip the layer in the config")
        layer = site.weight_quantizer
        if layer is not None and not (layer.weight_is_calibrated and layer.weight_fake_quant_enabled):
            raise ValueError(f"the weights of '{site.consumer}' are not quantized (uncalibrated or fake quant "
                             "disabled): convert the model before lowering")
    # A per-tensor model (every site one group) gets plain FakeQuantizes: the standard INT8 graph. Their
    # arithmetic rounds a rare element apart from torch's (x * (1/s) vs x / s), which is harmless there,
    # but would flip IGQ assignments downstream (Eq. 5 is discontinuous): with any grouped site every
    # quantizer keeps the core's exact arithmetic.
    plain = all(getattr(s.quantizer, "num_groups", 1) == 1 for s in found)
    lowered = copy.deepcopy(model)
    names = {id(m): n for n, m in lowered.named_modules()}
    replace: dict[int, nn.Module] = {}  # id(original module in the copy) -> replacement
    report = []
    for site in sites(lowered):
        quantizer = site.quantizer
        if isinstance(quantizer, SoftmaxQuantizer):
            new_softmax = replace.setdefault(id(quantizer), _as_lowered(quantizer, _LoweredSoftmaxQuantizer))
            if plain and quantizer.levels == "uniform":
                scale = float(ops.softmax_row_scale("uniform", quantizer.hi.detach().float(), quantizer.bits)[0])
                new_softmax.single = (scale, 0, 0, 2**quantizer.bits - 1)
            report.append(SiteLowering(site.name, site.kind, None, 0, integer=quantizer.levels == "uniform"))
            continue
        grid = _grid(quantizer)
        new_quantizer = replace.setdefault(id(quantizer), _as_lowered(quantizer, _LoweredActQuantizer))
        if site.kind == "matmul_operand":
            # OpenVINO's CPU plugin crashes on an int8 matmul of two activations reducing over < 16
            # (measured, 2026.4): small heads keep Q K^T in float
            small_head = site.info.get("operand") in ("q", "k") and site.info.get("head_dim", 16) < MIN_INT8_REDUCTION
            new_quantizer.signed_grid = None if small_head else _signed_grid(grid)
            if plain and new_quantizer.signed_grid is not None:
                new_quantizer.single = _single_fq(quantizer.lo, quantizer.hi, quantizer.bits, signed=True)
            report.append(SiteLowering(site.name, site.kind, grid, 0, integer=new_quantizer.signed_grid is not None))
            continue
        if plain and quantizer.bits == 8:  # the consumer's re-coding is this same quantizer: one FakeQuantize
            new_quantizer.single = _single_fq(quantizer.lo, quantizer.hi, quantizer.bits)
        layer = site.weight_quantizer
        if layer is None or id(layer) not in names:
            raise ValueError(f"site '{site.name}' feeds no weighted layer of the model: cannot lower it")
        cls = LoweredConv2d if site.kind == "conv_input" else LoweredLinear
        target = getattr(layer, "quantized_layer", None)
        if target is not None:
            veto = layer.__dict__.get("check_lowering")  # the adapter that placed it can refuse (see WeightQuantizer)
            if callable(veto):
                veto()
            # A WeightQuantizer applied where the layer uses its weight (NNCF hooks on the layer's op): the
            # float layer becomes the lowered one, with the input quantizer inside (the hooks on its op would
            # otherwise run after the re-coding), and both hooks pass their tensors through.
            if id(target) not in names:
                raise ValueError(f"the layer of site '{site.name}' is not part of the model: cannot lower it")
            replace[id(target)] = cls(layer, new_quantizer, grid)
            replace[id(layer)] = nn.Identity()
            replace[id(quantizer)] = nn.Identity()
        else:
            inner = getattr(layer, "input_quantizer", None) is quantizer
            # A quantizer outside its layer (a torch.ao FX graph runs it before the layer) stays where it is, lowered.
            replace[id(layer)] = cls(layer, new_quantizer if inner else None, grid)
        report.append(SiteLowering(site.name, site.kind, grid, 1 if grid.span <= 255 else 2))
    lowered_ids = set(replace)
    for module_id, new in replace.items():
        name = names.get(module_id)
        if name is None:
            continue  # a quantizer inside a replaced layer: the replacement holds it
        inside_replaced = any(name.startswith(names[i] + ".") for i in lowered_ids if i in names and i != module_id
                              and isinstance(replace[i], _LoweredWeight))
        if inside_replaced:
            continue
        lowered.set_submodule(name, new)
    # A deployment copy: no parameter trains. (torch's fake-quant ops trace to their mask-saving
    # variants, which have no export kernels, when their input requires grad.)
    lowered.requires_grad_(False)
    for module in lowered.modules():  # the registry names the replaced modules: the lowered model has none
        clear_sites(module)
    lowered.__dict__[LOWERING_ATTR] = report
    inexact = [r.site for r in report if r.grid is not None and not r.grid.exact]
    if inexact:
        logger.warning("%d of %d sites are not on one integer grid (quantize with IGQConfig(act_grid=8 or 16) for an "
                       "exact lowering); re-coded onto a 16-bit grid, e.g. '%s'", len(inexact), len(report), inexact[0])
    return lowered


def lowering_report(lowered: nn.Module) -> list[SiteLowering]:
    """Per site of a :func:`lower` result: its grid and GEMM count."""
    report = lowered.__dict__.get(LOWERING_ATTR)
    if report is None:
        raise ValueError("not a lowered model: call igq_plugin.lowering.lower(model) first")
    return list(report)
