"""W4A4 ablation: what each ingredient buys, one added at a time, on real weights.

    python benchmarks/ablation_w4a4.py                      # DINOv2-S probe + from-scratch FMNIST ViT
    python benchmarks/ablation_w4a4.py --models fmnist-vit  # one model (cells already done are kept)
    python benchmarks/ablation_w4a4.py --plots-only          # redraw markdown / PNG from the JSON
    python benchmarks/ablation_w4a4.py --device cuda         # same cells on a GPU (each cell records its device)

Models and data as benchmarks/accuracy.py: DINOv2-S at 224 px with a Fashion-MNIST linear probe
fit on FP features (2000 train / 2000 test images), calibrated on 32 real photos; the from-scratch
Fashion-MNIST ViT (full 10k test set), calibrated on 32 Fashion-MNIST training images.

Every row quantizes every site of DESIGN.md §1: the inputs and weights of every block Linear (qkv,
proj, fc1, fc2), the Q, K, V operands and post-softmax attention at 4 bits; the patch embedding and
the classifier head (FMNIST ViT; DINOv2 has none) at 8 bits, the DESIGN default. Rows that leave a
whole error source out say so: "W4A16" keeps every activation in float (weights as in the full row),
"W16A4" keeps every weight in float. Columns: top-1, cosine of the features / logits against FP,
the 5 sites with the lowest local SQNR (8 test images), and the quantization wall time.
A cell copied from another results file with the same configuration and protocol names it
("source"); cells not run are absent.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

import igq_plugin as igq
from igq_plugin.bench.data import fashion_mnist, gray_to_imagenet
from igq_plugin.bench.evaluation import SiteSQNR
from igq_plugin.bench.tasks import site_report
from igq_plugin.modules import iter_quantizers

from accuracy import build_model
from common import machine_info, save_figure, save_json, write_markdown

PAPER = dict(weight_bits=4, act_bits=4, num_groups=8)  # IGQ-ViT as published: uniform softmax, percentile weights
ALL = dict(PAPER, softmax_quantizer="tanq", weight_clipping="mse", weight_rounding="gptq", matmul_scheme="igq")

# name -> (config fields, calibration, fake quantization kept: "both" | "weights" | "acts")
ROWS: dict[str, tuple[dict, str, str]] = {
    "Layer-wise min-max": (dict(PAPER, act_scheme="layer"), "default", "both"),
    "Layer-wise + TanQ + MSE clip + GPTQ": (
        dict(PAPER, act_scheme="layer", softmax_quantizer="tanq", weight_clipping="mse", weight_rounding="gptq"),
        "default", "both"),
    "IGQ G8 as published (uniform softmax, percentile weights)": (PAPER, "default", "both"),
    "+ TanQ post-softmax": (dict(PAPER, softmax_quantizer="tanq"), "default", "both"),
    "+ MSE weight clipping": (dict(PAPER, softmax_quantizer="tanq", weight_clipping="mse"), "default", "both"),
    "+ GPTQ weight rounding": (
        dict(PAPER, softmax_quantizer="tanq", weight_clipping="mse", weight_rounding="gptq"), "default", "both"),
    "+ IGQ groups on Q/K/V (all ingredients)": (ALL, "default", "both"),
    "all ingredients, 128 calibration images": (ALL, "128", "both"),
    "all ingredients, 32 task-domain calibration images": (ALL, "task", "both"),
    "all ingredients, W4A16 (activations float)": (ALL, "default", "weights"),
    "all ingredients, W16A4 (weights float)": (ALL, "default", "acts"),
    "all ingredients at W6A6": (dict(ALL, weight_bits=6, act_bits=6), "default", "both"),
    "all ingredients + MSE-chosen activation ranges": (dict(ALL, range_update="mse"), "default", "both"),
    "all ingredients + RepQ, range q=0.95, 32 task-domain calibration images": (
        dict(ALL, reparam="repq", range_quantile=0.95), "task", "both"),
}


# Cells are computed in this order (most informative first), so an interrupted run keeps the key rows.
RUN_ORDER = [
    "+ IGQ groups on Q/K/V (all ingredients)", "Layer-wise + TanQ + MSE clip + GPTQ",
    "all ingredients, W4A16 (activations float)", "all ingredients, W16A4 (weights float)", "+ GPTQ weight rounding",
    "+ MSE weight clipping", "all ingredients, 32 task-domain calibration images", "all ingredients at W6A6",
    "+ TanQ post-softmax", "Layer-wise min-max", "IGQ G8 as published (uniform softmax, percentile weights)",
    "all ingredients, 128 calibration images", "all ingredients + MSE-chosen activation ranges",
    "all ingredients + RepQ, range q=0.95, 32 task-domain calibration images",
]
assert sorted(RUN_ORDER) == sorted(ROWS)


def calibration(model_name: str, default: list[torch.Tensor], kind: str) -> tuple[list[torch.Tensor], str]:
    """Calibration batches and their description. DINOv2's default is 32 photos; the probe's task
    domain is Fashion-MNIST (training split, never the test images)."""
    x_train, _ = fashion_mnist("train")
    if model_name == "dinov2":
        if kind == "default":
            return default, "32 photos"
        task = gray_to_imagenet(x_train[-96:] if kind == "128" else x_train[-32:])
        if kind == "128":
            return default + list(task.split(8)), "32 photos + 96 Fashion-MNIST train"
        return list(task.split(8)), "32 Fashion-MNIST train"
    if kind in ("default", "task"):
        return default, "32 Fashion-MNIST train"
    from igq_plugin.bench.zoo import fmnist_input

    extra = fmnist_input(x_train[-96:])
    return default + list(extra.split(8)), "128 Fashion-MNIST train"


def quantize_row(model, fields: dict, calib: list, keep: str) -> torch.nn.Module:
    """The row's quantized model; "weights" / "acts" run GPTQ with the other error source off."""
    cfg = igq.IGQConfig(**fields)
    if keep == "both":
        return igq.quantize(model, cfg, calib, progress=False)
    prepared = igq.prepare(model, cfg.replace(weight_rounding="nearest"))
    igq.calibrate(prepared, calib, progress=False)
    qmodel = igq.convert(prepared, progress=False)
    if keep == "weights":
        for _, quantizer in iter_quantizers(qmodel):
            quantizer.fake_quant_enabled = False
        if cfg.weight_rounding == "gptq":
            igq.round_weights(qmodel, calib, damp=cfg.gptq_damp, progress=False)
    else:
        for module in qmodel.modules():
            if isinstance(module, (igq.QuantLinear, igq.QuantConv2d)):
                module.weight_fake_quant_enabled = False
    return qmodel


