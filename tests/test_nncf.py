"""NNCF adapter: quantize_igq equals igq.quantize, IgnoredScope, NNCF state round trip, NNCF-style configs,
IGQAlgorithm in an NNCF Pipeline, and the OpenVINO export of the NNCF model."""
import copy
import json
import pathlib

import pytest
import timm
import torch

import igq_plugin as igq

nncf = pytest.importorskip("nncf", reason="the nncf extra is installed by scripts/setup.sh")
from igq_plugin.integrations.nncf import (ALLOWED_MODULES, IGQAlgorithm, create_compressed_model,  # noqa: E402
                                          get_nncf_graph, quantize_igq, register_sites)

from nets import MLP  # noqa: E402

EXAMPLE_CONFIG = pathlib.Path(__file__).resolve().parents[1] / "integrations" / "nncf" / "igq_w4a4_config.json"


def _vit(depth=2, dim=64, heads=4, seed=0):
    torch.manual_seed(seed)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=10, depth=depth, img_size=32,
                             patch_size=8, embed_dim=dim, num_heads=heads).eval()


def _batches(n=3, shape=(4, 3, 32, 32), seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=g) for _ in range(n)]


CFG = igq.IGQConfig(weight_bits=4, act_bits=4, num_groups=4)


def _site_names(model):
    return [s.name for s in igq.sites(model)]


def test_quantize_igq_equals_igq_quantize_on_deit_tiny():
    torch.manual_seed(0)
    model = timm.create_model("deit_tiny_patch16_224", pretrained=False).eval()
    data = _batches(2, (2, 3, 224, 224))
    x = _batches(1, (2, 3, 224, 224), seed=1)[0]
    cfg = igq.IGQConfig(weight_bits=4, act_bits=4, num_groups=8)
    ref = igq.quantize(model, cfg, data, progress=False)
    ours = quantize_igq(model, nncf.Dataset(data), config=cfg, progress=False)
    assert _site_names(ours) == _site_names(ref)  # every site: Linears, patch embedding, Q, K, V, softmax rows
    assert len(_site_names(ours)) == 1 + 12 * 8 + 1
    with torch.no_grad():
        assert torch.equal(ours(x), ref(x))
    assert not any("nncf" in n for n, _ in model.named_modules())  # the user's model is untouched
    assert model.blocks[0].attn.fused_attn is True


@pytest.mark.parametrize("tokens", [None, 5])
def test_quantize_igq_equals_igq_quantize_on_plain_mlp(tokens):
    torch.manual_seed(0)
    model = MLP().eval()
    shape = (4, 16) if tokens is None else (4, tokens, 16)
    data = _batches(3, shape)
    ref = igq.quantize(model, CFG, data, progress=False)
    ours = quantize_igq(model, nncf.Dataset(data), config=CFG, progress=False)
    x = _batches(1, shape, seed=3)[0]
    with torch.no_grad():
        assert torch.equal(ours(x), ref(x))
    assert _site_names(ours) == ["fc1.input_quantizer", "fc2.input_quantizer"]


def test_gptq_rounding_and_grid_configs_equal_igq_quantize():
    model, data, x = _vit(), _batches(), _batches(1, seed=1)[0]
    cfg = igq.IGQConfig(weight_bits=4, act_bits=4, num_groups=4, weight_rounding="gptq", act_grid=8)
    ref = igq.quantize(model, cfg, data, progress=False)
    ours = quantize_igq(model, nncf.Dataset(data), config=cfg, progress=False)
    with torch.no_grad():
        assert torch.equal(ours(x), ref(x))
    assert all(s.weight_quantizer.weight_rounded for s in igq.sites(ours) if s.kind == "linear_input")


