"""Budgeted group allocation: exact solver, BOP accounting, sensitivities, end to end."""
import itertools
import random

import pytest
import timm
import torch

import igq_plugin as igq
from igq_plugin import allocation
from igq_plugin.allocation import InfeasibleBudgetError, solve_multiple_choice_knapsack


# Solver --------------------------------------------------------------------------------------

def brute_force(costs, bops, budget):
    best = None
    for picks in itertools.product(*[range(len(c)) for c in costs]):
        spent = sum(b[k] for b, k in zip(bops, picks))
        if spent > budget:
            continue
        value = sum(c[k] for c, k in zip(costs, picks))
        if best is None or value < best[0] - 1e-12:
            best = (value, picks)
    return best


@pytest.mark.parametrize("seed", range(40))
def test_solver_matches_brute_force_and_respects_budget(seed):
    rng = random.Random(seed)
    sites = rng.randint(1, 5)
    sizes = [rng.randint(1, 5) for _ in range(sites)]
    costs = [[rng.random() * 10 ** rng.randint(-6, 0) for _ in range(s)] for s in sizes]
    bops = [[rng.randint(1, 10 ** rng.randint(3, 12)) for _ in range(s)] for s in sizes]
    floor, ceiling = sum(min(b) for b in bops), sum(max(b) for b in bops)
    budget = floor + rng.random() * (ceiling - floor) if rng.random() < 0.8 else floor
    picks = solve_multiple_choice_knapsack(costs, bops, budget)
    assert len(picks) == sites and all(0 <= k < s for k, s in zip(picks, sizes))
    assert sum(b[k] for b, k in zip(bops, picks)) <= budget
    value = sum(c[k] for c, k in zip(costs, picks))
    best_value, _ = brute_force(costs, bops, budget)
    assert value == pytest.approx(best_value, rel=1e-9, abs=1e-15)


def test_solver_tight_budget_takes_cheapest_and_large_budget_takes_best():
    costs = [[3.0, 2.0, 1.0], [5.0, 0.5]]
    bops = [[10, 20, 40], [7, 70]]
    assert solve_multiple_choice_knapsack(costs, bops, 17) == [0, 0]
    assert solve_multiple_choice_knapsack(costs, bops, 10**9) == [2, 1]
    assert solve_multiple_choice_knapsack(costs, bops, 80) == [0, 1]  # cost 3.5 beats (2, 0): 6.0 at 47 BOPs


def test_solver_infeasible_budget_names_minimum():
    with pytest.raises(InfeasibleBudgetError, match="budget >= 17") as info:
        solve_multiple_choice_knapsack([[1.0, 0.0], [1.0, 0.0]], [[10, 20], [7, 9]], 16)
    assert info.value.min_budget == 17


def test_solver_handles_tolerance_sized_options():
    # One huge option and several tiny ones: HiGHS's feasibility tolerance alone would overshoot the budget.
    costs, bops = [[1.0, 0.0]] * 6, [[0, 10**9]] + [[0, 1]] * 5
    assert solve_multiple_choice_knapsack(costs, bops, 10**9 + 2) == [0, 1, 1, 1, 1, 1]
    assert solve_multiple_choice_knapsack(costs, bops, 10**9 + 5) == [1] * 6
    # A budget exactly at the floor leaves only the cheapest options.
    assert solve_multiple_choice_knapsack([[0.4, 1e-7], [1.0, 0.0]], [[657, 3144], [10, 10**11]], 667) == [0, 0]


def test_solver_rejects_bad_tables():
    with pytest.raises(ValueError, match="site 1"):
        solve_multiple_choice_knapsack([[1.0], [1.0, 2.0]], [[1], [1]], 10)
    with pytest.raises(ValueError, match="finite"):
        solve_multiple_choice_knapsack([[float("nan")]], [[1]], 10)
    with pytest.raises(ValueError, match="no sites"):
        solve_multiple_choice_knapsack([], [], 10)


# Models -------------------------------------------------------------------------------------

def tiny_vit(depth=2):
    return timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, num_classes=10, img_size=32, patch_size=8, embed_dim=64,
        depth=depth, num_heads=2,
    ).eval()


def calib_batches(n=2, b=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, 3, 32, 32, generator=g) * torch.linspace(0.2, 3, 3).view(1, 3, 1, 1) for _ in range(n)]


SMALL = dict(allocation_candidates=(1, 2, 4), num_groups=2)


# BOP report ---------------------------------------------------------------------------------

