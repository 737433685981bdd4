"""Where does W4A4 lose accuracy on real weights? Quick one-change-at-a-time diagnosis on DINOv2-S.

    python benchmarks/diagnose_w4a4.py [--num-train 500] [--num-test 150]

Fashion-MNIST probe (fit on FP features) on DINOv2-S at 224 px, 32 real calibration photos. Each row
changes one thing from the default W4A4 IGQ G=8 config (every site quantized); rows that keep a site
in higher precision say so in their name. Also prints the 4 worst sites by local SQNR on 8 test images.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

import igq_plugin as igq
from igq_plugin.bench.data import calibration_photos, load_images
from igq_plugin.bench.evaluation import SiteSQNR
from igq_plugin.bench.tasks import ProbeTask, site_report
from igq_plugin.bench.zoo import load_dinov2_small

from common import machine_info, save_json, write_markdown


def rows() -> dict[str, igq.IGQConfig]:
    base = igq.IGQConfig(weight_bits=4, act_bits=4, num_groups=8)
    return {
        "W4A4 IGQ G8 (default, every site)": base,
        "W4A4 layer-wise": base.replace(act_scheme="layer"),
        "W4A4 IGQ, softmax@8b": base.replace(softmax_bits=8),
        "W4A4 IGQ, Q/K/V + softmax in float": base.replace(quantize_attention=False),
        "W8A4 IGQ (weights@8b)": base.replace(weight_bits=8),
        "W4A8 IGQ (activations@8b)": base.replace(act_bits=8),
        "W4A4 IGQ, range rule mean": base.replace(range_update="mean"),
        "W4A4 IGQ, range rule envelope": base.replace(range_update="envelope"),
        "W4A4 IGQ, Q/K/V operands IGQ": base.replace(matmul_scheme="igq"),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--num-train", type=int, default=500)
    ap.add_argument("--num-test", type=int, default=150)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = ap.parse_args()
    torch.manual_seed(0)
    model = load_dinov2_small()
    task = ProbeTask(model, num_train=args.num_train, num_test=args.num_test, cache_tag="dinov2s")
    calib = list(load_images(calibration_photos(32)).split(8))
    out = [{"config": "FP32", "top1": round(task.fp_top1, 2), "cosine": 1.0, "worst sites (dB)": ""}]
    for name, cfg in rows().items():
        qmodel = igq.quantize(model, cfg, calib, progress=False)
        metrics = task.evaluate(qmodel, desc=name)
        worst = SiteSQNR.worst(site_report(qmodel, task.site_inputs()), 4)
        out.append({"config": name, "top1": round(metrics["top1"], 2), "cosine": round(metrics["cosine"], 4),
                    "worst sites (dB)": ", ".join(f"{s} {v:.1f}" for s, v in worst)})
        print(out[-1], flush=True)
    meta = {"machine": machine_info(), "num_train": args.num_train, "num_test": args.num_test}
    args.out.mkdir(parents=True, exist_ok=True)
    save_json(args.out / "diagnose_w4a4.json", {**meta, "rows": out})
    write_markdown(args.out / "diagnose_w4a4.md", "W4A4 diagnosis on DINOv2-S (Fashion-MNIST probe)", out,
                   ["config", "top1", "cosine", "worst sites (dB)"], meta)


if __name__ == "__main__":
    main()