def test_ignored_scope_names_patterns_and_types_are_honoured():
    model, data = _vit(), _batches()
    scope = nncf.IgnoredScope(names=["head/linear/0"], patterns=[r"blocks/1/mlp/fc\d/.*"], types=["softmax"])
    q = quantize_igq(model, nncf.Dataset(data), config=CFG, ignored_scope=scope, progress=False)
    names = _site_names(q)
    assert "head.input_quantizer" not in names
    assert not any(n.startswith("blocks.1.mlp") for n in names)
    assert "blocks.0.mlp.fc1.input_quantizer" in names
    assert not any(s.kind == "softmax" for s in igq.sites(q))
    assert any(s.kind == "matmul_operand" for s in igq.sites(q))
    x = data[0]
    with torch.no_grad():  # the head runs in float: its weight is the float weight
        assert torch.equal(q.head.weight, model.head.weight)
    with pytest.raises(nncf.ValidationError):
        quantize_igq(model, nncf.Dataset(data), config=CFG, progress=False,
                     ignored_scope=nncf.IgnoredScope(names=["blocks.0.attn.qkv"]))  # dotted module name: not a node
    graph = get_nncf_graph(_vit(), x)
    assert "blocks/0/attn/qkv/linear/0" in {n.node_name for n in graph.get_all_nodes()}


def test_nncf_state_round_trip_is_bit_exact_and_restores_sites():
    model, data, x = _vit(), _batches(), _batches(1, seed=1)[0]
    cfg = igq.IGQConfig(weight_bits=4, act_bits=4, num_groups=4, weight_rounding="gptq")
    q = quantize_igq(model, nncf.Dataset(data), config=cfg, progress=False)
    state, weights = nncf.torch.get_config(q), q.state_dict()
    state = json.loads(json.dumps(state))  # NNCF's config is plain JSON
    with pytest.raises(Exception, match="untrusted"):
        nncf.torch.load_from_config(_vit(), state)  # NNCF's default allow-list is nncf.* only
    restored = nncf.torch.load_from_config(_vit(), state, allowed_modules=ALLOWED_MODULES)
    restored.load_state_dict(weights)
    register_sites(restored)
    with torch.no_grad():
        assert torch.equal(restored(x), q(x))
    assert _site_names(restored) == _site_names(q)
    report = igq.report(restored, example_input=x)
    assert "blocks.0.attn.qkv" in str(report)


def test_config_dict_and_json_file_equal_the_keyword_path(tmp_path):
    model, data, x = _vit(), _batches(), _batches(1, seed=1)[0]
    config = {"input_info": {"sample_size": [1, 3, 32, 32]},
              "compression": {"algorithm": "igq", "weight_bits": 4, "activation_bits": 4, "num_groups": 4,
                              "ignored_scopes": ["head/linear/0", "{re}blocks/1/attn/proj/.*"],
                              "initializer": {"range": {"num_init_samples": 2}}, "igq": {"act_grid": 8}}}
    path = tmp_path / "igq.json"
    path.write_text(json.dumps(config))
    from_dict = create_compressed_model(model, config, nncf.Dataset(data), progress=False)
    from_file = create_compressed_model(model, str(path), nncf.Dataset(data), progress=False)
    keywords = quantize_igq(model, nncf.Dataset(data), progress=False, subset_size=2,
                            config=igq.IGQConfig(weight_bits=4, act_bits=4, num_groups=4, act_grid=8),
                            ignored_scope=nncf.IgnoredScope(names=["head/linear/0"],
                                                            patterns=["blocks/1/attn/proj/.*"]))
    with torch.no_grad():
        assert torch.equal(from_dict(x), keywords(x))
        assert torch.equal(from_file(x), keywords(x))
    assert "blocks.1.attn.proj.input_quantizer" not in _site_names(from_dict)


def test_example_config_file_in_the_repo_loads():
    config = json.loads(EXAMPLE_CONFIG.read_text())
    config["input_info"]["sample_size"] = [1, 3, 32, 32]
    q = create_compressed_model(_vit(), config, nncf.Dataset(_batches()), progress=False)
    assert "head.input_quantizer" not in _site_names(q) and igq.sites(q)


