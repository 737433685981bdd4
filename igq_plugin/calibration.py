"""Calibration: streaming range observers and fitting of static group ranges.

Observers keep only per-instance summaries, never activations: a channel site stores the
(min, max) of every channel of every instance (O(instances x channels)); a softmax site stores
the maximum of every attention row (O(instances x heads x queries)). Their statistics are lists of
per-batch tensors, so observers of the same site that saw different shards of the calibration data
combine exactly: ``observer.merge(other)`` (fitting the merged observer equals fitting one that saw
all the data, up to the order of instances). Sampling observers take a ``seed``: give each shard
its own (e.g. its rank), or every shard samples the same token positions.

Group ranges are fitted in two stages (DESIGN.md §1):
1. k-means in (min, max) space with the usual mean update: deterministic initialization at
   quantiles of the range width, alternating assignment (paper Eq. 5, the rule used at
   inference) and mean update until no assignment changes or ``max_iter``; an empty group is
   re-seeded with the point farthest from its centre. Mean updates converge.
2. Each cluster's quantizer range is then set by the range rule ``update``, and (for the rules
   other than "mean") assignment by Eq. 5 *to the quantizer ranges* and the rule alternate
   until the assignment is stable, as it will be used at inference:
   * ``"mean"``: the cluster mean itself. Every channel wider than its group's mean range is
     clipped; outlier channels (DINOv2's |x| ~ 90 in block 0) are cut hard.
   * ``"envelope"``: (min l, max u) over the group: at a fixed point no calibration
     channel is clipped by the group it is assigned to.
   * ``"quantile"`` (default, q = 0.99): the (1 - q) quantile of l and the q quantile of u over
     the group.
   * ``"mse"``: per site, the rule of :data:`MSE_CANDIDATES` (mean, quantile 0.8 / 0.9 / 0.95 /
     0.99, envelope) whose ranges give the least squared quantization error on sampled
     calibration tokens, each instance assigned by Eq. 5 as at inference
     (:func:`select_group_ranges`). Clipping trades resolution for outliers, and the best trade
     depends on the bit width and the site: measured on DINOv2-S at 4 bits, clipping rules
     (mean, q = 0.8) beat q = 0.99, while at 6 bits "mean" lost 10 probe points. The
     observer then also keeps ``tokens`` sampled tokens of every instance (memory O(instances x
     tokens x C)). Softmax row groups have no "mse" search: they use the default rule.
Why this order (measured on DINOv2-S block inputs, real photos, 8 bits, G=8; held-out SQNR dB,
``benchmarks/update_rules.py``): mean-only ranges clip most channels (blocks.0.attn.proj
12.1 dB vs layer-wise 24.7); envelope of the k-means clusters without stage-2 re-assignment
still clips 24% of channels (13.6 dB), because Eq. 5 sends a channel to the *nearest* range,
not the one that covers it; with stage 2 it reaches 28-29 dB. Alternating envelope updates
from the width seeds (skipping stage 1) is unstable on heavy-tailed inputs: ranges at the
cluster's outer corner attract wider channels and every group drifts to the widest ones.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from . import ops

__all__ = [
    "UPDATE_RULES",
    "DEFAULT_UPDATE",
    "DEFAULT_QUANTILE",
    "BIT_AWARE_RULES",
    "default_range_rule",
    "ChannelRangeObserver",
    "RowMaxObserver",
    "ValueSampleObserver",
    "ChannelSampleObserver",
    "MSE_CANDIDATES",
    "select_group_ranges",
    "kmeans_ranges",
    "fit_group_ranges",
    "fit_row_groups",
]

UPDATE_RULES = ("envelope", "mean", "quantile", "mse")
# The rules "mse" chooses from per site: (rule, quantile), tightest first.
MSE_CANDIDATES = (("mean", None), ("quantile", 0.8), ("quantile", 0.9), ("quantile", 0.95), ("quantile", 0.99),
                  ("envelope", None))
# Defaults chosen by benchmarks/update_rules.py on real DINOv2-S weights (see the module docstring).
DEFAULT_UPDATE = "quantile"
DEFAULT_QUANTILE = 0.99
# Bit-aware default of IGQConfig(range_update=None, range_quantile=None): (max bits, rule, quantile), the
# first entry whose max bits a site's bits do not exceed; wider sites take (DEFAULT_UPDATE, DEFAULT_QUANTILE).
# Chosen on validation data by benchmarks/range_rule_by_bits.py (DINOv2-S on held-out photos, the FMNIST ViT
# on held-out training images): at <= 4 bits "mean" (k-means with mean-updated ranges, the simplest
# reading of IGQ-ViT) is the best rule on DINOv2 (W4A4 feature cosine 0.782 against 0.423 for q = 0.99)
# and within 0.002 of the best on the FMNIST ViT; at 5 bits q = 0.9 (DINOv2 0.879 against 0.666, FMNIST
# 0.9957 against 0.9975); from 6 bits on q = 0.99 (today's rule: best at 8 bits on both).
BIT_AWARE_RULES = ((4, "mean", None), (5, "quantile", 0.9))


def default_range_rule(bits: int) -> tuple[str, float]:
    """(range rule, quantile) of a site of ``bits`` bits under the bit-aware default (BIT_AWARE_RULES)."""
    for max_bits, rule, q in BIT_AWARE_RULES:
        if bits <= max_bits:
            return rule, q if q is not None else DEFAULT_QUANTILE
    return DEFAULT_UPDATE, DEFAULT_QUANTILE


def _check_finite(t: torch.Tensor, site: str) -> None:
    if not bool(torch.isfinite(t).all()):
        bad = "NaN" if bool(torch.isnan(t).any()) else "Inf"
        raise ValueError(
            f"calibration activation at site '{site}' contains {bad}; check the calibration data "
            "and the model's numerics (the input to this site must be finite)"
        )


class ChannelRangeObserver:
    """Collects per-instance per-channel (min, max) of activations [*instances, *tokens, C]
    (the first ``instance_dims`` dims index instances)."""

    def __init__(self, site: str = "", *, seed: int = 0, instance_dims: int = 1) -> None:
        self.site = site
        self.seed = seed
        self.instance_dims = instance_dims
        self._lo: list[torch.Tensor] = []
        self._hi: list[torch.Tensor] = []

    def merge(self, other: "ChannelRangeObserver") -> None:
        """Add the statistics of ``other`` (the same site, another shard of the data) to this observer."""
        if type(other) is not type(self):
            raise TypeError(f"site '{self.site}': cannot merge a {type(other).__name__} into a {type(self).__name__}")
        for name, value in vars(other).items():
            if name.startswith("_") and isinstance(value, list):
                getattr(self, name).extend(value)

    def observe(self, x: torch.Tensor) -> None:
        lo, hi = ops.channel_ranges(x.detach(), self.instance_dims)
        _check_finite(lo, self.site)
        _check_finite(hi, self.site)
        self._lo.append(lo.float().cpu())
        self._hi.append(hi.float().cpu())

    def add_ranges(self, lo: torch.Tensor, hi: torch.Tensor) -> None:
        """Record per-instance channel ranges [instances, C] computed elsewhere (what :meth:`observe` computes,
        e.g. by an NNCF statistic collector). Only for this class: sampling observers need the values."""
        if type(self) is not ChannelRangeObserver:
            raise TypeError(f"site '{self.site}': a {type(self).__name__} needs the activations, not their ranges")
        if lo.shape != hi.shape or lo.dim() != 2:
            raise ValueError(f"site '{self.site}': ranges must both be [instances, C]; got {tuple(lo.shape)} and "
                             f"{tuple(hi.shape)}")
        for t in (lo, hi):
            _check_finite(t, self.site)
        self._lo.append(lo.detach().float().cpu())
        self._hi.append(hi.detach().float().cpu())

    @property
    def num_instances(self) -> int:
        return sum(t.shape[0] for t in self._lo)

    def remap(self, fn) -> None:
        """Replace the recorded ranges by ``fn(lo, hi)``: an increasing per-channel map of the activation,
        applied elementwise and broadcast over the last (channel) dimension."""
        pairs = [fn(lo, hi) for lo, hi in zip(self._lo, self._hi)]
        self._lo = [lo.float() for lo, _ in pairs]
        self._hi = [hi.float() for _, hi in pairs]

    def ranges(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(lo, hi), each [instances, C]."""
        if not self._lo:
            raise ValueError(f"site '{self.site}' observed no activations")
        return torch.cat(self._lo), torch.cat(self._hi)


