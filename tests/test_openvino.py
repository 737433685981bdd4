"""OpenVINO INT8 lowering: what the CPU plugin runs (from the compiled runtime model, never assumed) and
how close its outputs are to the torch fake-quant model.

Models are small random-init timm ViTs (dim 96, 3 heads of 32: the CPU plugin's int8 MatMul with two
activation inputs needs a reduction of >= 16). Measured on the development CPU (AMD EPYC, OV 2026.4.1):
W4A4 act_grid=8 and W8A8 act_grid=16 both max |diff| 6e-8 vs the fake-quant model."""
import subprocess
import sys
import warnings

import numpy as np
import pytest
import timm
import torch

import igq_plugin as igq
from igq_plugin import ops
from igq_plugin.lowering import lower, lowering_report

ov = pytest.importorskip("openvino", reason="the openvino extra is installed by scripts/setup.sh")
from igq_plugin.integrations.openvino import (check_int8, compile_openvino, export_openvino,  # noqa: E402
                                              int8_report)


def _vit(depth=2):
    torch.manual_seed(0)
    m = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=10, depth=depth, img_size=64,
                          patch_size=16, embed_dim=96, num_heads=3).eval()
    for blk in m.blocks:
        blk.attn.fused_attn = False
    return m


def _images(n=8, seed=0):
    return torch.randn(n, 3, 64, 64, generator=torch.Generator().manual_seed(seed))


def _block_gemms(compiled):
    """FullyConnected / MatMul rows (the patch embedding is the one Convolution)."""
    return [r for r in int8_report(compiled) if r["type"] in ("FullyConnected", "MatMul")]


def test_int8_report_tells_integer_kernels_from_weight_decompression():
    """runtimePrecision says i8 also for a float GEMM that decompresses i8 weights: int8 must not."""
    lin = torch.nn.Linear(64, 32).eval()
    w = torch.fake_quantize_per_channel_affine(lin.weight.detach(), lin.weight.detach().abs().amax(1) / 127,
                                               torch.zeros(32, dtype=torch.int32), 0, -128, 127)

    class WeightOnly(torch.nn.Module):
        def forward(self, x):
            return torch.nn.functional.linear(x, w)

    x = torch.randn(2, 8, 64)
    compiled = compile_openvino(ov.convert_model(torch.export.export(WeightOnly(), (x,))))
    (row,) = int8_report(compiled)
    assert not row["int8"] and row["primitive"].endswith("f32")


def _fq(q, x):
    with torch.no_grad():
        return q(x).numpy()


@pytest.fixture(scope="module")
def w4a4():
    x = _images(16)
    return igq.quantize(_vit(), igq.IGQConfig(weight_bits=4, act_bits=4, act_grid=8), x, progress=False)


# --- the common grid ---------------------------------------------------------------------------------

@pytest.mark.parametrize("bits,grid_bits,signed", [(4, 8, False), (4, 16, False), (6, 8, False), (8, 16, False),
                                                   (4, 8, True), (8, 8, True)])
def test_snapped_groups_share_one_grid_that_fits(bits, grid_bits, signed):
    g = torch.Generator().manual_seed(bits)
    lo = -torch.rand(8, generator=g) * torch.logspace(-2, 1, 8)
    hi = torch.rand(8, generator=g) * torch.logspace(-2, 1, 8)
    hi[3], lo[5] = 0.0, 0.0  # one-sided groups (post-GELU like)
    new_lo, new_hi = ops.snap_to_grid(lo, hi, bits, grid_bits, signed)
    grid = ops.grid_of(new_lo, new_hi, bits)
    assert grid.exact
    if signed:
        assert grid.vmin >= -(2 ** (grid_bits - 1)) and grid.vmax <= 2 ** (grid_bits - 1) - 1
    else:
        assert grid.span <= 2**grid_bits - 1
    # every group's dequantized levels are integers on the grid
    scale, zero = ops.asym_qparams(new_lo, new_hi, bits)
    levels = (torch.arange(2**bits)[None, :] - zero[:, None]) * scale[:, None] / grid.step
    assert torch.allclose(levels, levels.round(), atol=1e-3)


