"""The site registry: an adapter that keeps quantizers apart from the layers they feed registers its sites
and gets reparameterization, calibration, the mse rule, GPTQ rounding and igq.report unchanged; in-place
prepare (meta device, hooks kept); mergeable observers; the registry follows copies and checkpoints."""
import copy

import pytest
import torch
from torch import nn

import igq_plugin as igq
from igq_plugin.calibration import ChannelRangeObserver, ChannelSampleObserver, RowMaxObserver


class FloatNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm = nn.LayerNorm(16)
        self.fc1 = nn.Linear(16, 32)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(32, 8)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(self.norm(x))))


class ApartNet(nn.Module):
    """The same network as a graph-level adapter builds it: quantizers as separate modules before
    QuantLinears that have no input quantizer of their own (as in a torch.ao FX graph)."""

    def __init__(self, float_net: FloatNet, cfg: igq.IGQConfig):
        super().__init__()
        self.norm = copy.deepcopy(float_net.norm)
        pct = igq.ops.default_weight_percentile(cfg.weight_bits)

        def quantizer(channels, site):
            return igq.ActQuantizer(cfg.act_bits, "igq", channels, cfg.num_groups, update=cfg.range_update, site=site)

        self.q1 = quantizer(16, "q1")
        self.fc1 = igq.QuantLinear.from_float(copy.deepcopy(float_net.fc1), w_bits=cfg.weight_bits, weight_percentile=pct)
        self.act = nn.GELU()
        self.q2 = quantizer(32, "q2")
        self.fc2 = igq.QuantLinear.from_float(copy.deepcopy(float_net.fc2), w_bits=cfg.weight_bits, weight_percentile=pct)
        for q, layer in ((self.q1, "fc1"), (self.q2, "fc2")):
            igq.register_site(self, q.site, "linear_input", q, layer, weight_quantizer=getattr(self, layer))
            getattr(self, layer).calibrate_weight()
            q.start_observer()

    def forward(self, x):
        return self.fc2(self.q2(self.act(self.fc1(self.q1(self.norm(x))))))


def _data():
    g = torch.Generator().manual_seed(0)
    return [torch.randn(4, 12, 16, generator=g) * torch.linspace(0.2, 3, 16) + 1.0 for _ in range(3)]


@pytest.mark.parametrize("range_update", ["quantile", "mse"])
def test_registered_sites_get_every_flow_of_the_eager_modules(range_update):
    torch.manual_seed(0)
    float_net = FloatNet().eval()
    cfg = igq.IGQConfig(weight_bits=4, act_bits=4, num_groups=4, range_update=range_update, reparam="repq",
                        quantize_attention=False, embed_bits=None, head_bits=None)
    data = _data()

    eager = igq.prepare(float_net, cfg)
    apart = ApartNet(float_net, cfg).eval()
    assert [s.name for s in igq.sites(eager)] == ["fc1.input_quantizer", "fc2.input_quantizer"]
    assert [(s.consumer, s.kind) for s in igq.sites(apart)] == [("fc1", "linear_input"), ("fc2", "linear_input")]
    for model in (eager, apart):
        igq.calibrate(model, data, progress=False)
        assert igq.reparameterize(model) == ["norm"]  # LayerNorm -> fc1 edge found through the site
        igq.convert(model, progress=False)
        assert igq.round_weights(model, data, progress=False) == ["fc1", "fc2"]
    x = torch.randn(3, 12, 16) * 2 + 1
    with torch.no_grad():
        assert torch.equal(apart(x), eager(x))
    assert torch.equal(apart.fc1.weight_int, eager.fc1.weight_int)
    assert torch.equal(apart.q1.lo, eager.fc1.input_quantizer.lo)
    report_eager, report_apart = igq.report(eager, x), igq.report(apart, x)
    assert [s.to_dict() for s in report_apart.sites] == [s.to_dict() for s in report_eager.sites]
    assert [s.site for s in report_apart.sites] == ["fc1", "fc2"]


