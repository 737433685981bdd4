"""Post-softmax level quantizers (log-sqrt2, TanQ) and RepQ-ViT / DopQ-ViT reparameterization."""
import math

import pytest
import timm
import torch
from torch import nn

import igq_plugin as igq
from igq_plugin import ops
from igq_plugin.modules import QuantLinear, SoftmaxQuantizer, fake_quant_disabled


# ---- level quantizers (pure ops) ------------------------------------------------------------------


@pytest.mark.parametrize("bits", [3, 4, 6, 8])
@pytest.mark.parametrize("kind", ops.SOFTMAX_QUANTIZERS)
def test_codes_are_exact(kind, bits):
    """Every level quantizes to its own code, and every code dequantizes to its level."""
    s = torch.tensor(0.8, dtype=torch.float64) if kind != "uniform" else torch.tensor(0.8 / (2**bits - 1), dtype=torch.float64)
    table = ops.softmax_level_table(kind, bits)
    assert table.numel() == 2**bits
    codes = ops.quantize_probs(table * s, s, kind, bits)
    assert torch.equal(codes, torch.arange(2**bits, dtype=torch.float64))
    assert torch.equal(ops.dequantize_probs(codes, s, kind, bits), table * s)


@pytest.mark.parametrize("steepness", [0.5, 4.0, 8.0, 32.0])
def test_tanq_monotone_and_denser_near_one(steepness):
    bits = 4
    table = ops.softmax_level_table("tanq", bits, steepness)
    gaps = table.diff()
    assert bool((gaps > 0).all()), "levels strictly increase"
    assert table[0] == 0 and math.isclose(float(table[-1]), 1.0, abs_tol=1e-12)
    mid = gaps[len(gaps) // 2]
    assert gaps[-1] < mid, "levels are denser near 1 than in the middle"
    assert torch.allclose(gaps, gaps.flip(0)), "symmetric: as dense near 1 as near 0"
    if steepness >= 4:
        uniform_gap = 1 / (2**bits - 1)
        log_table = ops.softmax_level_table("log_sqrt2", bits)
        assert gaps[-1] < uniform_gap and gaps[-1] < float(log_table[0] - log_table[1])
    # the quantizer itself is monotone: sorted probabilities give non-decreasing codes and values
    a = torch.rand(10_000, dtype=torch.float64).sort().values
    codes = ops.quantize_probs(a, torch.tensor(1.0, dtype=torch.float64), "tanq", bits, steepness)
    assert bool((codes.diff() >= 0).all())
    # and it rounds to one of the two levels that bracket every value
    values = ops.dequantize_probs(codes, torch.tensor(1.0, dtype=torch.float64), "tanq", bits, steepness)
    idx = torch.searchsorted(table, a).clamp(1, 2**bits - 1)
    assert bool(((values == table[idx]) | (values == table[idx - 1])).all())


def test_tanq_small_steepness_approaches_uniform():
    table = ops.softmax_level_table("tanq", 4, 1e-4)
    assert torch.allclose(table, torch.linspace(0, 1, 16, dtype=torch.float64), atol=1e-6)


def test_log_sqrt2_levels_zero_and_clipping():
    bits, s = 4, torch.tensor(0.5)
    a = torch.tensor([0.9, 0.5, 0.5 / math.sqrt(2), 0.25, 0.5 * 2 ** -7, 1e-6, 0.0])
    codes = ops.quantize_probs(a, s, "log_sqrt2", bits)
    assert codes.tolist() == [0, 0, 1, 2, 14, 15, 15]  # above s clips to s; tiny values -> zero code
    values = ops.dequantize_probs(codes, s, "log_sqrt2", bits)
    assert values[-1] == 0 and values[-2] == 0 and math.isclose(float(values[0]), 0.5)
    a = torch.rand(5000).sort().values
    assert bool((ops.quantize_probs(a, torch.tensor(1.0), "log_sqrt2", bits).diff() <= 0).all())


@pytest.mark.parametrize("kind", ops.SOFTMAX_QUANTIZERS)
def test_softmax_group_quantize_levels(kind):
    a = torch.softmax(torch.randn(2, 3, 10, 10) * 3, dim=-1)
    ghi = torch.tensor([0.3, 0.6, 1.0])
    codes, assign, s = ops.softmax_group_quantize(a, ghi, 4, kind)
    _, assign_uniform, _ = ops.softmax_group_quantize(a, ghi, 4)
    assert torch.equal(assign, assign_uniform), "row groups do not depend on the levels"
    a_hat = ops.softmax_group_fake_quantize(a, ghi, 4, kind)
    assert torch.equal(a_hat, ops.dequantize_probs(codes, s, kind, 4))
    assert bool((a_hat >= 0).all()) and bool((a_hat <= ghi.max() + 1e-6).all())


def test_level_quantizer_validation():
    with pytest.raises(ValueError, match="softmax quantizer must be one of"):
        SoftmaxQuantizer(4, levels="log2")
    with pytest.raises(ValueError, match="steepness"):
        SoftmaxQuantizer(4, levels="tanq", steepness=-1.0)
    with pytest.raises(ValueError, match="softmax_quantizer"):
        igq.IGQConfig(softmax_quantizer="pot")
    with pytest.raises(ValueError, match="tanq_steepness"):
        igq.IGQConfig(tanq_steepness=0)
    with pytest.raises(ValueError, match="reparam"):
        igq.IGQConfig(reparam="smoothquant")


def test_presets_round_trip():
    for cfg in (igq.IGQConfig.repq_vit(4), igq.IGQConfig.dopq_vit(6, num_groups=4)):
        assert igq.IGQConfig.from_json(cfg.to_json()) == cfg
    assert igq.IGQConfig.repq_vit(4).softmax_quantizer == "log_sqrt2"
    assert igq.IGQConfig.dopq_vit(4).reparam == "mosf"


# ---- reparameterization math (pure ops) -------------------------------------------------------------


def _post_ln_problem(c=24, o=16, n=50, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, generator=g, dtype=torch.float64) * (torch.rand(c, generator=g, dtype=torch.float64) * 4 + 0.1)
    x[:, 3] *= 30  # an outlier channel
    x = x + torch.randn(c, generator=g, dtype=torch.float64)
    w = torch.randn(o, c, generator=g, dtype=torch.float64)
    b = torch.randn(o, generator=g, dtype=torch.float64)
    return x, w, b


def test_fold_keeps_linear_output_and_maps_ranges():
    x, w, b = _post_ln_problem()
    scale, zp = ops.asym_qparams(x.amin(0), x.amax(0), 4)
    r1, r2 = ops.reparam_factors(scale, zp, ops.mean_target_scale(scale), torch.round(zp.mean()))
    x_new = (x + scale * r2) / r1
    w_new, b_new = ops.fold_linear(w, b, r1, r2, scale)
    assert torch.allclose(x_new @ w_new.t() + b_new, x @ w.t() + b, rtol=1e-10, atol=1e-10)
    lo, hi = ops.reparam_ranges(x.amin(0), x.amax(0), r1, r2, scale)
    assert torch.allclose(lo, x_new.amin(0)) and torch.allclose(hi, x_new.amax(0))
    gamma, beta = torch.rand(x.shape[1], dtype=torch.float64) + 0.5, torch.randn(x.shape[1], dtype=torch.float64)
    g2, b2 = ops.fold_layernorm(gamma, beta, r1, r2, scale)
    normed = torch.randn(7, x.shape[1], dtype=torch.float64)
    assert torch.allclose(normed * g2 + b2, (normed * gamma + beta + scale * r2) / r1)


@pytest.mark.parametrize("target", [ops.mean_target_scale, ops.mosf_target_scale])
def test_layerwise_quantizer_on_reparameterized_input_is_the_per_channel_quantizer(target):
    x, _, _ = _post_ln_problem()
    bits = 4
    scale, zp = ops.asym_qparams(x.amin(0), x.amax(0), bits)
    s_t, z_t = target(scale), torch.round(zp.mean())
    r1, r2 = ops.reparam_factors(scale, zp, s_t, z_t)
    x_new = (x + scale * r2) / r1
    per_channel = ops.quantize(x, scale, zp, 0, 2**bits - 1)
    layer = ops.quantize(x_new, s_t, z_t, 0, 2**bits - 1)
    assert torch.equal(per_channel, layer)


def test_mosf_scale_is_robust_to_outlier_channels():
    scale = torch.full((100,), 0.02) + torch.linspace(0, 0.01, 100)
    scale[:3] = torch.tensor([1.0, 2.0, 3.0])  # three outlier channels
    mean, mosf = float(ops.mean_target_scale(scale)), float(ops.mosf_target_scale(scale))
    inliers = float(scale[3:].mean())
    assert mean > 3 * inliers
    assert math.isclose(mosf, inliers, rel_tol=1e-6)
    assert float(ops.mosf_target_scale(torch.full((5,), 0.1))) == pytest.approx(0.1)  # MAD = 0


# ---- reparameterization of models -------------------------------------------------------------------


def _vit(**kwargs):
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=64, **kwargs).eval()
    for name, p in model.named_parameters():  # non-trivial LayerNorm affines
        if "norm" in name and p.dim() == 1:
            p.data.normal_(0.5 if name.endswith("weight") else 0.0, 0.5)
    return model