@pytest.mark.parametrize("change, message", [
    ({"compresion": {}}, r"unknown config key\(s\) \['compresion'\]; valid top-level keys"),
    ({"compression": {"algorithm": "igq", "weight_bit": 4}}, r"unknown 'compression' key\(s\) \['weight_bit'\]; "
                                                              r"valid keys: algorithm.*weight_bits"),
    ({"compression": {"algorithm": "quantization"}}, r"compression.algorithm must be \"igq\""),
    ({"compression": {"algorithm": "igq", "igq": {"act_bit": 4}}}, r"unknown IGQConfig field\(s\) \['act_bit'\]"),
    ({"compression": {"algorithm": "igq", "weight_bits": 3, "igq": {"weight_bits": 4}}}, "both given"),
    ({"compression": {"algorithm": "igq"}, "input_info": {"sample_size": [1, 3, 224, 224]}},
     r"sample_size \[1, 3, 224, 224\] does not match"),
    ({"compression": {"algorithm": "igq", "initializer": {"range": 3}}}, "num_init_samples"),
    ({"compression": {"algorithm": "igq", "igq": "act_grid"}}, "compression.igq must be a dict"),
    ({"compression": {"algorithm": "igq", "ignored_types": "softmax"}}, "ignored_types must be a list"),
    ({"compression": {"algorithm": "igq", "ignored_scopes": "head/linear/0"}}, "ignored_scopes must be a list"),
    ({"compression": {"algorithm": "igq", "subset_size": "4"}}, r"subset_size must be an int >= 1 .*got '4'"),
])
def test_bad_configs_are_rejected_clearly(change, message):
    with pytest.raises(ValueError, match=message):
        create_compressed_model(_vit(), change, nncf.Dataset(_batches()), progress=False)


def test_bad_arguments_are_rejected_and_the_model_is_untouched():
    model, data = _vit(), _batches()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(TypeError, match="nncf.Dataset"):
        quantize_igq(model, data, config=CFG)
    with pytest.raises(ValueError, match="fast_bias_correction"):
        quantize_igq(model, nncf.Dataset(data), config=CFG, fast_bias_correction=True)
    with pytest.raises(ValueError, match="model_type"):
        quantize_igq(model, nncf.Dataset(data), config=CFG, model_type="cnn")
    with pytest.raises(ValueError, match="2 values"):
        quantize_igq(model, nncf.Dataset([(x, 0) for x in data]), config=CFG)
    with pytest.raises(ValueError, match="reparam"):
        quantize_igq(model, nncf.Dataset(data), config=igq.IGQConfig(reparam=True))
    with pytest.raises(ValueError, match="subset_size"):
        quantize_igq(model, nncf.Dataset(data), config=CFG, subset_size=0)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    q = quantize_igq(model, nncf.Dataset([(x,) for x in data]), config=CFG, progress=False)  # 1-tuples: model(x)
    with pytest.raises(ValueError, match="already has igq quantizers"):
        quantize_igq(q, nncf.Dataset(data), config=CFG)


def _pipeline(model, data, *steps):
    from nncf.quantization.algorithms.pipeline import Pipeline
    from nncf.torch.function_hook import wrap_model
    from nncf.torch.function_hook.nncf_graph.nncf_graph_builder import GraphModelWrapper

    wrapped = GraphModelWrapper(wrap_model(copy.deepcopy(model)), example_input=data[0])
    return Pipeline([list(s) for s in steps]).run(wrapped, nncf.Dataset(data)).model


def test_igq_algorithm_in_an_nncf_pipeline_uses_nncf_statistics_and_equals_igq_quantize():
    model, data, x = _vit(), _batches(), _batches(1, seed=1)[0]
    algorithm = IGQAlgorithm(CFG, subset_size=3, progress=False)
    q = _pipeline(model, data, [algorithm])
    # every block Linear input ([B, N, C]) came from NNCF's reducers; the head's [B, C] input observed through its hook
    assert sorted(algorithm._collected) == sorted(f"blocks/{b}/{m}/linear/0" for b in range(2)
                                                  for m in ("attn/qkv", "attn/proj", "mlp/fc1", "mlp/fc2"))
    ref = igq.quantize(model, CFG, data, progress=False)
    with torch.no_grad():
        assert torch.equal(q(x), ref(x))


def test_igq_algorithm_after_smooth_quant():
    from nncf.quantization.algorithms.smooth_quant.algorithm import SmoothQuant

    model, data, x = _vit(), _batches(), _batches(1, seed=1)[0]
    q = _pipeline(model, data, [SmoothQuant(subset_size=3, alpha_map={"convolution": -1, "matmul": 0.95})],
                  [IGQAlgorithm(CFG, subset_size=3, progress=False)])
    names = [n for n, _ in q.named_modules()]
    assert any("SQMultiply" in type(m).__name__ for m in q.modules()), names[:5]
    assert len(igq.sites(q)) == len(igq.sites(igq.quantize(model, CFG, data, progress=False)))
    with torch.no_grad():
        cos = torch.nn.functional.cosine_similarity(q(x).flatten(), model(x).flatten(), 0)
    assert cos > 0.9


