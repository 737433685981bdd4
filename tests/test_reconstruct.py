"""Block reconstruction (igq.reconstruct): soft rounding math, loss goes down on held-out data, structure kept."""
import math

import pytest
import timm
import torch

import igq_plugin as igq
from igq_plugin import ops


def test_soft_rounding_values_by_hand():
    # h(v) = clamp(sigmoid(v) * 1.2 - 0.1, 0, 1)
    v = torch.tensor([0.0, 10.0, -10.0, math.log(3.0)])  # sigmoid(log 3) = 0.75 -> 0.8
    assert torch.allclose(ops.soft_rounding_h(v), torch.tensor([0.5, 1.0, 0.0, 0.8]))
    # regularizer 1 - |2h - 1|^beta: 1 at h = 0.5, 0 at h in {0, 1}; 1 - 0.6^2 = 0.64 at h = 0.8, beta 2
    assert torch.allclose(ops.rounding_regularizer(v, 2.0), torch.tensor(1.0 + 0.0 + 0.0 + 0.64))
    w = torch.tensor([[0.26, -0.74, 0.5]])
    scale, zero = torch.tensor([0.5]), torch.tensor([8.0])  # w / s = 0.52, -1.48, 1.0
    init = ops.soft_rounding_init(w, scale)
    assert torch.allclose(ops.soft_rounding_h(init), torch.tensor([[0.52, 0.52, 1e-4]]), atol=1e-5)
    soft = ops.soft_quantize_weight(w, scale, zero, 4, init)  # starts at the float weights
    assert torch.allclose(soft, w, atol=1e-4)
    hard = ops.soft_quantize_weight(w, scale, zero, 4, init, hard=True)  # 0.52 -> 1, -1.48 -> -1, 1.0 -> 1
    assert torch.equal(hard, torch.tensor([[0.5, -0.5, 0.5]]))
    up = ops.soft_quantize_weight(w, scale, zero, 4, torch.full_like(w, 10.0), hard=True)  # every value rounded up
    assert torch.equal(up, torch.tensor([[0.5, -0.5, 1.0]]))


def test_soft_rounding_starts_from_given_codes_by_hand():
    # w / s = 0.3, 0.3, 1.7, -0.4, 2.9 with codes - z = 0, 1, 1, 0, 1 (GPTQ may pick the farther code, or one
    # more than a step away): each pair holds its code, h leans at least 0.05 past 1/2 toward it
    scale, zero = torch.tensor([0.5]), torch.tensor([8.0])
    w = torch.tensor([[0.3, 0.3, 1.7, -0.4, 2.9]]) * 0.5
    codes = torch.tensor([[0.0, 1.0, 1.0, 0.0, 1.0]]) + 8
    base, v = ops.soft_rounding_start(w, scale, zero, codes)
    assert torch.equal(base, torch.tensor([[0.0, 0.0, 1.0, -1.0, 1.0]]))
    assert torch.allclose(ops.soft_rounding_h(v), torch.tensor([[0.3, 0.55, 0.45, 0.6, 0.45]]), atol=1e-5)
    assert torch.equal(ops.soft_rounding_codes(w, scale, zero, 4, v, base), codes)
    hard = ops.soft_quantize_weight(w, scale, zero, 4, v, hard=True, base=base)
    assert torch.equal(hard, ops.dequantize_weight(codes, scale, zero, torch.float32))
    soft = ops.soft_quantize_weight(w, scale, zero, 4, v, base=base)  # (base + h) * s
    assert torch.allclose(soft, torch.tensor([[0.3, 0.55, 1.45, -0.4, 1.45]]) * 0.5, atol=1e-5)
    # without codes: AdaRound's start at the float weights
    base, v = ops.soft_rounding_start(w, scale, zero)
    assert torch.equal(base, torch.tensor([[0.0, 0.0, 1.0, -1.0, 2.0]]))
    assert torch.allclose(v, ops.soft_rounding_init(w, scale))
    with pytest.raises(ValueError, match="shape"):
        ops.soft_rounding_start(w, scale, zero, codes[:, :2])


