"""Hugging Face transformers quantizer: from_pretrained(..., quantization_config=IGQConfig(...)), calibration,
attention sites through the "igq_eager" attention function, save_pretrained round trips."""
import dataclasses
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import transformers as T
from PIL import Image

import igq_plugin as igq
import igq_plugin.integrations.transformers as igq_hf

SMALL = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
BITS = dict(weight_bits=4, act_bits=4, num_groups=4)


def _vision(name):
    return {
        "vit": (T.ViTForImageClassification, T.ViTConfig(image_size=32, patch_size=8, num_labels=3, **SMALL)),
        "deit": (T.DeiTForImageClassification, T.DeiTConfig(image_size=32, patch_size=8, num_labels=3, **SMALL)),
        "dinov2": (T.Dinov2ForImageClassification, T.Dinov2Config(image_size=28, patch_size=14, num_labels=3, **SMALL)),
        "swin": (T.SwinForImageClassification, T.SwinConfig(image_size=32, patch_size=4, embed_dim=16, depths=[1, 1],
                                                            num_heads=[2, 2], window_size=4, num_labels=3)),
    }[name]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """Float checkpoints (random init) of each architecture, saved the way the Hub holds them."""
    torch.manual_seed(0)
    paths = {}
    for name in ("vit", "deit", "dinov2", "swin"):
        cls, config = _vision(name)
        paths[name] = tmp_path_factory.mktemp(name)
        cls(config).eval().save_pretrained(paths[name])
    paths["bert"] = tmp_path_factory.mktemp("bert")
    T.BertModel(T.BertConfig(vocab_size=100, max_position_embeddings=32, **SMALL)).eval().save_pretrained(paths["bert"])
    return paths


def _images(size, n=8, seed=0):
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _load(path, auto=T.AutoModelForImageClassification, **kwargs):
    return auto.from_pretrained(path, quantization_config=igq_hf.IGQConfig(**{**BITS, **kwargs}))


def test_config_fields_come_from_the_core_definition_and_round_trip():
    core_fields = {f.name for f in dataclasses.fields(igq.IGQConfig)}
    cfg = igq_hf.IGQConfig(weight_bits=6, act_bits=6, num_groups=12, skip=("a.*",), modules_to_not_convert=["head"])
    d = cfg.to_dict()
    assert core_fields <= set(d) and d["quant_method"] == "igq" and d["skip"] == ["a.*"]
    again = igq_hf.IGQConfig.from_dict(d)
    assert again.to_dict() == d and again.core == cfg.core and again.num_groups == 12
    assert json.loads(cfg.to_json_string())["weight_bits"] == 6
    with pytest.raises(ValueError, match="act_bits"):
        igq_hf.IGQConfig(act_bits=1)
    with pytest.raises(ValueError, match=r"unknown IGQConfig field\(s\) \['groups'\].*num_groups"):
        igq_hf.IGQConfig(groups=8)
    with pytest.raises(ValueError, match="calibration_batch_size"):
        igq_hf.IGQConfig(calibration_batch_size=0)
    with pytest.raises(ValueError, match="modules_to_not_convert"):
        igq_hf.IGQConfig(modules_to_not_convert="classifier")
    assert "calibration_dataset" not in igq_hf.IGQConfig(calibration_dataset=[torch.zeros(3)]).to_dict()