def test_snapping_moves_ranges_least_and_keeps_commensurate_groups():
    lo, hi = torch.tensor([-0.5, -1.0, -2.0]), torch.tensor([0.5, 1.0, 2.0])  # steps 1:2:4 already share a grid
    new_lo, new_hi = ops.snap_to_grid(lo, hi, 4, 8)
    (s0, z0), (s1, z1) = ops.asym_qparams(lo, hi, 4), ops.asym_qparams(new_lo, new_hi, 4)
    assert torch.allclose(s1, s0, rtol=1e-6) and torch.equal(z1, z0)  # the same quantizers


def test_near_commensurate_steps_are_not_called_exact():
    """Exactness is judged at the largest code: 0.05% apart steps move 8-bit values by a tenth of a step."""
    lo, hi = torch.tensor([-0.01 * 127, -0.010005 * 127]), torch.tensor([0.01 * 128, 0.010005 * 128])
    assert not ops.grid_of(lo, hi, 8).exact
    assert ops.grid_of(lo[:1], hi[:1], 8).exact


@pytest.mark.parametrize("bits", [4, 6, 8])
def test_inexact_grid_fits_16_bits_and_reconstructs_every_level(bits):
    """The fallback grid of unconstrained groups: within 16 bits, and the byte split re-codes every
    group's every level (the extremes included) to within half a grid step."""
    from igq_plugin.lowering import _byte_split

    g = torch.Generator().manual_seed(bits)
    for _ in range(50):
        lo = -torch.rand(6, generator=g) * torch.logspace(-2, 1, 6)
        hi = torch.rand(6, generator=g) * torch.logspace(1, -2, 6)
        grid = ops.grid_of(lo, hi, bits)
        assert grid.span <= 65535
        scale, zero = ops.asym_qparams(lo, hi, bits)
        levels = ((torch.arange(2**bits)[None, :] - zero[:, None]) * scale[:, None]).flatten()
        low, high = _byte_split(levels, grid)
        back = low + high + grid.step * grid.vmin
        assert (back - levels).abs().max() <= 0.5 * grid.step * (1 + 1e-3) + 1e-6


def test_grid_config_validation():
    with pytest.raises(ValueError, match="act_grid"):
        igq.IGQConfig(act_bits=8, act_grid=8)  # 8-bit groups need 9 bits of grid
    with pytest.raises(ValueError, match="act_grid must be one of"):
        igq.IGQConfig(act_grid=12)
    with pytest.raises(ValueError, match="per-channel"):
        igq.IGQConfig(act_scheme="channel", act_grid=16)
    igq.IGQConfig(act_bits=8, act_scheme="layer", act_grid=8)  # one group is its own grid


def test_act_grid_reaches_every_site_and_the_lowered_torch_model_is_exact(w4a4):
    for site in igq.sites(w4a4):
        if site.kind != "softmax":
            assert ops.grid_of(site.quantizer.lo, site.quantizer.hi, site.quantizer.bits).exact, site.name
    x = _images(4, seed=1)
    lowered = lower(w4a4)
    report = lowering_report(lowered)
    assert {r.kind for r in report} == {"conv_input", "linear_input", "matmul_operand", "softmax"}
    assert all(r.gemms == 1 for r in report if r.kind == "linear_input")
    with torch.no_grad():  # re-coding onto the grid changes nothing; the 8-bit asymmetric weights' zero-point
        # split (patch embedding, head) reorders float sums: measured max |diff| 6e-8
        torch.testing.assert_close(lowered(x), w4a4(x), rtol=0, atol=1e-6)


def test_lowering_leaves_the_model_untouched_and_refuses_unquantized(w4a4):
    before = {k: v.clone() for k, v in w4a4.state_dict().items()}
    lower(w4a4)
    assert all(torch.equal(before[k], v) for k, v in w4a4.state_dict().items())
    assert all(type(s.quantizer).__name__ in ("ActQuantizer", "SoftmaxQuantizer") for s in igq.sites(w4a4))
    with pytest.raises(ValueError, match="no quantization sites"):
        lower(_vit(1))
    igq.disable_fake_quant(w4a4)
    try:
        with pytest.raises(ValueError, match="fake quantization disabled"):
            lower(w4a4)
    finally:
        igq.enable_fake_quant(w4a4)


# --- OpenVINO ----------------------------------------------------------------------------------------

