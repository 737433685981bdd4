"""torch.ao FX flow: prepare_fx with get_igq_qconfig_mapping -> calibrate by running -> convert_igq_fx.

Equivalence: the FX flow calibrates with float weights (torch.ao's post-training flow). The core flow
calibrated the same way (weight fake-quant off during calibration) must give the same model: same
sites, ranges, weight codes and outputs."""
import warnings

import pytest
import timm
import torch
from torch import nn
from torch.ao.quantization import quantize_fx

import igq_plugin as igq
from nets import MLP
from igq_plugin.integrations.torch_ao import IGQFakeQuantize, convert_igq_fx, get_igq_qconfig_mapping


Net = MLP


def _fx(model, cfg, data):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torch.ao's own deprecation notice
        prepared = quantize_fx.prepare_fx(model, get_igq_qconfig_mapping(cfg), (data[0],))
    with torch.no_grad():
        for x in data:
            prepared(x)
    return convert_igq_fx(prepared, progress=False)


def _core_float_weight_calibration(model, cfg, data):
    prepared = igq.prepare(model, cfg)
    weighted = [site.weight_quantizer for site in igq.sites(prepared) if site.weight_quantizer is not None]
    for wq in weighted:
        wq.weight_fake_quant_enabled = False
    igq.calibrate(prepared, data, progress=False)
    for wq in weighted:
        wq.weight_fake_quant_enabled = True
    return igq.convert(prepared, progress=False)


def _models():
    return {
        "mlp": (Net().eval(), [torch.randn(4, 6, 16) for _ in range(3)], torch.randn(3, 6, 16)),
        "deit": (_unfused(timm.create_model("deit_tiny_patch16_224", img_size=32, patch_size=8, depth=2,
                                            num_classes=10).eval()),
                 [torch.randn(4, 3, 32, 32) for _ in range(2)], torch.randn(3, 3, 32, 32)),
    }


def _unfused(model):
    """prepare_fx traces the model as it is; igq.prepare switches timm's fused attention off. Compare like with like."""
    for module in model.modules():
        if hasattr(module, "fused_attn"):
            module.fused_attn = False
    return model


@pytest.mark.parametrize("name", ["mlp", "deit"])
def test_fx_flow_equals_the_core_flow(name):
    torch.manual_seed(0)
    model, data, x = _models()[name]
    cfg = igq.IGQConfig(weight_bits=4, act_bits=4, num_groups=4, quantize_attention=False)
    fx = _fx(model, cfg, data)
    core = _core_float_weight_calibration(model, cfg, data)
    fx_sites = {s.consumer: s for s in igq.sites(fx)}
    core_sites = {s.consumer: s for s in igq.sites(core)}
    assert fx_sites.keys() == core_sites.keys() and len(fx_sites) >= 2
    for consumer, site in fx_sites.items():
        other = core_sites[consumer]
        assert site.kind == other.kind and site.quantizer.bits == other.quantizer.bits
        assert torch.equal(site.quantizer.lo, other.quantizer.lo) and torch.equal(site.quantizer.hi, other.quantizer.hi)
        assert torch.equal(site.weight_quantizer.weight_scale, other.weight_quantizer.weight_scale)
    with torch.no_grad():
        torch.testing.assert_close(fx(x), core(x), rtol=1e-6, atol=1e-6)
    report = igq.report(fx, x)
    assert [s.site for s in report.sites if s.kind != "float"] == list(fx_sites)
    targets = {str(n.target) for n in torch.export.export(fx, (x,)).graph.nodes}
    assert "igq.group_fake_quant.default" in targets


def test_fx_model_gets_gptq_rounding_through_its_sites():
    torch.manual_seed(0)
    model, data, x = _models()["mlp"]
    cfg = igq.IGQConfig(num_groups=4, quantize_attention=False)
    fx = _fx(model, cfg, data)
    core = _core_float_weight_calibration(model, cfg, data)
    assert igq.round_weights(fx, data, progress=False) == igq.round_weights(core, data, progress=False) == ["fc1", "fc2"]
    assert torch.equal(fx.fc1.weight_int, core.fc1.weight_int)
    with torch.no_grad():
        torch.testing.assert_close(fx(x), core(x), rtol=1e-6, atol=1e-6)


def test_fx_head_patterns_skip_and_only_linear_inputs_are_kept():
    model = nn.Sequential()
    model.add_module("fc1", nn.Linear(16, 32))
    model.add_module("fc2", nn.Linear(32, 16))
    model.add_module("head", nn.Linear(16, 4))
    cfg = igq.IGQConfig(num_groups=4, skip=("fc2",), quantize_attention=False)
    fx = _fx(model.eval(), cfg, [torch.randn(4, 6, 16) for _ in range(2)])
    sites = {s.consumer: s for s in igq.sites(fx)}
    assert list(sites) == ["fc1", "head"] and isinstance(fx.fc2, nn.Linear)
    assert (sites["head"].quantizer.scheme, sites["head"].quantizer.bits, sites["head"].weight_quantizer.w_bits) == \
        ("layer", 8, 8)
    assert sites["fc1"].quantizer.scheme == "igq"
    assert not any(isinstance(m, IGQFakeQuantize) for m in fx.modules())  # output observers removed


def test_fx_errors():
    cfg = igq.IGQConfig(num_groups=4, quantize_attention=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        prepared = quantize_fx.prepare_fx(Net().eval(), get_igq_qconfig_mapping(cfg), (torch.randn(2, 6, 16),))
    nodes = [n.name for n in prepared.graph.nodes]
    with pytest.raises(RuntimeError, match="saw no calibration batch"):
        convert_igq_fx(prepared)
    assert [n.name for n in prepared.graph.nodes] == nodes  # nothing changed before the error
    with pytest.raises(ValueError, match="no IGQFakeQuantize"):
        convert_igq_fx(torch.fx.symbolic_trace(Net()))
    with pytest.raises(TypeError, match="GraphModule returned by prepare_fx"):
        convert_igq_fx(Net())
    from torch.ao.quantization import default_qconfig

    mixed = get_igq_qconfig_mapping(cfg).set_module_name("fc2", default_qconfig)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prepared = quantize_fx.prepare_fx(Net().eval(), mixed, (torch.randn(2, 6, 16),))
        prepared(torch.randn(2, 6, 16))
    with pytest.raises(ValueError, match="mixes torch.ao's own"):
        convert_igq_fx(prepared)
    with pytest.raises(RuntimeError, match="convert_igq_fx"):
        IGQFakeQuantize(bits=4, scheme="igq", num_groups=2).calculate_qparams()


def test_readme_fx_example_runs():
    """README's torch.ao FX example, executed as written."""
    import re
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    match = re.search(r"<!-- readme-example: torch_ao_fx -->\n```python\n(.*?)```", text, re.S)
    assert match, "README lost its torch.ao FX example"
    scope: dict = {}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # only torch.ao's deprecation notice (filtered in the example) may warn
        warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"timm\..*")
        exec(compile(match.group(1), "README.md", "exec"), scope)
    assert isinstance(scope["qmodel"], torch.fx.GraphModule) and len(igq.sites(scope["qmodel"])) == 1 + 12 * 4 + 1
