"""torch.ao FX and torchao pt2e flows against igq.quantize.

The three flows build the same model from the same config and calibration data: same sites, ranges,
weight codes and outputs (measured bit-identical on CPU; asserted with 1e-6). A plain prepare_fx
model calibrates with float weights (torch.ao's convention), so it is compared with
igq.quantize(calibration_weights="float"); prepare_igq_fx and the pt2e quantizer honour the config's
calibration_weights like igq.quantize."""
import dataclasses
import re
import warnings
from pathlib import Path

import pytest
import timm
import torch
from torch import nn
from torch.ao.quantization import quantize_fx
from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e, prepare_qat_pt2e

import igq_plugin as igq
from nets import MLP
from igq_plugin.integrations.torch_ao import (IGQFakeQuantize, IGQQuantizer, convert_igq_fx, fit_ranges,
                                              get_igq_backend_config, get_igq_qconfig_mapping, prepare_igq_fx)

CFG = igq.IGQConfig(weight_bits=4, act_bits=4, num_groups=4)


def _quiet():
    """torch.ao's FX API announces its deprecation; nothing else may warn."""
    ctx = warnings.catch_warnings()
    ctx.__enter__()
    warnings.simplefilter("error")
    warnings.filterwarnings("ignore", message=r"torch\.ao\.quantization is deprecated", category=DeprecationWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"timm\..*")
    return ctx


def _run(model, data):
    with torch.no_grad():
        for x in data:
            model(x)
    return model


def _plain_fx(model, cfg, data):
    ctx = _quiet()
    try:
        prepared = quantize_fx.prepare_fx(model, get_igq_qconfig_mapping(cfg), (data[0],),
                                          backend_config=get_igq_backend_config())
    finally:
        ctx.__exit__(None, None, None)
    return convert_igq_fx(_run(prepared, data), progress=False)


def _igq_fx(model, cfg, data):
    ctx = _quiet()
    try:
        prepared = prepare_igq_fx(model, cfg, (data[0],))
    finally:
        ctx.__exit__(None, None, None)
    return convert_igq_fx(_run(prepared, data), progress=False)


def _export(model, x):
    return torch.export.export(model, (x,), dynamic_shapes=({0: torch.export.Dim("batch")},)).module()


def _pt2e(model, cfg, data):
    prepared = prepare_pt2e(_export(model, data[0]), IGQQuantizer(cfg))
    return convert_pt2e(_run(prepared, data))


def _unfused(model):
    for module in model.modules():
        if hasattr(module, "fused_attn"):
            module.fused_attn = False  # the traced graphs then show Q K^T and the softmax
    return model


def _models():
    return {
        "mlp": (MLP().eval(), [torch.randn(4, 6, 16) for _ in range(3)], torch.randn(3, 6, 16)),
        "deit": (_unfused(timm.create_model("deit_tiny_patch16_224", img_size=32, patch_size=8, depth=2,
                                            num_classes=10).eval()),
                 [torch.randn(4, 3, 32, 32) for _ in range(2)], torch.randn(3, 3, 32, 32)),
    }


def _assert_same(flow, core, x, min_sites):
    a = {s.name: s for s in igq.sites(flow)}
    b = {s.name: s for s in igq.sites(core)}
    assert sorted(a) == sorted(b) and len(a) >= min_sites
    for name, site in a.items():
        other = b[name]
        assert (site.kind, site.consumer, site.quantizer.bits) == (other.kind, other.consumer, other.quantizer.bits)
        for attr in ("lo", "hi"):
            if hasattr(other.quantizer, attr):
                assert torch.equal(getattr(site.quantizer, attr), getattr(other.quantizer, attr)), (name, attr)
        if other.weight_quantizer is not None:
            assert torch.equal(site.weight_quantizer.weight_scale, other.weight_quantizer.weight_scale)
    with torch.no_grad():
        torch.testing.assert_close(flow(x), core(x), rtol=1e-6, atol=1e-6)


SITES = {"mlp": 2, "deit": 1 + 2 * 8 + 1}  # DeiT: patch embedding, per block 4 Linears + Q, K, V, softmax, head


