"""Weight-side quantizers: MSE clipping and GPTQ rounding with quantized inputs (pure ops)."""
import pytest
import torch

from igq_plugin import ops


def _problem(seed, n=256, c=48, o=24, noise=0.05):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, generator=g, dtype=torch.float64) @ torch.randn(c, c, generator=g, dtype=torch.float64) * 0.3
    x[:, seed % c] *= 8  # an outlier channel, as in ViT activations
    x_quant = x + noise * torch.randn(n, c, generator=g, dtype=torch.float64)  # upstream quantization error
    w = torch.randn(o, c, generator=g, dtype=torch.float64)
    return x, x_quant, w


@pytest.mark.parametrize("bits", [3, 4, 8])
def test_mse_clipping_never_worse_than_min_max(bits):
    g = torch.Generator().manual_seed(bits)
    w = torch.distributions.StudentT(3.0).sample((32, 256)) * torch.rand(32, 1, generator=g)  # heavy tails
    qmin, qmax = ops.qrange(bits)
    err = {}
    for name, (s, z) in {"mse": ops.mse_weight_qparams(w, bits), "minmax": ops.weight_qparams(w, bits, 0.0)}.items():
        err[name] = (ops.fake_quantize(w, s[:, None], z[:, None], qmin, qmax) - w).pow(2).sum(1)
    assert bool((err["mse"] <= err["minmax"] + 1e-6).all())
    if bits <= 4:
        assert float(err["mse"].sum()) < 0.9 * float(err["minmax"].sum())  # clipping pays off at low bits


@pytest.mark.parametrize("seed", range(12))
@pytest.mark.parametrize("bits", [3, 4])
def test_gptq_never_increases_reconstruction_error(seed, bits):
    x, x_quant, w = _problem(seed)
    h, cross, _ = ops.input_correlations(x_quant, x)
    target = ops.compensated_target(w, h, cross)
    scale, zp = ops.mse_weight_qparams(target, bits)
    w_gptq = ops.gptq_quantize(target, h, scale, zp, bits, block_size=16)
    w_rtn = ops.round_to_nearest(w, *ops.mse_weight_qparams(w, bits), bits)
    y = x @ w.t()
    err_gptq = float((x_quant @ w_gptq.t() - y).pow(2).sum())
    err_rtn = float((x_quant @ w_rtn.t() - y).pow(2).sum())
    assert err_gptq <= err_rtn * (1 + 1e-9)
    # the quantized weights are on each row's grid
    codes = torch.round(w_gptq / scale[:, None]) + zp[:, None]
    assert torch.allclose((codes - zp[:, None]) * scale[:, None], w_gptq, atol=1e-9)
    assert bool((codes >= 0).all()) and bool((codes <= 2**bits - 1).all())


def test_gptq_beats_rounding_clearly_on_correlated_inputs():
    x, _, w = _problem(0, noise=0.0)
    h, _, _ = ops.input_correlations(x)
    scale, zp = ops.mse_weight_qparams(w, 4)
    err = {name: float(ops.hessian_error(q, w, h)) for name, q in
           {"gptq": ops.gptq_quantize(w, h, scale, zp, 4), "rtn": ops.round_to_nearest(w, scale, zp, 4)}.items()}
    assert err["gptq"] < 0.7 * err["rtn"]


def test_compensated_target_is_the_weight_when_inputs_are_exact():
    x, _, w = _problem(1)
    h, cross, rows = ops.input_correlations(x[:100])
    h, cross, rows = ops.input_correlations(x[100:], state=(h, cross, rows))
    assert rows == x.shape[0]
    assert torch.allclose(ops.compensated_target(w, h, cross, damp=0.0), w, atol=1e-8)


def test_gptq_shape_errors():
    with pytest.raises(ValueError, match=r"target must be \[O, C\]"):
        ops.gptq_quantize(torch.randn(4, 5), torch.eye(4), torch.ones(4), torch.zeros(4), 4)
    with pytest.raises(ValueError, match="same shape"):
        ops.input_correlations(torch.randn(3, 4), torch.randn(3, 5))


def test_weight_clipping_option_is_used_by_quantized_layers():
    import igq_plugin as igq
    from igq_plugin.modules import QuantLinear

    model = torch.nn.Sequential(torch.nn.Linear(32, 16), torch.nn.GELU(), torch.nn.Linear(16, 8)).eval()
    x = torch.randn(8, 5, 32)
    q = igq.quantize(model, igq.IGQConfig(weight_bits=4, act_bits=8, weight_clipping="mse"), x, progress=False)
    layer = q[0]
    assert isinstance(layer, QuantLinear) and layer.weight_clipping == "mse"
    scale, zp = ops.mse_weight_qparams(model[0].weight, 4)
    assert torch.equal(layer.weight_scale, scale) and torch.equal(layer.weight_zero_point, zp)
    with pytest.raises(ValueError, match="weight_clipping must be one of"):
        igq.IGQConfig(weight_clipping="gptq")