def test_report_counts_macs_bits_and_groups():
    model = tiny_vit()
    q = igq.quantize(model, igq.IGQConfig(num_groups=4), calib_batches(), progress=False)
    rep = igq.report(q)
    sites = {s.site: s for s in rep.sites}
    tokens = 16 + 1  # 4x4 patches + CLS
    fc1 = sites["blocks.0.mlp.fc1"]
    assert (fc1.kind, fc1.groups, fc1.w_bits, fc1.a_bits) == ("linear", 4, 4, 4)
    assert fc1.macs == tokens * 64 * 256
    assert fc1.bops() == fc1.macs * 16 + igq.ops.igq_linear_overhead_ops(tokens, 64, 256, 4) * 32
    assert sites["patch_embed.proj"].macs == 16 * 64 * 3 * 8 * 8
    assert sites["patch_embed.proj"].w_bits == 8
    assert sites["head"].macs == 64 * 10 and sites["head"].a_bits == 8
    av = sites["blocks.1.attn.av"]
    assert av.macs == 2 * tokens * tokens * 32 and av.groups == 4
    assert sites["blocks.1.attn.qk"].groups == 1
    assert rep.total_bops == sum(s.bops() for s in rep.sites)
    assert rep.fp_bops == sum(s.macs for s in rep.sites) * 32 * 32
    assert rep.total_bops < rep.fp_bops / 20
    assert "blocks.0.mlp.fc1" in rep.table() and "ratio to FP32" in rep.table()
    # Shapes from one explicit forward pass give the same report.
    again = igq.report(q, calib_batches(1, b=1)[0])
    assert again.to_dict() == rep.to_dict()


def test_report_needs_shapes_and_survives_save_load(tmp_path):
    model = tiny_vit()
    q = igq.quantize(model, igq.IGQConfig(), calib_batches(), progress=False)
    igq.save(q, tmp_path / "q.pt")
    loaded = igq.load(tmp_path / "q.pt", model)
    assert igq.report(loaded).to_dict() == igq.report(q).to_dict()
    with pytest.raises(ValueError, match="example_input"):
        igq.report(igq.prepare(model, igq.IGQConfig(), observe=False))


def test_swin_window_sites_count_every_window():
    model = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, img_size=56, embed_dim=32,
                              depths=(1, 1), num_heads=(1, 2), window_size=7, num_classes=10).eval()
    q = igq.quantize(model, igq.IGQConfig(), [torch.randn(2, 3, 56, 56)], progress=False)
    sites = {s.site: s for s in igq.report(q).sites}
    qkv, fc1 = sites["layers.0.blocks.0.attn.qkv"], sites["layers.0.blocks.0.mlp.fc1"]
    assert qkv.shape["instances"] == 4 and qkv.shape["tokens"] == 49  # 14x14 tokens in 4 windows of 7x7
    assert qkv.macs == 196 * 32 * 96 and fc1.macs == 196 * 32 * 128
    assert sites["layers.0.blocks.0.attn.av"].macs == 4 * 1 * 49 * 49 * 32


def test_layer_scheme_has_no_grouping_overhead():
    q = igq.quantize(tiny_vit(), igq.IGQConfig(act_scheme="layer"), calib_batches(), progress=False)
    for s in igq.report(q).sites:
        assert s.groups == 1 and s.overhead_ops() == 0


# Sensitivity --------------------------------------------------------------------------------

def calibrated(model, cfg, data):
    prepared = igq.prepare(model, cfg)
    igq.calibrate(prepared, data, progress=False)
    return prepared


def test_block_replay_gives_the_same_sensitivities(monkeypatch):
    model, data = tiny_vit(depth=3), calib_batches()
    cfg = igq.IGQConfig(**SMALL)
    prepared = calibrated(model, cfg, data)
    assert allocation.find_blocks(prepared)[0] == "blocks"
    sites = {n: q for n, (_, q) in allocation.allocatable_sites(prepared, cfg).items()}
    cands = {n: [1, 2, 4] for n in sites}
    fast = allocation.site_sensitivity(prepared, data, sites, cands, progress=False)
    monkeypatch.setattr(allocation.sensitivity, "find_blocks", lambda m: None)
    slow = allocation.site_sensitivity(prepared, data, sites, cands, progress=False)
    for name in sites:
        assert fast[name] == pytest.approx(slow[name], rel=1e-4, abs=1e-12), name
        assert all(v >= 0 for v in fast[name])
    # More groups fit an instance-varying site better on average.
    assert sum(v[0] for v in fast.values()) > sum(v[-1] for v in fast.values())


