"""Post-softmax quantizers and post-LayerNorm reparameterization on real weights (DINOv2-S).

    python benchmarks/softmax_levels.py [--bits 4 6] [--num-test 64] [--out benchmarks/results]

Calibrates on the 32 real photos, measures feature cosine against FP on the first --num-test
Fashion-MNIST test images (224 px). Every site of DESIGN.md §1 is quantized in every row. Rows:
IGQ G=8 with uniform / log-sqrt2 / TanQ(kappa) softmax levels, RepQ-ViT and DopQ-ViT presets, RepQ
with the MOSF scale, and IGQ + RepQ reparameterization. This is how the TanQ steepness default was
chosen. Writes softmax_levels.json and softmax_levels.md.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import igq_plugin as igq
from igq_plugin.bench.data import calibration_photos, fashion_mnist, gray_to_imagenet, load_images
from igq_plugin.bench.zoo import load_dinov2_small

from common import machine_info, save_json, write_markdown

STEEPNESS = (2.0, 3.0, 4.0, 8.0, 16.0, 32.0)


def configs(bits: int) -> dict[str, igq.IGQConfig]:
    base = dict(weight_bits=bits, act_bits=bits, num_groups=8)
    rows = {"IGQ G=8, uniform softmax": igq.IGQConfig(**base),
            "IGQ G=8, log-sqrt2 softmax": igq.IGQConfig(**base, softmax_quantizer="log_sqrt2")}
    for k in STEEPNESS:
        rows[f"IGQ G=8, TanQ kappa={k:g}"] = igq.IGQConfig(**base, softmax_quantizer="tanq", tanq_steepness=k)
    rows["RepQ-ViT (mean scale, log-sqrt2)"] = igq.IGQConfig.repq_vit(bits)
    rows["RepQ-ViT with the MOSF scale"] = igq.IGQConfig.repq_vit(bits, reparam="mosf")
    rows["DopQ-ViT (MOSF, TanQ)"] = igq.IGQConfig.dopq_vit(bits)
    rows["IGQ G=8 + RepQ reparam, uniform softmax"] = igq.IGQConfig(**base, reparam="repq")
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--bits", nargs="+", type=int, default=[4, 6])
    ap.add_argument("--num-test", type=int, default=64)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = ap.parse_args()
    torch.manual_seed(0)
    model = load_dinov2_small()
    calib = load_images(calibration_photos(32))
    test = gray_to_imagenet(fashion_mnist("test")[0][: args.num_test])
    with torch.no_grad():
        ref = model.forward_features(test)
    rows = []
    for bits in args.bits:
        for name, cfg in configs(bits).items():
            t0 = time.perf_counter()
            qmodel = igq.quantize(model, cfg, calib, progress=False)
            seconds = time.perf_counter() - t0
            with torch.no_grad():
                out = qmodel.forward_features(test)
            cos = torch.nn.functional.cosine_similarity(out.flatten(1), ref.flatten(1)).mean().item()
            rows.append({"bits": f"W{bits}A{bits}", "config": name, "cosine": round(cos, 4),
                         "quantize_s": round(seconds, 1)})
            print(json.dumps(rows[-1]), flush=True)
    meta = {"machine": machine_info(), "num_test": args.num_test, "calibration": "32 real photos",
            "command": "python benchmarks/softmax_levels.py"}
    args.out.mkdir(parents=True, exist_ok=True)
    save_json(args.out / "softmax_levels.json", {"meta": meta, "rows": rows})
    write_markdown(args.out / "softmax_levels.md",
                   f"Softmax levels and reparameterization, DINOv2-S feature cosine vs FP ({args.num_test} "
                   "Fashion-MNIST test images, 224 px; every site quantized)",
                   rows, ["bits", "config", "cosine", "quantize_s"], meta)


if __name__ == "__main__":
    main()
