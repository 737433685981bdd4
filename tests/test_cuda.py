"""Triton kernels of the igq ops (igq_plugin.integrations.cuda) against the reference ops.

Without a GPU the kernels run on CPU tensors through Triton's interpreter (TRITON_INTERPRET=1, set in
conftest.py); with one, on CUDA. Shapes are small and not multiples of the tiles (64 x 64 x 32 GEMM,
16 x 64 activation tiles). The int32 parts (codes, assignment, per-group partial sums) are compared
exactly; float32 outputs too, since the kernels keep the reference's epilogue order and rounding."""
import pytest
import timm
import torch

import igq_plugin as igq
from igq_plugin import ops

pytest.importorskip("triton", reason="the cuda extra (triton) is installed by scripts/setup.sh")
import igq_plugin.integrations.cuda as K  # noqa: E402

DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")
SHAPES = [(2, 7, 40), (3, 17, 70), (1, 66, 130)]


def _groups(G, seed=0):
    g = torch.Generator().manual_seed(seed)
    lo = torch.sort(-2 * torch.rand(G, generator=g))[0]
    hi = torch.sort(2 * torch.rand(G, generator=g))[0]
    return lo.to(DEV), hi.to(DEV)


def _x(shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    spread = 3 * torch.rand(1, 1, shape[-1], generator=g)  # channels of different ranges: several groups used
    return (torch.randn(*shape, generator=g) * spread).to(DEV)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("G, bits", [(1, 8), (3, 4), (8, 6), (8, 8)])
def test_group_quantize_equals_the_reference_exactly(shape, G, bits):
    x, (lo, hi) = _x(shape), _groups(G)
    codes, assignment = K.group_quantize(x, lo, hi, bits)
    ref_codes, ref_assignment = ops.group_quantize_codes(x.cpu(), lo.cpu(), hi.cpu(), bits)
    assert torch.equal(assignment.cpu(), ref_assignment)
    assert torch.equal(codes.cpu(), ref_codes)
    if G > 1:
        assert assignment.unique().numel() > 1


def test_group_quantize_with_two_instance_dims():
    x, (lo, hi) = _x((2, 3, 9, 24)), _groups(4)
    codes, assignment = K.group_quantize(x, lo, hi, 4, instance_dims=2)
    ref_codes, ref_assignment = ops.group_quantize_codes(x.cpu(), lo.cpu(), hi.cpu(), 4, instance_dims=2)
    assert assignment.shape == (6, 24) and torch.equal(assignment.cpu(), ref_assignment)
    assert torch.equal(codes.cpu(), ref_codes)


def _linear_operands(shape, G, bits, out_features=45, seed=0, bias=True):
    x, (lo, hi) = _x(shape, seed), _groups(G, seed)
    codes, assignment = ops.group_quantize_codes(x, lo, hi, bits)
    scale, zero_point = ops.group_qparams(lo, hi, bits)
    g = torch.Generator().manual_seed(seed + 1)
    w = torch.randint(-128, 128, (out_features, shape[-1]), dtype=torch.int8, generator=g).to(DEV)
    w_scale = torch.rand(out_features, generator=g).to(DEV)
    b = torch.randn(out_features, generator=g).to(DEV) if bias else None
    return codes, assignment, scale, zero_point.to(torch.int32), w, w_scale, b


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("G, bits", [(1, 8), (3, 4), (8, 8)])
@pytest.mark.parametrize("bias", [True, False])
def test_grouped_linear_equals_the_reference_exactly(shape, G, bits, bias):
    args = _linear_operands(shape, G, bits, bias=bias)
    out = K.grouped_linear(*args)
    ref, ref_partials = ops.grouped_linear_reference(*[a.cpu() if a is not None else None for a in args],
                                                     partial_sums=True)
    assert out.dtype == torch.float32 and torch.equal(out.cpu(), ref)
    codes, assignment, _, zero_point, w, _, _ = args
    partials = K.grouped_linear_partials(codes, assignment, zero_point, w)
    assert torch.equal(partials.cpu().to(torch.int32), ref_partials)


def test_grouped_linear_reads_transposed_weights_and_rounds_to_half_types():
    codes, assignment, scale, zero_point, w, w_scale, b = _linear_operands((2, 9, 48), 4, 4)
    ref = ops.grouped_linear_reference(codes, assignment, scale, zero_point, w, w_scale, b)
    w_t = w.t().contiguous().t()  # same values, column-major storage
    assert torch.equal(K.grouped_linear(codes, assignment, scale, zero_point, w_t, w_scale, b), ref)
    for dtype in (torch.float16, torch.bfloat16):
        out = K.grouped_linear(codes, assignment, scale, zero_point, w, w_scale, b, out_dtype=dtype)
        assert out.dtype == dtype
        if dtype == torch.bfloat16 and DEV.type == "cpu":
            # Triton's CPU interpreter truncates float32 -> bfloat16 (a GPU rounds to nearest even): 1 ulp
            ulp = torch.finfo(torch.bfloat16).eps * ref.abs().clamp_min(torch.finfo(torch.float32).tiny)
            assert ((out.float() - ref).abs() <= ulp).all()
        else:
            assert torch.equal(out, ref.to(dtype))
    with pytest.raises(ValueError, match="out_dtype"):
        K.grouped_linear(codes, assignment, scale, zero_point, w, w_scale, b, out_dtype=torch.int32)


def test_group_segments_sort_channels_by_group():
    assignment = torch.tensor([[2, 0, 1, 0, 2], [1, 1, 1, 1, 1]])
    perm, seg = K.group_segments(assignment, 3)
    assert perm.tolist() == [[1, 3, 2, 0, 4], [0, 1, 2, 3, 4]]
    assert seg.tolist() == [[0, 2, 3, 5], [0, 0, 5, 5]]


def _model(cfg):
    torch.manual_seed(0)
    m = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=10, depth=1, img_size=32, patch_size=8,
                          embed_dim=64, num_heads=4).eval()
    data = [torch.randn(4, 3, 32, 32) for _ in range(2)]
    return igq.quantize(m, cfg, data, progress=False).to(DEV)