@pytest.mark.parametrize("target", ["repq", "mosf"])
def test_reparameterize_leaves_float_outputs_unchanged(target):
    model = _vit()
    x = torch.randn(6, 3, 64, 64)
    prepared = igq.prepare(model, igq.IGQConfig(weight_bits=6, act_bits=6, act_scheme="layer"))
    igq.calibrate(prepared, x, progress=False)
    with torch.no_grad(), fake_quant_disabled(prepared):
        before = prepared(x)
    norms = igq.reparameterize(prepared, target=target)
    assert len(norms) == 2 * len(model.blocks)  # norm1 -> qkv and norm2 -> fc1 of every block
    assert "blocks.0.norm1" in norms and "blocks.0.norm2" in norms
    with torch.no_grad(), fake_quant_disabled(prepared):
        after = prepared(x)
    assert torch.allclose(after, before, rtol=1e-4, atol=1e-5)
    assert not torch.equal(prepared.blocks[0].norm1.weight, model.blocks[0].norm1.weight)
    with pytest.raises(RuntimeError, match="already reparameterized"):
        igq.reparameterize(prepared)


def test_repq_equals_per_channel_quantization_of_post_ln_sites():
    """With float weights, RepQ-ViT's layer-wise quantizer on the folded model is the per-channel
    quantizer of the original post-LayerNorm activations (RepQ-ViT's central identity)."""
    model = _vit(depth=4)  # deeper models agree too, until a rounding tie flips a code and it is amplified
    x = torch.randn(6, 3, 64, 64)
    repq = igq.quantize(model, igq.IGQConfig.repq_vit(4, softmax_quantizer="uniform"), x, progress=False)
    ref = igq.prepare(model, igq.IGQConfig.repq_vit(4, softmax_quantizer="uniform", reparam=None))
    igq.calibrate(ref, x, progress=False)
    for name, q in igq.iter_quantizers(ref):
        if name.endswith(("attn.qkv.input_quantizer", "mlp.fc1.input_quantizer")):
            q.scheme = "channel"  # static per-channel min-max ranges
    igq.convert(ref, progress=False)
    for m in (repq, ref):
        for module in m.modules():
            if isinstance(module, QuantLinear):
                module.weight_fake_quant_enabled = False
    with torch.no_grad():
        y_repq, y_ref, y_fp = repq(x), ref(x), model(x)
    noise = (y_ref - y_fp).norm()
    assert float(noise) > 0.01 * float(y_fp.norm())  # 4-bit activations do change the output ...
    assert float((y_repq - y_ref).norm()) < 1e-4 * float(noise)  # ... identically in both models


