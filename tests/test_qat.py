"""Variation-aware QAT (igq_plugin.qat): losses by hand, LSQ and range gradients, a short run, resume."""
import math

import pytest
import timm
import torch

import igq_plugin as igq
from igq_plugin import ops


def test_bin_regularizer_by_hand():
    # bits 2 (codes 0..3), s = 1, z = 0: u = w; levels 0, 0, 1, 2; distances 0.1, 0.4, 0.2, 0
    w = torch.tensor([[0.1, 0.4, 1.2, 2.0]], requires_grad=True)
    reg = ops.bin_regularizer(w, torch.tensor([1.0]), torch.tensor([0.0]), 2)
    assert math.isclose(reg.item(), 0.085 + 0.0225 + 0.04, rel_tol=1e-6)
    # bin 0: mse (0.01 + 0.16) / 2 = 0.085, mean 0.25, variance 0.085 - 0.0625 = 0.0225; bin 1: 0.04 + 0; bin 2: 0
    reg.backward()
    # d/dw of bin 0's mse + var = (2 d_i / n) + (2 d_i / n - 2 mean / n): w1 = 0.1 + 0.1 - 0.25 = -0.05 ...
    expected = torch.tensor([[0.1 + 0.1 - 0.25, 0.4 + 0.4 - 0.25, 0.4, 0.0]])
    assert torch.allclose(w.grad, expected, atol=1e-6)
    # code units: the same weights at step 0.5 with zero point 1 give the same value
    w2 = torch.tensor([[0.1, 0.4, 1.2, 2.0]]) * 0.5 - 0.5
    assert math.isclose(float(ops.bin_regularizer(w2, torch.tensor([0.5]), torch.tensor([1.0]), 2)), reg.item(),
                        rel_tol=1e-5)


def test_distillation_losses_by_hand():
    student = torch.tensor([[0.0, 0.0]])
    teacher = torch.tensor([[math.log(3.0), 0.0]])  # softmax 0.75 / 0.25
    kl = 0.75 * math.log(0.75 / 0.5) + 0.25 * math.log(0.25 / 0.5)
    assert math.isclose(float(ops.distillation_loss(student, teacher, "kl")), kl, rel_tol=1e-6)
    p = math.sqrt(3.0) / (math.sqrt(3.0) + 1.0)  # softmax of (log 3) / 2 against 0
    kl_t2 = 4.0 * (p * math.log(p / 0.5) + (1 - p) * math.log((1 - p) / 0.5))
    assert math.isclose(float(ops.distillation_loss(student, teacher, "kl", temperature=2.0)), kl_t2, rel_tol=1e-6)
    a, b = torch.tensor([[1.0, 0.0], [0.0, 2.0]]), torch.tensor([[1.0, 1.0], [0.0, 1.0]])
    assert math.isclose(float(ops.distillation_loss(a, b, "mse")), (0 + 1 + 0 + 1) / 4, rel_tol=1e-6)
    cos = (1.0 / math.sqrt(2.0) + 1.0) / 2
    assert math.isclose(float(ops.distillation_loss(a, b, "cosine")), 1.0 - cos, rel_tol=1e-6)
    with pytest.raises(ValueError, match="one of"):
        ops.distillation_loss(a, b, "l1")
    with pytest.raises(ValueError, match="differ"):
        ops.distillation_loss(a, b[:1], "mse")


