"""Group-size allocation under a bit-operation budget (paper Eq. 9-10; DESIGN.md §1).

    prepared = igq.prepare(model, cfg)            # cfg.group_allocation == "bop"
    igq.calibrate(prepared, data)
    result = igq.allocation.allocate(prepared, data, cfg)   # sets every site's group count
    qmodel = igq.convert(prepared)

``igq.quantize`` runs these steps itself when ``cfg.group_allocation == "bop"``.
"""
from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import nn

from ..config import CONFIG_ATTR
from .._inputs import check_calibration_data, model_device, model_input, run_model, to_device
from ..modules import fake_quant_disabled
from ..registry import sites
from ..reparam import REPARAM_ATTR, reparameterize
from .cost import CostReport, SiteCost, _first_tensor, record_site_shapes, site_costs
from .sensitivity import METRICS, find_blocks, output_distance, site_sensitivity
from .solver import InfeasibleBudgetError, min_feasible_budget, solve_multiple_choice_knapsack

__all__ = [
    "Allocation",
    "allocate",
    "allocatable_sites",
    "resolve_budget",
    "report",
    "CostReport",
    "SiteCost",
    "record_site_shapes",
    "site_costs",
    "site_sensitivity",
    "output_distance",
    "find_blocks",
    "METRICS",
    "solve_multiple_choice_knapsack",
    "min_feasible_budget",
    "InfeasibleBudgetError",
    "ALLOCATION_ATTR",
]

ALLOCATION_ATTR = "igq_allocation"

logger = logging.getLogger("igq_plugin")


@dataclass
class Allocation:
    """Result of :func:`allocate`: per site the candidates, psi, BOPs and the chosen group count."""

    sites: list  # cost-record names (Linear module, "<attention>.av")
    candidates: list  # per site, group counts tried
    psi: list  # per site, psi for each candidate
    bops: list  # per site, BOPs for each candidate
    groups: list  # per site, the chosen group count
    budget: float
    fixed_bops: int  # BOPs of every site that is not allocated
    total_bops: int  # fixed + chosen
    fp_bops: int
    metric: str

    def to_dict(self) -> dict[str, Any]:
        return {
            "metric": self.metric,
            "budget_bops": self.budget,
            "total_bops": self.total_bops,
            "fixed_bops": self.fixed_bops,
            "fp_bops": self.fp_bops,
            "sites": [
                {"site": s, "groups": g, "candidates": list(c), "psi": list(p), "bops": list(b)}
                for s, g, c, p, b in zip(self.sites, self.groups, self.candidates, self.psi, self.bops)
            ],
        }


def allocatable_sites(prepared: nn.Module, config) -> dict[str, tuple[str, nn.Module]]:
    """Site name -> (cost-record name, quantizer) of the sites whose group count is allocated.

    Linear-input sites under ``act_scheme="igq"``, and post-softmax row groups unless
    ``softmax_groups`` fixes them (igq.sites).
    """
    if config.act_scheme != "igq":
        return {}
    found = {}
    for site in sites(prepared):
        q = site.quantizer
        if site.kind == "linear_input" and getattr(q, "scheme", None) == "igq":
            found[site.name] = (site.consumer, q)
        elif site.kind == "softmax" and config.softmax_groups is None:
            found[site.name] = (f"{site.consumer}.av", q)
    return found


def resolve_budget(bop_budget: Optional[float], uniform_bops: float, fp_bops: float) -> float:
    """Budget in BOPs: None -> ``uniform_bops`` (every allocated site at num_groups); (0, 1] -> that
    fraction of the FP32 BOPs; > 1 -> an absolute BOP count."""
    if bop_budget is None:
        return float(uniform_bops)
    if bop_budget <= 1.0:
        return float(bop_budget) * fp_bops
    return float(bop_budget)


def _as_inputs(calibration_data: Any) -> list:
    check_calibration_data(calibration_data)
    batches = [calibration_data] if isinstance(calibration_data, torch.Tensor) else list(calibration_data)
    return [model_input(b, i) for i, b in enumerate(batches)]


def _batch_size(x: Any) -> int:
    t = x if isinstance(x, torch.Tensor) else _first_tensor((), x)
    return t.shape[0] if t is not None and t.dim() > 0 else 1


def _sensitivity_inputs(inputs: list, limit: Optional[int], batch_size: int) -> list:
    """The first ``limit`` instances (all if None); same-shaped tensors re-batched by ``batch_size``."""
    if limit is not None:
        kept, count = [], 0
        for x in inputs:
            if count >= limit:
                break
            n, room = _batch_size(x), limit - count
            if n > room:
                x = x[:room] if isinstance(x, torch.Tensor) else {
                    k: v[:room] if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] == n else v
                    for k, v in x.items()}
            kept.append(x)
            count += min(n, room)
        inputs = kept
    if inputs and all(isinstance(x, torch.Tensor) for x in inputs) and len({tuple(x.shape[1:]) for x in inputs}) == 1:
        return list(torch.cat(inputs).split(batch_size))  # fewer, larger forwards
    return inputs


