"""W4A4 configuration selected on held-out validation images, then scored once on the test set.

    python benchmarks/select_w4a4.py                         # DINOv2-S probe (about 25 min on 2 CPU cores)
    python benchmarks/select_w4a4.py --models fmnist-vit     # the from-scratch Fashion-MNIST ViT
    python benchmarks/select_w4a4.py --plots-only            # redraw the markdown from the JSON

At W4A4 the best range rule and reparameterization differ between models and bit widths (README,
"W4A4"), so a user has to choose one. Choosing on the test images overstates the result; this
script chooses the way a user can: every candidate is quantized with all ingredients
(IGQConfig.igq_plus: every site at 4 bits, embedding / head 8) on 32 (or 128) task-domain calibration
images, scored by the feature (DINOv2) or logit (FMNIST ViT) cosine against full precision on
``--val-images`` validation images, and only the winner is evaluated on the test set.

Images: DINOv2's calibration images are the last 32 (128) of Fashion-MNIST's training split, its
validation images the first training images outside the probe's training subset and the
calibration images; the test images are the probe's 2000. The FMNIST ViT is calibrated on the
ablation's 32 training images (128: 96 more) and validated on other training images (it was trained on them,
so its validation cosine is a fidelity measure, not a generalization one); its test set is the
full 10k. Nothing here reads a test image before the choice is made.
"""
from __future__ import annotations

import argparse
import functools
import json
import sys
import time
from pathlib import Path

import torch

import igq_plugin as igq
from igq_plugin._inputs import run_model
from igq_plugin.bench.data import fashion_mnist, gray_to_imagenet
from igq_plugin.bench.evaluation import extract_features, fidelity, probe_features

from accuracy import build_model
from common import machine_info, save_json, write_markdown

# name -> (IGQConfig fields changed from IGQConfig.igq_plus(4), calibration images)
CANDIDATES: dict[str, tuple[dict, int]] = {
    "q=0.99 (default)": ({}, 32),
    "q=0.95": (dict(range_quantile=0.95), 32),
    "q=0.9": (dict(range_quantile=0.9), 32),
    "q=0.8": (dict(range_quantile=0.8), 32),
    "mean": (dict(range_update="mean"), 32),
    "RepQ, q=0.99": (dict(reparam="repq"), 32),
    "RepQ, q=0.95": (dict(reparam="repq", range_quantile=0.95), 32),
    "RepQ, q=0.9": (dict(reparam="repq", range_quantile=0.9), 32),
    "RepQ, q=0.8": (dict(reparam="repq", range_quantile=0.8), 32),
    "RepQ, mean": (dict(reparam="repq", range_update="mean"), 32),
    "q=0.95, 128 images": (dict(range_quantile=0.95), 128),
    "RepQ, q=0.95, 128 images": (dict(reparam="repq", range_quantile=0.95), 128),
}


MAX_CALIB = max(images for _, images in CANDIDATES.values())


def split(model_name: str, task, val_images: int):
    """(calibration inputs of ``MAX_CALIB`` images, validation inputs, fidelity function model -> outputs).

    A candidate with n calibration images takes the first n (32: the ablation's 32)."""
    x_train, _ = fashion_mnist("train")
    if model_name == "dinov2":
        calib_idx = torch.arange(len(x_train) - 32, len(x_train))
        calib_idx = torch.cat([calib_idx, torch.arange(len(x_train) - MAX_CALIB, len(x_train) - 32)])
        taken = set(task.train_indices.tolist()) | set(calib_idx.tolist())
        val_idx = torch.tensor([i for i in range(len(x_train)) if i not in taken][:val_images])
        return gray_to_imagenet(x_train[calib_idx]), gray_to_imagenet(x_train[val_idx]), probe_features
    from igq_plugin.bench.zoo import fmnist_input

    calib_idx = torch.randperm(len(x_train), generator=torch.Generator().manual_seed(1))[:MAX_CALIB]  # as accuracy.py
    rest = torch.ones(len(x_train), dtype=torch.bool)
    rest[calib_idx] = False
    val_idx = rest.nonzero().flatten()[:val_images]
    return fmnist_input(x_train[calib_idx]), fmnist_input(x_train[val_idx]), run_model


@torch.no_grad()
def outputs(fn, model, x: torch.Tensor) -> torch.Tensor:
    return extract_features(functools.partial(fn, model), x, batch_size=32, progress=False)


def quantize_candidate(model, name: str, calib: torch.Tensor) -> torch.nn.Module:
    fields, images = CANDIDATES[name]
    torch.manual_seed(0)
    return igq.quantize(model, igq.IGQConfig.igq_plus(4, **fields), list(calib[:images].split(8)), progress=False)