def test_igq_algorithm_needs_the_dataset_for_gptq():
    model, data = _vit(), _batches()
    cfg = igq.IGQConfig(weight_bits=4, act_bits=4, weight_rounding="gptq")
    with pytest.raises(ValueError, match="runs the calibration data again"):
        _pipeline(model, data, [IGQAlgorithm(cfg, subset_size=3, progress=False)])
    q = _pipeline(model, data, [IGQAlgorithm(cfg, subset_size=3, progress=False,
                                             calibration_dataset=nncf.Dataset(data))])
    assert all(s.weight_quantizer.weight_rounded for s in igq.sites(q) if s.kind == "linear_input")


def test_nncf_quantized_model_exports_to_openvino_int8():
    pytest.importorskip("openvino", reason="the openvino extra is installed by scripts/setup.sh")
    from igq_plugin.integrations.openvino import check_int8, compile_openvino, export_openvino

    model, data, x = _vit(), _batches(), _batches(1, seed=1)[0]
    cfg = igq.IGQConfig(weight_bits=4, act_bits=4, num_groups=4, act_grid=8)
    q = quantize_igq(model, nncf.Dataset(data), config=cfg, progress=False)
    compiled = compile_openvino(export_openvino(q, x))
    rows = check_int8(compiled)
    assert sum(r["type"] == "FullyConnected" for r in rows) == 2 * 4 + 1
    assert sum(r["type"] == "MatMul" for r in rows) == 2 * 2
    with torch.no_grad():
        assert abs(compiled(x.numpy())[0] - q(x).numpy()).max() < 1e-4
    with torch.no_grad():  # export leaves the NNCF model as it was
        assert torch.equal(q(x), quantize_igq(model, nncf.Dataset(data), config=cfg, progress=False)(x))


def test_readme_example_runs():
    import re

    text = (pathlib.Path(__file__).parents[1] / "README.md").read_text()
    match = re.search(r"<!-- readme-example: nncf -->\n```python\n(.*?)```", text, re.S)
    assert match, "README lost its nncf example"
    scope: dict = {}
    exec(compile(match.group(1), "README.md", "exec"), scope)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(scope["restored"](x), scope["qmodel"](x))
        assert torch.equal(scope["same"](x), scope["qmodel"](x))
    assert "head.input_quantizer" not in _site_names(scope["qmodel"])


def test_nncf_quantizes_through_forward_only_so_features_need_forward_features_wrapped():
    """Why the benchmark's NNCF baseline wraps probe models (benchmarks/accuracy.py): NNCF's hooks run in
    forward() alone; forward_features() of an NNCF-quantized model runs unquantized."""
    from igq_plugin.bench.evaluation import ForwardFeatures, probe_features

    model, data, x = _vit(), _batches(), _batches(1, seed=1)[0]
    items = [b[i:i + 1] for b in data for i in range(b.shape[0])]
    sq_off = nncf.AdvancedQuantizationParameters(smooth_quant_alphas=nncf.AdvancedSmoothQuantParameters(matmul=-1))
    plain = nncf.quantize(copy.deepcopy(model), nncf.Dataset(items), model_type=nncf.ModelType.TRANSFORMER,
                          subset_size=len(items), advanced_parameters=sq_off)
    wrapped = nncf.quantize(ForwardFeatures(copy.deepcopy(model)), nncf.Dataset(items),
                            model_type=nncf.ModelType.TRANSFORMER, subset_size=len(items), advanced_parameters=sq_off)
    with torch.no_grad():
        fp = probe_features(model, x)
        assert torch.equal(probe_features(plain, x), fp)  # forward_features: no quantizer ran
        quantized = probe_features(wrapped, x)  # forward is forward_features: quantized
        assert not torch.equal(quantized, fp)
        assert torch.nn.functional.cosine_similarity(quantized.flatten(), fp.flatten(), 0) > 0.9
    # the same holds for IGQ's NNCF hooks: quantize the entry point that will be called
    q = quantize_igq(ForwardFeatures(model), nncf.Dataset(data), config=CFG, progress=False)
    ref = igq.quantize(model, CFG, data, progress=False)
    with torch.no_grad():
        assert torch.equal(q(x), ref.forward_features(x))


