"""Observers and group-range fitting."""
import pytest
import torch

from igq_plugin import ops
from igq_plugin.calibration import ChannelRangeObserver, RowMaxObserver, fit_group_ranges, fit_row_groups, kmeans_ranges


def _ranges(n=40, c=64):
    scale = torch.logspace(-2, 1, c) * torch.exp(torch.randn(n, c) * 0.5)
    x = torch.randn(n, 16, c) * scale.unsqueeze(1) + torch.randn(c) * 0.1
    return ops.channel_ranges(x)


@pytest.mark.parametrize("update", ["envelope", "mean", "quantile"])
def test_fit_is_deterministic(update):
    lo, hi = _ranges()
    a = fit_group_ranges(lo, hi, 8, update=update)
    b = fit_group_ranges(lo.clone(), hi.clone(), 8, update=update)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert a[0].shape == (8,) and bool((a[0] <= a[1]).all())


def test_envelope_fixed_point_covers_every_calibration_channel():
    lo, hi = _ranges()
    glo, ghi = fit_group_ranges(lo, hi, 8, update="envelope", max_iter=1000)
    assign = ops.assign_groups(lo, hi, glo, ghi)
    assert bool((lo >= glo[assign] - 1e-6).all() and (hi <= ghi[assign] + 1e-6).all())


def test_kmeans_converges_to_a_fixed_point():
    lo, hi = _ranges()
    centres, assign = kmeans_ranges(lo, hi, 8, max_iter=1000)
    assert torch.equal(ops.assign_groups(lo.flatten().double(), hi.flatten().double(), centres[:, 0], centres[:, 1]), assign)


def test_single_group_envelope_is_global_min_max():
    lo, hi = _ranges()
    glo, ghi = fit_group_ranges(lo, hi, 1, update="envelope")
    assert float(glo) == float(lo.min()) and float(ghi) == float(hi.max())


def test_mean_update_recovers_separated_clusters():
    centres = torch.tensor([[-0.1, 0.1], [-1.0, 1.0], [-10.0, 10.0]])
    pts = centres.repeat_interleave(50, 0) + torch.randn(150, 2) * 0.01
    glo, ghi = fit_group_ranges(pts[:, 0], pts[:, 1], 3, update="mean")
    torch.testing.assert_close(torch.stack([glo, ghi], 1), centres, atol=0.01, rtol=0)


def test_empty_groups_are_reseeded():
    # 4 distinct points, 4 groups: duplicated seeds would leave groups empty without re-seeding
    lo = torch.tensor([-1.0, -1.0, -1.0, -5.0, -9.0, -0.1])
    hi = torch.tensor([1.0, 1.0, 1.0, 5.0, 9.0, 0.1])
    glo, ghi = fit_group_ranges(lo, hi, 4, update="mean")
    assert len({(float(a), float(b)) for a, b in zip(glo, ghi)}) == 4


def test_fit_rejects_bad_arguments():
    lo, hi = _ranges()
    with pytest.raises(ValueError, match="update"):
        fit_group_ranges(lo, hi, 4, update="median")
    with pytest.raises(ValueError, match="num_groups"):
        fit_group_ranges(lo, hi, 0)


def test_row_groups_fit_row_maxima():
    u = torch.cat([torch.full((100,), 0.1), torch.full((100,), 0.5), torch.full((100,), 0.95)])
    ghi = fit_row_groups(u + torch.rand(300) * 0.01, 3)
    assert ghi.shape == (3,)
    torch.testing.assert_close(ghi, torch.tensor([0.11, 0.51, 0.96]), atol=0.011, rtol=0)


def test_observers_store_only_summaries_and_name_site_on_nan():
    obs = ChannelRangeObserver("blocks.3.mlp.fc1.input_quantizer")
    obs.observe(torch.randn(2, 50, 8))
    obs.observe(torch.randn(3, 50, 8))
    lo, hi = obs.ranges()
    assert lo.shape == (5, 8) and obs.num_instances == 5
    bad = torch.randn(1, 4, 8)
    bad[0, 1, 2] = float("nan")
    with pytest.raises(ValueError, match=r"blocks\.3\.mlp\.fc1\.input_quantizer.*NaN"):
        obs.observe(bad)
    rows = RowMaxObserver("attn.softmax")
    rows.observe(torch.softmax(torch.randn(2, 3, 5, 5), -1))
    assert rows.maxima().shape == (30,)
    with pytest.raises(ValueError, match="Inf"):
        rows.observe(torch.full((1, 1, 2, 2), float("inf")))


def test_bit_aware_default_range_rule_per_site_bits():
    import timm

    import igq_plugin as igq
    from igq_plugin.calibration import default_range_rule

    assert [default_range_rule(b) for b in (2, 4, 5, 6, 8)] == [
        ("mean", 0.99), ("mean", 0.99), ("quantile", 0.9), ("quantile", 0.99), ("quantile", 0.99)]
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=10, depth=1, img_size=32,
                              patch_size=8, embed_dim=64, num_heads=4).eval()
    calib = [torch.randn(4, 3, 32, 32)]

    def rules(cfg):
        q = igq.quantize(model, cfg, calib, progress=False)
        return {s.name: (s.quantizer.update, s.quantizer.quantile) for s in igq.sites(q)}

    four = rules(igq.IGQConfig(weight_bits=4, act_bits=4, num_groups=4, module_bits={"*.fc2": [4, 6]}))
    assert four["blocks.0.mlp.fc1.input_quantizer"] == ("mean", 0.99)
    assert four["blocks.0.attn.softmax_quantizer"] == ("mean", 0.99)
    assert four["blocks.0.mlp.fc2.input_quantizer"] == ("quantile", 0.99)  # a 6-bit site in a 4-bit model
    assert four["patch_embed.proj.input_quantizer"] == ("quantile", 0.99)  # 8-bit embedding
    five = rules(igq.IGQConfig(weight_bits=5, act_bits=5, num_groups=4))
    assert five["blocks.0.mlp.fc1.input_quantizer"] == ("quantile", 0.9)
    # either field set: the config's rule everywhere (a quantile alone selects "quantile")
    assert set(rules(igq.IGQConfig(weight_bits=4, act_bits=4, num_groups=4, range_quantile=0.95)).values()) == {
        ("quantile", 0.95)}
    assert set(rules(igq.IGQConfig(weight_bits=4, act_bits=4, num_groups=4, range_update="quantile")).values()) == {
        ("quantile", 0.99)}