def test_lsq_weight_gradients_by_hand_and_finite_differences():
    # bits 2 (qmax 3), s = 1, z = 0: codes round(0.3) = 0, round(1.6) = 2, 5.0 clamped to 3
    w = torch.tensor([[0.3, 1.6, 5.0]], requires_grad=True)
    s = torch.tensor([1.0], requires_grad=True)
    out = ops.lsq_fake_quantize_weight(w, s, torch.tensor([0.0]), 2)
    assert torch.equal(out.detach(), ops.fake_quantize_weight(w.detach(), s.detach(), torch.tensor([0.0]), 2))
    out.sum().backward()
    assert torch.equal(w.grad, torch.tensor([[1.0, 1.0, 0.0]]))  # straight through inside, 0 where clamped
    g = 1.0 / math.sqrt(3 * 3)  # LSQ gradient scale 1 / sqrt(N * qmax)
    assert math.isclose(float(s.grad), g * ((0 - 0.3) + (2 - 1.6) + 3.0), rel_tol=1e-6)
    # where the clamp holds, the output s (qmax - z) is smooth in s: the gradient is its true derivative
    w = torch.full((1, 4), 10.0)
    s = torch.tensor([0.7], requires_grad=True)
    z = torch.tensor([1.0])
    ops.lsq_fake_quantize_weight(w, s, z, 3).sum().backward()
    eps = 1e-3
    fd = (ops.fake_quantize_weight(w, s.detach() + eps, z, 3).sum()
          - ops.fake_quantize_weight(w, s.detach() - eps, z, 3).sum()) / (2 * eps)
    assert math.isclose(float(s.grad) / (1.0 / math.sqrt(4 * 7)), float(fd), rel_tol=1e-4)


def test_activation_range_gradients_match_finite_differences_where_the_op_is_smooth():
    # Every value above a range [0, hi]: the output is hi itself, so d/dhi is exact (no rounding involved).
    torch.manual_seed(0)
    x = torch.rand(4, 6, 8) + 3.0  # [instances, tokens, channels]
    lo, hi = torch.zeros(2), torch.tensor([1.5, 2.5])

    def loss(hi_):
        return (ops.group_fake_quantize(x, lo, hi_, 4) * torch.linspace(0.5, 2.0, 8)).sum()

    hi_var = hi.clone().requires_grad_(True)
    loss(hi_var).backward()
    eps = 1e-3
    for g in range(2):
        bump = torch.zeros(2)
        bump[g] = eps
        fd = (loss(hi + bump) - loss(hi - bump)) / (2 * eps)
        assert math.isclose(float(hi_var.grad[g]), float(fd), rel_tol=1e-3, abs_tol=1e-3), (g, hi_var.grad, fd)
    assert float(hi_var.grad.sum()) > 0  # every channel is clipped to the range of the group it chose
    # post-softmax rows above a row maximum hi are clipped to it: d/dhi is exact there too
    a = torch.full((1, 2, 3, 4), 0.9)
    row_hi = torch.tensor([0.5, 0.8])
    var = row_hi.clone().requires_grad_(True)
    ops.softmax_group_fake_quantize(a, var, 4, "uniform").sum().backward()
    fd = [(ops.softmax_group_fake_quantize(a, row_hi + eps * torch.eye(2)[k], 4, "uniform").sum()
           - ops.softmax_group_fake_quantize(a, row_hi - eps * torch.eye(2)[k], 4, "uniform").sum()) / (2 * eps)
          for k in range(2)]
    assert torch.allclose(var.grad, torch.stack(fd), rtol=1e-3, atol=1e-3)


def test_multi_crop_shapes_determinism_and_errors():
    x = torch.arange(2 * 3 * 8 * 8, dtype=torch.float32).reshape(2, 3, 8, 8)
    a = igq.qat.multi_crop(x, 3, generator=torch.Generator().manual_seed(0))
    b = igq.qat.multi_crop(x, 3, generator=torch.Generator().manual_seed(0))
    assert a.shape == (6, 3, 8, 8) and torch.equal(a, b)
    full = igq.qat.multi_crop(x, 1, scale=(1.0, 1.0), ratio=(1.0, 1.0), flip=False)
    assert torch.allclose(full, x)  # the whole image, resized to itself
    with pytest.raises(ValueError, match="crop scale"):
        igq.qat.multi_crop(x, 2, scale=(0.0, 1.0))
    with pytest.raises(ValueError, match=r"\[B, C, H, W\]"):
        igq.qat.multi_crop(x[0], 2)


def _setup(seed=0, bits=3):
    torch.manual_seed(seed)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=10, depth=2, img_size=32,
                              patch_size=8, embed_dim=64, num_heads=4).eval()
    with torch.no_grad():
        model.head.weight.mul_(30.0)  # logits spread like a trained classifier's (a random head's are all ~0)
    g = torch.Generator().manual_seed(seed)
    calib = [torch.randn(8, 3, 32, 32, generator=g) for _ in range(2)]
    q = igq.quantize(model, igq.IGQConfig(weight_bits=bits, act_bits=bits, num_groups=4), calib, progress=False)
    return model, q, torch.randn(64, 3, 32, 32, generator=g), torch.randn(32, 3, 32, 32, generator=g)


