"""Calibration: streaming range observers and fitting of static group ranges.

Observers keep only per-instance summaries, never activations: a channel site stores the
(min, max) of every channel of every instance (O(instances x channels)); a softmax site stores
the maximum of every attention row (O(instances x heads x queries)).

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

import torch

from . import ops

__all__ = [
    "UPDATE_RULES",
    "DEFAULT_UPDATE",
    "DEFAULT_QUANTILE",
    "ChannelRangeObserver",
    "RowMaxObserver",
    "ValueSampleObserver",
    "kmeans_ranges",
    "fit_group_ranges",
    "fit_row_groups",
]

UPDATE_RULES = ("envelope", "mean", "quantile")
# Defaults chosen by benchmarks/update_rules.py on real DINOv2-S weights (see the module docstring).
DEFAULT_UPDATE = "quantile"
DEFAULT_QUANTILE = 0.99


def _check_finite(t: torch.Tensor, site: str) -> None:
    if not bool(torch.isfinite(t).all()):
        bad = "NaN" if bool(torch.isnan(t).any()) else "Inf"
        raise ValueError(
            f"calibration activation at site '{site}' contains {bad}; check the calibration data "
            "and the model's numerics (the input to this site must be finite)"
        )


class ChannelRangeObserver:
    """Collects per-instance per-channel (min, max) of activations [B, ..., C]."""

    def __init__(self, site: str = "") -> None:
        self.site = site
        self._lo: list[torch.Tensor] = []
        self._hi: list[torch.Tensor] = []

    def observe(self, x: torch.Tensor) -> None:
        lo, hi = ops.channel_ranges(x.detach())
        _check_finite(lo, self.site)
        _check_finite(hi, self.site)
        self._lo.append(lo.float().cpu())
        self._hi.append(hi.float().cpu())

    @property
    def num_instances(self) -> int:
        return sum(t.shape[0] for t in self._lo)

    def remap(self, fn) -> None:
        """Replace the recorded ranges by ``fn(lo, hi)`` (a monotone per-channel map of the activation)."""
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

    def __init__(self, site: str = "", samples_per_call: int = 1 << 16, seed: int = 0) -> None:
        super().__init__(site)
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


def _big_quantile(values: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    ordered = values.sort().values
    index = (q * (ordered.numel() - 1)).round().long()
    return ordered[index]


class RowMaxObserver:
    """Collects the maximum of every attention row of probabilities [..., N_q, N_k]."""

    def __init__(self, site: str = "") -> None:
        self.site = site
        self._u: list[torch.Tensor] = []

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
    sums = torch.zeros(g, 2, dtype=lo.dtype).index_add_(0, assign, torch.stack([lo, hi], 1))
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
        new[:, 0] = torch.full((g,), math.inf, dtype=lo.dtype).scatter_reduce(0, assign, lo, "amin")
        new[:, 1] = torch.full((g,), -math.inf, dtype=hi.dtype).scatter_reduce(0, assign, hi, "amax")
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
    seeds = order[((torch.arange(num_groups, dtype=torch.float64) + 0.5) / num_groups * n).long().clamp_max(n - 1)]
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
    """
    if update not in UPDATE_RULES:
        raise ValueError(f"update must be one of {UPDATE_RULES}, got {update!r}")
    if num_groups < 1:
        raise ValueError(f"num_groups must be >= 1, got {num_groups}")
    lo = lo.reshape(-1).double()
    hi = hi.reshape(-1).double()
    centres, assign = kmeans_ranges(lo, hi, num_groups, max_iter=max_iter)
    ranges = _cluster_ranges(lo, hi, assign, centres, update, quantile)
    if update != "mean":
        # Stage 2: re-assign with the quantizer ranges themselves (Eq. 5, as at inference) and
        # re-apply the rule until the assignment is stable, so channels sit in groups that cover them.
        for _ in range(max_iter):
            new_assign = ops.assign_groups(lo, hi, ranges[:, 0], ranges[:, 1])
            if torch.equal(new_assign, assign):
                break
            assign = new_assign
            ranges = _cluster_ranges(lo, hi, assign, ranges, update, quantile)
    width_order = torch.argsort(ranges[:, 1] - ranges[:, 0], stable=True)
    ranges = ranges[width_order]
    return ranges[:, 0].float(), ranges[:, 1].float()


def fit_row_groups(
    maxima: torch.Tensor, num_groups: int, *, update: str = DEFAULT_UPDATE, max_iter: int = 100, quantile: float = DEFAULT_QUANTILE
) -> torch.Tensor:
    """Fit ``num_groups`` softmax row ranges [0, u_g] to observed row maxima; returns u_g [G].

    Same k-means as channel groups with l = 0 for every row, so the distance reduces to
    |u_i - u_g| (the row assignment rule used at inference).
    """
    _, group_hi = fit_group_ranges(
        torch.zeros_like(maxima), maxima, num_groups, update=update, max_iter=max_iter, quantile=quantile
    )
    return group_hi