def test_num_init_samples_counts_samples_as_in_nncf_2():
    model, x = _vit(), _batches(1, seed=1)[0]
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(12, 3, 32, 32)), batch_size=4)
    dataset = nncf.Dataset(loader, lambda b: b[0])
    config = {"compression": {"algorithm": "igq", "weight_bits": 4, "activation_bits": 4, "num_groups": 4,
                              "initializer": {"range": {"num_init_samples": 8}}}}
    q = create_compressed_model(model, config, dataset, progress=False)
    ref = quantize_igq(model, dataset, config=igq.IGQConfig(weight_bits=4, act_bits=4, num_groups=4), subset_size=2,
                       progress=False)  # 8 samples = 2 batches of 4
    with torch.no_grad():
        assert torch.equal(q(x), ref(x))


def test_lowering_refuses_other_hooks_on_a_quantized_input():
    import openvino  # noqa: F401  (scripts/setup.sh installs it: missing is a failure, not a skip)
    from nncf.quantization.algorithms.smooth_quant.algorithm import SmoothQuant

    from igq_plugin.lowering import lower

    model, data = _vit(), _batches()
    cfg = igq.IGQConfig(weight_bits=4, act_bits=4, num_groups=4, act_grid=8)
    q = _pipeline(model, data, [SmoothQuant(subset_size=3, alpha_map={"convolution": -1, "matmul": 0.95})],
                  [IGQAlgorithm(cfg, subset_size=3, progress=False)])
    with pytest.raises(ValueError, match="other NNCF hooks on its input .*SQMultiply"):
        lower(q)


def test_fused_attention_is_named_in_a_warning(caplog):
    class Attention(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.qkv, self.proj = torch.nn.Linear(16, 48), torch.nn.Linear(16, 16)

        def forward(self, x):
            q, k, v = self.qkv(x).reshape(x.shape[0], x.shape[1], 3, 2, 8).permute(2, 0, 3, 1, 4)
            out = torch.nn.functional.scaled_dot_product_attention(q, k, v)
            return self.proj(out.transpose(1, 2).reshape(x.shape))

    data = _batches(2, (2, 5, 16))
    with caplog.at_level("WARNING", logger="igq_plugin"):
        q = quantize_igq(Attention().eval(), nncf.Dataset(data), config=CFG, progress=False)
    assert "scaled_dot_product_attention" in caplog.text
    assert {s.kind for s in igq.sites(q)} == {"linear_input"}


def test_group_allocation_runs_on_the_nncf_model_as_in_igq_quantize():
    model, data, x = _vit(), _batches(), _batches(1, seed=1)[0]
    cfg = igq.IGQConfig(weight_bits=4, act_bits=4, num_groups=4, group_allocation="bop",
                        allocation_candidates=(1, 2, 4, 8))
    ref = igq.quantize(model, cfg, data, progress=False)
    ours = quantize_igq(model, nncf.Dataset(data), config=cfg, progress=False)
    groups = {s.name: s.quantizer.num_groups for s in igq.sites(ours)}
    assert groups == {s.name: s.quantizer.num_groups for s in igq.sites(ref)}
    assert len(set(groups.values())) > 1  # the budget moved groups between sites
    with torch.no_grad():
        assert torch.equal(ours(x), ref(x))


def test_igq_algorithm_apply_on_its_own_calibrates_with_the_dataset():
    from nncf.torch.function_hook import wrap_model
    from nncf.torch.function_hook.nncf_graph.nncf_graph_builder import GraphModelWrapper

    model, data, x = _vit(), _batches(), _batches(1, seed=1)[0]
    wrapped = GraphModelWrapper(wrap_model(copy.deepcopy(model)), example_input=data[0])
    with pytest.raises(ValueError, match="needs the calibration data"):
        IGQAlgorithm(CFG, subset_size=3, progress=False).apply(wrapped, None)
    assert not igq.sites(wrapped.model)  # refused before anything changed
    q = IGQAlgorithm(CFG, subset_size=3, progress=False).apply(wrapped, None, dataset=nncf.Dataset(data)).model
    with torch.no_grad():
        assert torch.equal(q(x), igq.quantize(model, CFG, data, progress=False)(x))