def test_site_records_validate_kind_and_follow_deepcopy():
    q = igq.ActQuantizer(4, "layer", site="x")
    with pytest.raises(ValueError, match="kind must be one of"):
        igq.register_site(nn.Module(), "x", "input", q, "fc")
    with pytest.raises(ValueError, match="only linear_input / conv_input"):
        igq.register_site(nn.Module(), "x", "softmax", q, "attn", weight_quantizer=nn.Linear(2, 2))
    qmodel = igq.quantize(FloatNet().eval(), igq.IGQConfig(num_groups=2), _data(), progress=False)
    clone = copy.deepcopy(qmodel)
    for a, b in zip(igq.sites(qmodel), igq.sites(clone)):
        assert a.name == b.name and a.quantizer is not b.quantizer
        assert b.quantizer is clone.get_submodule(b.name) and b.weight_quantizer is clone.get_submodule(b.consumer)
    with pytest.raises(ValueError, match="already has igq quantizers"):
        igq.quantize(qmodel, igq.IGQConfig(num_groups=2), _data(), progress=False)


def test_load_refuses_a_checkpoint_with_other_sites(tmp_path):
    cfg = igq.IGQConfig(num_groups=2)
    qmodel = igq.quantize(FloatNet().eval(), cfg, _data(), progress=False)
    path = tmp_path / "q.pt"
    igq.save(qmodel, path)
    ckpt = torch.load(path, weights_only=True)
    ckpt["sites"][0][1] = "conv_input"
    torch.save(ckpt, path)
    with pytest.raises(ValueError, match="other quantization sites"):
        igq.load(path, FloatNet().eval())


def test_prepare_in_place_on_meta_device_then_load_weights_and_calibrate():
    torch.manual_seed(0)
    reference = FloatNet().eval()
    cfg = igq.IGQConfig(weight_bits=4, act_bits=4, num_groups=4)
    data = _data()
    expected = igq.quantize(reference, cfg, data, progress=False)

    with torch.device("meta"):
        model = FloatNet().eval()
    prepared = igq.prepare(model, cfg, inplace=True)
    assert prepared is model and isinstance(model.fc1, igq.QuantLinear) and model.fc1.weight.is_meta
    assert not model.fc1.weight_is_calibrated
    model.to_empty(device="cpu")
    missing, unexpected = model.load_state_dict(reference.state_dict(), strict=False)
    assert not unexpected and all("quantizer" in k or k.split(".")[-1].startswith("weight_") for k in missing)
    igq.calibrate(model, data, progress=False)
    igq.convert(model, progress=False)
    x = torch.randn(2, 12, 16)
    with torch.no_grad():
        assert torch.equal(model(x), expected(x))


def test_prepare_keeps_module_hooks_and_never_copies_an_instance_forward():
    import timm

    model = timm.create_model("deit_tiny_patch16_224", img_size=32, patch_size=8, depth=1, num_classes=10).eval()
    calls = []
    model.blocks[0].attn.register_forward_hook(lambda m, a, o: calls.append("attn"))
    handle = model.blocks[0].mlp.fc1.register_forward_pre_hook(lambda m, a: calls.append("fc1"))
    model.blocks[0].attn.forward = lambda *args, **kwargs: pytest.fail("the float forward ran")  # as accelerate does
    prepared = igq.prepare(model, igq.IGQConfig(num_groups=2), inplace=True)
    assert "forward" not in vars(prepared.blocks[0].attn)
    names = [s.name for s in igq.sites(prepared)]
    assert names == [n for n, _ in prepared.named_modules() if n in set(names)]  # module order
    assert {s.kind for s in igq.sites(prepared)} == {"conv_input", "linear_input", "matmul_operand", "softmax"}
    igq.calibrate(prepared, torch.randn(2, 3, 32, 32), progress=False)
    assert calls == ["attn", "fc1"]
    handle.remove()  # the user's handle still removes the hook from the quantized module
    calls.clear()
    igq.convert(prepared, progress=False)(torch.randn(1, 3, 32, 32))
    assert calls == ["attn"]