def device_name(device: str) -> str:
    """"cpu", or "cuda: <GPU name>" (cells record where they ran: quantization times differ)."""
    dev = torch.device(device)
    return f"cuda: {torch.cuda.get_device_name(dev)}" if dev.type == "cuda" else dev.type


def load_results(path: Path) -> dict:
    results = json.loads(path.read_text()) if path.is_file() else {"cells": {}}
    if "machine" in results:  # files written before cells recorded their device: all ran on the CPU
        results.setdefault("machines", {})["cpu"] = results.pop("machine")
    return results


def run(args) -> dict:
    path = args.out / "ablation_w4a4.json"
    results = load_results(path)
    for model_name in args.models:
        model, task, calib = build_model(model_name, args)
        model = model.to(args.device)
        device = device_name(args.device)
        fp_key = f"{model_name}|FP32"
        results["cells"][fp_key] = {"model": model_name, "row": "FP32", "top1": round(task.fp_top1, 2), "cosine": 1.0}
        for row in RUN_ORDER:
            fields, calib_kind, keep = ROWS[row]
            key = f"{model_name}|{row}"
            if key in results["cells"] and not args.fresh:
                continue
            batches, calib_desc = calibration(model_name, calib, calib_kind)
            torch.manual_seed(0)
            t0 = time.perf_counter()
            qmodel = quantize_row(model, fields, batches, keep)
            quant_s = time.perf_counter() - t0
            metrics = task.evaluate(qmodel, desc=row)
            worst = SiteSQNR.worst(site_report(qmodel, task.site_inputs()), 5)
            report = igq.report(qmodel)
            print(f"\n[{model_name}] {row}: top-1 {metrics['top1']:.2f}, cosine {metrics['cosine']:.4f}, "
                  f"quantize {quant_s:.0f} s, calibration: {calib_desc}")
            print(report.table())
            results["cells"][key] = {
                "model": model_name, "row": row, "config": fields, "calibration": calib_desc, "fake_quant": keep,
                "top1": round(metrics["top1"], 2), "cosine": round(metrics["cosine"], 4),
                "worst_sites_db": [[s, round(v, 1)] for s, v in worst], "quantize_s": round(quant_s, 1),
                "device": device,
                "sites": report.to_dict(),
            }
            results.setdefault("machines", {})[device] = machine_info()
            save_json(path, results)
    return results