class TwiceBlocks(torch.nn.Module):
    """Runs its first block twice per forward: replay must notice and fall back to whole runs."""

    def __init__(self, vit):
        super().__init__()
        self.vit = vit

    def forward(self, x):
        v = self.vit
        h = v.norm_pre(v._pos_embed(v.patch_embed(x)))
        h = v.blocks[0](v.blocks[0](h))
        for blk in v.blocks[1:]:
            h = blk(h)
        return v.forward_head(v.norm(h))


def test_replay_falls_back_when_a_block_runs_twice(monkeypatch):
    model, data = TwiceBlocks(tiny_vit(depth=3)).eval(), calib_batches()
    cfg = igq.IGQConfig(**SMALL)
    prepared = calibrated(model, cfg, data)
    sites = {n: q for n, (_, q) in allocation.allocatable_sites(prepared, cfg).items()}
    cands = {n: [1, 4] for n in sites}
    guarded = allocation.site_sensitivity(prepared, data, sites, cands, progress=False)
    monkeypatch.setattr(allocation.sensitivity, "find_blocks", lambda m: None)
    whole = allocation.site_sensitivity(prepared, data, sites, cands, progress=False)
    for name in sites:
        assert guarded[name] == pytest.approx(whole[name], rel=1e-4, abs=1e-12), name


def test_sensitivity_leaves_prepared_model_as_it_was():
    model, data = tiny_vit(), calib_batches()
    cfg = igq.IGQConfig(**SMALL)
    a, b = calibrated(model, cfg, data), calibrated(model, cfg, data)
    sites = {n: q for n, (_, q) in allocation.allocatable_sites(a, cfg).items()}
    allocation.site_sensitivity(a, data, sites, {n: [1, 4] for n in sites}, progress=False)
    qa, qb = igq.convert(a, progress=False), igq.convert(b, progress=False)
    x = calib_batches(1, seed=3)[0]
    assert torch.equal(qa(x), qb(x))


def test_output_distance():
    ref = torch.randn(3, 10)
    assert torch.allclose(allocation.output_distance(ref, ref, "kl"), torch.zeros(3, dtype=torch.float64))
    out = ref + 0.1 * torch.randn(3, 10)
    mse = allocation.output_distance(ref, out, "mse")
    assert torch.allclose(mse, ((out - ref) ** 2).sum(1).double() / (ref**2).sum(1).double())
    p, q = ref.double().softmax(1), out.double().softmax(1)
    assert torch.allclose(allocation.output_distance(ref, out, "kl"), (p * (p / q).log()).sum(1))
    with pytest.raises(ValueError, match="metric"):
        allocation.output_distance(ref, out, "l1")


# End to end ---------------------------------------------------------------------------------

def test_quantize_with_bop_allocation_stays_within_uniform_budget():
    model, data = tiny_vit(), calib_batches()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    uniform = igq.quantize(model, igq.IGQConfig(**SMALL), data, progress=False)
    q = igq.quantize(model, igq.IGQConfig(group_allocation="bop", **SMALL), data, progress=False)
    result = q.igq_allocation
    assert result.budget == igq.report(uniform).total_bops
    assert igq.report(q).total_bops == result.total_bops <= result.budget
    chosen = dict(zip(result.sites, result.groups))
    for s in igq.report(q).sites:
        if s.site in chosen:
            assert s.groups == chosen[s.site] in (1, 2, 4)
    # Optimal: no other assignment within budget has smaller summed psi than the chosen one.
    best, _ = brute_force(result.psi, result.bops, result.budget - result.fixed_bops)
    chosen_value = sum(p[c.index(g)] for p, c, g in zip(result.psi, result.candidates, result.groups))
    assert chosen_value == pytest.approx(best)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    out = q(data[0])
    assert out.shape == (4, 10) and torch.isfinite(out).all()


def test_fraction_budget_and_infeasible_budget():
    model, data = tiny_vit(), calib_batches()
    with pytest.raises(InfeasibleBudgetError, match=r"bop_budget >= [0-9.e+]+ \(or a fraction >= 0\.0"):
        igq.quantize(model, igq.IGQConfig(group_allocation="bop", bop_budget=1e-4, **SMALL), data, progress=False)
    fp = igq.report(igq.quantize(model, igq.IGQConfig(**SMALL), data, progress=False)).fp_bops
    q = igq.quantize(model, igq.IGQConfig(group_allocation="bop", bop_budget=0.5, **SMALL), data, progress=False)
    assert q.igq_allocation.budget == pytest.approx(0.5 * fp)
    result = q.igq_allocation  # a budget far above any allocation: every site takes its least sensitive count
    for psi, cands, g in zip(result.psi, result.candidates, result.groups):
        assert psi[cands.index(g)] == min(psi)


