"""Quantizer and quantized-layer modules shared by every integration.

All quantized state is plain buffers (``lo``, ``hi``, ``weight_scale``, ...), so
``state_dict``, safetensors and framework checkpoints round-trip it. The modules work on
their own: build one, call ``start_observer()``, run data through it, call ``fit()``.

Life cycle of a quantizer: uncalibrated -> observing (``start_observer``; forward passes
activations through unchanged and records ranges) -> calibrated (``fit``; forward
fake-quantizes). Calling an uncalibrated quantizer that is not observing is an error.

The life-cycle state is Python-side (``is_calibrated``, the observer), set by fit / load_ranges
/ load_state_dict, so forward never reads a tensor as a bool and ``torch.export`` traces a
quantized model without data-dependent guards; the ``calibrated`` buffer only carries the state
through state_dict. Forward passes call the ``igq`` torch.library ops (:mod:`igq_plugin.ops.library`).
"""
from __future__ import annotations

import contextlib
import logging
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from . import ops
from .calibration import (
    DEFAULT_QUANTILE,
    DEFAULT_UPDATE,
    ChannelRangeObserver,
    ChannelSampleObserver,
    RowMaxObserver,
    ValueSampleObserver,
    fit_group_ranges,
    select_group_ranges,
    fit_row_groups,
)
from .registry import sites

__all__ = [
    "ActQuantizer",
    "SoftmaxQuantizer",
    "QuantLinear",
    "QuantConv2d",
    "WeightQuantizer",
    "iter_quantizers",
    "enable_fake_quant",
    "disable_fake_quant",
    "fake_quant_disabled",
    "sync_calibration_state",
]

logger = logging.getLogger("igq_plugin")


class _Quantizer(nn.Module):
    """Shared life cycle: observer attribute, Python-side calibration flag mirrored in the ``calibrated`` buffer."""

    _observer_cls: type = ChannelRangeObserver

    def __init__(self, bits: int, site: str) -> None:
        super().__init__()
        self.bits = ops.check_bits(bits, "bits")
        self.site = site
        self.observer = None
        self.fake_quant_enabled = True  # False: forward passes its input through (no observing, no quantizing)
        self.is_calibrated = False  # what forward reads; the buffer below only persists it
        self.register_buffer("calibrated", torch.tensor(False))

    @property
    def observing(self) -> bool:
        return self.observer is not None

    def start_observer(self, seed: int = 0) -> None:
        """Record statistics on the next forward passes. ``seed`` seeds any sampling the observer does:
        give each shard of a sharded calibration its own (e.g. its rank) and merge the observers."""
        self.observer = self._observer_cls(self.site, seed=seed)

    def mark_calibrated(self, calibrated: bool = True) -> None:
        """Set the calibration state (Python flag and the persisted buffer)."""
        self.is_calibrated = bool(calibrated)
        self.calibrated.fill_(bool(calibrated))

    def _require_calibrated(self) -> None:
        if not self.is_calibrated:
            raise RuntimeError(
                f"quantizer at site '{self.site}' is not calibrated: run calibration data through the "
                "prepared model and call igq.convert(), or use igq.quantize()"
            )

    _RANGES: tuple[str, ...] = ()  # names of the range tensors (buffers, or parameters once learnable)

    def _set_range(self, name: str, value: torch.Tensor) -> None:
        """Replace a range tensor (its shape may change), keeping it a Parameter if it was made learnable."""
        if name in self._parameters:
            self._parameters[name] = nn.Parameter(value, requires_grad=self._parameters[name].requires_grad)
        else:
            setattr(self, name, value)

    def learn_ranges(self, learn: bool = True) -> None:
        """Make the static ranges trainable parameters (LSQ-style: the igq ops give their gradients), or
        buffers again with ``learn=False``. State-dict keys do not change. Needs a calibrated quantizer."""
        if learn and not self.is_calibrated:
            raise RuntimeError(f"quantizer at site '{self.site}' is not calibrated: fit its ranges before "
                               "learning them")
        for name in self._RANGES:
            value = getattr(self, name).detach()
            if learn and name in self._buffers:
                del self._buffers[name]
                self.register_parameter(name, nn.Parameter(value.clone()))
            elif not learn and name in self._parameters:
                del self._parameters[name]
                self.register_buffer(name, value.clone())

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # Group counts can differ per site (allocation, clamping): take range shapes from the checkpoint.
        for name in self._RANGES:
            key = prefix + name
            if name in self._parameters and key in state_dict and state_dict[key].shape != self._parameters[name].shape:
                self._set_range(name, torch.empty_like(state_dict[key], device=self._parameters[name].device))
        for name, buf in self._buffers.items():
            key = prefix + name
            if buf is not None and key in state_dict and state_dict[key].shape != buf.shape:
                self._buffers[name] = torch.empty_like(state_dict[key], device=buf.device, dtype=buf.dtype)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        flag = state_dict.get(prefix + "calibrated")
        if flag is not None and flag.device.type != "meta":
            self.is_calibrated = bool(flag)


