"""Exact budgeted group allocation: a multiple-choice knapsack solved as a MILP (paper Eq. 10).

Pick one option k_l per site l minimizing sum_l cost[l][k_l] subject to
sum_l bops[l][k_l] <= budget. Sites may have different numbers of options.
"""
from __future__ import annotations

import contextlib
import os
import sys
import tempfile
from collections.abc import Sequence

import numpy as np

__all__ = ["InfeasibleBudgetError", "solve_multiple_choice_knapsack", "min_feasible_budget"]


class InfeasibleBudgetError(ValueError):
    """The budget is below the cheapest choice; ``min_budget`` says what would be feasible."""

    def __init__(self, message: str, min_budget: float) -> None:
        super().__init__(message)
        self.min_budget = min_budget


def _check(costs: Sequence[Sequence[float]], bops: Sequence[Sequence[float]]) -> None:
    if len(costs) != len(bops):
        raise ValueError(f"costs has {len(costs)} sites but bops has {len(bops)}")
    if not costs:
        raise ValueError("no sites to allocate")
    for l, (c, b) in enumerate(zip(costs, bops)):
        if len(c) == 0 or len(c) != len(b):
            raise ValueError(f"site {l}: {len(c)} costs and {len(b)} BOP values (need the same number, >= 1)")
        if not (np.isfinite(c).all() and np.isfinite(b).all()):
            raise ValueError(f"site {l}: costs and BOPs must be finite, got {list(c)} / {list(b)}")
        if min(b) < 0:
            raise ValueError(f"site {l}: BOPs must be >= 0, got {list(b)}")


@contextlib.contextmanager
def _quiet_stdout():
    """Swallow C-level writes to fd 1 (scipy's HiGHS prints debug lines there) so CLI JSON stays clean."""
    try:
        fd = sys.stdout.fileno()
    except (AttributeError, ValueError, OSError):  # captured / replaced stdout: nothing to protect
        yield
        return
    sys.stdout.flush()
    saved = os.dup(fd)
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), fd)
        try:
            yield
        finally:
            os.dup2(saved, fd)
            os.close(saved)


def min_feasible_budget(bops: Sequence[Sequence[float]]) -> float:
    """The smallest budget any allocation fits: the cheapest option of every site."""
    return float(sum(min(b) for b in bops))


def solve_multiple_choice_knapsack(
    costs: Sequence[Sequence[float]], bops: Sequence[Sequence[float]], budget: float
) -> list[int]:
    """Indices k_l (one per site) of an optimal allocation; exact (MILP via HiGHS).

    The returned allocation never exceeds ``budget``; ties in cost are broken towards fewer BOPs.
    Raises :class:`InfeasibleBudgetError` when ``budget`` < :func:`min_feasible_budget`.
    """
    from scipy.optimize import Bounds, LinearConstraint, milp

    _check(costs, bops)
    if not np.isfinite(budget):
        raise ValueError(f"budget must be a finite number of BOPs, got {budget!r}")
    floor = min_feasible_budget(bops)
    if budget < floor:
        raise InfeasibleBudgetError(
            f"BOP budget {budget:.6g} is infeasible: the cheapest allocation (fewest groups at every site) "
            f"needs {floor:.6g} BOPs; give a budget >= {floor:.6g}", floor,
        )
    sizes = [len(c) for c in costs]
    if sum(max(b) for b in bops) <= budget:  # budget covers anything: each site's least cost, then fewest BOPs
        return [min(range(len(c)), key=lambda k, c=c, b=b: (c[k], b[k])) for c, b in zip(costs, bops)]
    offsets = np.cumsum([0] + sizes)
    n = int(offsets[-1])
    cost = np.concatenate([np.asarray(c, dtype=np.float64) for c in costs])
    bop = np.concatenate([np.asarray(b, dtype=np.float64) for b in bops])
    # Normalize both rows so HiGHS tolerances are relative; subtract each site's cheapest option so the
    # budget row measures only the BOPs spent above the floor.
    base = np.concatenate([np.full(s, min(b)) for s, b in zip(sizes, bops)])
    extra = bop - base
    slack = budget - floor
    cost_scale = max(np.abs(cost).max(), 1e-300)
    # Lexicographic tie-break: a tiny BOP term, far below any cost difference that matters.
    objective = cost / cost_scale + 1e-9 * extra / max(extra.max(), 1.0)
    choose_one = np.zeros((len(sizes), n))
    for l in range(len(sizes)):
        choose_one[l, offsets[l]:offsets[l + 1]] = 1.0
    limit = slack
    for attempt in range(60):
        scale = max(limit, 1.0)  # the budget row in units of the remaining slack: tolerances stay relative to it
        upper = (extra <= limit).astype(np.float64)  # an option that alone exceeds the slack is out
        constraints = [
            LinearConstraint(choose_one, 1.0, 1.0),
            LinearConstraint((extra / scale)[None, :], -np.inf, limit / scale),
        ]
        with _quiet_stdout():
            res = milp(objective, constraints=constraints, integrality=np.ones(n), bounds=Bounds(0, upper),
                       options={"mip_rel_gap": 0.0})
        if res.x is None:
            raise RuntimeError(f"MILP solver failed: {res.message}")
        picks = [int(np.argmax(res.x[offsets[l]:offsets[l + 1]])) for l in range(len(sizes))]
        spent = sum(float(bops[l][k]) for l, k in enumerate(picks))
        if spent <= budget:
            return picks
        # Solver tolerance let it exceed the budget: tighten (at least geometrically) and re-solve.
        limit = max(0.0, limit - max(spent - budget, 1e-7 * slack * 2**attempt))
    raise RuntimeError("MILP solver could not return an allocation within the budget")  # pragma: no cover
