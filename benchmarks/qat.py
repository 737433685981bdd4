"""Calibration only vs block reconstruction vs variation-aware QAT, the from-scratch Fashion-MNIST ViT.

Every site quantized (IGQConfig(weight_bits=b, act_bits=b): IGQ G=8 Linear inputs, uniform softmax
rows, patch embedding and head at 8 bits), calibrated on 32 training images (as accuracy.py). Then:
* "+ igq.reconstruct": its defaults (200 iterations per block) on --rec-images training images;
* "+ igq.qat.train": --steps steps of multi-crop distillation from the FP model on --train-images
  training images; the range learning rate (and the float weights' rate) is chosen among --range-lrs
  (--lrs) on --val-images held-out *training* images (never the test split); the test split is scored
  once per row;
* "+ igq.reconstruct + igq.qat.train": QAT (the chosen range learning rate) from the reconstructed model.
Top-1 on the first --num-test test images, and on the validation images.

    python benchmarks/qat.py                       # W4A4, W3A3, W2A2; about 40 minutes on 2 cores
    python benchmarks/qat.py --bits 2 --steps 1500 --range-lrs 3e-2 --lrs 1e-4 3e-4 --no-reconstruct \
        --name qat_fmnist_w2a2_long                # W2A2, 5x the steps; about 1 hour on 2 cores
    python benchmarks/qat.py --bits 2 --steps 50 --range-lrs 1e-2 --num-test 200 --out /tmp/qat   # smoke
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

import igq_plugin as igq
from igq_plugin.bench.data import fashion_mnist
from igq_plugin.bench.zoo import fmnist_input, load_fmnist_vit

from common import machine_info, save_figure, save_json, write_markdown

RESULTS = Path(__file__).parent / "results"


@torch.no_grad()
def top1(model, x: torch.Tensor, y: torch.Tensor) -> float:
    correct = sum(int((model(x[i:i + 256]).argmax(1) == y[i:i + 256]).sum()) for i in range(0, len(x), 256))
    return round(100.0 * correct / len(x), 2)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--bits", nargs="+", type=int, default=[4, 3, 2])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--lrs", nargs="+", type=float, default=[1e-4], help="QAT learning rates of the float weights tried")
    ap.add_argument("--scale-lr", type=float, default=igq.qat.SCALE_LR,
                    help="of the weight step sizes (relative: Adam on log step size)")
    ap.add_argument("--range-lrs", nargs="+", type=float, default=[1e-3, 1e-2, 3e-2], help="range learning rates tried")
    ap.add_argument("--oscillation-weight", type=float, default=1e-3, help="of the bin regularizer (qat.train's default)")
    ap.add_argument("--crops", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--train-images", type=int, default=4000)
    ap.add_argument("--rec-images", type=int, default=256)
    ap.add_argument("--val-images", type=int, default=2000)
    ap.add_argument("--num-test", type=int, default=2000)
    ap.add_argument("--no-reconstruct", action="store_true")
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--name", default="qat_fmnist", help="results file stem")
    args = ap.parse_args(argv)

    model = load_fmnist_vit()
    x_train, y_train = fashion_mnist("train")
    x_test, y_test = fashion_mnist("test")
    order = torch.randperm(len(x_train), generator=torch.Generator().manual_seed(1))  # as accuracy.py
    calib = list(fmnist_input(x_train[order[:32]]).split(8))
    train = fmnist_input(x_train[order[32:32 + args.train_images]])
    rec = train[:args.rec_images]
    val_idx = order[-args.val_images:]
    val_x, val_y = fmnist_input(x_train[val_idx]), y_train[val_idx]
    test_x, test_y = fmnist_input(x_test[:args.num_test]), y_test[:args.num_test]

    rows = [{"bits": "-", "method": "FP32", "val": top1(model, val_x, val_y), "test": top1(model, test_x, test_y)}]
    print(rows[-1], flush=True)
    for bits in args.bits:
        torch.manual_seed(0)
        q = igq.quantize(model, igq.IGQConfig(weight_bits=bits, act_bits=bits), calib, progress=False)
        rows.append({"bits": f"W{bits}A{bits}", "method": "IGQConfig() calibration only", "val": top1(q, val_x, val_y),
                     "test": top1(q, test_x, test_y)})
        print(rows[-1], flush=True)
        r = None
        if not args.no_reconstruct:
            r = igq.quantize(model, igq.IGQConfig(weight_bits=bits, act_bits=bits), calib, progress=False)
            t0 = time.perf_counter()
            igq.reconstruct(r, rec, progress=False)
            seconds = time.perf_counter() - t0
            rows.append({"bits": f"W{bits}A{bits}", "method": f"+ igq.reconstruct ({args.rec_images} images, 200 iters)",
                         "val": top1(r, val_x, val_y), "test": top1(r, test_x, test_y), "seconds": round(seconds)})
            print(rows[-1], flush=True)
        recipe = (f"{args.steps} steps x {args.batch_size} images x {args.crops} crops, {args.train_images} images, "
                  f"bin regularizer {args.oscillation_weight:g}")

        def qat(start, lr, range_lr):
            t0 = time.perf_counter()
            student = igq.qat.train(start, train, teacher=model, steps=args.steps, batch_size=args.batch_size,
                                    crops=args.crops, lr=lr, scale_lr=args.scale_lr, range_lr=range_lr,
                                    oscillation_weight=args.oscillation_weight, progress=False)
            return student, time.perf_counter() - t0

        tried = []
        for lr in args.lrs:
            for range_lr in args.range_lrs:
                student, seconds = qat(q, lr, range_lr)
                tried.append((top1(student, val_x, val_y), lr, range_lr, seconds, student))
                print(f"W{bits}A{bits} qat lr {lr:g} range lr {range_lr:g}: val {tried[-1][0]} ({seconds:.0f} s)",
                      flush=True)
        val, lr, range_lr, seconds, student = max(tried, key=lambda t: t[0])
        chosen = "range lr" if len(args.lrs) == 1 else "lr, range lr"
        rows.append({"bits": f"W{bits}A{bits}",
                     "method": f"+ igq.qat.train ({recipe}, lr {lr:g}, scale lr {args.scale_lr:g}, "
                               f"range lr {range_lr:g}; {chosen} chosen on val)",
                     "val": val, "test": top1(student, test_x, test_y), "seconds": round(seconds),
                     "val_by_lr_range_lr": {f"{t[1]:g},{t[2]:g}": t[0] for t in tried}})
        print(rows[-1], flush=True)
        if r is not None:
            student, seconds = qat(r, lr, range_lr)
            rows.append({"bits": f"W{bits}A{bits}", "method": f"+ igq.reconstruct + igq.qat.train (lr {lr:g}, "
                                                              f"range lr {range_lr:g})",
                         "val": top1(student, val_x, val_y), "test": top1(student, test_x, test_y),
                         "seconds": round(seconds)})
            print(rows[-1], flush=True)

    meta = {"machine": machine_info(), "args": {k: str(v) for k, v in vars(args).items()},
            "fp_test": rows[0]["test"]}
    args.out.mkdir(parents=True, exist_ok=True)
    save_json(args.out / f"{args.name}.json", {"meta": meta, "rows": rows})
    write_markdown(args.out / f"{args.name}.md", "Fashion-MNIST ViT: calibration vs reconstruction vs QAT "
                   "(every site quantized; top-1 %, val = held-out training images)",
                   rows, ["bits", "method", "val", "test", "seconds"], meta)
    plot(rows, args.out / f"{args.name}.png")
    return 0


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bits = [r["bits"] for r in rows if r["method"].startswith("IGQConfig")]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    kinds = [("IGQConfig", "calibration only"), ("+ igq.reconstruct (", "reconstruction"), ("+ igq.qat", "QAT"),
             ("+ igq.reconstruct + igq.qat", "reconstruction + QAT")]
    width = 0.8 / len(kinds)
    for k, (prefix, label) in enumerate(kinds):
        values = [next((r["test"] for r in rows if r["bits"] == b and r["method"].startswith(prefix)), 0.0) for b in bits]
        ax.bar([i + k * width for i in range(len(bits))], values, width, label=label)
    ax.axhline(rows[0]["test"], color="k", linestyle="--", linewidth=1, label="FP32")
    ax.set_xticks([i + width for i in range(len(bits))], bits)
    ax.set_ylabel("test top-1 (%)")
    ax.set_title("Fashion-MNIST ViT, every site quantized")
    ax.legend(fontsize=8)
    save_figure(fig, path)


if __name__ == "__main__":
    sys.exit(main())