def test_target_scale_cancels_in_the_quantized_model():
    """The folding is exact, so the layer-wise scale (mean or MOSF) only sets the common scale of the
    reparameterized activation; per-output-channel weight quantizers are invariant to it."""
    model = _vit(depth=2)
    model.blocks[0].norm1.weight.data[:4] *= 30  # outlier channels, which pull the mean scale up
    x = torch.randn(6, 3, 64, 64)
    q_mean = igq.quantize(model, igq.IGQConfig.repq_vit(4), x, progress=False)
    q_mosf = igq.quantize(model, igq.IGQConfig.repq_vit(4, reparam="mosf"), x, progress=False)
    s_mean = q_mean.blocks[0].attn.qkv.input_quantizer.qparams()[0]
    s_mosf = q_mosf.blocks[0].attn.qkv.input_quantizer.qparams()[0]
    assert float(s_mosf) < 0.9 * float(s_mean)  # MOSF does pick a different (smaller) layer-wise scale
    with torch.no_grad():
        y_fp, y_mean, y_mosf = model(x), q_mean(x), q_mosf(x)
    assert float((y_mean - y_mosf).norm()) < 1e-3 * float((y_mean - y_fp).norm())


def test_reparameterize_bias_free_qkv_and_save_load(tmp_path):
    model = _vit(qkv_bias=False)
    x = torch.randn(4, 3, 64, 64)
    cfg = igq.IGQConfig.repq_vit(6)
    q = igq.quantize(model, cfg, x, progress=False)
    assert q.blocks[0].attn.qkv.bias is not None and model.blocks[0].attn.qkv.bias is None
    igq.save(q, tmp_path / "q.pt")
    loaded = igq.load(tmp_path / "q.pt", model)
    with torch.no_grad():
        assert torch.equal(loaded(x), q(x))