def test_small_sites_and_infeasible_default_budget():
    model, data = tiny_vit(), calib_batches()
    # Candidates above a site's 64 channels: that site falls back to one group per channel.
    q = igq.quantize(model, igq.IGQConfig(group_allocation="bop", allocation_candidates=(128, 256), num_groups=256),
                     data, progress=False)
    groups = dict(zip(q.igq_allocation.sites, q.igq_allocation.groups))
    assert groups["blocks.0.attn.qkv"] == 64 and groups["blocks.0.mlp.fc2"] in (128, 256)
    with pytest.raises(InfeasibleBudgetError, match="default budget .*num_groups=3.*Add num_groups"):
        igq.quantize(model, igq.IGQConfig(group_allocation="bop", allocation_candidates=(4, 8), num_groups=3), data,
                     progress=False)


def test_allocation_config_validation_and_errors():
    for bad, match in (
        ({"group_allocation": "greedy"}, "group_allocation"),
        ({"bop_budget": -1}, "bop_budget"),
        ({"bop_budget": True}, "bop_budget"),
        ({"bop_budget": float("inf")}, "bop_budget"),
        ({"allocation_candidates": ()}, "allocation_candidates"),
        ({"allocation_candidates": (0, 2)}, "allocation_candidates"),
        ({"sensitivity_metric": "l2"}, "sensitivity_metric"),
        ({"sensitivity_images": 0}, "sensitivity_images"),
    ):
        with pytest.raises((ValueError, TypeError), match=match):
            igq.IGQConfig(**bad)
    cfg = igq.IGQConfig(group_allocation="bop", bop_budget=0.05, allocation_candidates=[2, 4])
    assert igq.IGQConfig.from_json(cfg.to_json()) == cfg
    with pytest.raises(ValueError, match="head is only used"):
        igq.quantize(tiny_vit(), igq.IGQConfig(), calib_batches(), head=torch.nn.Identity(), progress=False)
    with pytest.raises(ValueError, match="group_allocation='bop' chooses IGQ group counts: it needs act_scheme='igq'"):
        igq.IGQConfig(act_scheme="layer", group_allocation="bop")


def test_sensitivity_images_limits_the_instances(monkeypatch):
    seen = []
    real = allocation.site_sensitivity

    def spy(prepared, inputs, *args, **kwargs):
        seen.append([x.shape[0] for x in inputs])
        return real(prepared, inputs, *args, **kwargs)

    monkeypatch.setattr(allocation, "site_sensitivity", spy)
    data = calib_batches(3, b=4)  # 12 instances
    igq.quantize(tiny_vit(), igq.IGQConfig(group_allocation="bop", sensitivity_images=6, **SMALL), data, progress=False)
    igq.quantize(tiny_vit(), igq.IGQConfig(group_allocation="bop", **SMALL), data, progress=False)
    assert seen == [[6], [12]]


def test_head_and_mse_metric():
    model, data = tiny_vit(), calib_batches()
    calls = []

    def head(out):
        calls.append(out.shape)
        return out[:, :3] * 10.0

    q = igq.quantize(model, igq.IGQConfig(group_allocation="bop", **SMALL), data, head=head, progress=False)
    assert q.igq_allocation.metric == "kl" and calls and all(shape[1] == 10 for shape in calls)
    plain = igq.quantize(model, igq.IGQConfig(group_allocation="bop", **SMALL), data, progress=False)
    assert q.igq_allocation.psi != plain.igq_allocation.psi
    q2 = igq.quantize(model, igq.IGQConfig(group_allocation="bop", sensitivity_metric="mse", **SMALL), data,
                      progress=False)
    assert q2.igq_allocation.metric == "mse" and all(p >= 0 for ps in q2.igq_allocation.psi for p in ps)


def test_disable_fake_quant_gives_float_outputs_and_enable_restores():
    model, data = tiny_vit(), calib_batches()
    q = igq.quantize(model, igq.IGQConfig(), data, progress=False)
    x = calib_batches(1, seed=5)[0]
    quantized = q(x)
    igq.disable_fake_quant(q)
    torch.testing.assert_close(q(x), model(x), rtol=1e-5, atol=1e-5)
    igq.enable_fake_quant(q)
    assert torch.equal(q(x), quantized)
    with igq.modules.fake_quant_disabled(q):
        torch.testing.assert_close(q(x), model(x), rtol=1e-5, atol=1e-5)
    assert torch.equal(q(x), quantized)