def run(args) -> dict:
    path = args.out / "select_w4a4.json"
    results = json.loads(path.read_text()) if path.is_file() else {"models": {}}
    results["machine"] = machine_info()
    names = args.only or list(CANDIDATES)
    unknown = sorted(set(names) - set(CANDIDATES))
    if unknown:
        raise SystemExit(f"unknown candidates {unknown}; choose from {list(CANDIDATES)}")
    for model_name in args.models:
        model, task, _ = build_model(model_name, args)
        calib, val_x, fn = split(model_name, task, args.val_images)
        ref = outputs(fn, model, val_x)
        entry = results["models"].setdefault(model_name, {"candidates": {}})
        entry.update(fp_top1=round(task.fp_top1, 2), val_images=len(val_x), calibration="Fashion-MNIST train")
        best_name, best_model = None, None  # the best candidate quantized in this run (kept for the test)
        for name in names:
            if name in entry["candidates"] and not args.fresh:
                continue
            fields, images = CANDIDATES[name]
            t0 = time.perf_counter()
            qmodel = quantize_candidate(model, name, calib)
            quant_s = time.perf_counter() - t0
            val = fidelity(ref, outputs(fn, qmodel, val_x))
            print(f"[{model_name}] {name}: validation cosine {val['cosine']:.4f}, quantize {quant_s:.0f} s", flush=True)
            entry["candidates"][name] = {"config": fields, "calibration_images": images,
                                         "val_cosine": round(val["cosine"], 4), "quantize_s": round(quant_s, 1)}
            save_json(path, results)
            scores = entry["candidates"]
            if best_name is None or scores[name]["val_cosine"] > scores[best_name]["val_cosine"]:
                best_name, best_model = name, qmodel
        done = {n: c for n, c in entry["candidates"].items() if n in CANDIDATES}
        winner = max(done, key=lambda n: done[n]["val_cosine"])
        if args.test and (entry.get("winner", {}).get("name") != winner or args.fresh):
            fields, images = CANDIDATES[winner]
            config = igq.IGQConfig.igq_plus(4, **fields)
            qmodel = best_model if winner == best_name else quantize_candidate(model, winner, calib)
            metrics = task.evaluate(qmodel, desc=f"test: {winner}")
            entry["winner"] = {"name": winner, "config": config.to_dict(), "calibration_images": images,
                               "test_top1": round(metrics["top1"], 2), "test_cosine": round(metrics["cosine"], 4),
                               "chosen_among": sorted(done)}
            print(f"[{model_name}] winner {winner}: test top-1 {metrics['top1']:.2f} (FP {task.fp_top1:.2f}), "
                  f"cosine {metrics['cosine']:.4f}", flush=True)
            save_json(path, results)
    return results


def write_outputs(results: dict, out: Path) -> None:
    rows = []
    for model_name, entry in results["models"].items():
        win = entry.get("winner", {})
        for name, cell in entry["candidates"].items():
            chosen = name == win.get("name")
            rows.append({"model": model_name, "candidate": f"**{name}**" if chosen else name,
                         "calibration images": cell.get("calibration_images", 32),
                         "validation cosine": cell["val_cosine"], "quantize s": cell["quantize_s"],
                         "test top-1": win["test_top1"] if chosen else "",
                         "test cosine": win["test_cosine"] if chosen else "",
                         "FP top-1": entry["fp_top1"] if chosen else ""})
    write_markdown(out / "select_w4a4.md",
                   "W4A4 (all ingredients, every site at 4 bits) chosen on validation images; only the winner "
                   "(bold) is scored on the test set", rows,
                   ["model", "candidate", "calibration images", "validation cosine", "quantize s", "test top-1", "test cosine", "FP top-1"],
                   {"machine": results.get("machine", {})})


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["dinov2"], choices=["dinov2", "fmnist-vit"])
    ap.add_argument("--only", nargs="+", default=None, help=f"candidates to run (default all: {list(CANDIDATES)})")
    ap.add_argument("--val-images", type=int, default=128, help="validation images the choice is made on")
    ap.add_argument("--num-train", type=int, default=2000, help="DINOv2 probe training images")
    ap.add_argument("--num-test", type=int, default=2000, help="DINOv2 probe test images")
    ap.add_argument("--no-test", dest="test", action="store_false", help="choose only; do not score the winner")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    ap.add_argument("--fresh", action="store_true", help="recompute candidates already in the JSON")
    ap.add_argument("--plots-only", action="store_true")
    args = ap.parse_args(argv)
    if args.val_images < 1:
        raise SystemExit("--val-images must be >= 1")
    results = json.loads((args.out / "select_w4a4.json").read_text()) if args.plots_only else run(args)
    write_outputs(results, args.out)
    print(f"wrote {args.out / 'select_w4a4.md'}")


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).parent))
    main()