class ActQuantizer(_Quantizer):
    """Static activation quantizer of one site (channels last).

    scheme "layer": one asymmetric range [lo, hi] for the whole tensor (buffers of shape [1]):
        the min and max over calibration, or with ``percentile=p`` the (100-p)-th and p-th
        percentiles of the calibration values (e.g. 99.99).
    scheme "channel": a static range per channel (buffers [C]).
    scheme "igq": G static group ranges (buffers [G]); every instance assigns each channel to
        the nearest group (paper Eq. 5) and is quantized with that group's range.
    grid_bits (8 or 16; ``IGQConfig.act_grid``): fitted ranges are moved onto one common integer grid
        of that many bits (igq_plugin.ops.grid), signed with ``grid_signed`` (attention operands), so
        the site deploys as one (8) or two (16) standard INT8 GEMMs (igq_plugin.lowering).
    """

    def __init__(
        self,
        bits: int,
        scheme: str = "igq",
        channels: Optional[int] = None,
        num_groups: int = 8,
        *,
        update: str = DEFAULT_UPDATE,
        quantile: float = DEFAULT_QUANTILE,
        kmeans_iters: int = 100,
        percentile: Optional[float] = None,
        site: str = "",
        instance_dims: int = 1,
        grid_bits: Optional[int] = None,
        grid_signed: bool = False,
    ) -> None:
        super().__init__(bits, site)
        if grid_bits is not None:
            if scheme == "channel":
                raise ValueError(f"site '{site}': a common grid (grid_bits={grid_bits}) needs scheme 'igq' or "
                                 "'layer'; static per-channel ranges are a reference, not deployed")
            groups = 1 if scheme == "layer" or num_groups == 1 else 2
            if grid_bits not in ops.GRID_BITS:
                raise ValueError(f"site '{site}': grid_bits must be one of {ops.GRID_BITS}, got {grid_bits!r}")
            if not ops.grid_feasible(bits, grid_bits, grid_signed, groups):
                raise ValueError(f"site '{site}': {bits}-bit groups do not fit a {grid_bits}-bit common grid "
                                 "(use 16 bits, or at most 7-bit activations)")
        # Fitted group ranges are moved onto one common integer grid of this many bits (ops.grid): what
        # a deployment on standard INT8 GEMMs needs. Signed: the grid is centred (attention operands).
        self.grid_bits = grid_bits
        self.grid_signed = bool(grid_signed)
        if isinstance(instance_dims, bool) or not isinstance(instance_dims, int) or instance_dims < 1:
            raise ValueError(f"instance_dims must be an int >= 1 at site '{site}', got {instance_dims!r}")
        # Layout of this site's activation: the first instance_dims dims index instances, the
        # channel dim is last, the dims between are tokens (igq_plugin.ops.groups).
        self.instance_dims = instance_dims
        if scheme not in ("layer", "channel", "igq"):
            raise ValueError(f"scheme must be 'layer', 'channel' or 'igq', got {scheme!r}")
        if percentile is not None and (scheme != "layer" or not 50.0 < percentile <= 100.0):
            raise ValueError(
                f"percentile ranges need scheme 'layer' and 50 < percentile <= 100; got scheme {scheme!r}, "
                f"percentile {percentile!r} at site '{site}'"
            )
        self.percentile = percentile
        if scheme != "layer" and channels is None:
            raise ValueError(f"scheme {scheme!r} needs the channel count of site '{site}'")
        self.scheme = scheme
        self.channels = channels
        self.update = update
        self.quantile = quantile
        self.kmeans_iters = kmeans_iters
        self.chosen_rule: Optional[tuple[str, Optional[float]]] = None  # set by update="mse" fits
        # Per-channel weights of the "mse" error: the squared column norms of the Linear this site
        # feeds (set by set_input_error_weights), so the search minimizes that Linear's output error.
        self.error_weights: Optional[torch.Tensor] = None
        if scheme == "layer":
            size = 1
        elif scheme == "channel":
            size = channels
        else:
            size = num_groups
            if channels is not None and num_groups > channels:
                note_group_clamp(site, channels, num_groups)
                size = channels
        self.register_buffer("lo", torch.zeros(size))
        self.register_buffer("hi", torch.zeros(size))

    _RANGES = ("lo", "hi")

    @property
    def num_groups(self) -> int:
        return self.lo.numel() if self.scheme == "igq" else 1

    def start_observer(self, seed: int = 0) -> None:
        if self.percentile is not None:
            cls = ValueSampleObserver
        elif self.scheme == "igq" and self.update == "mse":
            cls = ChannelSampleObserver
        else:
            cls = ChannelRangeObserver
        self.observer = cls(self.site, seed=seed, instance_dims=self.instance_dims)

    @property
    def max_groups(self) -> int:
        """The most groups this site can use (its channel count; unbounded when unknown)."""
        return self.channels if self.channels is not None else 1 << 30

    def set_num_groups(self, num_groups: int) -> None:
        """Resize an "igq" quantizer to ``num_groups`` groups (ranges are refitted by :meth:`fit`)."""
        if self.scheme != "igq":
            raise ValueError(f"site '{self.site}' uses scheme {self.scheme!r}; only 'igq' sites have a group count")
        if not 1 <= num_groups <= self.max_groups:
            raise ValueError(f"site '{self.site}': num_groups must be in [1, {self.max_groups}], got {num_groups}")
        self._set_range("lo", torch.zeros(num_groups, device=self.lo.device))
        self._set_range("hi", torch.zeros(num_groups, device=self.hi.device))
        self.mark_calibrated(False)

    def fit_ranges(self, num_groups: Optional[int] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Static (lo, hi) ranges from the observer, without changing the quantizer.

        ``num_groups`` (scheme "igq" only): fit this many groups instead of the current count.
        """
        if self.observer is None:
            raise RuntimeError(f"quantizer at site '{self.site}' has no observer: call start_observer() and run data")
        lo, hi = self.observer.ranges()  # [instances, C]
        if self.scheme == "layer" and self.percentile is not None:
            return self._on_grid(*self.observer.percentile_range(self.percentile))
        if self.scheme == "layer":
            return self._on_grid(lo.min().reshape(1), hi.max().reshape(1))
        if self.scheme == "channel":
            return lo.amin(0), hi.amax(0)
        groups = self.lo.numel() if num_groups is None else num_groups
        if self.update == "mse":
            group_lo, group_hi, rule = select_group_ranges(
                self.observer.chunks(), groups, self.bits, max_iter=self.kmeans_iters, channel_weights=self.error_weights
            )
            self.chosen_rule = rule
            return self._on_grid(group_lo, group_hi)
        return self._on_grid(*fit_group_ranges(lo, hi, groups, update=self.update, max_iter=self.kmeans_iters,
                                               quantile=self.quantile))

    def _on_grid(self, lo: torch.Tensor, hi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Fitted ranges, moved onto one common integer grid when the site has ``grid_bits``."""
        if self.grid_bits is None:
            return lo, hi
        return ops.snap_to_grid(lo, hi, self.bits, self.grid_bits, self.grid_signed)

    def load_ranges(self, lo: torch.Tensor, hi: torch.Tensor) -> None:
        """Set static ranges (resizing the buffers to match) and mark the quantizer calibrated."""
        self._set_range("lo", lo.detach().to(self.lo.device, self.lo.dtype).clone())
        self._set_range("hi", hi.detach().to(self.hi.device, self.hi.dtype).clone())
        self.mark_calibrated(True)

    def fit(self) -> None:
        """Compute static ranges from the observer and stop observing."""
        self.load_ranges(*self.fit_ranges())
        self.observer = None

    def qparams(self) -> tuple[torch.Tensor, torch.Tensor]:
        return ops.asym_qparams(self.lo, self.hi, self.bits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.fake_quant_enabled:
            return x
        if self.observer is not None:
            self.observer.observe(x)
            return x
        self._require_calibrated()
        if self.scheme != "channel":  # "igq", and "layer" as one group: igq::group_fake_quant
            return ops.group_fake_quantize(x, self.lo, self.hi, self.bits, self.instance_dims)
        scale, zero_point = self.qparams()  # static per-channel reference (not deployable): plain aten, float32
        qmin, qmax = ops.qrange(self.bits)
        return ops.fake_quantize(x.float(), scale.float(), zero_point.float(), qmin, qmax).to(x.dtype)

    def extra_repr(self) -> str:
        grid = "" if self.grid_bits is None else f", grid_bits={self.grid_bits}{' signed' if self.grid_signed else ''}"
        return f"site={self.site!r}, bits={self.bits}, scheme={self.scheme}, groups={self.num_groups}{grid}"


def note_group_clamp(site: str, channels: int, num_groups: int) -> None:
    """Log that an IGQ site with fewer channels than ``num_groups`` uses one group per channel."""
    logger.warning("site '%s' has %d channels < num_groups=%d: using %d groups (one per channel)",
                   site, channels, num_groups, channels)


def set_input_error_weights(model: nn.Module) -> None:
    """Give every Linear-input site's quantizer the squared column norms of the fed Linear's weight
    (the diagonal of the output-error metric: ||W e||^2 ~ sum_c ||W[:, c]||^2 e_c^2), used by the
    "mse" range rule. Call after the weights are final (after reparameterization)."""
    for site in sites(model, "linear_input"):
        set_site_error_weights(site)


def set_site_error_weights(site) -> None:
    """:func:`set_input_error_weights` for one registered site."""
    if site.kind == "linear_input" and site.weight_quantizer is not None and not site.weight_quantizer.weight.is_meta:
        site.quantizer.error_weights = site.weight_quantizer.weight.detach().float().pow(2).sum(0).cpu()


class SoftmaxQuantizer(_Quantizer):
    """Post-softmax attention quantizer with static row groups [0, u_g].

    ``levels``: "uniform" (unsigned uniform, IGQ-ViT), "log_sqrt2" (RepQ-ViT) or "tanq"
    (DopQ-ViT's tangent quantizer, steepness ``steepness``); see :mod:`igq_plugin.ops.levels`.
    Every row is assigned to the group whose u_g is nearest its maximum, whatever the levels.
    """

    _observer_cls = RowMaxObserver
    _RANGES = ("hi",)

    def __init__(
        self, bits: int, num_groups: int = 1, *, update: str = DEFAULT_UPDATE, quantile: float = DEFAULT_QUANTILE,
        kmeans_iters: int = 100, levels: str = "uniform", steepness: float = ops.DEFAULT_TANQ_STEEPNESS,
        site: str = "",
    ) -> None:
        super().__init__(bits, site)
        ops.check_softmax_quantizer(levels, steepness)
        self.levels = levels
        self.steepness = float(steepness)
        self.update = update
        self.quantile = quantile
        self.kmeans_iters = kmeans_iters
        self.register_buffer("hi", torch.ones(num_groups))

    @property
    def num_groups(self) -> int:
        return self.hi.numel()

    max_groups = 1 << 30  # no channel bound: rows are many (instances x heads x queries)

    def set_num_groups(self, num_groups: int) -> None:
        """Resize to ``num_groups`` row groups (ranges are refitted by :meth:`fit`)."""
        if num_groups < 1:
            raise ValueError(f"site '{self.site}': num_groups must be >= 1, got {num_groups}")
        self._set_range("hi", torch.ones(num_groups, device=self.hi.device))
        self.mark_calibrated(False)

    def fit_ranges(self, num_groups: Optional[int] = None) -> torch.Tensor:
        """Static group maxima u_g from the observer (``num_groups`` overrides the count), quantizer unchanged."""
        if self.observer is None:
            raise RuntimeError(f"quantizer at site '{self.site}' has no observer: call start_observer() and run data")
        u = self.observer.maxima()
        groups = self.num_groups if num_groups is None else num_groups
        if groups == 1:
            return u.max().reshape(1)
        return fit_row_groups(u, groups, update=self.update, max_iter=self.kmeans_iters, quantile=self.quantile)

    def load_ranges(self, hi: torch.Tensor) -> None:
        self._set_range("hi", hi.detach().to(self.hi.device, self.hi.dtype).clone())
        self.mark_calibrated(True)

    def fit(self) -> None:
        self.load_ranges(self.fit_ranges())
        self.observer = None

    def forward(self, a: torch.Tensor) -> torch.Tensor:
        if not self.fake_quant_enabled:
            return a
        if self.observer is not None:
            self.observer.observe(a)
            return a
        self._require_calibrated()
        return ops.softmax_group_fake_quantize(a, self.hi, self.bits, self.levels, self.steepness)

    def extra_repr(self) -> str:
        extra = f", steepness={self.steepness:g}" if self.levels == "tanq" else ""
        return f"site={self.site!r}, bits={self.bits}, groups={self.num_groups}, levels={self.levels}{extra}"


class _QuantWeightMixin:
    """Per-output-channel weight fake-quantization from buffers weight_scale / weight_zero_point."""

    def _init_weight_quant(self, w_bits: int, out_channels: int, percentile: float, clipping: str = "percentile") -> None:
        self.w_bits = ops.check_bits(w_bits, "w_bits")
        if clipping not in ops.WEIGHT_CLIPPINGS:
            raise ValueError(f"weight clipping must be one of {ops.WEIGHT_CLIPPINGS}, got {clipping!r}")
        self.weight_percentile = percentile
        self.weight_clipping = clipping
        self.register_buffer("weight_scale", torch.ones(out_channels))
        self.register_buffer("weight_zero_point", torch.zeros(out_channels))
        self.weight_is_calibrated = False  # what forward reads; the buffer persists it
        self.register_buffer("weight_calibrated", torch.tensor(False))
        # Integer weight codes chosen by error-compensating rounding (igq.round_weights); empty:
        # round-to-nearest of ``weight``. ``weight`` itself always stays the float weight.
        self.register_buffer("weight_int", torch.empty(0, dtype=torch.uint8))
        self.weight_fake_quant_enabled = True

    def weight_qparams_for(self, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(scale, zero point) [O] this layer's clipping rule gives ``weight`` (percentile or MSE-optimal)."""
        return ops.clipped_weight_qparams(weight, self.w_bits, self.weight_clipping, self.weight_percentile)

    def calibrate_weight(self) -> None:
        """Set the weight quantizer from the current weights (percentile or MSE-optimal clipping)."""
        scale, zero_point = self.weight_qparams_for(self.weight)
        self.weight_scale.copy_(scale)
        self.weight_zero_point.copy_(zero_point)
        self.weight_int = self.weight_int.new_empty(0)  # rounding decisions belong to the old quantizer
        self._mark_weight_calibrated()

    @property
    def weight_rounded(self) -> bool:
        """True when the weight codes come from error-compensating rounding (``weight_int``)."""
        return self.weight_int.numel() > 0

    def set_weight_codes(self, codes: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor) -> None:
        """Install integer codes (shape of ``weight``) with their per-output-channel quantizer."""
        qmin, qmax = ops.qrange(self.w_bits)
        if codes.shape != self.weight.shape:
            raise ValueError(f"codes have shape {tuple(codes.shape)}, the weight {tuple(self.weight.shape)}")
        if codes.numel() and not (float(codes.min()) >= qmin and float(codes.max()) <= qmax):
            raise ValueError(f"codes must be integers in [{qmin}, {qmax}] for {self.w_bits}-bit weights")
        self.weight_scale.copy_(scale)
        self.weight_zero_point.copy_(zero_point)
        self.weight_int = torch.round(codes).to(device=self.weight.device, dtype=torch.uint8)
        self._mark_weight_calibrated()

    @property
    def learning_weight_scale(self) -> bool:
        """True while the step sizes are a trainable Parameter (QAT, :meth:`learn_weight_scale`)."""
        return "weight_scale" in self._parameters

    def learn_weight_scale(self, learn: bool = True) -> None:
        """Make the per-channel step sizes ``weight_scale`` a trainable Parameter (LSQ: quantized_weight
        then passes gradients to it and to the latent weights), or a buffer again with ``learn=False``.
        Learning needs the float weights themselves to be the latent weights: rounded codes
        (``weight_int``, from GPTQ or reconstruction) are first written back into ``weight`` as their
        dequantized values, so training starts from exactly the rounded model. State-dict keys do not change."""
        if learn:
            if not self.weight_is_calibrated:
                raise RuntimeError("the weight quantizer is not calibrated: call calibrate_weight() or igq.convert() "
                                   "before learning its step sizes")
            if self.learning_weight_scale:
                return
            if self.weight_rounded:
                with torch.no_grad():
                    self.weight.copy_(self.quantized_weight())
                self.weight_int = self.weight_int.new_empty(0)
            value = self._buffers.pop("weight_scale").detach().clone()
            self.register_parameter("weight_scale", nn.Parameter(value))
        elif self.learning_weight_scale:
            value = self._parameters.pop("weight_scale").detach().clamp_min(1e-8).clone()
            self.register_buffer("weight_scale", value)

    def _mark_weight_calibrated(self) -> None:
        self.weight_is_calibrated = True
        self.weight_calibrated.fill_(True)

    def quantized_weight(self) -> torch.Tensor:
        """Fake-quantized weight (the float weight while the weight quantizer is uncalibrated); while
        ``soft_rounding`` holds learned rounding variables (igq.reconstruct), the soft-rounded weight;
        while the step sizes are learned (igq_plugin.qat), the LSQ fake quantization."""
        if not (self.weight_fake_quant_enabled and self.weight_is_calibrated):
            return self.weight
        soft = self.__dict__.get("soft_rounding")
        if soft is not None:
            return ops.soft_quantize_weight(self.weight, self.weight_scale, self.weight_zero_point, self.w_bits, soft,
                                            base=self.__dict__.get("soft_rounding_base"))
        if self.weight_rounded:
            return ops.dequantize_weight(self.weight_int, self.weight_scale, self.weight_zero_point, self.weight.dtype)
        if self.learning_weight_scale:
            return ops.lsq_fake_quantize_weight(self.weight, self.weight_scale, self.weight_zero_point, self.w_bits)
        return ops.fake_quantize_weight(self.weight, self.weight_scale, self.weight_zero_point, self.w_bits)

    def integer_weight(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The weight operand of ``igq::grouped_linear``: (int8 codes minus zero point [O, ...], float32 scale [O]),
        so that the fake-quantized weight is ``scale * codes``.

        Raises ValueError when the codes minus their zero points do not fit int8 (asymmetric 8-bit
        weights can span [-255, 255]); weights of <= 7 bits always fit.
        """
        if not self.weight_is_calibrated:
            raise RuntimeError("the weight quantizer is not calibrated: call calibrate_weight() or igq.convert() first")
        zero = self.weight_zero_point.reshape((-1,) + (1,) * (self.weight.dim() - 1))
        centred = self.weight_codes().detach().float() - zero.float()
        lo, hi = (float(v) for v in torch.aminmax(centred))
        if lo < -128 or hi > 127:
            raise ValueError(
                f"{self.w_bits}-bit weight codes minus their zero points span [{lo:.0f}, {hi:.0f}], outside int8: "
                "igq::grouped_linear takes int8 weights; quantize this layer's weights to <= 7 bits"
            )
        return centred.to(torch.int8), self.weight_scale.float()

    def weight_codes(self) -> torch.Tensor:
        """Integer weight codes (in the weight's dtype)."""
        if self.weight_rounded:
            return self.weight_int.to(self.weight.dtype)
        return ops.quantize_weight(self.weight, self.weight_scale, self.weight_zero_point, self.w_bits)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        codes = state_dict.get(prefix + "weight_int")
        if codes is not None and codes.shape != self.weight_int.shape:  # rounded or not, per checkpoint
            self.weight_int = torch.empty(codes.shape, dtype=torch.uint8, device=self.weight_int.device)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        flag = state_dict.get(prefix + "weight_calibrated")
        if flag is not None and flag.device.type != "meta":
            self.weight_is_calibrated = bool(flag)


class QuantLinear(_QuantWeightMixin, nn.Module):
    """A Linear with an input activation quantizer and per-output-channel weight quantizer.

    Parameter names (``weight``, ``bias``) match nn.Linear, so checkpoints of the float model load.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        w_bits: int = 4,
        weight_percentile: float = 0.0,
        weight_clipping: str = "percentile",
        input_quantizer: Optional[ActQuantizer] = None,
    ) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None
        self._init_weight_quant(w_bits, out_features, weight_percentile, weight_clipping)
        self.input_quantizer = input_quantizer

    @classmethod
    def from_float(cls, linear: nn.Linear, **kwargs) -> "QuantLinear":
        q = cls(linear.in_features, linear.out_features, linear.bias is not None, **kwargs)
        q.weight = linear.weight
        q.bias = linear.bias
        return q.to(linear.weight.device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_quantizer is not None:
            x = self.input_quantizer(x)
        return F.linear(x, self.quantized_weight(), self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, w_bits={self.w_bits}"


class WeightQuantizer(_QuantWeightMixin, nn.Module):
    """A layer's per-output-channel weight quantizer kept apart from the layer: ``forward(weight)`` returns
    the fake-quantized weight. For graphs that quantize a weight where the layer uses it (NNCF function
    hooks) instead of replacing the layer by a :class:`QuantLinear`.

    It is a site's ``weight_quantizer`` (the weight-quantizer API of QuantLinear) once bound to its
    layer with :meth:`bind` (the layer is referenced, not a submodule: it stays where it is in the
    model); ``quantized_layer`` is that layer, which ``igq_plugin.lowering.lower`` replaces (with the
    input quantizer inside it). An adapter may set ``check_lowering`` (a callable that raises) when that
    move would be wrong, e.g. other hooks run between the quantizer and the layer. Unbound (e.g. just
    restored from a checkpoint) it still quantizes the weights it is given.
    """

    def __init__(self, out_channels: int, *, w_bits: int = 8, weight_percentile: float = 0.0,
                 weight_clipping: str = "percentile") -> None:
        super().__init__()
        self._init_weight_quant(w_bits, out_channels, weight_percentile, weight_clipping)
        self.__dict__["_layer"] = None
        self.__dict__["_current"] = None  # the weight being quantized, during forward

    def bind(self, layer: nn.Module) -> None:
        """Quantize the weight of ``layer`` (a module with ``weight`` [O, ...] and ``bias``)."""
        weight = getattr(layer, "weight", None)
        if not isinstance(weight, torch.Tensor) or weight.shape[0] != self.weight_scale.numel():
            raise ValueError(f"cannot bind a weight quantizer of {self.weight_scale.numel()} output channels to "
                             f"{type(layer).__name__} with weight {getattr(weight, 'shape', None)}")
        self.__dict__["_layer"] = layer

    @property
    def quantized_layer(self) -> Optional[nn.Module]:
        return self.__dict__["_layer"]

    def _bound(self) -> nn.Module:
        layer = self.__dict__["_layer"]
        if layer is None:
            raise RuntimeError("this WeightQuantizer is not bound to its layer: call bind(layer) (or the adapter's "
                               "register_sites(model))")
        return layer

    @property
    def weight(self) -> torch.Tensor:
        current = self.__dict__["_current"]
        return current if current is not None else self._bound().weight

    @property
    def bias(self) -> Optional[torch.Tensor]:
        return self._bound().bias

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        self.__dict__["_current"] = weight
        try:
            return self.quantized_weight()
        finally:
            self.__dict__["_current"] = None

    def extra_repr(self) -> str:
        return f"out_channels={self.weight_scale.numel()}, w_bits={self.w_bits}"


class QuantConv2d(_QuantWeightMixin, nn.Module):
    """A Conv2d (e.g. the patch embedding) with a per-tensor input quantizer and per-channel weights."""

    def __init__(
        self, conv: nn.Conv2d, *, w_bits: int = 8, weight_percentile: float = 0.0, weight_clipping: str = "percentile",
        input_quantizer: Optional[ActQuantizer] = None,
    ) -> None:
        super().__init__()
        if conv.padding_mode != "zeros":
            raise ValueError(f"QuantConv2d supports padding_mode='zeros' only, got {conv.padding_mode!r}")
        self.in_channels, self.out_channels = conv.in_channels, conv.out_channels
        self.kernel_size, self.stride, self.padding = conv.kernel_size, conv.stride, conv.padding
        self.dilation, self.groups = conv.dilation, conv.groups
        self.weight = conv.weight
        self.bias = conv.bias
        self._init_weight_quant(w_bits, conv.out_channels, weight_percentile, weight_clipping)
        self.input_quantizer = input_quantizer
        self.to(conv.weight.device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_quantizer is not None:
            x = self.input_quantizer(x)
        return F.conv2d(x, self.quantized_weight(), self.bias, self.stride, self.padding, self.dilation, self.groups)

    def extra_repr(self) -> str:
        return f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, w_bits={self.w_bits}"


def iter_quantizers(model: nn.Module):
    """Yield (name, quantizer) for every ActQuantizer / SoftmaxQuantizer in ``model``."""
    for name, module in model.named_modules():
        if isinstance(module, _Quantizer):
            yield name, module


def _fake_quant_flags(model: nn.Module) -> list[tuple[nn.Module, str]]:
    """(module, flag attribute) of every quantizer and weight quantizer: igq modules, and what registered
    sites name (an adapter's own weight quantizer needs only the weight-quantizer API)."""
    found: dict[int, tuple[nn.Module, str]] = {}
    for module in model.modules():
        if isinstance(module, _Quantizer):
            found[id(module)] = (module, "fake_quant_enabled")
        elif isinstance(module, _QuantWeightMixin):
            found[id(module)] = (module, "weight_fake_quant_enabled")
    for site in sites(model):
        if hasattr(site.quantizer, "fake_quant_enabled"):
            found.setdefault(id(site.quantizer), (site.quantizer, "fake_quant_enabled"))
        wq = site.weight_quantizer
        if wq is not None and hasattr(wq, "weight_fake_quant_enabled"):
            found.setdefault(id(wq), (wq, "weight_fake_quant_enabled"))
    return list(found.values())


def _set_fake_quant(model: nn.Module, enabled: bool) -> None:
    for module, attr in _fake_quant_flags(model):
        setattr(module, attr, enabled)


def sync_calibration_state(model: nn.Module) -> None:
    """Set every quantizer's Python-side calibration flags from its persisted buffers (``calibrated``,
    ``weight_calibrated``).

    ``load_state_dict`` does this itself; call it after a loader that assigns buffers directly
    (e.g. accelerate's meta-device loading). It reads the buffers on the host: never call it
    inside a forward that is traced.
    """
    for module in model.modules():
        if isinstance(module, _Quantizer) and not module.calibrated.is_meta:
            module.is_calibrated = bool(module.calibrated)
        elif isinstance(module, _QuantWeightMixin) and not module.weight_calibrated.is_meta:
            module.weight_is_calibrated = bool(module.weight_calibrated)


def disable_fake_quant(model: nn.Module) -> None:
    """Make every quantizer and quantized weight of ``model`` pass values through unchanged (float outputs).

    Observers stop recording too; :func:`enable_fake_quant` restores normal operation. Like
    ``torch.ao.quantization.disable_fake_quant``, but for igq_plugin modules.
    """
    _set_fake_quant(model, False)


def enable_fake_quant(model: nn.Module) -> None:
    """Undo :func:`disable_fake_quant`."""
    _set_fake_quant(model, True)


@contextlib.contextmanager
def fake_quant_disabled(model: nn.Module):
    """Run the block with every quantizer of ``model`` passing values through; restores each one's flag."""
    saved = [(module, attr, getattr(module, attr)) for module, attr in _fake_quant_flags(model)]
    disable_fake_quant(model)
    try:
        yield model
    finally:
        for module, attr, value in saved:
            setattr(module, attr, value)