class ValueSampleObserver(ChannelRangeObserver):
    """Per-instance channel ranges plus a bounded uniform sample of the activation values.

    Used by layer-wise *percentile* ranges: the p-th percentile of the values seen is estimated
    from at most ``samples_per_call`` values per forward (drawn with a fixed seed), so memory
    stays bounded however much calibration data runs through.
    """

    def __init__(self, site: str = "", samples_per_call: int = 1 << 16, *, seed: int = 0, instance_dims: int = 1) -> None:
        super().__init__(site, seed=seed, instance_dims=instance_dims)
        self.samples_per_call = samples_per_call
        self._gen = torch.Generator().manual_seed(seed)
        self._values: list[torch.Tensor] = []

    def observe(self, x: torch.Tensor) -> None:
        super().observe(x)
        flat = x.detach().reshape(-1).float().cpu()
        if flat.numel() > self.samples_per_call:
            flat = flat[torch.randint(flat.numel(), (self.samples_per_call,), generator=self._gen)]
        self._values.append(flat)

    def percentile_range(self, percentile: float) -> tuple[torch.Tensor, torch.Tensor]:
        """((100 - p)-th, p-th) percentile of the sampled values, each of shape [1]."""
        if not self._values:
            raise ValueError(f"site '{self.site}' observed no activations")
        values = torch.cat(self._values).double()
        q = torch.tensor([1.0 - percentile / 100.0, percentile / 100.0], dtype=torch.float64)
        lo, hi = torch.quantile(values, q) if values.numel() <= 1 << 24 else _big_quantile(values, q)
        return lo.float().reshape(1), hi.float().reshape(1)