def test_w4a4_every_block_gemm_runs_int8_and_matches(w4a4, tmp_path):
    x = _images(8, seed=2)
    ov_model = export_openvino(w4a4, x[:2], tmp_path / "igq.xml")
    compiled = compile_openvino(ov_model)
    rows = _block_gemms(compiled)
    # 2 blocks x (4 Linears + QK^T + PV) + head
    assert len(rows) == 2 * 6 + 1 and all(r["int8"] for r in rows), rows
    assert sum(r["type"] == "MatMul" for r in rows) == 4
    out, ref = compiled(x.numpy())[0], _fq(w4a4, x)  # batch 8 through a model exported at batch 2
    assert ops.cosine(torch.from_numpy(out), torch.from_numpy(ref)) >= 0.999
    assert np.abs(out - ref).max() < 1e-4
    again = compile_openvino(tmp_path / "igq.xml")  # the .xml round trip
    np.testing.assert_array_equal(again(x.numpy())[0], out)
    assert ov_model.get_rt_info(["runtime_options", "INFERENCE_PRECISION_HINT"]).astype(str) == "f32"


def test_w8a8_two_gemm_split_runs_int8_and_matches():
    x = _images(16)
    q = igq.quantize(_vit(1), igq.IGQConfig(weight_bits=8, act_bits=8, act_grid=16), x, progress=False)
    report = lowering_report(lower(q))
    assert any(r.gemms == 2 for r in report)
    compiled = compile_openvino(export_openvino(q, x[:2]))
    rows = _block_gemms(compiled)
    assert all(r["int8"] for r in rows), rows
    out, ref = compiled(x[:4].numpy())[0], _fq(q, x[:4])
    assert np.abs(out - ref).max() < 1e-4  # the byte split and the weights' zero-point correction are exact


def test_unconstrained_groups_export_with_a_warning_and_stay_close(caplog):
    x = _images(16)
    q = igq.quantize(_vit(1), igq.IGQConfig(weight_bits=4, act_bits=4), x, progress=False)
    with caplog.at_level("WARNING", logger="igq_plugin"):
        compiled = compile_openvino(export_openvino(q, x[:2]))
    assert "not on one integer grid" in caplog.text
    assert all(r["int8"] for r in _block_gemms(compiled))
    out, ref = compiled(x[:4].numpy())[0], _fq(q, x[:4])
    assert ops.cosine(torch.from_numpy(out), torch.from_numpy(ref)) >= 0.999


def test_bf16_inference_precision_is_refused_and_would_be_wrong(w4a4):
    with pytest.raises(ValueError, match="f32"):
        compile_openvino(export_openvino(w4a4, _images(2)), config={"INFERENCE_PRECISION_HINT": "bf16"})
    core = ov.Core()
    if "bf16" not in str(core.get_property("CPU", "INFERENCE_PRECISION_HINT")).lower().replace("bfloat16", "bf16"):
        pytest.skip("this CPU's default inference precision is f32: the bf16 failure cannot be shown here")
    x = _images(8, seed=3)
    default = core.compile_model(export_openvino(w4a4, x[:2]), "CPU")  # the plugin's bf16 default
    out, ref = default(x.numpy())[0], _fq(w4a4, x)
    assert np.linalg.norm(out - ref) / np.linalg.norm(ref) > 0.01  # the assignment in bf16 is wrong


def test_check_int8_names_float_gemms(w4a4):
    rows = check_int8(compile_openvino(export_openvino(w4a4, _images(2))))  # patch embedding included
    assert [r["type"] for r in rows].count("Convolution") == 1
    x = _images(2)
    with torch.no_grad():
        fp = ov.convert_model(torch.export.export(_vit(1), (x,)))
    with pytest.raises(ValueError, match="do not run INT8: .*FullyConnected"):
        check_int8(compile_openvino(fp))


