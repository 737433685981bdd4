"""DINOv2-S probe: calibration only vs block reconstruction vs variation-aware QAT, under a stated CPU budget.

Every site quantized, the validation-chosen configuration of benchmarks/select_w4a4.py at each bit width
(IGQConfig.igq_plus(b, reparam="repq", range_quantile=0.95), 32 task-domain calibration images), as
``benchmarks/reconstruction.py --config best``. Stages per bit width:
* ``calibration``: the calibrated model;
* ``reconstruct``: + igq.reconstruct on the first --rec-images probe-training images, --iters per block;
* ``qat``: + igq.qat.train from the calibrated model: --steps steps of --batch-size images x --crops random
  crops, drawn from the probe's --num-train training images (training split), cosine distillation of the
  FP backbone's features (the probe's input). ``--lr 0`` (the default here): the quantizers are trained
  (weight step sizes, activation group ranges, softmax row maxima) and the float weights are not. Chosen
  on validation images (32 Fashion-MNIST training images, feature cosine after 12 steps from 0.9445):
  lr 0 -> 0.9454, qat.train's lr 1e-4 -> 0.8226 (an absolute rate of 1e-4 is half an 8-bit step of
  DINOv2's patch embedding per step). Step-size and range rates: the qat.train defaults (chosen on
  Fashion-MNIST validation images);
* ``reconstruct+qat``: the same QAT from the reconstructed model (needs the ``reconstruct`` stage; its
  model is kept in --state-dir).
Top-1 of the probe and feature cosine on its --num-test test images, scored once per row; the test
images are never trained or calibrated on. Rows are merged into the results file as they finish, and a
row already there is not recomputed (``--fresh`` recomputes the selected ones), so a long run can be
split across sessions.

    python benchmarks/qat_dinov2.py --bits 4 3                  # every stage; ~3.5 hours on 2 cores
    python benchmarks/qat_dinov2.py --bits 3 --stages calibration qat
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch

import igq_plugin as igq
from igq_plugin.bench.zoo import cache_dir

from common import machine_info, save_json, write_markdown
from reconstruction import build, config

RESULTS = Path(__file__).parent / "results"
STAGES = ("calibration", "reconstruct", "qat", "reconstruct+qat")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--bits", nargs="+", type=int, default=[4, 3])
    ap.add_argument("--stages", nargs="+", choices=STAGES, default=list(STAGES))
    ap.add_argument("--rec-images", type=int, default=256)
    ap.add_argument("--iters", type=int, default=50, help="reconstruction iterations per block (50: ~30 min, W4A4)")
    ap.add_argument("--steps", type=int, default=160, help="QAT steps (~9 s each on 2 cores at 8 x 2 views)")
    ap.add_argument("--lr", type=float, default=0.0, help="of the float weights (0: quantizer-only QAT; docstring)")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--crops", type=int, default=2)
    ap.add_argument("--num-train", type=int, default=2000)
    ap.add_argument("--num-test", type=int, default=2000)
    ap.add_argument("--fresh", action="store_true", help="recompute the selected rows")
    ap.add_argument("--state-dir", type=Path, default=cache_dir() / "qat_dinov2")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    args.config = "best"  # reconstruction.build: task-domain calibration images
    if "reconstruct+qat" in args.stages and "reconstruct" not in args.stages:
        for bits in args.bits:
            if not (args.state_dir / f"w{bits}_reconstruct.pt").is_file():
                ap.error(f"--stages reconstruct+qat at W{bits}A{bits} needs the reconstruct stage (or its saved model "
                         f"in {args.state_dir})")

    path = args.out / "qat_dinov2.json"
    def stored() -> list[dict]:
        return json.loads(path.read_text())["rows"] if path.is_file() else []

    done = stored()
    model, task, calib, rec = build("dinov2", args)
    train = torch.cat([task.transform(task.train_images[i:i + 64]) for i in range(0, args.num_train, 64)])
    recipe = (f"{args.steps} steps x {args.batch_size} images x {args.crops} crops of {args.num_train} images, cosine, "
              + ("quantizers only" if args.lr == 0 else f"lr {args.lr:g}"))

    def record(row: dict) -> None:
        done[:] = stored()  # rows another run (another bit width or stage) wrote meanwhile are kept
        keep = [r for r in done if (r["bits"], r["stage"]) != (row["bits"], row["stage"])]
        done[:] = keep + [row]
        done.sort(key=lambda r: (r["bits"] != "-", -int(r["bits"][1]) if r["bits"] != "-" else 0,
                                 STAGES.index(r["stage"]) if r["stage"] in STAGES else -1))
        meta = {"machine": machine_info(), "args": {k: str(v) for k, v in vars(args).items()}}
        save_json(path, {"meta": meta, "rows": done})
        write_markdown(args.out / "qat_dinov2.md", "DINOv2-S probe: calibration vs reconstruction vs QAT "
                       "(every site quantized; probe top-1 % and feature cosine on the test images)", done,
                       ["bits", "stage", "method", "top1", "cosine", "seconds"], meta)
        print(row, flush=True)

    def pending(bits: int, stage: str) -> bool:
        return stage in args.stages and (args.fresh or not any(
            (r["bits"], r["stage"]) == (f"W{bits}A{bits}", stage) for r in done))

    def score(q, bits: int, stage: str, method: str, seconds=None) -> None:
        got = task.evaluate(q, desc=f"W{bits}A{bits} {stage}")
        row = {"bits": f"W{bits}A{bits}", "stage": stage, "method": method, "top1": round(got["top1"], 2),
               "cosine": round(got["cosine"], 4)}
        if seconds is not None:
            row["seconds"] = round(seconds)
        record(row)

    def qat(start, bits: int, stage: str, method: str) -> None:
        t0 = time.perf_counter()
        student = igq.qat.train(start, train, teacher=model, steps=args.steps, batch_size=args.batch_size,
                                crops=args.crops, lr=args.lr, distill="cosine",
                                checkpoint=args.state_dir / f"w{bits}_{stage}.ckpt",
                                checkpoint_every=20, resume=not args.fresh)
        score(student, bits, stage, method, time.perf_counter() - t0)

    if not any(r["stage"] == "FP32" for r in done):
        record({"bits": "-", "stage": "FP32", "method": "FP32 backbone", "top1": round(task.fp_top1, 2)})
    args.state_dir.mkdir(parents=True, exist_ok=True)
    for bits in args.bits:
        if not any(pending(bits, s) for s in STAGES):
            continue
        cfg, label = config("best", bits)
        q = None
        if any(pending(bits, s) for s in ("calibration", "qat", "reconstruct")):
            torch.manual_seed(0)
            q = igq.quantize(model, cfg, calib, progress=False)
        if pending(bits, "calibration"):
            score(q, bits, "calibration", f"{label} calibration only")
        if pending(bits, "qat"):
            qat(q, bits, "qat", f"+ igq.qat.train ({recipe})")
        saved = args.state_dir / f"w{bits}_reconstruct.pt"
        r = None
        if pending(bits, "reconstruct"):
            r = copy.deepcopy(q)  # reconstruct works in place; the calibrated model is the same starting point
            t0 = time.perf_counter()
            igq.reconstruct(r, rec, iters=args.iters)
            seconds = time.perf_counter() - t0
            igq.save(r, saved)
            score(r, bits, "reconstruct", f"+ igq.reconstruct ({args.rec_images} images, {args.iters} iters)", seconds)
        if pending(bits, "reconstruct+qat"):
            start = r if r is not None else igq.load(saved, model)
            qat(start, bits, "reconstruct+qat",
                "+ igq.reconstruct + igq.qat.train (same QAT, from the reconstructed model)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