class ChannelSampleObserver(ChannelRangeObserver):
    """Per-instance channel ranges plus ``tokens`` sampled token positions of every instance.

    The samples feed the "mse" range rule: the error of candidate group ranges is measured on
    them with each instance assigned by its full channel ranges, as at inference. Token positions
    are drawn per forward with a fixed seed (all positions when an instance has fewer).
    """

    def __init__(self, site: str = "", tokens: int = 32, *, seed: int = 0, instance_dims: int = 1) -> None:
        super().__init__(site, seed=seed, instance_dims=instance_dims)
        if tokens < 1:
            raise ValueError(f"tokens must be >= 1, got {tokens}")
        self.tokens = tokens
        self._gen = torch.Generator().manual_seed(seed)
        self._samples: list[torch.Tensor] = []

    def observe(self, x: torch.Tensor) -> None:
        super().observe(x)
        xi = ops.as_instances(x.detach(), self.instance_dims)
        if xi.shape[1] > self.tokens:
            index = torch.randperm(xi.shape[1], generator=self._gen)[: self.tokens].sort().values
            xi = xi[:, index.to(xi.device)]
        self._samples.append(xi.float().cpu())

    def remap(self, fn) -> None:
        super().remap(fn)
        self._samples = [fn(t, t)[0].float() for t in self._samples]

    def chunks(self) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """(samples [B, K, C], lo [B, C], hi [B, C]) of every observed forward."""
        if not self._samples:
            raise ValueError(f"site '{self.site}' observed no activations")
        return list(zip(self._samples, self._lo, self._hi))


