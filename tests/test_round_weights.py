"""Model-level GPTQ rounding (igq.round_weights, IGQConfig(weight_rounding="gptq"))."""
import importlib
import logging
import sys
from pathlib import Path

import pytest
import timm
import torch
from torch import nn

import igq_plugin as igq
from igq_plugin import ops
from igq_plugin._inputs import concat_inputs
from igq_plugin.modules import QuantLinear, fake_quant_disabled


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(48, 96), nn.GELU(), nn.Linear(96, 32)).eval()


def _data(n=4, tokens=40, c=48, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, tokens, c, generator=g)
    x[:, :, 3] *= 6  # an outlier channel
    return list(x.split(2))


def _converted(model, cfg, data):
    prepared = igq.prepare(model, cfg)
    igq.calibrate(prepared, data, progress=False)
    return igq.convert(prepared, progress=False)


def _layer_inputs(qmodel, data):
    """The quantized inputs X^ every QuantLinear receives on the concatenated calibration data."""
    seen = {}
    hooks = [m.input_quantizer.register_forward_hook(lambda mod, a, out, n=n: seen.setdefault(n, out.detach()))
             for n, m in qmodel.named_modules() if isinstance(m, QuantLinear)]
    with torch.no_grad():
        qmodel(concat_inputs(data))
    for h in hooks:
        h.remove()
    return seen


@pytest.mark.parametrize("bits", [3, 4])
def test_gptq_never_increases_each_layers_error_on_its_calibration_inputs(bits):
    model, data = _mlp(), _data()
    cfg = igq.IGQConfig(weight_bits=bits, act_bits=4, num_groups=4, head_patterns=())
    rtn = _converted(model, cfg, data)
    gptq = _converted(model, cfg, data)
    rounded = igq.round_weights(gptq, data, progress=False)
    assert rounded == ["0", "2"]
    inputs = _layer_inputs(gptq, data)  # the inputs GPTQ saw (layer 0 rounded before layer 2 ran)
    gains = []
    for name in rounded:
        x, ref_layer = inputs[name], dict(model.named_modules())[name]
        with torch.no_grad():
            target = x @ ref_layer.weight.t()
            err = {k: float((x @ dict(m.named_modules())[name].quantized_weight().t() - target).pow(2).sum())
                   for k, m in (("rtn", rtn), ("gptq", gptq))}
        assert err["gptq"] <= err["rtn"] * (1 + 1e-6), (name, err)
        gains.append(err["rtn"] / err["gptq"])
    assert max(gains) > 1.05  # and it does pay off


def test_codes_are_stored_and_float_weights_kept():
    model, data = _mlp(), _data()
    q = igq.quantize(model, igq.IGQConfig(weight_bits=4, act_bits=4, num_groups=4, weight_rounding="gptq"), data,
                     progress=False)
    layer = q[0]
    assert layer.weight_rounded and layer.weight_int.dtype == torch.uint8 and layer.weight_int.shape == (96, 48)
    assert torch.equal(layer.weight, model[0].weight)  # the float weight is untouched
    codes = layer.weight_codes()
    assert float(codes.min()) >= 0 and float(codes.max()) <= 15
    deq = (codes - layer.weight_zero_point[:, None]) * layer.weight_scale[:, None]
    assert torch.allclose(layer.quantized_weight(), deq)
    assert not torch.equal(layer.quantized_weight(), ops.fake_quantize_weight(
        layer.weight, layer.weight_scale, layer.weight_zero_point, 4))  # GPTQ changed some roundings
    x = concat_inputs(data)
    with torch.no_grad(), fake_quant_disabled(q):
        assert torch.allclose(q(x), model(x), atol=1e-6)  # float model recovered
    layer.calibrate_weight()  # a new weight quantizer drops the old rounding decisions
    assert not layer.weight_rounded