def test_igq_with_reparam_fits_groups_on_reparameterized_ranges():
    model = _vit()
    x = torch.randn(6, 3, 64, 64)
    q = igq.quantize(model, igq.IGQConfig(weight_bits=6, act_bits=6, reparam="repq"), x, progress=False)
    site = q.blocks[0].attn.qkv.input_quantizer
    assert site.scheme == "igq" and site.num_groups == 8
    with torch.no_grad():
        y, yq = model(x), q(x)
    assert float(ops.cosine(y, yq)) > 0.9


class _LNFeedsResidual(nn.Module):
    """A LayerNorm whose output feeds a Linear *and* a residual add: not foldable."""

    def __init__(self):
        super().__init__()
        self.norm = nn.LayerNorm(16)
        self.fc = nn.Linear(16, 16)
        nn.init.normal_(self.norm.weight, 1.0, 0.5)

    def forward(self, x):
        h = self.norm(x)
        return self.fc(h) + h


def test_reparameterize_refuses_shared_layernorm_output_and_changes_nothing():
    model = _LNFeedsResidual().eval()
    x = torch.randn(4, 5, 16) * torch.linspace(0.1, 5, 16)
    prepared = igq.prepare(model, igq.IGQConfig(weight_bits=6, act_bits=6, act_scheme="layer"))
    igq.calibrate(prepared, x, progress=False)
    snapshot = {k: v.clone() for k, v in prepared.state_dict().items()}
    with pytest.raises(RuntimeError, match="changed the float outputs.*norm"):
        igq.reparameterize(prepared)
    assert all(torch.equal(v, snapshot[k]) for k, v in prepared.state_dict().items())
    with pytest.raises(RuntimeError, match="changed the float outputs"):
        igq.quantize(model, igq.IGQConfig(weight_bits=6, act_bits=6, reparam="repq"), x, progress=False)


def test_layernorm_feeding_a_skipped_linear_is_left_alone():
    model = _vit(depth=2)
    x = torch.randn(4, 3, 64, 64)
    q = igq.quantize(model, igq.IGQConfig.repq_vit(6, skip=("blocks.0.attn.qkv",)), x, progress=False)
    assert q.igq_reparameterized == ["blocks.0.norm2", "blocks.1.norm1", "blocks.1.norm2"]
    assert torch.equal(q.blocks[0].norm1.weight, model.blocks[0].norm1.weight)


def test_reparameterize_needs_calibration():
    model = _vit()
    prepared = igq.prepare(model, igq.IGQConfig(reparam="repq"))
    with pytest.raises(ValueError, match="example input"):
        igq.reparameterize(prepared)
    with pytest.raises(RuntimeError, match="needs calibration ranges"):
        igq.reparameterize(prepared, torch.randn(2, 3, 64, 64))


def test_reparameterize_hf_dinov2_query_key_value():
    import transformers
    cfg = transformers.Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                                    image_size=28, patch_size=14)
    torch.manual_seed(0)
    model = transformers.Dinov2Model(cfg).eval()
    x = torch.randn(3, 3, 28, 28)
    prepared = igq.prepare(model, igq.IGQConfig(weight_bits=6, act_bits=6, act_scheme="layer"))
    igq.calibrate(prepared, x, progress=False)
    norms = igq.reparameterize(prepared)
    consumers = igq.reparam.find_layernorm_consumers(prepared, x)
    qkv = consumers["encoder.layer.0.norm1"]  # query, key, value (names depend on the transformers version)
    assert len(qkv) == 3 and all(n.startswith("encoder.layer.0.attention.") for n in qkv)
    assert consumers["encoder.layer.0.norm2"] == ["encoder.layer.0.mlp.fc1"]
    assert len(norms) == 4


