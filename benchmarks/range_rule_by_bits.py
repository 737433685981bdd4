"""Which group-range rule works at which bit width: the measurement behind the bit-aware default.

For every bit width and every candidate rule (range_update "quantile" at q = 0.99 / 0.95 / 0.9 / 0.8,
and "mean", the simplest reading of the paper: k-means with mean-updated ranges), quantize with
IGQConfig(weight_bits=b, act_bits=b, range_update=..., range_quantile=...) (every site quantized) and
score on *validation* data only (nothing here touches a test split):
* dinov2: DINOv2-S/14, calibrated on the first 16 real photos, feature cosine and SQNR against FP on
  the other 48 photos and their mirror images (the protocol of benchmarks/update_rules.py);
* fmnist-vit: the from-scratch Fashion-MNIST ViT, calibrated on 32 training images (as accuracy.py),
  top-1 and logit cosine on 2000 held-out training images.
The default (IGQConfig.range_quantile=None) takes, per site, the quantile this table favours at the
site's bits (igq_plugin.calibration.default_range_quantile).

    python benchmarks/range_rule_by_bits.py      # about 25 minutes on 2 cores
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

import igq_plugin as igq
from igq_plugin.bench.data import calibration_photos, fashion_mnist, load_images
from igq_plugin.bench.zoo import fmnist_input, load_dinov2_small, load_fmnist_vit

from common import machine_info, save_json, sqnr_db, write_markdown

RESULTS = Path(__file__).parent / "results"
RULES = [("quantile", 0.99), ("quantile", 0.95), ("quantile", 0.9), ("quantile", 0.8), ("mean", None)]


def data(name: str):
    """(model, calibration batches, validation inputs, validation labels or None)."""
    if name == "dinov2":
        images = load_images(calibration_photos(64))
        return load_dinov2_small(), list(images[:16].split(4)), torch.cat([images[16:], images[16:].flip(-1)]), None
    x, y = fashion_mnist("train")
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(1))
    return (load_fmnist_vit(), list(fmnist_input(x[order[:32]]).split(8)), fmnist_input(x[order[-2000:]]),
            y[order[-2000:]])


@torch.no_grad()
def outputs(model, x: torch.Tensor) -> torch.Tensor:
    return torch.cat([model(x[i:i + 32]) for i in range(0, len(x), 32)])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="+", default=["fmnist-vit", "dinov2"], choices=["fmnist-vit", "dinov2"])
    ap.add_argument("--bits", nargs="+", type=int, default=None, help="default: 8 6 5 4 3 (dinov2), 8 6 5 4 3 2 (fmnist)")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    rows = []
    for name in args.models:
        model, calib, val_x, val_y = data(name)
        ref = outputs(model, val_x)
        for bits in args.bits or ([8, 6, 5, 4, 3] if name == "dinov2" else [8, 6, 5, 4, 3, 2]):
            for rule, q in RULES:
                torch.manual_seed(0)
                t0 = time.perf_counter()
                cfg = igq.IGQConfig(weight_bits=bits, act_bits=bits, range_update=rule, range_quantile=q)
                out = outputs(igq.quantize(model, cfg, calib, progress=False), val_x)
                row = {"model": name, "bits": f"W{bits}A{bits}", "rule": rule if q is None else f"quantile {q}",
                       "cosine": round(torch.nn.functional.cosine_similarity(ref, out, dim=1).mean().item(), 4),
                       "sqnr_db": round(sqnr_db(ref, out), 2), "seconds": round(time.perf_counter() - t0, 1)}
                if val_y is not None:
                    row["top1"] = round(100.0 * (out.argmax(1) == val_y).float().mean().item(), 2)
                rows.append(row)
                print(row, flush=True)
    meta = {"machine": machine_info(), "args": {k: str(v) for k, v in vars(args).items()},
            "validation": {"dinov2": "48 held-out photos + mirrors (feature cosine)",
                           "fmnist-vit": "2000 held-out training images (top-1, logit cosine)"}}
    save_json(args.out / "range_rule_by_bits.json", {"meta": meta, "rows": rows})
    write_markdown(args.out / "range_rule_by_bits.md", "Group-range rule by bit width (validation data, every site "
                   "quantized)", rows, ["model", "bits", "rule", "cosine", "sqnr_db", "top1"], meta)
    return 0


if __name__ == "__main__":
    sys.exit(main())