def write_outputs(results: dict, out: Path) -> None:
    models = sorted({c["model"] for c in results["cells"].values()}, key=["dinov2", "fmnist-vit"].index)
    rows = []
    for model_name in models:
        for row in ["FP32", *ROWS]:
            cell = results["cells"].get(f"{model_name}|{row}")
            if cell is None:
                continue
            name = f"{row} [from {cell['source']}]" if cell.get("source") else row
            rows.append({
                "model": model_name, "row": name, "top1": f"{cell['top1']:.2f}", "cosine": f"{cell['cosine']:.4f}",
                "calibration": cell.get("calibration", ""),
                "worst 5 sites (SQNR dB)": ", ".join(f"{s} {v}" for s, v in cell.get("worst_sites_db", [])),
                "quantize s": cell.get("quantize_s", ""), "device": cell.get("device", "cpu"),
            })
    write_markdown(out / "ablation_w4a4.md", "W4A4 ablation (every site quantized; embed/head 8 bits)", rows,
                   ["model", "row", "top1", "cosine", "calibration", "quantize s", "device", "worst 5 sites (SQNR dB)"],
                   {"machines": results.get("machines", {})})
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(models), figsize=(7 * len(models), 5.5), squeeze=False)
    for ax, model_name in zip(axes[0], models):
        names = [r for r in ROWS if f"{model_name}|{r}" in results["cells"]]
        values = [results["cells"][f"{model_name}|{r}"]["top1"] for r in names]
        ax.barh(range(len(names)), values, color="tab:blue")
        fp = results["cells"].get(f"{model_name}|FP32")
        if fp:
            ax.axvline(fp["top1"], color="k", ls="--", label=f"FP32 {fp['top1']:.1f}")
            ax.legend(loc="lower right")
        ax.set_yticks(range(len(names)), names, fontsize=8)
        ax.invert_yaxis()
        ax.set_xlabel("top-1 (%)")
        ax.set_title(f"{model_name}: W4A4 ingredients")
        for i, v in enumerate(values):
            ax.text(v + 0.5, i, f"{v:.1f}", va="center", fontsize=8)
    fig.tight_layout()
    save_figure(fig, out / "ablation_w4a4.png", dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="+", default=["dinov2", "fmnist-vit"], choices=["dinov2", "fmnist-vit"])
    ap.add_argument("--num-train", type=int, default=2000, help="DINOv2 probe training images")
    ap.add_argument("--num-test", type=int, default=2000, help="DINOv2 probe test images")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    ap.add_argument("--fresh", action="store_true", help="recompute cells already in the JSON")
    ap.add_argument("--device", default="cpu", help="torch device to quantize and evaluate on (cpu, cuda, cuda:1)")
    ap.add_argument("--plots-only", action="store_true")
    args = ap.parse_args(argv)
    if args.plots_only:
        results = load_results(args.out / "ablation_w4a4.json")
        if not results["cells"]:
            sys.exit(f"no results in {args.out / 'ablation_w4a4.json'}: run without --plots-only first")
    else:
        results = run(args)
    write_outputs(results, args.out)


if __name__ == "__main__":
    main()