def _setup(depth=3, seed=0):
    torch.manual_seed(seed)
    m = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=10, depth=depth, img_size=32,
                          patch_size=8, embed_dim=64, num_heads=4).eval()
    g = torch.Generator().manual_seed(seed)
    calib = [torch.randn(8, 3, 32, 32, generator=g) for _ in range(4)]
    return m, calib, torch.randn(96, 3, 32, 32, generator=g), torch.randn(48, 3, 32, 32, generator=g)


def test_reconstruction_lowers_held_out_error_and_keeps_the_igq_structure(tmp_path):
    model, calib, rec, held_out = _setup()
    q = igq.quantize(model, igq.IGQConfig(weight_bits=4, act_bits=4, num_groups=8), calib, progress=False)
    groups = {s.name: s.quantizer.num_groups for s in igq.sites(q)}
    with torch.no_grad():
        ref = model(held_out)
        before = (q(held_out) - ref).pow(2).mean()
    assert igq.reconstruct(q, rec, iters=60, progress=False) is q
    with torch.no_grad():
        after = (q(held_out) - ref).pow(2).mean()
    assert after < 0.8 * before, (before, after)
    assert {s.name: s.quantizer.num_groups for s in igq.sites(q)} == groups
    assert all(s.weight_quantizer.weight_rounded for s in igq.sites(q, "linear_input")
               if s.consumer.startswith("blocks."))
    assert not any(isinstance(p, torch.nn.Parameter) for s in igq.sites(q) for p in s.quantizer.parameters())
    assert all("soft_rounding" not in s.weight_quantizer.__dict__ for s in igq.sites(q, "linear_input"))
    path = tmp_path / "q.pt"
    igq.save(q, path)
    again = igq.load(path, _setup()[0])
    with torch.no_grad():
        assert torch.equal(again(held_out), q(held_out))


def test_zero_iterations_keep_round_to_nearest():
    model, calib, rec, held_out = _setup(depth=1)
    cfg = igq.IGQConfig(weight_bits=4, act_bits=4)
    q = igq.quantize(model, cfg, calib, progress=False)
    r = igq.reconstruct(igq.quantize(model, cfg, calib, progress=False), rec, iters=0, progress=False)
    with torch.no_grad():
        assert torch.allclose(r(held_out), q(held_out), atol=1e-5)


def test_zero_iterations_keep_gptq_codes():
    model, calib, rec, held_out = _setup(depth=1)
    cfg = igq.IGQConfig(weight_bits=4, act_bits=4, weight_rounding="gptq")
    q = igq.quantize(model, cfg, calib, progress=False)
    r = igq.reconstruct(igq.quantize(model, cfg, calib, progress=False), rec, iters=0, progress=False)
    rounded = [(s.name, s.weight_quantizer) for s in igq.sites(q, "linear_input") if s.weight_quantizer.weight_rounded]
    assert rounded
    ours = {s.name: s.weight_quantizer for s in igq.sites(r, "linear_input")}
    for name, wq in rounded:  # the codes GPTQ chose, not round-to-nearest of the float weights
        assert torch.equal(ours[name].weight_int, wq.weight_int), name
        rtn = ops.quantize_weight(wq.weight, wq.weight_scale, wq.weight_zero_point, wq.w_bits)
        assert not torch.equal(rtn.to(torch.uint8), wq.weight_int), name  # GPTQ moved some codes
    with torch.no_grad():
        assert torch.allclose(r(held_out), q(held_out), atol=1e-5)


def test_chained_block_inputs_equal_running_the_model(monkeypatch):
    """Consecutive blocks of one nn.Sequential take the previous block's outputs instead of running the model
    up to each block: the same reconstruction, bit for bit."""
    import sys

    rec_module = sys.modules["igq_plugin.reconstruct"]  # the package exports the function under the module's name
    model, calib, rec, held_out = _setup(depth=3)
    cfg = igq.IGQConfig(weight_bits=4, act_bits=4)
    chained = igq.reconstruct(igq.quantize(model, cfg, calib, progress=False), rec, iters=3, progress=False)
    assert rec_module._follows(chained, "blocks.0", "blocks.1")
    assert not rec_module._follows(chained, "blocks.0", "blocks.2")
    captured = []
    real_capture = rec_module._capture
    monkeypatch.setattr(rec_module, "_follows", lambda *a: False)
    monkeypatch.setattr(rec_module, "_capture", lambda *a: captured.append(1) or real_capture(*a))
    again = igq.reconstruct(igq.quantize(model, cfg, calib, progress=False), rec, iters=3, progress=False)
    assert len(captured) == 6  # every block, quantized and float
    for key, value in chained.state_dict().items():
        assert torch.equal(value, again.state_dict()[key]), key
    with torch.no_grad():
        assert torch.equal(chained(held_out), again(held_out))