@pytest.mark.parametrize("act_grid", [8, None])
def test_int8_linears_match_the_integer_reference_and_the_fake_quant_model(act_grid):
    q = _model(igq.IGQConfig(weight_bits=4, act_bits=4, num_groups=4, act_grid=act_grid))
    qi = K.int8_linears(q)
    qkv = qi.blocks[0].attn.qkv
    assert isinstance(qkv, K.Int8IGQLinear) and (qkv.grid is not None) == (act_grid is not None)
    assert isinstance(qi.head, igq.QuantLinear)  # 8-bit asymmetric head weights stay in fake quantization
    x = _x((4, 17, 64))
    layer, quantizer = q.blocks[0].attn.qkv, q.blocks[0].attn.qkv.input_quantizer
    codes, assignment = ops.group_quantize_codes(x, quantizer.lo, quantizer.hi, quantizer.bits)
    scale, zero_point = ops.group_qparams(quantizer.lo, quantizer.hi, quantizer.bits)
    w_codes, w_scale = layer.integer_weight()
    exact = ops.grouped_linear_reference(codes, assignment, scale, zero_point.to(torch.int32), w_codes, w_scale,
                                         layer.bias.detach())
    with torch.no_grad():
        out, fake = qkv(x), layer(x)
    if act_grid is None:
        assert torch.equal(out, exact)  # the grouped kernel is the reference op
    tol = 1e-5 * fake.abs().max()  # the grid GEMM and the fake-quant layer round in other orders (float32)
    assert (out - exact).abs().max() <= tol and (out - fake).abs().max() <= tol
    images = torch.randn(4, 3, 32, 32).to(DEV)
    with torch.no_grad():
        assert torch.allclose(qi(images), q(images), atol=1e-4, rtol=1e-4)
    assert igq.sites(q) and not igq.sites(qi)


def test_grid_codes_dequantize_to_the_group_fake_quant():
    q = _model(igq.IGQConfig(weight_bits=4, act_bits=4, num_groups=4, act_grid=8))
    quantizer = q.blocks[0].mlp.fc1.input_quantizer
    grid = ops.grid_of(quantizer.lo, quantizer.hi, quantizer.bits)
    x = _x((3, 17, 64))
    codes, _ = K.grid_quantize(x, quantizer.lo, quantizer.hi, quantizer.bits, grid)
    values = (codes.double() + grid.vmin) * grid.step
    ref = ops.group_fake_quantize_reference(x, quantizer.lo, quantizer.hi, quantizer.bits).double()
    assert (values - ref).abs().max() < 1e-5 * ref.abs().max()
    with pytest.raises(ValueError, match="not on one exact grid"):
        lo, hi = _groups(4, seed=3)
        K.grid_quantize(x, lo, hi, 4, ops.grid_of(lo, hi, 4, max_bits=8))


