"""Core speed: calibrate + quantize time, and fake-quant forward time vs FP, side by side.

    python benchmarks/bench_core.py [--model deit_tiny_patch16_224] [--images 32] [--batch 8]

Random-init timm model (speed does not depend on the weights), 224x224 inputs. Reports medians
over --repeats runs; writes results/bench_core.{json,md} with the CPU model and flags.
"""
from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import timm
import torch

import igq_plugin as igq

from common import machine_info, median_time, save_json, write_markdown


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="deit_tiny_patch16_224")
    ap.add_argument("--images", type=int, default=32)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = ap.parse_args()
    torch.manual_seed(0)
    model = timm.create_model(args.model, pretrained=False).eval()
    calib = list(torch.randn(args.images, 3, 224, 224).split(args.batch))
    x = torch.randn(args.batch, 3, 224, 224)
    rows = []
    for scheme in ("layer", "igq"):
        cfg = igq.IGQConfig(weight_bits=4, act_bits=4, num_groups=8, act_scheme=scheme)
        qtimes = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            qmodel = igq.quantize(model, cfg, calib, progress=False)
            qtimes.append(time.perf_counter() - t0)
        with torch.no_grad():
            fp = median_time(lambda: model(x), repeats=args.repeats * 2)
            fq = median_time(lambda: qmodel(x), repeats=args.repeats * 2)
        rows.append({
            "scheme": f"{scheme} W4A4" + (" G8" if scheme == "igq" else ""),
            "calibrate_quantize_s": round(statistics.median(qtimes), 2),
            "fp_forward_ms": round(fp * 1e3, 1),
            "fakequant_forward_ms": round(fq * 1e3, 1),
            "forward_ratio": round(fq / fp, 2),
        })
        print(rows[-1], flush=True)
    meta = {"benchmark": "bench_core", "model": args.model, "calibration_images": args.images,
            "batch": args.batch, "machine": machine_info(), "rows": rows}
    args.out.mkdir(parents=True, exist_ok=True)
    save_json(args.out / "bench_core.json", meta, indent=2)
    write_markdown(args.out / "bench_core.md", f"Core speed ({args.model}, {args.images} calibration images, batch {args.batch})",
                   rows, list(rows[0]), meta)


if __name__ == "__main__":
    main()