def _big_quantile(values: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    ordered = values.sort().values
    index = (q * (ordered.numel() - 1)).round().long()
    return ordered[index]


class RowMaxObserver:
    """Collects the maximum of every attention row of probabilities [..., N_q, N_k]."""

    def __init__(self, site: str = "", *, seed: int = 0) -> None:
        self.site = site
        self.seed = seed
        self._u: list[torch.Tensor] = []

    merge = ChannelRangeObserver.merge

    def observe(self, a: torch.Tensor) -> None:
        u = ops.row_maxima(a.detach()).reshape(-1)
        _check_finite(u, self.site)
        self._u.append(u.float().cpu())

    @property
    def num_instances(self) -> int:
        return sum(t.numel() for t in self._u)

    def maxima(self) -> torch.Tensor:
        if not self._u:
            raise ValueError(f"site '{self.site}' observed no activations")
        return torch.cat(self._u)


def _nearest_rank_quantile(t: torch.Tensor, q: float) -> torch.Tensor:
    k = min(t.numel() - 1, max(0, math.ceil(q * t.numel()) - 1))
    return torch.kthvalue(t, k + 1).values


def _cluster_means(lo: torch.Tensor, hi: torch.Tensor, assign: torch.Tensor, centres: torch.Tensor) -> torch.Tensor:
    g = centres.shape[0]
    counts = torch.bincount(assign, minlength=g).to(lo.dtype)
    sums = torch.zeros(g, 2, dtype=lo.dtype, device=lo.device).index_add_(0, assign, torch.stack([lo, hi], 1))
    new = centres.clone()
    filled = counts > 0
    new[filled] = sums[filled] / counts[filled, None]
    return new


def _cluster_ranges(
    lo: torch.Tensor, hi: torch.Tensor, assign: torch.Tensor, centres: torch.Tensor, update: str, quantile: float
) -> torch.Tensor:
    """Final (l_g, u_g) of each cluster under the range rule ``update``."""
    if update == "mean":
        return centres
    g = centres.shape[0]
    new = centres.clone()
    if update == "envelope":
        new[:, 0] = torch.full((g,), math.inf, dtype=lo.dtype, device=lo.device).scatter_reduce(0, assign, lo, "amin")
        new[:, 1] = torch.full((g,), -math.inf, dtype=hi.dtype, device=hi.device).scatter_reduce(0, assign, hi, "amax")
        empty = torch.bincount(assign, minlength=g) == 0
        new[empty] = centres[empty]
        return new
    for k in range(g):  # "quantile"
        members = assign == k
        if bool(members.any()):
            new[k, 0] = _nearest_rank_quantile(lo[members], 1.0 - quantile)
            new[k, 1] = _nearest_rank_quantile(hi[members], quantile)
    return new


def kmeans_ranges(
    lo: torch.Tensor, hi: torch.Tensor, num_groups: int, *, max_iter: int = 100
) -> tuple[torch.Tensor, torch.Tensor]:
    """Stage 1: k-means of (min, max) pairs. Returns (centres [G, 2] float64, assignment [n])."""
    lo = lo.reshape(-1).double()
    hi = hi.reshape(-1).double()
    n = lo.numel()
    if n == 0:
        raise ValueError("no (min, max) pairs to fit group ranges to")
    points = torch.stack([lo, hi], 1)
    order = torch.argsort(hi - lo, stable=True)
    seeds = order[((torch.arange(num_groups, dtype=torch.float64, device=lo.device) + 0.5) / num_groups * n).long().clamp_max(n - 1)]
    centres = points[seeds].clone()
    assign = None
    for _ in range(max_iter):
        new_assign = ops.assign_groups(lo, hi, centres[:, 0], centres[:, 1])
        counts = torch.bincount(new_assign, minlength=num_groups)
        if bool((counts == 0).any()) and n >= num_groups:
            # Re-seed each empty group with the point farthest from its current centre.
            dist = ((points - centres[new_assign]) ** 2).sum(1)
            for k in torch.nonzero(counts == 0).flatten().tolist():
                far = int(torch.argmax(dist))
                centres[k] = points[far]
                dist[far] = -1.0
            new_assign = ops.assign_groups(lo, hi, centres[:, 0], centres[:, 1])
        if assign is not None and torch.equal(new_assign, assign):
            break
        assign = new_assign
        centres = _cluster_means(lo, hi, assign, centres)
    return centres, assign


def _check_fit_args(update: str, num_groups: int) -> None:
    if update not in UPDATE_RULES:
        raise ValueError(f"update must be one of {UPDATE_RULES}, got {update!r}")
    if num_groups < 1:
        raise ValueError(f"num_groups must be >= 1, got {num_groups}")


def _refine_ranges(
    lo: torch.Tensor, hi: torch.Tensor, centres: torch.Tensor, assign: torch.Tensor, update: str, quantile: float,
    max_iter: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Stage 2 from the k-means result: (group_lo, group_hi) float32, sorted by range width."""
    ranges = _cluster_ranges(lo, hi, assign, centres, update, quantile)
    if update != "mean":
        # Re-assign with the quantizer ranges themselves (Eq. 5, as at inference) and re-apply the
        # rule until the assignment is stable, so channels sit in groups that cover them.
        for _ in range(max_iter):
            new_assign = ops.assign_groups(lo, hi, ranges[:, 0], ranges[:, 1])
            if torch.equal(new_assign, assign):
                break
            assign = new_assign
            ranges = _cluster_ranges(lo, hi, assign, ranges, update, quantile)
    width_order = torch.argsort(ranges[:, 1] - ranges[:, 0], stable=True)
    ranges = ranges[width_order]
    return ranges[:, 0].float(), ranges[:, 1].float()


def fit_group_ranges(
    lo: torch.Tensor,
    hi: torch.Tensor,
    num_groups: int,
    *,
    update: str = DEFAULT_UPDATE,
    max_iter: int = 100,
    quantile: float = DEFAULT_QUANTILE,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fit ``num_groups`` static ranges to observed (min, max) pairs (any matching shapes).

    Returns (group_lo, group_hi), each [num_groups], sorted by range width. Deterministic.
    ``update="mse"`` needs token samples: use :func:`select_group_ranges`.
    """
    _check_fit_args(update, num_groups)
    if update == "mse":
        raise ValueError('update="mse" chooses ranges by the error on sampled tokens: call select_group_ranges')
    lo = lo.reshape(-1).double()
    hi = hi.reshape(-1).double()
    centres, assign = kmeans_ranges(lo, hi, num_groups, max_iter=max_iter)
    return _refine_ranges(lo, hi, centres, assign, update, quantile, max_iter)


def select_group_ranges(
    chunks: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
    num_groups: int,
    bits: int,
    *,
    max_iter: int = 100,
    candidates: tuple[tuple[str, Optional[float]], ...] = MSE_CANDIDATES,
    channel_weights: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor, tuple[str, Optional[float]]]:
    """The "mse" rule: group ranges of the candidate rule with the least quantization error.

    ``chunks``: (samples [B, K, C], lo [B, C], hi [B, C]) as :meth:`ChannelSampleObserver.chunks`
    gives them. One k-means of all (lo, hi) pairs; each candidate (rule, quantile) refines it;
    the error of each is :func:`ops.group_quant_error` summed over the chunks (ties: the earlier
    candidate), each channel's error weighted by ``channel_weights`` [C] when given (the squared
    column norms of the Linear the site feeds: its output error). Returns (group_lo, group_hi,
    chosen candidate).
    """
    _check_fit_args("mse", num_groups)
    if not chunks or not candidates:
        raise ValueError("select_group_ranges needs observed chunks and at least one candidate rule")
    lo = torch.cat([c[1].reshape(-1) for c in chunks]).double()
    hi = torch.cat([c[2].reshape(-1) for c in chunks]).double()
    centres, assign = kmeans_ranges(lo, hi, num_groups, max_iter=max_iter)
    best = None
    for rule, q in candidates:
        if rule not in UPDATE_RULES or rule == "mse":
            raise ValueError(f"candidate rule must be one of {UPDATE_RULES[:-1]}, got {rule!r}")
        group_lo, group_hi = _refine_ranges(lo, hi, centres, assign, rule, q if q is not None else DEFAULT_QUANTILE,
                                            max_iter)
        err = sum(float(ops.group_quant_error(x, l, h, group_lo, group_hi, bits, channel_weights))
                  for x, l, h in chunks)
        if best is None or err < best[0]:
            best = (err, group_lo, group_hi, (rule, q))
    return best[1], best[2], best[3]


def fit_row_groups(
    maxima: torch.Tensor, num_groups: int, *, update: str = DEFAULT_UPDATE, max_iter: int = 100, quantile: float = DEFAULT_QUANTILE
) -> torch.Tensor:
    """Fit ``num_groups`` softmax row ranges [0, u_g] to observed row maxima; returns u_g [G].

    Same k-means as channel groups with l = 0 for every row, so the distance reduces to
    |u_i - u_g| (the row assignment rule used at inference). ``update="mse"`` (a channel-site
    rule) falls back to the default rule here.
    """
    update = DEFAULT_UPDATE if update == "mse" else update
    _, group_hi = fit_group_ranges(
        torch.zeros_like(maxima), maxima, num_groups, update=update, max_iter=max_iter, quantile=quantile
    )
    return group_hi