def test_attention_pv_is_exact_in_int32_and_close_in_float():
    B, H, N, D = 2, 3, 19, 16
    a = torch.softmax(3 * torch.randn(B, H, N, N), -1).to(DEV)
    codes, _, row_scale = ops.softmax_group_quantize(a, torch.tensor([0.2, 0.6, 1.0], device=DEV), 8, "uniform")
    v = _x((B, N, H * D))
    vlo, vhi = torch.tensor([-2.0, -0.5], device=DEV), torch.tensor([2.0, 0.5], device=DEV)
    v_codes, v_assign = ops.group_quantize_codes(v, vlo, vhi, 8)
    scale, zero_point = ops.group_qparams(vlo, vhi, 8)
    v_scale, v_zero = scale[v_assign].reshape(B, H, D), zero_point[v_assign].reshape(B, H, D)
    v4 = v_codes.reshape(B, N, H, D).transpose(1, 2).contiguous()
    out, acc = K.attention_pv(codes.to(torch.uint8), row_scale.squeeze(-1), v4, v_scale, v_zero, return_int=True)
    exact = codes.double() @ (v4.double() - v_zero.double().unsqueeze(2))
    assert torch.equal(acc.double(), exact)
    ref = (codes * row_scale) @ ((v4.float() - v_zero.unsqueeze(2)) * v_scale.unsqueeze(2))
    assert (out - ref).abs().max() < 1e-5 * ref.abs().max()
    with pytest.raises(ValueError, match="do not chain"):
        K.attention_pv(codes.to(torch.uint8), row_scale.squeeze(-1), v4[..., :5, :], v_scale, v_zero)


def test_kernels_are_registered_for_cuda_tensors():
    for op in ("igq::grouped_linear", "igq::group_quantize"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(op, "CUDA"), op
    if DEV.type == "cuda":  # the op itself dispatches to the Triton kernel
        args = _linear_operands((2, 9, 48), 4, 4)
        assert torch.equal(torch.ops.igq.grouped_linear(*args, 1).cpu(),
                           ops.grouped_linear_reference(*[a.cpu() for a in args]))


def test_gpu_benchmark_script_runs_in_smoke_mode(tmp_path):
    """benchmarks/gpu_grouped_linear.py is what a GPU run executes: its --smoke mode (tiny shapes; here
    through the interpreter) must produce its JSON and markdown."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    bench = Path(__file__).resolve().parents[1] / "benchmarks"
    subprocess.run([sys.executable, "gpu_grouped_linear.py", "--smoke", "--out", str(tmp_path)], cwd=bench,
                   check=True, capture_output=True, text=True, timeout=600)
    results = json.loads((tmp_path / "gpu_grouped_linear_smoke.json").read_text())
    assert len(results["gemm"]) == 4 * 2 and "IGQ GEMM kernel (G=8) TFLOP/s" in results["gemm"][0]
    assert results["vit_b_forward_ms"]["batch 2"]
    assert (tmp_path / "gpu_grouped_linear_smoke.md").read_text().startswith("# IGQ Triton kernels")


def test_cpu_tensors_without_the_interpreter_get_a_clear_error():
    import subprocess
    import sys

    if torch.cuda.is_available():
        pytest.skip("with a GPU present CPU tensors go to the reference ops: nothing to refuse")
    code = ("import os, torch; os.environ.pop('TRITON_INTERPRET', None)\n"
            "import igq_plugin.integrations.cuda as K\n"
            "try:\n    K.group_quantize(torch.randn(2, 3, 8), torch.zeros(2), torch.ones(2), 4)\n"
            "except ValueError as e:\n    print(e)\n")
    env = {k: v for k, v in __import__("os").environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert "run on CUDA tensors" in out.stdout and "TRITON_INTERPRET=1" in out.stdout, out.stderr[-2000:]