def _kl(model, q, x):
    with torch.no_grad():
        return float(ops.distillation_loss(q(x), model(x), "kl"))


def test_qat_lowers_held_out_distillation_loss_keeps_structure_and_leaves_the_input_model(tmp_path):
    model, q, train, held_out = _setup()
    before_state = {k: v.clone() for k, v in q.state_dict().items()}
    groups = {s.name: s.quantizer.num_groups for s in igq.sites(q)}
    before = _kl(model, q, held_out)
    student = igq.qat.train(q, train, steps=30, batch_size=16, crops=2, crop_scale=(0.8, 1.0), lr=1e-3, scale_lr=1e-2,
                            progress=False)
    assert student is not q
    after = _kl(model, student, held_out)
    assert after < 0.8 * before, (before, after)
    assert all(torch.equal(v, q.state_dict()[k]) for k, v in before_state.items())  # the input model untouched
    assert {s.name: s.quantizer.num_groups for s in igq.sites(student)} == groups
    # learned quantizers are buffers again, state-dict keys unchanged; save / load round-trips the result
    assert set(student.state_dict()) == set(before_state)
    assert not any(isinstance(p, torch.nn.Parameter) for s in igq.sites(student) for p in s.quantizer.parameters())
    assert all(not s.weight_quantizer.learning_weight_scale for s in igq.sites(student, "linear_input"))
    path = tmp_path / "qat.pt"
    igq.save(student, path)
    again = igq.load(path, _setup()[0])
    with torch.no_grad():
        assert torch.equal(again(held_out), student(held_out))


def test_resume_reproduces_the_uninterrupted_run(tmp_path):
    model, q, train, held_out = _setup(bits=4)
    kwargs = dict(steps=6, batch_size=8, crops=2, lr=1e-3, checkpoint_every=3, progress=False)
    full = igq.qat.train(q, train, checkpoint=tmp_path / "full.pt", **kwargs)

    class Interrupt(Exception):
        pass

    calls = []

    def stop_at_step_4(module, args):
        calls.append(1)
        if len(calls) == 2 * 4:  # teacher and student forward per step: interrupted inside step 4
            raise Interrupt

    handle = q.register_forward_pre_hook(stop_at_step_4)
    with pytest.raises(Interrupt):
        igq.qat.train(q, train, checkpoint=tmp_path / "part.pt", **kwargs)
    handle.remove()
    assert torch.load(tmp_path / "part.pt", weights_only=False)["step"] == 3
    resumed = igq.qat.train(q, train, checkpoint=tmp_path / "part.pt", resume=True, **kwargs)
    full_state, resumed_state = full.state_dict(), resumed.state_dict()
    assert all(torch.equal(full_state[k], resumed_state[k]) for k in full_state)
    with torch.no_grad():
        assert torch.equal(full(held_out), resumed(held_out))
    # different settings or a different starting model are refused
    with pytest.raises(ValueError, match="lr: checkpoint 0.001, now 0.002"):
        igq.qat.train(q, train, checkpoint=tmp_path / "part.pt", resume=True, **{**kwargs, "lr": 2e-3})
    with pytest.raises(ValueError, match="differs from the one"):
        igq.qat.train(full, train, checkpoint=tmp_path / "part.pt", resume=True, **kwargs)