def allocate(
    prepared: nn.Module,
    calibration_data: Any,
    config=None,
    *,
    head: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
    output_fn: Optional[Callable[[nn.Module, Any], Any]] = None,
    batch_size: int = 32,
    progress: bool = True,
) -> Allocation:
    """Choose every allocatable site's group count under the BOP budget and resize its quantizer.

    ``prepared`` must be calibrated (observers still holding statistics, i.e. before
    ``igq.convert``). ``calibration_data`` is run again for the sensitivities; ``config`` defaults
    to the one ``igq.prepare`` stored. See :mod:`igq_plugin.allocation.sensitivity` for ``head``
    and ``output_fn``. Raises :class:`InfeasibleBudgetError` (with the minimum feasible budget)
    when no allocation fits.
    """
    config = getattr(prepared, CONFIG_ATTR, None) if config is None else config
    if config is None:
        raise ValueError("allocate needs the IGQConfig: pass config= or use a model from igq.prepare")
    if config.reparam and getattr(prepared, REPARAM_ATTR, None) is None:
        reparameterize(prepared, target=config.reparam)  # sensitivities must see the final quantizers
    sites = allocatable_sites(prepared, config)
    unseen = [n for n, (_, q) in sites.items() if q.observer is not None and q.observer.num_instances == 0]
    if unseen:
        logger.warning("group allocation skips %d site(s) that saw no calibration data: %s", len(unseen), ", ".join(unseen))
        sites = {n: v for n, v in sites.items() if n not in unseen}
    if not sites:
        raise ValueError(
            "group allocation found no IGQ site: it needs act_scheme='igq' (Linear inputs) or softmax row groups "
            f"(got act_scheme={config.act_scheme!r}, softmax_groups={config.softmax_groups!r})"
        )
    inputs = _as_inputs(calibration_data)
    device = model_device(prepared)
    inputs = [to_device(x, device) for x in _sensitivity_inputs(inputs, config.sensitivity_images, batch_size)]
    costs = site_costs(prepared)
    by_name = {c.site: c for c in costs.sites}
    missing = [record for record, _ in sites.values() if record not in by_name]
    if missing:
        raise ValueError(f"no recorded shapes for site(s) {missing[:3]}: calibrate the prepared model first")
    allocated = {record for record, _ in sites.values()}
    fixed = sum(c.bops() for c in costs.sites if c.site not in allocated)
    uniform = fixed + sum(by_name[record].bops(min(config.num_groups, q.max_groups)) for record, q in sites.values())
    budget = resolve_budget(config.bop_budget, uniform, costs.fp_bops)

    candidates = {}
    for qname, (_, q) in sites.items():
        options = sorted({g for g in config.allocation_candidates if g <= q.max_groups})
        candidates[qname] = options or [min(min(config.allocation_candidates), q.max_groups)]
    names = list(sites)
    bops = [[by_name[sites[n][0]].bops(g) for g in candidates[n]] for n in names]
    floor = min_feasible_budget(bops) + fixed
    if budget < floor:  # before the (slow) sensitivities
        fraction = math.ceil(floor / costs.fp_bops * 1e6) / 1e6
        given = (f"the default budget (BOPs of uniform num_groups={config.num_groups}: {budget:.0f})"
                 if config.bop_budget is None else f"bop_budget={config.bop_budget!r} ({budget:.0f} BOPs)")
        hint = (" Add num_groups to allocation_candidates or set bop_budget." if config.bop_budget is None else "")
        raise InfeasibleBudgetError(
            f"{given} is infeasible: the fewest candidate groups at every allocated site, with the fixed sites, "
            f"need {math.ceil(floor)} BOPs ({fraction} of FP32); give bop_budget >= {math.ceil(floor)} "
            f"(or a fraction >= {fraction}).{hint}", floor,
        )
    psi = site_sensitivity(
        prepared, inputs, {n: q for n, (_, q) in sites.items()}, candidates,
        metric=config.sensitivity_metric, head=head, output_fn=output_fn, progress=progress,
    )
    picks = solve_multiple_choice_knapsack([psi[n] for n in names], bops, budget - fixed)
    chosen = [candidates[n][k] for n, k in zip(names, picks)]
    for n, g in zip(names, chosen):
        sites[n][1].set_num_groups(g)
    spent = sum(b[k] for b, k in zip(bops, picks))
    result = Allocation(
        sites=[sites[n][0] for n in names], candidates=[candidates[n] for n in names], psi=[psi[n] for n in names],
        bops=bops, groups=chosen, budget=budget, fixed_bops=fixed, total_bops=fixed + spent, fp_bops=costs.fp_bops,
        metric=config.sensitivity_metric,
    )
    setattr(prepared, ALLOCATION_ATTR, result)
    return result


@torch.no_grad()
def report(qmodel: nn.Module, example_input: Any = None) -> CostReport:
    """Per-site costs of a prepared or quantized model: site, kind, groups, w_bits, a_bits, MACs, BOPs.

    Shapes come from the calibration pass (``igq.calibrate`` records them) or, if given, from one
    forward pass of ``example_input`` (a batch or a dict of keyword arguments).
    """
    if example_input is None:
        return site_costs(qmodel)
    shapes: dict = {}
    with fake_quant_disabled(qmodel), record_site_shapes(qmodel, shapes):
        run_model(qmodel, model_input(example_input, 0))
    return site_costs(qmodel, shapes)