@pytest.mark.parametrize("name", ["mlp", "deit"])
def test_plain_prepare_fx_equals_igq_quantize_with_float_weight_calibration(name):
    torch.manual_seed(0)
    model, data, x = _models()[name]
    cfg = dataclasses.replace(CFG, calibration_weights="float")
    fx = _plain_fx(model, cfg, data)
    _assert_same(fx, igq.quantize(model, cfg, data, progress=False), x, SITES[name])
    layers = {s.site for s in igq.report(fx, x).sites if s.kind in ("linear", "conv")}
    assert layers == {s.consumer for s in igq.sites(fx) if s.weight_quantizer is not None}
    targets = {str(n.target) for n in torch.export.export(fx, (x,)).graph.nodes}
    assert "igq.group_fake_quant.default" in targets
    assert not any(isinstance(m, IGQFakeQuantize) for m in fx.modules())


@pytest.mark.parametrize("calibration_weights", ["quantized", "float"])
@pytest.mark.parametrize("name", ["mlp", "deit"])
def test_prepare_igq_fx_and_pt2e_equal_igq_quantize(name, calibration_weights):
    torch.manual_seed(0)
    model, data, x = _models()[name]
    cfg = dataclasses.replace(CFG, calibration_weights=calibration_weights)
    core = igq.quantize(model, cfg, data, progress=False)
    _assert_same(_igq_fx(model, cfg, data), core, x, SITES[name])
    _assert_same(_pt2e(model, cfg, data), core, x, SITES[name])


def test_skip_patterns_follow_the_core_in_both_flows():
    """skip matches each module's own name (a skipped block leaves its children quantized), as igq.quantize."""
    torch.manual_seed(0)
    model, data, x = _models()["deit"]
    cfg = dataclasses.replace(CFG, skip=("blocks.0", "blocks.1.attn", "blocks.0.mlp.fc2"))
    core = igq.quantize(model, cfg, data, progress=False)
    assert "blocks.0.mlp.fc1" in {s.consumer for s in igq.sites(core)}
    assert "blocks.1.attn" not in {s.consumer for s in igq.sites(core)}
    for flow in (_igq_fx(model, cfg, data), _pt2e(model, cfg, data), _plain_fx(model, cfg, data)):
        assert sorted(s.name for s in igq.sites(flow)) == sorted(s.name for s in igq.sites(core))


def test_attention_sites_and_report_in_both_flows():
    torch.manual_seed(0)
    model, data, x = _models()["deit"]
    for flow in (_igq_fx(model, CFG, data), _pt2e(model, CFG, data)):
        kinds = [(s.name, s.kind) for s in igq.sites(flow, "matmul_operand")] + \
                [(s.name, s.kind) for s in igq.sites(flow, "softmax")]
        assert ("blocks.1.attn.k_quantizer", "matmul_operand") in kinds
        assert ("blocks.0.attn.softmax_quantizer", "softmax") in kinds and len(kinds) == 8
        report = {s.site: s for s in igq.report(flow, x).sites}
        assert report["blocks.0.attn.qk"].shape["head_dim"] == 64 and report["blocks.0.attn.av"].macs > 0


def test_pt2e_model_reexports_saves_and_loads(tmp_path):
    torch.manual_seed(0)
    model, data, x = _models()["deit"]
    qmodel = _pt2e(model, CFG, data)
    ops = [str(n.target) for n in qmodel.graph.nodes]  # the converted graph calls the core quantizers
    assert "blocks.0.attn.qkv" in ops and "blocks.0.attn.softmax_quantizer" in ops
    with torch.no_grad():
        eager = qmodel(x)
    exported = torch.export.export(qmodel, (x,), dynamic_shapes=({0: torch.export.Dim("batch")},))
    targets = [str(n.target) for n in exported.graph.nodes]
    assert targets.count("igq.group_fake_quant.default") == SITES["deit"] - 2  # all but the softmax sites
    assert targets.count("igq.softmax_row_fake_quant.default") == 2
    path = tmp_path / "deit_igq.pt2"
    torch.export.save(exported, path)
    loaded = torch.export.load(path).module()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), eager, rtol=1e-6, atol=1e-6)
        assert loaded(torch.randn(5, 3, 32, 32)).shape == (5, 10)  # dynamic batch