def test_torch_ao_models_export_int8():
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    from igq_plugin.integrations.torch_ao import IGQQuantizer, convert_igq_fx, prepare_igq_fx

    cfg = igq.IGQConfig(act_grid=8)
    x = _images(8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        prepared = prepare_igq_fx(_vit(1), cfg, (x,))
    with torch.no_grad():
        prepared(x)
    fx = convert_igq_fx(prepared, progress=False)
    prepared = prepare_pt2e(torch.export.export(_vit(1), (x,)).module(), IGQQuantizer(cfg))
    with torch.no_grad():
        prepared(x)
    pt2e = convert_pt2e(prepared)
    for q, dynamic in ((fx, True), (pt2e, False)):  # the pt2e graph was exported at batch 8
        compiled = compile_openvino(export_openvino(q, x, dynamic_batch=dynamic))
        assert all(r["int8"] for r in _block_gemms(compiled))
        out, ref = compiled(x.numpy())[0], _fq(q, x)
        assert np.abs(out - ref).max() < 1e-4


def test_transformers_model_exports_int8(tmp_path):
    T = pytest.importorskip("transformers")
    import igq_plugin.integrations.transformers as igq_hf

    torch.manual_seed(0)
    T.ViTForImageClassification(T.ViTConfig(image_size=32, patch_size=8, num_labels=3, hidden_size=64,
                                            num_hidden_layers=2, num_attention_heads=2,
                                            intermediate_size=128)).eval().save_pretrained(tmp_path)
    x = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    model = T.AutoModelForImageClassification.from_pretrained(
        tmp_path, quantization_config=igq_hf.IGQConfig(act_grid=8, calibration_dataset=x))
    compiled = compile_openvino(export_openvino(model, {"pixel_values": x[:2]}))
    rows = _block_gemms(compiled)
    assert all(r["int8"] for r in rows[:-1]), rows  # the classifier on [B, C] may stay f32
    with torch.no_grad():
        ref = model(pixel_values=x).logits.numpy()
    assert np.abs(compiled({"pixel_values": x.numpy()})[0] - ref).max() < 1e-4


def test_importing_igq_plugin_does_not_load_openvino():
    code = ("import sys, igq_plugin, igq_plugin.lowering, igq_plugin.integrations.openvino; "
            "assert 'openvino' not in sys.modules, 'openvino imported'")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_export_errors_are_clear(w4a4, tmp_path):
    with pytest.raises(ValueError, match=r"\.xml"):
        export_openvino(w4a4, _images(2), tmp_path / "model.bin")
    with pytest.raises(ValueError, match="does not exist"):
        export_openvino(w4a4, _images(2), tmp_path / "missing" / "model.xml")
    with pytest.raises(TypeError, match="example_input"):
        export_openvino(w4a4, 3)


def test_small_heads_keep_q_k_matmul_in_float():
    """The CPU plugin crashes on an int8 activation x activation matmul reducing over < 16 channels."""
    torch.manual_seed(0)
    m = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=10, depth=1, img_size=64,
                          patch_size=16, embed_dim=48, num_heads=6).eval()  # head_dim 8
    m.blocks[0].attn.fused_attn = False
    x = _images(8)
    q = igq.quantize(m, igq.IGQConfig(act_grid=8), x, progress=False)
    report = {r.site.rsplit(".", 1)[-1]: r.integer for r in lowering_report(lower(q)) if r.kind != "linear_input"}
    assert report["q_quantizer"] is False and report["k_quantizer"] is False and report["v_quantizer"] is True
    compiled = compile_openvino(export_openvino(q, x[:2]))
    matmuls = [r["int8"] for r in int8_report(compiled) if r["type"] == "MatMul"]
    assert matmuls == [False, True]  # Q K^T float, P V (reduction over 17 tokens) INT8
    out, ref = compiled(x.numpy())[0], _fq(q, x)
    assert np.abs(out - ref).max() < 1e-4


def test_per_tensor_model_is_the_standard_int8_graph():
    """Every site one group: plain FakeQuantizes (no assignment ops), every GEMM INT8, outputs close."""
    x = _images(16)
    q = igq.quantize(_vit(1), igq.IGQConfig(weight_bits=8, act_bits=8, act_scheme="layer", act_grid=8), x,
                     progress=False)
    ov_model = export_openvino(q, x[:2])
    assert not {"TopK", "ReduceMin"} & {op.get_type_name() for op in ov_model.get_ordered_ops()}
    compiled = compile_openvino(ov_model)
    check_int8(compiled)
    out, ref = compiled(x[:4].numpy())[0], _fq(q, x[:4])
    assert ops.cosine(torch.from_numpy(out), torch.from_numpy(ref)) >= 0.999


def test_readme_example_runs():
    import re
    from pathlib import Path

    text = (Path(__file__).parents[1] / "README.md").read_text()
    match = re.search(r"<!-- readme-example: openvino -->\n```python\n(.*?)```", text, re.S)
    assert match, "README lost its openvino example"
    scope: dict = {}
    exec(compile(match.group(1), "README.md", "exec"), scope)
    assert len(scope["rows"]) == 1 + 2 * 6 + 1 and scope["logits"].shape == (4, 10)
