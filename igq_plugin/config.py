"""IGQConfig: the one typed, validated, serializable configuration of igq_plugin."""
from __future__ import annotations

import dataclasses
import json
import warnings
from dataclasses import dataclass, field
from typing import Any, Optional

from .calibration import UPDATE_RULES
from .ops.grid import GRID_BITS, grid_feasible
from .ops.levels import DEFAULT_TANQ_STEEPNESS, SOFTMAX_QUANTIZERS
from .ops.quant import check_bits
from .ops.weight import WEIGHT_CLIPPINGS, WEIGHT_ROUNDINGS

__all__ = [
    "IGQConfig", "ACT_SCHEMES", "CONFIG_VERSION", "CONFIG_ATTR", "GROUP_ALLOCATIONS", "REPARAMS", "SENSITIVITY_METRICS",
    "SOFTMAX_QUANTIZERS", "WEIGHT_CLIPPINGS", "WEIGHT_ROUNDINGS",
]

ACT_SCHEMES = ("layer", "channel", "igq")
REPARAMS = (None, "repq", "mosf")
GROUP_ALLOCATIONS = (None, "bop")
SENSITIVITY_METRICS = ("kl", "mse")
CONFIG_VERSION = 1
CONFIG_ATTR = "igq_config"  # attribute of a prepared / quantized model holding its IGQConfig
MAX_GROUPS = 1024  # group counts size per-site buffers and k-means work; the paper uses <= 16