def test_step_sizes_learn_in_log_units():
    from igq_plugin.qat import _UnitAdam

    # Adam's first step moves every element by lr in its unit (m_hat / sqrt(v_hat) = sign of the gradient)
    a = torch.nn.Parameter(torch.tensor([1.0, -2.0]))
    b = torch.nn.Parameter(torch.tensor([1e-4, 10.0]))
    opt = _UnitAdam([{"params": [a], "lr": 0.1, "unit": "abs"}, {"params": [b], "lr": 0.1, "unit": "log"}])
    a.grad, b.grad = torch.ones(2), torch.ones(2)
    opt.step()
    assert torch.allclose(a.detach(), torch.tensor([0.9, -2.1]), atol=1e-6)
    assert torch.allclose(b.detach(), torch.tensor([1e-4, 10.0]) * math.exp(-0.1), rtol=1e-5)  # relative, stays > 0
    torch.manual_seed(0)
    c = torch.nn.Parameter(torch.rand(5) + 0.1)
    ref = torch.nn.Parameter(c.detach().log())
    opt_c, opt_ref = _UnitAdam([{"params": [c], "lr": 0.05, "unit": "log"}]), torch.optim.Adam([ref], lr=0.05)
    for _ in range(3):  # = torch's Adam on log c
        g = torch.randn(5)
        c.grad, ref.grad = g.clone(), g * c.detach()
        opt_c.step()
        opt_ref.step()
    assert torch.allclose(c.detach().log(), ref.detach(), atol=1e-5)


def test_layers_with_tiny_step_sizes_train_stably():
    # a layer whose weights (and step sizes) are 1e-4 of the others (as an 8-bit patch embedding beside 4-bit
    # MLPs): an absolute learning rate would push its step sizes through 0; in log units each changes by a
    # bounded factor
    model, q, train, held_out = _setup(bits=4)
    fc1 = q.blocks[0].mlp.fc1
    with torch.no_grad():
        fc1.weight.mul_(1e-4)
        fc1.weight_scale.mul_(1e-4)
    start = fc1.weight_scale.clone()
    steps, scale_lr = 4, 0.05
    student = igq.qat.train(q, train, steps=steps, batch_size=8, crops=1, lr=0.0, scale_lr=scale_lr, progress=False)
    ratio = student.blocks[0].mlp.fc1.weight_scale / start
    assert bool(((ratio >= math.exp(-steps * scale_lr) * 0.999) & (ratio <= math.exp(steps * scale_lr) * 1.001)).all())
    assert not torch.equal(ratio, torch.ones_like(ratio))
    with torch.no_grad():
        assert torch.isfinite(student(held_out)).all()


def test_gptq_codes_are_the_starting_point_and_module_bits_apply():
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=10, depth=2, img_size=32,
                              patch_size=8, embed_dim=64, num_heads=4).eval()
    calib = [torch.randn(8, 3, 32, 32) for _ in range(2)]
    cfg = igq.IGQConfig(weight_bits=3, act_bits=3, num_groups=4, weight_rounding="gptq", module_bits={"*.fc2": [6, 8]})
    q = igq.quantize(model, cfg, calib, progress=False)
    fc2 = q.blocks[0].mlp.fc2
    assert (fc2.w_bits, fc2.input_quantizer.bits) == (6, 8)
    assert (q.blocks[0].mlp.fc1.w_bits, q.blocks[0].mlp.fc1.input_quantizer.bits) == (3, 3)
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        ref = q(x)
    student = igq.qat.train(q, torch.randn(8, 3, 32, 32), steps=1, lr=0.0, scale_lr=0.0, range_lr=0.0, progress=False)
    with torch.no_grad():
        assert torch.allclose(student(x), ref, atol=1e-5)  # zero learning rates: the GPTQ-rounded model itself


def test_bad_arguments_name_the_field():
    _, q, train, _ = _setup()
    for kwargs, match in ((dict(steps=0), "steps"), (dict(lr=-1.0), "lr"), (dict(distill="l2"), "distill"),
                          (dict(crop_scale=(0.5, 1.5)), "crop_scale"), (dict(resume=True), "resume=True needs")):
        with pytest.raises(ValueError, match=match):
            igq.qat.train(q, train, progress=False, **kwargs)
    with pytest.raises(TypeError, match="image tensors"):
        igq.qat.train(q, torch.randn(4, 10), progress=False)
    with pytest.raises(ValueError, match="no quantization sites"):
        igq.qat.train(torch.nn.Linear(2, 2), train, progress=False)


def test_default_range_lr_follows_the_narrowest_activation_bits():
    assert igq.qat.default_range_lr(_setup(bits=3)[1]) == 3e-2
    assert igq.qat.default_range_lr(_setup(bits=4)[1]) == 1e-2