def test_quantize_gptq_on_timm_vit_save_load_and_model_untouched(tmp_path):
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, num_classes=10, depth=2).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    data = [torch.randn(2, 3, 32, 32) for _ in range(3)]
    cfg = igq.IGQConfig(weight_bits=4, act_bits=4, num_groups=4, softmax_quantizer="tanq", weight_clipping="mse",
                        weight_rounding="gptq", matmul_scheme="igq")
    q = igq.quantize(model, cfg, iter(data), progress=False)  # a one-shot iterator is reused safely
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    linears = [n for n, m in q.named_modules() if isinstance(m, QuantLinear)]
    assert getattr(q, "igq_gptq_rounded") == linears  # every Linear, head included, in forward order
    assert all(q.get_submodule(n).weight_rounded for n in linears)
    nearest = igq.quantize(model, cfg.replace(weight_rounding="nearest"), data, progress=False)
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        out = q(x)
        assert not torch.equal(out, nearest(x))
        igq.save(q, tmp_path / "q.pt")
        loaded = igq.load(tmp_path / "q.pt", model)
        assert torch.equal(loaded(x), out)
        assert loaded.blocks[0].attn.qkv.weight_rounded


def test_checkpoint_without_codes_loads_as_round_to_nearest(tmp_path):
    model, data = _mlp(), _data()
    q = igq.quantize(model, igq.IGQConfig(num_groups=4), data, progress=False)
    igq.save(q, tmp_path / "q.pt")
    ckpt = torch.load(tmp_path / "q.pt", weights_only=True)
    ckpt["state_dict"] = {k: v for k, v in ckpt["state_dict"].items() if not k.endswith("weight_int")}
    torch.save(ckpt, tmp_path / "old.pt")  # as written before weight_int existed
    loaded = igq.load(tmp_path / "old.pt", model)
    x = concat_inputs(data)
    with torch.no_grad():
        assert torch.equal(loaded(x), q(x))


def test_gptq_with_activations_off_is_plain_gptq_and_compensate_runs():
    model, data = _mlp(), _data()
    cfg = igq.IGQConfig(weight_bits=4, act_bits=4, num_groups=4)
    q = _converted(model, cfg, data)
    for _, quantizer in igq.iter_quantizers(q):
        quantizer.fake_quant_enabled = False
    igq.round_weights(q, data, progress=False)
    x = concat_inputs(data)
    h, _, _ = ops.input_correlations(x)
    scale, zp = q[0].weight_scale, q[0].weight_zero_point
    expected = ops.gptq_quantize(model[0].weight.detach().double(), h, scale, zp, 4, damp=0.1)
    assert torch.allclose(q[0].quantized_weight().double(), expected, atol=1e-5)
    comp = _converted(model, cfg, data)
    igq.round_weights(comp, data, compensate=True, progress=False)
    assert comp[2].weight_rounded