def _check_int(value: Any, name: str, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int >= {minimum}, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")


CALIBRATION_WEIGHTS = ("quantized", "float")


def _check_choice(value: Any, name: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")


def _module_bits(value: Any) -> dict[str, tuple[int, int]]:
    """{pattern: bits or (weight_bits, act_bits)} -> {pattern: (weight_bits, act_bits)}, validated."""
    if not isinstance(value, dict):
        raise TypeError(f"module_bits must be a dict {{glob pattern: bits or [weight_bits, act_bits]}}, e.g. "
                        f"{{'*.mlp.fc2': [4, 8]}}; got {type(value).__name__}")
    out = {}
    for pattern, bits in value.items():
        if not isinstance(pattern, str) or not pattern:
            raise TypeError(f"module_bits keys must be non-empty glob patterns of layer names, got {pattern!r}")
        pair = (bits, bits) if isinstance(bits, int) and not isinstance(bits, bool) else bits
        if not isinstance(pair, (tuple, list)) or len(pair) != 2:
            raise ValueError(f"module_bits[{pattern!r}] must be bits (2-8) or [weight_bits, act_bits], got {bits!r}")
        for b, what in zip(pair, ("weight bits", "act bits")):
            check_bits(b, f"module_bits[{pattern!r}] {what}")
        out[pattern] = (int(pair[0]), int(pair[1]))
    return out


def _as_patterns(value: Any, name: str) -> tuple[str, ...]:
    if isinstance(value, str):
        value = (value,)
    try:
        patterns = tuple(value)
    except TypeError:
        raise TypeError(f"{name} must be a sequence of module-name glob patterns, got {value!r}") from None
    for p in patterns:
        if not isinstance(p, str):
            raise TypeError(f"{name} must contain strings (glob patterns), got {p!r}")
    return patterns


@dataclass
class IGQConfig:
    """Configuration of instance-aware group quantization.

    Bits
        weight_bits, act_bits: bits of the transformer-block Linear weights and inputs (2-8).
        softmax_bits: bits of post-softmax attention (None: act_bits).
        embed_bits, head_bits: bits (weights and inputs) of the patch embedding and the
            classifier head; None keeps that layer in full precision.
        module_bits: module-dependent bit widths: {glob pattern of layer names: bits} (weights and
            inputs) or {pattern: [weight_bits, act_bits]}, e.g. {"*.mlp.fc2": [4, 8]}, for the block
            Linears a pattern matches (the first matching pattern wins; skip, embed and head patterns
            come first). Attention operands keep act_bits / softmax_bits.
    Activation quantization
        act_scheme: "igq" (instance-aware groups), "layer" (one static range per tensor) or
            "channel" (static per-channel ranges; a non-deployable upper reference).
        num_groups: IGQ groups per Linear input site. A site with fewer channels gets one
            group per channel (a warning names it).
        softmax_groups: row groups of post-softmax attention (None: num_groups under "igq",
            1 otherwise).
        matmul_scheme: scheme of the Q, K, V operands of the attention matmuls (per-head
            channels; default "layer").
        quantize_attention: quantize Q, K, V and post-softmax attention in known attention
            modules (timm ViT/DeiT/DINOv2, Swin).
        softmax_quantizer: levels of post-softmax attention: "uniform" (IGQ-ViT), "log_sqrt2"
            (RepQ-ViT) or "tanq" (DopQ-ViT's tangent quantizer, dense near 0 and near 1); row
            groups apply to all three (igq_plugin.ops.levels).
        tanq_steepness: kappa of "tanq" (larger: levels more concentrated at 0 and 1).
    Reparameterization (igq_plugin.reparam)
        reparam: None, "repq" or "mosf": fold per-channel scales of every LayerNorm output that
            feeds only Linears (qkv, fc1) into the LayerNorm affine and those Linears (RepQ-ViT).
            The site's per-channel quantizer (calibration min/max at act_bits) becomes exactly one
            layer-wise quantizer (act_scheme "layer"), or IGQ groups are fitted on the
            reparameterized activation (act_scheme "igq"). The layer-wise scale is the mean of the
            channel scales ("repq") or DopQ-ViT's MAD-guided scale ("mosf"). The float outputs are
            checked unchanged (relative error <= 1e-3) on calibration instances.
    Calibration
        range_update: range rule of the fitted groups, one of "envelope", "mean",
            "quantile" (see igq_plugin.calibration), or "mse": per site, the rule
            with the least quantization error on sampled calibration tokens (softmax rows
            keep the default rule). None (default) with range_quantile None: bit-aware, per
            site by its bits (igq_plugin.calibration.BIT_AWARE_RULES, chosen on validation data by
            benchmarks/range_rule_by_bits.py): "mean" at <= 4 bits, "quantile" q = 0.9 at 5 bits,
            q = 0.99 from 6 bits on.
        range_quantile: q of the "quantile" rule (None: 0.99, or the bit-aware default; a q given
            alone selects the "quantile" rule).
        kmeans_iters: iteration cap of the group fitting.
        act_percentile: for sites whose scheme is "layer" (block Linear inputs under
            act_scheme="layer", Q/K/V operands under matmul_scheme="layer"): clip at the
            (100-p)-th / p-th percentile of the calibration values (e.g. 99.99) instead of
            min / max. None (default): min-max. Not used by "channel" / "igq" sites.
        act_grid: None (default) or 8 / 16: fit every activation site's group ranges onto one common
            integer grid of that many bits (group steps whole multiples of one base step, igq_plugin.ops.grid),
            so the deployed layer is one (8) or two (16) standard u8 x i8 GEMMs on the CPU
            (igq_plugin.integrations.openvino). Q, K, V operands get a signed grid (zero point 0 in the
            matmul; 8-bit Q/K/V groups then share one symmetric range). 8 needs act_bits <= 7 (or one
            group). None: unconstrained groups; export then re-codes them onto an approximate 16-bit grid.
    Weights
        weight_clipping: "percentile" (default; ``weight_percentile``) or "mse": per output channel, the
            clipping range minimizing the channel's squared rounding error (igq_plugin.ops.mse_weight_qparams).
        weight_percentile: clipping eps in percent per output channel (None: 5e-2 at <= 4 bits,
            1e-3 at 5-6 bits, 0 = min-max at 7-8 bits).
        weight_rounding: "nearest" (default) or "gptq": after the activation ranges are fitted, round
            every Linear's weights with GPTQ second-order error compensation on the inputs the
            quantized model feeds it (IGQ-quantized, upstream layers already rounded), layer by
            layer in forward order (igq_plugin.rounding.round_weights). Costs two more passes over
            the calibration data, held in memory as one batch.
        gptq_damp: Hessian damping of "gptq", as a fraction of its mean diagonal.
        reconstruct_iters: 0 (default, off) or the steps per transformer block of block reconstruction
            after calibration (igq.reconstruct on the calibration data, its other defaults: learned
            rounding and ranges). More images than the usual 32 help; call igq.reconstruct yourself to
            give it its own images.
        calibration_weights: "quantized" (default): activations are observed downstream of
            quantized weights (the model as it will run); "float": weights stay float while
            calibrating (torch.ao's post-training convention: a plain ``prepare_fx`` model calibrates
            this way). Each of igq.quantize, prepare_igq_fx and the pt2e IGQQuantizer honours it.
    Sites
        skip: module-name glob patterns left in full precision.
        embed_patterns, head_patterns: glob patterns that identify the patch embedding and
            the classifier head.
    Allocation (paper Eq. 9-10; igq_plugin.allocation)
        group_allocation: None (uniform num_groups) or "bop": choose each IGQ site's group count
            among ``allocation_candidates`` minimizing the summed sensitivity psi under a BOP
            budget (exact multiple-choice knapsack). Sites: Linear inputs, and post-softmax rows
            unless softmax_groups is set.
        bop_budget: None (default): the BOPs of the model with uniform num_groups; a number in
            (0, 1]: that fraction of the FP32 model's BOPs; a number > 1: absolute BOPs per instance.
        allocation_candidates: group counts tried per site (default 1, 2, 4, 8, 12, 16).
        sensitivity_metric: "kl" (default; KL of softmax outputs: classifiers, or a backbone
            through a task head passed to igq.quantize(head=...)) or "mse" (relative squared
            error of the outputs: a feature distance for backbones).
        sensitivity_images: calibration instances the sensitivities are measured on (None: all;
            group ranges are always fitted on all of them). Fewer is proportionally faster.
    """

    weight_bits: int = 4
    act_bits: int = 4
    num_groups: int = 8
    act_scheme: str = "igq"
    softmax_groups: Optional[int] = None
    softmax_bits: Optional[int] = None
    matmul_scheme: str = "layer"
    quantize_attention: bool = True
    softmax_quantizer: str = "uniform"
    tanq_steepness: float = DEFAULT_TANQ_STEEPNESS
    reparam: Optional[str] = None
    embed_bits: Optional[int] = 8
    head_bits: Optional[int] = 8
    module_bits: dict = field(default_factory=dict)
    range_update: Optional[str] = None
    range_quantile: Optional[float] = None
    kmeans_iters: int = 100
    act_percentile: Optional[float] = None
    act_grid: Optional[int] = None
    weight_clipping: str = "percentile"
    weight_percentile: Optional[float] = None
    weight_rounding: str = "nearest"
    gptq_damp: float = 0.1
    reconstruct_iters: int = 0
    calibration_weights: str = "quantized"
    skip: tuple[str, ...] = ()
    embed_patterns: tuple[str, ...] = ("*patch_embed*",)
    head_patterns: tuple[str, ...] = ("head", "head.*", "classifier", "classifier.*")
    group_allocation: Optional[str] = None
    bop_budget: Optional[float] = None
    allocation_candidates: tuple[int, ...] = (1, 2, 4, 8, 12, 16)
    sensitivity_metric: str = "kl"
    sensitivity_images: Optional[int] = None
    version: int = field(default=CONFIG_VERSION, repr=False)

    def __post_init__(self) -> None:
        check_bits(self.weight_bits, "weight_bits")
        check_bits(self.act_bits, "act_bits")
        for name in ("softmax_bits", "embed_bits", "head_bits"):
            value = getattr(self, name)
            if value is not None:
                check_bits(value, name)
        self.module_bits = _module_bits(self.module_bits)
        _check_choice(self.act_scheme, "act_scheme", ACT_SCHEMES)
        _check_choice(self.matmul_scheme, "matmul_scheme", ACT_SCHEMES)
        _check_int(self.num_groups, "num_groups", 1)
        if self.softmax_groups is not None:
            _check_int(self.softmax_groups, "softmax_groups", 1)
        for name in ("num_groups", "softmax_groups"):
            value = getattr(self, name)
            if value is not None and value > MAX_GROUPS:
                raise ValueError(f"{name} must be <= {MAX_GROUPS} (IGQ-ViT uses 4-16 groups), got {value}")
        if not isinstance(self.quantize_attention, bool):
            raise TypeError(f"quantize_attention must be a bool, got {self.quantize_attention!r}")
        _check_choice(self.softmax_quantizer, "softmax_quantizer", SOFTMAX_QUANTIZERS)
        if (isinstance(self.tanq_steepness, bool) or not isinstance(self.tanq_steepness, (int, float))
                or not 0 < self.tanq_steepness < 1e6):
            raise ValueError(f"tanq_steepness must be a positive number (e.g. 4.0), got {self.tanq_steepness!r}")
        _check_choice(self.reparam, "reparam", REPARAMS)
        _check_choice(self.range_update, "range_update", (None,) + UPDATE_RULES)
        if self.range_quantile is not None and (
                isinstance(self.range_quantile, bool) or not isinstance(self.range_quantile, (int, float))
                or not 0.5 < self.range_quantile <= 1.0):
            raise ValueError(f"range_quantile must be None (bit-aware default) or a float in (0.5, 1], got "
                             f"{self.range_quantile!r}")
        _check_int(self.kmeans_iters, "kmeans_iters", 1)
        if self.act_percentile is not None:
            if isinstance(self.act_percentile, bool) or not isinstance(self.act_percentile, (int, float)):
                raise TypeError(f"act_percentile must be a float in (50, 100] percent or None, got {self.act_percentile!r}")
            if not 50.0 < self.act_percentile <= 100.0:
                raise ValueError(f"act_percentile must be in (50, 100] percent (e.g. 99.99), got {self.act_percentile}")
        if self.act_grid is not None:
            _check_choice(self.act_grid, "act_grid", (None,) + GRID_BITS)
            if self.act_scheme == "channel":
                raise ValueError("act_grid needs act_scheme 'igq' or 'layer': static per-channel ranges are a "
                                 "reference, not deployed")
            one_group = self.act_scheme == "layer" or self.num_groups == 1
            if not grid_feasible(self.act_bits, self.act_grid, groups=1 if one_group else 2):
                raise ValueError(f"act_grid={self.act_grid} cannot hold {self.act_bits}-bit groups: use act_grid=16 "
                                 "(two GEMMs) or act_bits <= 7")
        _check_choice(self.weight_clipping, "weight_clipping", WEIGHT_CLIPPINGS)
        if self.weight_percentile is not None:
            if isinstance(self.weight_percentile, bool) or not isinstance(self.weight_percentile, (int, float)):
                raise TypeError(f"weight_percentile must be a float in [0, 50) percent, got {self.weight_percentile!r}")
            if not 0.0 <= self.weight_percentile < 50.0:
                raise ValueError(f"weight_percentile must be in [0, 50) percent, got {self.weight_percentile}")
        _check_choice(self.weight_rounding, "weight_rounding", WEIGHT_ROUNDINGS)
        _check_choice(self.calibration_weights, "calibration_weights", CALIBRATION_WEIGHTS)
        if (isinstance(self.gptq_damp, bool) or not isinstance(self.gptq_damp, (int, float))
                or not 0.0 <= self.gptq_damp < 1e3):
            raise ValueError(f"gptq_damp must be a number >= 0 (fraction of the mean Hessian diagonal, e.g. 0.1), "
                             f"got {self.gptq_damp!r}")
        if (isinstance(self.reconstruct_iters, bool) or not isinstance(self.reconstruct_iters, int)
                or self.reconstruct_iters < 0):
            raise ValueError(f"reconstruct_iters must be an int >= 0 (0: no block reconstruction), got "
                             f"{self.reconstruct_iters!r}")
        self.skip = _as_patterns(self.skip, "skip")
        self.embed_patterns = _as_patterns(self.embed_patterns, "embed_patterns")
        self.head_patterns = _as_patterns(self.head_patterns, "head_patterns")
        _check_choice(self.group_allocation, "group_allocation", GROUP_ALLOCATIONS)
        if self.bop_budget is not None:
            if (isinstance(self.bop_budget, bool) or not isinstance(self.bop_budget, (int, float))
                    or not 0 < self.bop_budget < float("inf")):
                raise ValueError(
                    f"bop_budget must be None (BOPs of uniform num_groups), a fraction in (0, 1] of the FP32 BOPs or "
                    f"a BOP count > 1; got {self.bop_budget!r}"
                )
        if isinstance(self.allocation_candidates, int) or not self.allocation_candidates:
            raise ValueError(f"allocation_candidates must be a non-empty sequence of group counts, got {self.allocation_candidates!r}")
        self.allocation_candidates = tuple(self.allocation_candidates)
        for g in self.allocation_candidates:
            _check_int(g, "allocation_candidates entries", 1)
            if g > MAX_GROUPS:
                raise ValueError(f"allocation_candidates entries must be <= {MAX_GROUPS}, got {g}")
        _check_choice(self.sensitivity_metric, "sensitivity_metric", SENSITIVITY_METRICS)
        if self.sensitivity_images is not None:
            _check_int(self.sensitivity_images, "sensitivity_images", 1)
        if self.version != CONFIG_VERSION:
            raise ValueError(f"IGQConfig version {self.version} is not supported (this igq_plugin writes {CONFIG_VERSION})")
        if self.group_allocation is not None and self.act_scheme != "igq":
            raise ValueError(f"group_allocation={self.group_allocation!r} chooses IGQ group counts: it needs "
                             f"act_scheme='igq', got act_scheme={self.act_scheme!r}")
        if self.act_grid is not None and self.act_bits == 8 and self.matmul_scheme == "igq" and self.quantize_attention:
            warnings.warn("IGQConfig: act_grid with 8-bit Q/K/V groups: an INT8 matmul of two activations needs a "
                          "signed 8-bit grid, on which 8-bit groups all become one symmetric range "
                          "(matmul_scheme='igq' then acts as 'layer')", UserWarning, stacklevel=3)
        for message in self._ignored_fields():
            warnings.warn(f"IGQConfig: {message}", UserWarning, stacklevel=3)

    def _ignored_fields(self) -> list[str]:
        """Messages for fields set away from their default where the rest of the config never reads them."""
        default = {f.name: f.default for f in dataclasses.fields(self) if f.default is not dataclasses.MISSING}
        changed = {name for name, value in default.items() if getattr(self, name) != value}
        if tuple(self.allocation_candidates) != (1, 2, 4, 8, 12, 16):
            changed.add("allocation_candidates")
        rules = [
            ("tanq_steepness", self.softmax_quantizer != "tanq", "softmax_quantizer is not 'tanq'"),
            ("act_percentile", not (self.act_scheme == "layer" or (self.quantize_attention and self.matmul_scheme == "layer")),
             "no site is layer-wise (act_scheme and matmul_scheme are not 'layer')"),
            ("gptq_damp", self.weight_rounding != "gptq", "weight_rounding is not 'gptq'"),
            ("weight_percentile", self.weight_clipping != "percentile", "weight_clipping is not 'percentile'"),
            ("range_quantile", self.range_update in ("mean", "envelope"), f"range_update is {self.range_update!r}"),
            ("num_groups", self.act_scheme != "igq" and self.matmul_scheme != "igq",
             "no site uses IGQ groups (act_scheme and matmul_scheme are not 'igq')"),
        ]
        for name in ("bop_budget", "allocation_candidates", "sensitivity_metric", "sensitivity_images"):
            rules.append((name, self.group_allocation is None, "group_allocation is None"))
        for name in ("softmax_groups", "softmax_bits", "softmax_quantizer", "tanq_steepness", "matmul_scheme"):
            rules.append((name, not self.quantize_attention, "quantize_attention is False"))
        return [f"{name}={getattr(self, name)!r} has no effect: {why}" for name, unused, why in rules
                if unused and name in changed]

    # Presets ---------------------------------------------------------------------------
    @classmethod
    def repq_vit(cls, bits: int = 4, **changes: Any) -> "IGQConfig":
        """RepQ-ViT (Li et al., ICCV 2023) in this engine: layer-wise activations, post-LayerNorm
        scale reparameterization, log-sqrt(2) post-softmax quantizer (one range per site)."""
        fields = dict(weight_bits=bits, act_bits=bits, act_scheme="layer", reparam="repq",
                      softmax_quantizer="log_sqrt2", softmax_groups=1)
        return cls(**{**fields, **changes})

    @classmethod
    def dopq_vit(cls, bits: int = 4, **changes: Any) -> "IGQConfig":
        """DopQ-ViT's post-training quantizers (Yang et al., 2024) in this engine: RepQ-ViT's layout
        with the MAD-guided reparameterization scale and the TanQ post-softmax quantizer.
        (DopQ-ViT's block reconstruction is not part of this preset.)"""
        fields = dict(weight_bits=bits, act_bits=bits, act_scheme="layer", reparam="mosf",
                      softmax_quantizer="tanq", softmax_groups=1)
        return cls(**{**fields, **changes})

    @classmethod
    def igq_plus(cls, bits: int = 4, **changes: Any) -> "IGQConfig":
        """IGQ-ViT with every ingredient the W4A4 ablation kept (benchmarks/ablation_w4a4.py): TanQ
        post-softmax levels, MSE weight clipping, GPTQ weight rounding on the quantized inputs and
        IGQ groups on the Q, K, V operands. Every site quantized, as in the default config."""
        fields = dict(weight_bits=bits, act_bits=bits, softmax_quantizer="tanq", weight_clipping="mse",
                      weight_rounding="gptq", matmul_scheme="igq")
        return cls(**{**fields, **changes})

    # Effective values -------------------------------------------------------------------
    @property
    def effective_softmax_groups(self) -> int:
        if self.softmax_groups is not None:
            return self.softmax_groups
        return self.num_groups if self.act_scheme == "igq" else 1

    @property
    def effective_softmax_bits(self) -> int:
        return self.softmax_bits if self.softmax_bits is not None else self.act_bits

    # Serialization ----------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        for key in ("skip", "embed_patterns", "head_patterns", "allocation_candidates"):
            d[key] = list(d[key])
        d["module_bits"] = {pattern: list(bits) for pattern, bits in self.module_bits.items()}
        d["type"] = type(self).__name__
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "IGQConfig":
        if not isinstance(d, dict):
            raise TypeError(f"IGQConfig.from_dict expects a dict, got {type(d).__name__}")
        d = dict(d)
        kind = d.pop("type", cls.__name__)
        if kind != "IGQConfig":
            raise ValueError(f"not an IGQConfig dict (type={kind!r})")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown IGQConfig field(s) {unknown}; valid fields: {sorted(names)}")
        return cls(**d)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "IGQConfig":
        return cls.from_dict(json.loads(text))

    def replace(self, **changes: Any) -> "IGQConfig":
        """A copy with some fields changed (validated)."""
        return dataclasses.replace(self, **changes)