def test_bad_arguments_are_refused():
    from nets import MLP

    model, calib, rec, _ = _setup(depth=1)
    with pytest.raises(ValueError, match="quantize it"):
        igq.reconstruct(model, rec)
    q = igq.quantize(model, igq.IGQConfig(weight_bits=4, act_bits=4), calib, progress=False)
    with pytest.raises(ValueError, match="qdrop"):
        igq.reconstruct(q, rec, qdrop=1.5)
    with pytest.raises(ValueError, match="iters"):
        igq.reconstruct(q, rec, iters=-1)
    mlp = igq.quantize(MLP(), igq.IGQConfig(weight_bits=4, act_bits=4), torch.randn(8, 16), progress=False)
    with pytest.raises(ValueError, match="no block list"):
        igq.reconstruct(mlp, torch.randn(8, 16))


def test_a_failing_block_keeps_its_weights_and_no_grad_callers_work():
    model, calib, rec, held_out = _setup(depth=2)
    q = igq.quantize(model, igq.IGQConfig(weight_bits=4, act_bits=4), calib, progress=False)
    with torch.no_grad():  # reconstruction enables gradients itself
        igq.reconstruct(q, rec[:16], iters=2, batch_size=8, progress=False)
    assert q.blocks[0].attn.qkv.weight_rounded
    fresh = igq.quantize(model, igq.IGQConfig(weight_bits=4, act_bits=4), calib, progress=False)
    with torch.no_grad():
        before = fresh(held_out)
    with pytest.raises(TypeError, match="Tensor"):
        igq.reconstruct(fresh, {"x": rec}, progress=False)
    block = fresh.blocks[0]
    original = block.forward
    calls = {"n": 0}

    def failing(x):  # fails on the third training step of block 0
        if torch.is_grad_enabled():
            calls["n"] += 1
            if calls["n"] == 3:
                raise RuntimeError("boom")
        return original(x)

    block.forward = failing
    with pytest.raises(RuntimeError, match="boom"):
        igq.reconstruct(fresh, rec[:16], iters=5, batch_size=8, progress=False)
    del block.forward
    assert all("soft_rounding" not in s.weight_quantizer.__dict__ for s in igq.sites(fresh, "linear_input"))
    assert not fresh.blocks[0].attn.qkv.weight_rounded
    with torch.no_grad():
        assert torch.equal(fresh(held_out), before)


def test_nncf_models_are_refused():
    import nncf  # scripts/setup.sh installs it: missing is a failure, not a skip
    from igq_plugin.integrations.nncf import quantize_igq

    model, calib, rec, _ = _setup(depth=1)
    q = quantize_igq(model, nncf.Dataset(calib), config=igq.IGQConfig(weight_bits=4, act_bits=4), progress=False)
    with pytest.raises(ValueError, match="outside the modules of block"):
        igq.reconstruct(q, rec)


def test_config_field_runs_reconstruction_inside_quantize():
    model, calib, _, held_out = _setup(depth=2)
    with pytest.raises(ValueError, match="reconstruct_iters must be an int >= 0"):
        igq.IGQConfig(reconstruct_iters=-1)
    cfg = igq.IGQConfig(weight_bits=4, act_bits=4)
    manual = igq.reconstruct(igq.quantize(model, cfg, calib, progress=False), calib, iters=3, progress=False)
    inside = igq.quantize(model, igq.IGQConfig(weight_bits=4, act_bits=4, reconstruct_iters=3), calib, progress=False)
    with torch.no_grad():
        assert torch.equal(inside(held_out), manual(held_out))
    assert igq.IGQConfig.from_dict(igq.IGQConfig(reconstruct_iters=5).to_dict()).reconstruct_iters == 5