def test_round_weights_errors_and_rollback(monkeypatch):
    model, data = _mlp(), _data()
    cfg = igq.IGQConfig(weight_bits=4, act_bits=4, num_groups=4)
    prepared = igq.prepare(model, cfg)
    igq.calibrate(prepared, data, progress=False)
    with pytest.raises(RuntimeError, match="still observing.*igq.convert"):
        igq.round_weights(prepared, data, progress=False)
    q = igq.convert(prepared, progress=False)
    with pytest.raises(ValueError, match="damp"):
        igq.round_weights(q, data, damp=-1, progress=False)
    with pytest.raises(ValueError, match="block_size"):
        igq.round_weights(q, data, block_size=0, progress=False)
    with pytest.raises(ValueError, match="no Linear-input site"):
        igq.round_weights(nn.Sequential(nn.Linear(3, 3)), data, progress=False)
    calls = []
    real = ops.gptq_quantize

    def fail_second(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise FloatingPointError("boom")
        return real(*args, **kwargs)

    scales = [m.weight_scale.clone() for m in (q[0], q[2])]
    monkeypatch.setattr(ops, "gptq_quantize", fail_second)
    with pytest.raises(FloatingPointError):
        igq.round_weights(q, data, progress=False)
    assert not q[0].weight_rounded and not q[2].weight_rounded  # the first layer's rounding was undone
    assert all(torch.equal(s, m.weight_scale) for s, m in zip(scales, (q[0], q[2])))


def test_shared_layer_is_rounded_once_with_a_warning(caplog):
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(16, 16)

        def forward(self, x):
            return self.fc(torch.relu(self.fc(x)))

    torch.manual_seed(0)
    model, data = Twice().eval(), [torch.randn(2, 8, 16) for _ in range(2)]
    q = _converted(model, igq.IGQConfig(num_groups=2), data)
    with caplog.at_level(logging.WARNING, logger="igq_plugin"):
        assert igq.round_weights(q, data, progress=False) == ["fc"]
    assert "more than once" in caplog.text and "fc" in caplog.text


def test_set_weight_codes_validation():
    layer = _converted(_mlp(), igq.IGQConfig(num_groups=4), _data())[0]
    with pytest.raises(ValueError, match="shape"):
        layer.set_weight_codes(torch.zeros(3, 3), layer.weight_scale, layer.weight_zero_point)
    with pytest.raises(ValueError, match=r"integers in \[0, 15\]"):
        layer.set_weight_codes(torch.full_like(layer.weight, 16.0), layer.weight_scale, layer.weight_zero_point)


@pytest.mark.parametrize("kwargs, match", [
    (dict(weight_rounding="adaround"), "weight_rounding must be one of"),
    (dict(gptq_damp=-0.1), "gptq_damp"),
    (dict(gptq_damp=True), "gptq_damp"),
])
def test_config_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        igq.IGQConfig(**kwargs)


def test_concat_inputs():
    a, b = torch.randn(2, 3), torch.randn(1, 3)
    assert torch.equal(concat_inputs([a, (b, torch.tensor([0]))]), torch.cat([a, b]))
    merged = concat_inputs([{"x": a, "flag": True}, {"x": b, "flag": True}])
    assert torch.equal(merged["x"], torch.cat([a, b])) and merged["flag"] is True
    with pytest.raises(ValueError, match="'flag'"):
        concat_inputs([{"x": a, "flag": True}, {"x": b, "flag": False}])
    with pytest.raises(TypeError, match="same keys"):
        concat_inputs([{"x": a}, {"y": b}])
    with pytest.raises(TypeError, match="mix"):
        concat_inputs([a, {"x": b}])
    with pytest.raises(ValueError, match="empty"):
        concat_inputs([])


def test_ablation_script_rows_and_outputs(tmp_path):
    """benchmarks/ablation_w4a4.py: the three fake-quant modes and the markdown / PNG writer."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
    try:
        ablation = importlib.import_module("ablation_w4a4")
    finally:
        sys.path.pop(0)
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, num_classes=10, depth=1).eval()
    data = [torch.randn(2, 3, 32, 32) for _ in range(2)]
    fields = dict(ablation.ALL, num_groups=4)
    both = ablation.quantize_row(model, fields, data, "both")
    weights = ablation.quantize_row(model, fields, data, "weights")
    acts = ablation.quantize_row(model, fields, data, "acts")
    assert both.blocks[0].mlp.fc1.weight_rounded and weights.blocks[0].mlp.fc1.weight_rounded
    assert not any(q.fake_quant_enabled for _, q in igq.iter_quantizers(weights))
    assert not acts.blocks[0].mlp.fc1.weight_rounded and not acts.blocks[0].mlp.fc1.weight_fake_quant_enabled
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = model(x)
        outs = {k: m(x) for k, m in (("both", both), ("weights", weights), ("acts", acts))}
    assert all(not torch.equal(o, ref) for o in outs.values())
    results = {"cells": {
        "fmnist-vit|FP32": {"model": "fmnist-vit", "row": "FP32", "top1": 86.0, "cosine": 1.0},
        "fmnist-vit|Layer-wise min-max": {"model": "fmnist-vit", "row": "Layer-wise min-max", "top1": 80.0,
                                          "cosine": 0.9, "worst_sites_db": [["blocks.0.mlp.fc2", 7.5]],
                                          "calibration": "32", "quantize_s": 1.0},
    }}
    ablation.write_outputs(results, tmp_path)
    md = (tmp_path / "ablation_w4a4.md").read_text()
    assert "Layer-wise min-max" in md and "blocks.0.mlp.fc2 7.5" in md
    assert (tmp_path / "ablation_w4a4.png").stat().st_size > 1000