def test_convert_reparameterizes_and_drops_the_kept_instances():
    model = _vit(depth=2)
    x = torch.randn(4, 3, 64, 64)
    prepared = igq.prepare(model, igq.IGQConfig.repq_vit(6))
    igq.calibrate(prepared, x, progress=False)
    assert igq.reparam.EXAMPLE_ATTR in prepared.__dict__
    qmodel = igq.convert(prepared, progress=False)
    assert len(qmodel.igq_reparameterized) == 4
    assert igq.reparam.EXAMPLE_ATTR not in qmodel.__dict__
    with torch.no_grad():
        assert float(ops.cosine(model(x), qmodel(x))) > 0.95


def test_constant_channels_keep_the_fold_exact():
    model = _vit(depth=2)
    model.blocks[0].norm1.weight.data[:3] = 0.0  # channels that are the constant beta
    x = torch.randn(4, 3, 64, 64)
    qmodel = igq.quantize(model, igq.IGQConfig.repq_vit(6), x, progress=False)  # checks FP outputs internally
    site = qmodel.blocks[0].attn.qkv.input_quantizer
    scale, zero_point = site.qparams()
    assert 0 <= float(zero_point) <= 63 and float(scale) > 1e-4
    with torch.no_grad():
        assert float(ops.cosine(model(x), qmodel(x))) > 0.95


def test_failure_after_folding_restores_weights_and_observers(monkeypatch):
    model = _vit(depth=2)
    x = torch.randn(4, 3, 64, 64)
    prepared = igq.prepare(model, igq.IGQConfig(weight_bits=6, act_bits=6, reparam="repq"))
    igq.calibrate(prepared, x, progress=False)
    snapshot = {k: v.clone() for k, v in prepared.state_dict().items()}
    site = prepared.blocks[1].mlp.fc1.input_quantizer
    ranges = [t.clone() for t in site.observer.ranges()]
    calls = []
    original = igq.reparam._retarget_quantizer

    def flaky(q, *args):
        calls.append(q.site)
        if len(calls) == 4:
            raise KeyboardInterrupt  # e.g. the user interrupts half-way
        return original(q, *args)

    monkeypatch.setattr(igq.reparam, "_retarget_quantizer", flaky)
    with pytest.raises(KeyboardInterrupt):
        igq.reparameterize(prepared)
    assert all(torch.equal(v, snapshot[k]) for k, v in prepared.state_dict().items())
    assert all(torch.equal(a, b) for a, b in zip(site.observer.ranges(), ranges))
    assert prepared.blocks[0].attn.qkv.input_quantizer.observer.ranges()[0].shape == ranges[0].shape
    monkeypatch.undo()
    assert len(igq.reparameterize(prepared)) == 4  # a clean retry works


class _BiasFreeNorm(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm = nn.LayerNorm(16, bias=False)
        self.fc = nn.Linear(16, 8, bias=False)
        nn.init.normal_(self.norm.weight, 1.0, 0.8)

    def forward(self, x):
        return self.fc(self.norm(x))


def test_bias_free_layernorm_and_linear_save_load_after_explicit_reparameterize(tmp_path):
    model = _BiasFreeNorm().eval()
    x = torch.randn(4, 5, 16) + torch.linspace(-2, 2, 16)
    prepared = igq.prepare(model, igq.IGQConfig(weight_bits=6, act_bits=6, act_scheme="layer"))  # reparam=None
    igq.calibrate(prepared, x, progress=False)
    assert igq.reparameterize(prepared) == ["norm"]
    qmodel = igq.convert(prepared, progress=False)
    assert qmodel.norm.bias is not None and qmodel.fc.bias is not None
    assert model.norm.bias is None and model.fc.bias is None  # the user's model is untouched
    igq.save(qmodel, tmp_path / "q.pt")
    loaded = igq.load(tmp_path / "q.pt", model)
    assert loaded.igq_reparameterized == ["norm"]
    with torch.no_grad():
        assert torch.equal(loaded(x), qmodel(x))


def test_allocation_with_reparameterization():
    model = _vit(depth=2)
    x = torch.randn(4, 3, 64, 64)
    cfg = igq.IGQConfig(weight_bits=6, act_bits=6, reparam="repq", group_allocation="bop",
                        allocation_candidates=(1, 4, 8))
    qmodel = igq.quantize(model, cfg, x, progress=False)
    assert len(qmodel.igq_reparameterized) == 4 and qmodel.igq_allocation is not None