def test_observers_merge_shards_exactly():
    x = torch.randn(8, 10, 6) * torch.linspace(0.1, 4, 6)
    whole, merged = ChannelRangeObserver("s"), ChannelRangeObserver("s")
    whole.observe(x)
    merged.observe(x[:3])
    shard = ChannelRangeObserver("s")
    shard.observe(x[3:])
    merged.merge(shard)
    assert all(torch.equal(a, b) for a, b in zip(whole.ranges(), merged.ranges()))
    rows, rows_b = RowMaxObserver("a"), RowMaxObserver("a")
    a = torch.softmax(torch.randn(4, 2, 5, 5), -1)
    rows.observe(a[:2])
    rows_b.observe(a[2:])
    rows.merge(rows_b)
    assert torch.equal(rows.maxima(), a.amax(-1).reshape(-1))
    with pytest.raises(TypeError, match="cannot merge"):
        whole.merge(rows)
    # sampling observers: different seeds per shard sample different tokens
    s0, s1 = ChannelSampleObserver("s", tokens=3, seed=0), ChannelSampleObserver("s", tokens=3, seed=1)
    s0.observe(x)
    s1.observe(x)
    assert not torch.equal(s0.chunks()[0][0], s1.chunks()[0][0])
    s0.merge(s1)
    assert len(s0.chunks()) == 2


def test_full_backward_hooks_survive_prepare():
    model = FloatNet()
    seen = []
    model.fc2.register_full_backward_hook(lambda m, gi, go: seen.append(go[0].shape))
    prepared = igq.prepare(model, igq.IGQConfig(num_groups=2), inplace=True)
    igq.calibrate(prepared, _data(), progress=False)
    igq.convert(prepared, progress=False)
    prepared(torch.randn(2, 12, 16, requires_grad=True)).sum().backward()
    assert seen == [torch.Size([2, 12, 8])]


def test_failed_in_place_prepare_leaves_the_model_as_it_was(monkeypatch):
    model = FloatNet()
    before = {name: type(m) for name, m in model.named_modules()}
    calls = {"n": 0}
    original = igq.QuantLinear.calibrate_weight

    def fail_on_second(self):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("disk on fire")
        original(self)

    monkeypatch.setattr(igq.QuantLinear, "calibrate_weight", fail_on_second)
    with pytest.raises(RuntimeError, match="disk on fire"):
        igq.prepare(model, igq.IGQConfig(num_groups=2), inplace=True)
    assert {name: type(m) for name, m in model.named_modules()} == before and not igq.sites(model)
    monkeypatch.setattr(igq.QuantLinear, "calibrate_weight", original)
    assert igq.prepare(model, igq.IGQConfig(num_groups=2), inplace=True) is model  # and it can be retried


def test_sites_of_a_wrapped_quantized_model_and_report():
    qmodel = igq.quantize(FloatNet().eval(), igq.IGQConfig(num_groups=2), _data(), progress=False)
    wrapper = nn.Sequential(qmodel, nn.Linear(8, 3))
    assert [s.name for s in igq.sites(wrapper)] == ["0.fc1.input_quantizer", "0.fc2.input_quantizer"]
    assert igq.get_site(wrapper, "0.fc1.input_quantizer").quantizer is qmodel.fc1.input_quantizer
    report = igq.report(wrapper, torch.randn(2, 12, 16))
    assert [(s.site, s.kind) for s in report.sites] == [("0.fc1", "linear"), ("0.fc2", "linear"), ("1", "float")]
    recorded = igq.report(wrapper)  # the shapes calibration recorded on the inner model, prefixed
    assert [(s.site, s.kind) for s in recorded.sites] == [("0.fc1", "linear"), ("0.fc2", "linear")]


def test_calibration_flags_follow_the_buffers_and_sensitivity_probing_restores_them():
    from igq_plugin.allocation.sensitivity import _only_site

    qmodel = igq.quantize(FloatNet().eval(), igq.IGQConfig(num_groups=2), _data(), progress=False)
    q = qmodel.fc1.input_quantizer
    q._buffers["calibrated"] = torch.tensor(False)  # as a loader that assigns buffers directly would
    igq.sync_calibration_state(qmodel)
    assert not q.is_calibrated
    with pytest.raises(RuntimeError, match="not calibrated"):
        qmodel(torch.randn(1, 12, 16))
    q._buffers["calibrated"] = torch.tensor(True)
    igq.sync_calibration_state(qmodel)
    qmodel(torch.randn(1, 12, 16))
    fresh = igq.prepare(FloatNet().eval(), igq.IGQConfig(num_groups=2))
    p = fresh.fc1.input_quantizer
    with _only_site(p, (torch.tensor([-1.0, -2.0]), torch.tensor([1.0, 2.0]))):
        assert p.is_calibrated
    assert not p.is_calibrated and not bool(p.calibrated) and p.observing
