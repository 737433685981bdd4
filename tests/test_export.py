"""torch.export of quantized timm models: strict and non-strict, igq ops as graph nodes, outputs equal
eager, torch.export.save / load round trip. Small random-weight models (the graph, not accuracy, is tested)."""
import io

import pytest
import timm
import torch

import igq_plugin as igq

# name -> (factory, image size). Small depths and widths keep export fast on 2 cores; the module
# classes (timm Attention, Swin WindowAttention, DINOv2 layer-scale blocks) are the real ones.
MODELS = {
    "deit": (lambda: timm.create_model("deit_tiny_patch16_224", img_size=32, patch_size=8, depth=2, num_classes=10), 32),
    "vit": (lambda: timm.create_model("vit_small_patch16_224", img_size=32, patch_size=8, depth=2, num_classes=10,
                                      embed_dim=96, num_heads=3), 32),
    "dinov2": (lambda: timm.create_model("vit_small_patch14_dinov2", img_size=28, depth=2, num_classes=0,
                                         dynamic_img_size=True, embed_dim=96, num_heads=3), 28),
    "swin": (lambda: timm.create_model("swin_tiny_patch4_window7_224", img_size=56, depths=(2, 2), num_heads=(2, 4),
                                       embed_dim=32, num_classes=10), 56),
}
IGQ_OPS = {"igq.group_fake_quant.default", "igq.softmax_row_fake_quant.default"}


@pytest.fixture(scope="module")
def quantized():
    torch.manual_seed(0)
    out = {}
    for name, (factory, size) in MODELS.items():
        model = factory().eval()
        data = [torch.randn(4, 3, size, size) for _ in range(2)]
        cfg = igq.IGQConfig(weight_bits=4, act_bits=4, num_groups=4, softmax_quantizer="tanq")
        out[name] = (igq.quantize(model, cfg, data, progress=False), size)
    return out


@pytest.mark.parametrize("strict", [False, True], ids=["nonstrict", "strict"])
@pytest.mark.parametrize("name", list(MODELS))
def test_export_quantized_timm_model(quantized, name, strict):
    qmodel, size = quantized[name]
    x = torch.randn(2, 3, size, size)
    ep = torch.export.export(qmodel, (x,), strict=strict)
    targets = [str(n.target) for n in ep.graph.nodes if n.op == "call_function"]
    assert IGQ_OPS <= set(targets)
    # one group_fake_quant node per activation site ("igq" groups, and "layer" sites as one group),
    # one softmax_row_fake_quant node per attention
    act_sites = [s for s in igq.sites(qmodel) if getattr(s.quantizer, "scheme", None) in ("igq", "layer")]
    assert targets.count("igq.group_fake_quant.default") == len(act_sites)
    assert targets.count("igq.softmax_row_fake_quant.default") == len(igq.sites(qmodel, "softmax")) > 0
    with torch.no_grad():
        eager = qmodel(x)
        exported = ep.module()(x)
    # The same ops in the same order: equal up to float rounding; measured exactly equal on CPU.
    torch.testing.assert_close(exported, eager, rtol=1e-6, atol=1e-6)
    buf = io.BytesIO()
    torch.export.save(ep, buf)
    buf.seek(0)
    loaded = torch.export.load(buf)
    with torch.no_grad():
        torch.testing.assert_close(loaded.module()(x), eager, rtol=1e-6, atol=1e-6)


def test_export_dynamic_batch(quantized):
    qmodel, size = quantized["deit"]
    batch = torch.export.Dim("batch", min=1, max=64)
    ep = torch.export.export(qmodel, (torch.randn(2, 3, size, size),), dynamic_shapes={"x": {0: batch}})
    x = torch.randn(5, 3, size, size)
    with torch.no_grad():
        torch.testing.assert_close(ep.module()(x), qmodel(x), rtol=1e-6, atol=1e-6)


def test_uncalibrated_model_raises_at_export_not_silently():
    factory, size = MODELS["deit"]
    prepared = igq.prepare(factory().eval(), igq.IGQConfig(), observe=False)
    with pytest.raises(Exception, match="not calibrated"):
        torch.export.export(prepared, (torch.randn(1, 3, size, size),))