def test_fx_convert_rounds_weights_with_gptq_as_igq_quantize_does():
    torch.manual_seed(0)
    model, data, x = _models()["mlp"]
    cfg = dataclasses.replace(CFG, weight_rounding="gptq")
    ctx = _quiet()
    try:
        prepared = _run(prepare_igq_fx(model, cfg, (data[0],)), data)
    finally:
        ctx.__exit__(None, None, None)
    with pytest.raises(ValueError, match="calibration_data=batches"):
        convert_igq_fx(prepared)
    fx = convert_igq_fx(prepared, calibration_data=data, progress=False)
    core = igq.quantize(model, cfg, data, progress=False)
    assert torch.equal(fx.fc1.weight_int, core.fc1.weight_int) and fx.fc1.weight_int.numel()
    with torch.no_grad():
        torch.testing.assert_close(fx(x), core(x), rtol=1e-6, atol=1e-6)


def test_fx_and_pt2e_give_the_same_model_as_gptq_rounding_through_sites():
    torch.manual_seed(0)
    model, data, x = _models()["mlp"]
    flows = [_igq_fx(model, CFG, data), _pt2e(model, CFG, data), igq.quantize(model, CFG, data, progress=False)]
    assert [igq.round_weights(f, data, progress=False) for f in flows] == [["fc1", "fc2"]] * 3
    with torch.no_grad():
        outs = [f(x) for f in flows]
    torch.testing.assert_close(outs[0], outs[2], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(outs[1], outs[2], rtol=1e-6, atol=1e-6)


def _train(model, data, labels, steps):
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(steps):
        total = 0.0
        for x, y in zip(data, labels):
            loss = nn.functional.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += loss.item()
        losses.append(total)
    return losses


@pytest.mark.parametrize("flow", ["fx", "fx_plain", "pt2e"])
def test_qat_trains_weights_and_group_ranges_then_converts(flow):
    torch.manual_seed(0)
    model = _unfused(timm.create_model("deit_tiny_patch16_224", img_size=32, patch_size=8, depth=2, num_classes=10))
    data = [torch.randn(8, 3, 32, 32) for _ in range(3)]
    labels = [torch.randint(0, 10, (8,)) for _ in range(3)]
    if flow.startswith("fx"):
        ctx = _quiet()
        try:
            if flow == "fx":
                prepared = prepare_igq_fx(model.train(), CFG, (data[0],), qat=True)
            else:  # torch.ao's own call with the IGQ mapping: fit_ranges gives the layers the core's weight quant
                prepared = quantize_fx.prepare_qat_fx(model.train(), get_igq_qconfig_mapping(CFG), (data[0],),
                                                      backend_config=get_igq_backend_config())
        finally:
            ctx.__exit__(None, None, None)
    else:
        prepared = prepare_qat_pt2e(_export(model.train(), data[0]), IGQQuantizer(CFG, is_qat=True))
    _run(prepared, data)  # calibration
    fit_ranges(prepared)
    ranges = {n: p.detach().clone() for n, p in prepared.named_parameters() if n.endswith((".lo", ".hi"))}
    assert len(ranges) >= 2 * 8
    losses = _train(prepared, data, labels, 8)
    assert losses[-1] < 0.5 * losses[0], losses
    moved = [n for n, p in prepared.named_parameters() if n in ranges and not torch.equal(p, ranges[n])]
    assert len(moved) >= len(ranges) // 2  # gradients reached the group ranges
    with torch.no_grad():
        if flow.startswith("fx"):
            trained = prepared.eval()(data[0])
            qmodel = convert_igq_fx(prepared, progress=False)
        else:
            trained = prepared(data[0])
            qmodel = convert_pt2e(prepared)
        torch.testing.assert_close(qmodel(data[0]), trained, rtol=1e-5, atol=1e-5)
    assert len(igq.sites(qmodel)) == SITES["deit"]


class _Branchy(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(16, 16)
        self.gate = _DataDependent()
        self.fc2 = nn.Linear(16, 4)

    def forward(self, x):
        return self.fc2(self.gate(self.fc1(x)))


class _DataDependent(nn.Module):
    def forward(self, x):
        if x.sum() > 0:  # control flow on values: torch.fx cannot trace it
            return x.relu()
        return x


def test_fx_errors():
    cfg = dataclasses.replace(CFG, quantize_attention=False)
    with pytest.raises(RuntimeError, match=r"cannot trace 'gate' \(_DataDependent\).*set_non_traceable_module_names"
                                           r".*pt2e.*igq.quantize"):
        prepare_igq_fx(_Branchy().eval(), cfg, (torch.randn(2, 16),))
    from torch.ao.quantization.fx.custom_config import PrepareCustomConfig

    custom = PrepareCustomConfig().set_non_traceable_module_names(["gate"])  # the way out the message names
    ctx = _quiet()
    try:
        prepared = prepare_igq_fx(_Branchy().eval(), cfg, (torch.randn(2, 16),), prepare_custom_config=custom)
    finally:
        ctx.__exit__(None, None, None)
    nodes = [n.name for n in prepared.graph.nodes]
    with pytest.raises(RuntimeError, match="saw no calibration batch"):
        convert_igq_fx(prepared)
    assert [n.name for n in prepared.graph.nodes] == nodes  # nothing changed before the error
    assert [s.consumer for s in igq.sites(convert_igq_fx(_run(prepared, [torch.randn(2, 16)]), progress=False))] == \
        ["fc1", "fc2"]
    with pytest.raises(ValueError, match="no IGQFakeQuantize"):
        convert_igq_fx(torch.fx.symbolic_trace(MLP()))
    with pytest.raises(TypeError, match="GraphModule returned by prepare_fx"):
        convert_igq_fx(MLP())
    from torch.ao.quantization import default_qconfig

    mixed = get_igq_qconfig_mapping(cfg).set_module_name("fc2", default_qconfig)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prepared = quantize_fx.prepare_fx(MLP().eval(), mixed, (torch.randn(2, 6, 16),))
        prepared(torch.randn(2, 6, 16))
    with pytest.raises(ValueError, match="mixes torch.ao's own"):
        convert_igq_fx(prepared)
    with pytest.raises(RuntimeError, match="convert_igq_fx"):
        IGQFakeQuantize(bits=4, scheme="igq", num_groups=2).calculate_qparams()


def test_fx_without_the_backend_config_says_what_it_misses(caplog):
    torch.manual_seed(0)
    model, data, _ = _models()["deit"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        prepared = quantize_fx.prepare_fx(model, get_igq_qconfig_mapping(CFG), (data[0],))
    with caplog.at_level("WARNING", logger="igq_plugin"):
        qmodel = convert_igq_fx(_run(prepared, data), progress=False)
    assert "backend_config=get_igq_backend_config()" in caplog.text and "blocks.0.attn" in caplog.text
    assert not igq.sites(qmodel, "softmax") and len(igq.sites(qmodel, "linear_input")) == 9


def test_pt2e_errors():
    from torchao.quantization.pt2e import MinMaxObserver
    from torchao.quantization.pt2e.quantizer import (ComposableQuantizer, QuantizationAnnotation, QuantizationSpec,
                                                     Quantizer)

    prepared = prepare_pt2e(_export(MLP().eval(), torch.randn(2, 6, 16)), IGQQuantizer(CFG))
    with pytest.raises(RuntimeError, match="saw no calibration batch.*before convert_pt2e"):
        convert_pt2e(prepared)

    class Int8Outputs(Quantizer):  # another quantizer: observes the outputs of ``target`` nodes it finds free
        def __init__(self, target):
            super().__init__()
            self.target = target

        def annotate(self, model):
            spec = QuantizationSpec(dtype=torch.uint8, quant_min=0, quant_max=255, qscheme=torch.per_tensor_affine,
                                    observer_or_fake_quant_ctr=MinMaxObserver)
            for node in model.graph.nodes:
                if node.target is self.target and "quantization_annotation" not in node.meta:
                    node.meta["quantization_annotation"] = QuantizationAnnotation(output_qspec=spec, _annotated=True)
            return model

        def validate(self, model):
            pass

    linear, gelu = torch.ops.aten.linear.default, torch.ops.aten.gelu.default
    with pytest.raises(ValueError, match="already annotated by another quantizer"):
        prepare_pt2e(_export(MLP().eval(), torch.randn(2, 6, 16)),
                     ComposableQuantizer([Int8Outputs(linear), IGQQuantizer(CFG)]))
    with pytest.raises(ValueError, match="input of 'fc2' .* also observed by another quantizer"):
        prepare_pt2e(_export(MLP().eval(), torch.randn(2, 6, 16)),
                     ComposableQuantizer([Int8Outputs(gelu), IGQQuantizer(CFG)]))
    # the other order: torchao's ComposableQuantizer does not validate; convert_pt2e stops before any IGQ change
    prepared = prepare_pt2e(_export(MLP().eval(), torch.randn(2, 6, 16)),
                            ComposableQuantizer([IGQQuantizer(CFG), Int8Outputs(gelu)]))
    _run(prepared, [torch.randn(2, 6, 16)])
    with pytest.raises(ValueError, match="input of 'fc2' .* also observed by another quantizer"):
        convert_pt2e(prepared)
    assert not igq.sites(prepared)
    with pytest.raises(ValueError, match="reparameterization"):
        IGQQuantizer(igq.IGQConfig(reparam="repq"))
    with pytest.raises(ValueError, match="group allocation"):
        IGQQuantizer(igq.IGQConfig(group_allocation="bop"))
    with pytest.raises(ValueError, match=r"igq.round_weights\(qmodel, data\)"):
        IGQQuantizer(igq.IGQConfig(weight_rounding="gptq"))
    with pytest.raises(TypeError, match="IGQConfig"):
        IGQQuantizer({"weight_bits": 4})


def _readme_example(marker):
    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    match = re.search(rf"<!-- readme-example: {marker} -->\n```python\n(.*?)```", text, re.S)
    assert match, f"README lost its {marker} example"
    return match.group(1)


@pytest.mark.parametrize("marker", ["torch_ao_fx", "torch_ao_pt2e", "torch_ao_qat"])
def test_readme_examples_run(marker):
    """README's torch.ao examples, executed as written; only torch.ao's deprecation notice may warn."""
    scope: dict = {}
    ctx = _quiet()
    try:
        exec(compile(_readme_example(marker), "README.md", "exec"), scope)
    finally:
        ctx.__exit__(None, None, None)
    blocks = 2 if marker == "torch_ao_qat" else 12
    assert len(igq.sites(scope["qmodel"])) == 1 + blocks * 8 + 1


class _TwoHeads(nn.Module):
    """One tensor feeds two Linears (as q_proj / k_proj / v_proj do) and a residual add."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(16, 16)
        self.a = nn.Linear(16, 8)
        self.b = nn.Linear(16, 8)

    def forward(self, x):
        h = self.fc1(x)
        return self.a(h) + self.b(h) + h[..., :8]


class _WeightMatmulHead(nn.Module):
    """softmax(mean(h) @ w): a matmul with a weight before a softmax is no attention."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(16, 16)
        self.w = nn.Parameter(torch.randn(16, 4))

    def forward(self, x):
        return torch.softmax(self.fc(x).mean(1) @ self.w, -1)


class _Twice(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(16, 16)

    def forward(self, x):
        return self.fc(self.fc(x))


@pytest.mark.parametrize("net", [_TwoHeads, _WeightMatmulHead])
def test_shared_inputs_and_weight_matmuls_match_igq_quantize(net):
    torch.manual_seed(0)
    model, data, x = net().eval(), [torch.randn(4, 6, 16) for _ in range(2)], torch.randn(3, 6, 16)
    core = igq.quantize(model, CFG, data, progress=False)
    for flow in (_igq_fx(model, CFG, data), _pt2e(model, CFG, data)):
        assert sorted(s.name for s in igq.sites(flow)) == sorted(s.name for s in igq.sites(core))
        with torch.no_grad():
            torch.testing.assert_close(flow(x), core(x), rtol=1e-6, atol=1e-6)


def test_a_module_that_runs_twice_is_refused_before_any_change():
    torch.manual_seed(0)
    data = [torch.randn(4, 6, 16)]
    ctx = _quiet()
    try:
        prepared = _run(prepare_igq_fx(_Twice().eval(), CFG, (data[0],)), data)
    finally:
        ctx.__exit__(None, None, None)
    code = prepared.code
    with pytest.raises(ValueError, match="'fc' run.* more than once.*igq.quantize"):
        convert_igq_fx(prepared)
    assert prepared.code == code and not igq.sites(prepared)
    with pytest.raises(ValueError, match="'fc' runs more than once.*igq.quantize"):
        prepare_pt2e(_export(_Twice().eval(), data[0]), IGQQuantizer(CFG))


def test_hf_eager_attention_gets_every_site_in_pt2e():
    """transformers' eager attention: matmul, scale, mask, softmax(dtype=float32).to(dtype), dropout, matmul."""
    import transformers

    torch.manual_seed(0)
    config = transformers.ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2,
                                    num_attention_heads=2, intermediate_size=64, attn_implementation="eager")
    model = transformers.ViTModel(config, add_pooling_layer=False).eval()

    class Features(nn.Module):
        def __init__(self):
            super().__init__()
            self.vit = model

        def forward(self, x):
            return self.vit(pixel_values=x).last_hidden_state

    data = [torch.randn(4, 3, 32, 32) for _ in range(2)]
    qmodel = _pt2e(Features().eval(), CFG, data)
    tags = sorted(s.name.rsplit(".", 1)[-1] for s in igq.sites(qmodel) if s.kind in ("matmul_operand", "softmax"))
    assert tags == sorted(["q_quantizer", "k_quantizer", "v_quantizer", "softmax_quantizer"] * 2)
    assert len(igq.sites(qmodel, "linear_input")) == 2 * 6  # q, k, v, o, fc1, fc2: one observer each
    with torch.no_grad():
        cos = nn.functional.cosine_similarity(qmodel(data[0]).flatten(1), Features()(data[0]).flatten(1))
    assert cos.min() > 0.5


def test_fx_qat_keeps_skipped_layers_float_and_the_users_model_untouched():
    torch.manual_seed(0)
    model = MLP()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = dataclasses.replace(CFG, skip=("fc2",))
    data = [torch.randn(8, 6, 16) for _ in range(2)]
    ctx = _quiet()
    try:
        prepared = prepare_igq_fx(model.train(), cfg, (data[0],), qat=True)
    finally:
        ctx.__exit__(None, None, None)
    _run(prepared, data)
    fit_ranges(prepared)
    opt = torch.optim.SGD(prepared.parameters(), lr=0.1)
    for x in data:
        loss = prepared(x).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert type(prepared.fc2) is nn.Linear  # float while training too
    qmodel = convert_igq_fx(prepared.eval(), progress=False)
    assert type(qmodel.fc2) is nn.Linear and [s.consumer for s in igq.sites(qmodel)] == ["fc1"]
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    site = igq.sites(qmodel)[0]
    assert "lo" in site.quantizer._buffers and "hi" in site.quantizer._buffers  # ranges are buffers again


def test_pt2e_without_torchao_names_the_extra(monkeypatch):
    import sys

    import igq_plugin.integrations.torch_ao as torch_ao

    monkeypatch.setitem(sys.modules, "torchao", None)  # as if torchao were not installed
    with pytest.raises(ImportError, match=r'pip install "igq_plugin\[torchao\]"'):
        torch_ao.IGQQuantizer