@pytest.mark.parametrize("name", ["vit", "deit", "dinov2", "swin"])
def test_vision_models_get_every_site_and_round_trip_bit_identically(checkpoints, name, tmp_path):
    _, config = _vision(name)
    x = _images(config.image_size, 3, seed=1)
    model = _load(checkpoints[name], calibration_dataset=list(_images(config.image_size)), calibration_batch_size=4)
    kinds = [s.kind for s in igq.sites(model)]
    layers = config.num_hidden_layers if name != "swin" else sum(config.depths)
    assert kinds.count("softmax") == layers and kinds.count("matmul_operand") == 3 * layers
    assert kinds.count("conv_input") == 1  # patch embedding, layer-wise at embed_bits
    assert isinstance(model.classifier, torch.nn.Linear)  # transformers' default: the classifier stays float
    report = igq.report(model, x)
    assert {f"{s.consumer}" for s in igq.sites(model, "softmax")} <= {r.site.rsplit(".", 1)[0] for r in report.sites}
    with torch.no_grad():
        logits = model(pixel_values=x).logits
    model.save_pretrained(tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["config.json", "model.safetensors"]
    saved = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert saved["quant_method"] == "igq" and saved["num_groups"] == 4
    again = T.AutoModelForImageClassification.from_pretrained(tmp_path)  # no quantization_config passed
    with torch.no_grad():
        assert torch.equal(again(pixel_values=x).logits, logits)
    assert [s.name for s in igq.sites(again)] == [s.name for s in igq.sites(model)]


def test_auto_model_backbones_and_a_text_encoder(checkpoints):
    dinov2 = _load(checkpoints["dinov2"], T.AutoModel, calibration_dataset=[_images(28, 4)])
    assert type(dinov2).__name__ == "Dinov2Model" and len(igq.sites(dinov2, "softmax")) == 2
    ids = torch.randint(0, 100, (4, 12), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(4, 12, dtype=torch.long)
    mask[:, 9:] = 0  # padding: the additive mask reaches the quantized softmax
    bert = _load(checkpoints["bert"], T.AutoModel, calibration_dataset=[{"input_ids": ids, "attention_mask": mask}])
    kinds = [s.kind for s in igq.sites(bert)]
    assert kinds.count("softmax") == 2 and kinds.count("linear_input") == 12
    with torch.no_grad():
        out = bert(input_ids=ids, attention_mask=mask).last_hidden_state
        ref = T.AutoModel.from_pretrained(checkpoints["bert"])(input_ids=ids, attention_mask=mask).last_hidden_state
    cos = torch.nn.functional.cosine_similarity(out[:, :9].flatten(1), ref[:, :9].flatten(1)).min()
    assert 0.5 < cos < 1.0  # quantized, and still the same function


def test_without_a_dataset_the_first_forward_names_calibrate(checkpoints):
    model = _load(checkpoints["vit"])
    with pytest.raises(RuntimeError, match=r"igq_plugin\.integrations\.transformers\.calibrate\(model, data\)"):
        model(pixel_values=_images(32, 2))
    calibrated = _load(checkpoints["vit"], calibration_dataset=[_images(32)])
    igq_hf.calibrate(model, [_images(32)], progress=False)
    with torch.no_grad():
        assert torch.equal(model(pixel_values=_images(32, 2)).logits, calibrated(pixel_values=_images(32, 2)).logits)


def test_calibration_inputs_users_have(checkpoints):
    """The same 8 images as one tensor batch, single [3, H, W] tensors, dicts, PIL images with the
    image processor and a datasets.Dataset of rows: the same model."""
    import datasets

    images = _images(32)
    pil = [Image.fromarray((img.permute(1, 2, 0).clamp(-1, 1) * 127 + 128).to(torch.uint8).numpy()) for img in images]
    processor = T.ViTImageProcessor(size={"height": 32, "width": 32}, do_rescale=True)
    processed = processor(images=pil, return_tensors="pt")["pixel_values"]
    x = _images(32, 2, seed=3)

    def logits(data, **kwargs):
        model = _load(checkpoints["vit"], calibration_dataset=data, calibration_batch_size=8, **kwargs)
        with torch.no_grad():
            return model(pixel_values=x).logits

    ref = logits([processed])
    assert torch.equal(logits(list(processed)), ref)
    assert torch.equal(logits([{"pixel_values": processed}]), ref)
    assert torch.equal(logits(pil, processor=processor), ref)
    rows = datasets.Dataset.from_dict({"image": pil, "label": [0] * len(pil)})
    assert torch.equal(logits(rows, processor=processor), ref)
    with pytest.raises(ValueError, match="processor"):
        logits(pil)
    with pytest.raises(TypeError, match="one kind of item"):
        logits([processed[0], "a text"])


def test_bfloat16_loads_and_quantizes_on_cpu(checkpoints):
    model = T.AutoModelForImageClassification.from_pretrained(
        checkpoints["vit"], dtype=torch.bfloat16,
        quantization_config=igq_hf.IGQConfig(**BITS, calibration_dataset=[_images(32).bfloat16()]))
    with torch.no_grad():
        out = model(pixel_values=_images(32, 2).bfloat16()).logits
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    assert all(s.quantizer.is_calibrated for s in igq.sites(model))


def test_modules_to_not_convert(checkpoints):
    model = _load(checkpoints["vit"], modules_to_not_convert=["vit.layers.0.mlp"], calibration_dataset=[_images(32)])
    consumers = {s.consumer for s in igq.sites(model)}
    assert "vit.layers.0.mlp.fc1" not in consumers and "vit.layers.1.mlp.fc1" in consumers
    assert "classifier" in consumers  # named list given: the classifier is quantized (layer-wise, head_bits)


def test_a_process_without_the_plugin_loads_float_and_calibrate_says_what_to_import(checkpoints, tmp_path):
    model = _load(checkpoints["vit"], calibration_dataset=[_images(32)])
    model.save_pretrained(tmp_path)
    code = textwrap.dedent(f"""
        import torch, transformers
        model = transformers.AutoModelForImageClassification.from_pretrained({str(tmp_path)!r})
        print("quantized modules:", sum(type(m).__name__ == "QuantLinear" for m in model.modules()))
        import igq_plugin.integrations.transformers as igq_hf
        try:
            igq_hf.calibrate(model, [torch.randn(2, 3, 32, 32)], progress=False)
        except ValueError as err:
            print("error:", err)
    """)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert "quantized modules: 0" in out.stdout, out.stdout + out.stderr
    assert "loaded before igq_plugin.integrations.transformers was imported" in out.stdout


def test_readme_example_runs():
    """README's Hugging Face example, executed as written; nothing may warn."""
    import re
    import warnings
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    match = re.search(r"<!-- readme-example: hf_transformers -->\n```python\n(.*?)```", text, re.S)
    assert match, "README lost its Hugging Face example"
    scope: dict = {}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        exec(compile(match.group(1), "README.md", "exec"), scope)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(scope["again"](pixel_values=x).logits, scope["model"](pixel_values=x).logits)
    assert len(igq.sites(scope["again"])) == 1 + 4 * 6 + 4 * 4


def test_the_padding_mask_reaches_igq_eager_attention(checkpoints):
    """With the quantizers off, "igq_eager" is transformers' eager attention, padding mask included."""
    ids = torch.randint(0, 100, (4, 12), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(4, 12, dtype=torch.long)
    mask[:, 9:] = 0
    model = _load(checkpoints["bert"], T.AutoModel, calibration_dataset=[{"input_ids": ids, "attention_mask": mask}])
    eager = T.AutoModel.from_pretrained(checkpoints["bert"], attn_implementation="eager").eval()
    with torch.no_grad(), igq.modules.fake_quant_disabled(model):
        out = model(input_ids=ids, attention_mask=mask).last_hidden_state
        unmasked = model(input_ids=ids).last_hidden_state
        ref = eager(input_ids=ids, attention_mask=mask).last_hidden_state
    torch.testing.assert_close(out[:, :9], ref[:, :9], rtol=1e-5, atol=1e-5)
    assert (out[:, :9] - unmasked[:, :9]).abs().max() > 1e-3  # the mask matters, and it arrived


@pytest.mark.parametrize("preset", ["gptq", "allocation"])
def test_checkpoints_whose_tensor_shapes_the_calibration_sets_round_trip(checkpoints, tmp_path, preset):
    """GPTQ weight codes and allocated group counts change tensor shapes; the reload takes them from the file."""
    extra = {"weight_rounding": "gptq"} if preset == "gptq" else {
        "group_allocation": "bop", "allocation_candidates": (1, 4, 12), "sensitivity_metric": "mse"}
    model = _load(checkpoints["vit"], calibration_dataset=[_images(32)], **extra)
    shapes = {tuple(s.quantizer.hi.shape) for s in igq.sites(model, "linear_input")}
    x = _images(32, 3, seed=2)
    with torch.no_grad():
        logits = model(pixel_values=x).logits
    model.save_pretrained(tmp_path)
    again = T.AutoModelForImageClassification.from_pretrained(tmp_path)
    with torch.no_grad():
        assert torch.equal(again(pixel_values=x).logits, logits)
    if preset == "gptq":
        assert all(s.weight_quantizer.weight_int.numel() for s in igq.sites(again, "linear_input"))
    else:
        assert len(shapes) > 1  # the allocation gave the sites different group counts


def test_loading_with_another_class_is_an_error_not_garbage(checkpoints, tmp_path):
    ids = torch.randint(0, 100, (2, 8))
    _load(checkpoints["bert"], T.AutoModel, calibration_dataset=[{"input_ids": ids}]).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="no quantizer state for .*pooler.dense"):
        T.AutoModelForSequenceClassification.from_pretrained(tmp_path)


def test_config_changes_after_construction_reach_the_core(checkpoints):
    cfg = igq_hf.IGQConfig(**BITS)
    cfg.weight_bits = 8
    assert cfg.core.weight_bits == 8 and cfg.to_dict()["weight_bits"] == 8
    cfg.update(act_bits=6)
    assert cfg.core.act_bits == 6
    with pytest.raises(ValueError, match="weight_bits"):
        cfg.weight_bits = 1
    plus = igq_hf.IGQConfig.igq_plus(4, num_groups=12, calibration_batch_size=4)
    assert plus.core == igq.IGQConfig.igq_plus(4, num_groups=12) and plus.calibration_batch_size == 4


def test_calibrating_again(checkpoints):
    data, other = [_images(32)], [_images(32, seed=5)]
    x = _images(32, 2, seed=6)
    for extra in ({}, {"weight_rounding": "gptq"}):
        model = _load(checkpoints["vit"], calibration_dataset=data, **extra)
        fresh = _load(checkpoints["vit"], calibration_dataset=other, **extra)
        igq_hf.calibrate(model, other, progress=False)  # the same as calibrating once on the new data
        with torch.no_grad():
            assert torch.equal(model(pixel_values=x).logits, fresh(pixel_values=x).logits)
    model = _load(checkpoints["vit"], calibration_dataset=data, reparam="repq")
    with pytest.raises(ValueError, match="reparameterized"):
        igq_hf.calibrate(model, other, progress=False)
    with torch.no_grad():
        model(pixel_values=x)  # still calibrated and usable
    assert model.config.quantization_config.calibration_dataset is None  # the data is not kept by the model
