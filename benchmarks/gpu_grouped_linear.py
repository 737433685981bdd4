"""GPU throughput of the IGQ Triton kernels against torch._int_mm (per-tensor int8) and fp16 / bf16 matmul.

Layer shapes: the four Linears of a ViT-S / B / L block (qkv, proj, fc1, fc2; K, N in {384, ..., 4096}),
tokens = 197 x batch, batch in {1, 8, 64}. Variants, interleaved round-robin per shape, CUDA-event
medians over --runs rounds after a warm-up:
* "IGQ GEMM kernel (G=8)": the grouped int8 GEMM kernel alone (permutation given), 4-bit codes, 8 groups;
* "IGQ GEMM (G=8)": igq::grouped_linear's CUDA kernel as called: the per-instance permutation
  (group_segments, torch) included;
* "IGQ grid GEMM": the common-grid path (act_grid=8): one int8 GEMM with the scales in its epilogue;
* "IGQ Linear (G=8)" / "IGQ grid Linear": the whole quantized Linear from float activations
  (activation kernel: min / max, Eq. 5 assignment, codes; then the GEMM);
* "torch._int_mm": per-tensor int8 x int8 -> int32 (no scales: a lower bound for any int8 Linear);
* "fp16 matmul", "bf16 matmul": torch.matmul.
TFLOP/s counts 2 M K N per GEMM; each sample times --reps back-to-back calls. A full ViT-B/16 forward (batch 8 and 64) compares the IGQ model with
its Linears on the kernels (int8_linears; attention kept in fake quantization) against the fp16 model
and the layer-wise int8 model on the same kernels.

    python benchmarks/gpu_grouped_linear.py            # needs a CUDA GPU and triton; ~5 minutes on an H200
    python benchmarks/gpu_grouped_linear.py --smoke    # tiny shapes; runs on CPU through Triton's interpreter
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

from common import save_json, save_text

RESULTS = Path(__file__).parent / "results"

BLOCKS = {"ViT-S": 384, "ViT-B": 768, "ViT-L": 1024}


def layer_shapes(dim: int) -> dict[str, tuple[int, int]]:
    return {"qkv": (dim, 3 * dim), "proj": (dim, dim), "fc1": (dim, 4 * dim), "fc2": (4 * dim, dim)}


def timer(device: torch.device, reps: int):
    """fn -> seconds per call, over ``reps`` back-to-back calls (CUDA events on a GPU, perf_counter otherwise):
    small GEMMs take microseconds, so one call would time the launch, not the kernel."""
    if device.type == "cuda":
        def run(fn):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(reps):
                fn()
            end.record()
            torch.cuda.synchronize()
            return start.elapsed_time(end) / 1e3 / reps
    else:
        def run(fn):
            t0 = time.perf_counter()
            fn()
            return time.perf_counter() - t0
    return run


def interleaved(fns: dict, runs: int, device: torch.device, reps: int = 1) -> dict[str, float]:
    """Median seconds per call of each fn, all run round-robin (warm-up round first)."""
    run = timer(device, reps)
    for fn in fns.values():
        fn()
    times = {name: [] for name in fns}
    for _ in range(runs):
        for name, fn in fns.items():
            times[name].append(run(fn))
    return {name: statistics.median(t) for name, t in times.items()}


def gemm_variants(tokens: int, batch: int, k: int, n: int, device: torch.device, groups: int = 8):
    import igq_plugin.integrations.cuda as K
    from igq_plugin import ops

    g = torch.Generator().manual_seed(0)
    per = tokens // batch
    x = (torch.randn(batch, per, k, generator=g) * (3 * torch.rand(1, 1, k, generator=g))).to(device)
    lo = torch.linspace(-2.0, -0.1, groups).to(device)
    hi = torch.linspace(0.1, 2.0, groups).to(device)
    snapped_lo, snapped_hi = ops.snap_to_grid(lo, hi, 4, 8, False)
    grid = ops.grid_of(snapped_lo, snapped_hi, 4)
    codes, assignment = K.group_quantize(x, lo, hi, 4)
    grid_codes, _ = K.grid_quantize(x, snapped_lo, snapped_hi, 4, grid)
    scale, zero_point = ops.group_qparams(lo, hi, 4)
    zero_point = zero_point.to(torch.int32)
    w = torch.randint(-8, 8, (n, k), dtype=torch.int8, generator=g).to(device)
    w_scale, bias = torch.rand(n, generator=g).to(device), torch.randn(n, generator=g).to(device)
    perm, seg = K.group_segments(assignment, groups)
    xi, zp32, ws, b32 = codes.contiguous(), zero_point.contiguous(), w_scale.float(), bias.float()
    fns = {
        "IGQ GEMM kernel (G=8)": lambda: K._gemm(xi, perm, seg, zp32, scale, w, ws, b32, True, torch.float16),
        "IGQ GEMM (G=8)": lambda: K.grouped_linear(codes, assignment, scale, zero_point, w, w_scale, bias,
                                                   out_dtype=torch.float16),
        "IGQ grid GEMM": lambda: K.grid_linear(grid_codes, grid, w, w_scale, bias, out_dtype=torch.float16),
        "IGQ Linear (G=8)": lambda: K.grouped_linear(*K.group_quantize(x, lo, hi, 4), scale, zero_point, w, w_scale,
                                                     bias, out_dtype=torch.float16),
        "IGQ grid Linear": lambda: K.grid_linear(K.grid_quantize(x, snapped_lo, snapped_hi, 4, grid)[0], grid, w,
                                                 w_scale, bias, out_dtype=torch.float16),
    }
    if device.type == "cuda":
        a8 = torch.randint(-8, 8, (tokens, k), dtype=torch.int8, device=device)
        a16, ab = x.reshape(tokens, k).half(), x.reshape(tokens, k).bfloat16()
        w16, wb = w.half().t(), w.bfloat16().t()
        fns["torch._int_mm"] = lambda: torch._int_mm(a8, w.t())  # cuBLASLt's layout: A row-major, B column-major
        fns["fp16 matmul"] = lambda: torch.matmul(a16, w16)
        fns["bf16 matmul"] = lambda: torch.matmul(ab, wb)
    return fns


def vit_b_forward(batch: int, device: torch.device, runs: int, smoke: bool) -> dict:
    import timm

    import igq_plugin as igq
    import igq_plugin.integrations.cuda as K

    torch.manual_seed(0)
    kwargs = dict(depth=1, img_size=32, patch_size=8, embed_dim=64, num_heads=4) if smoke else {}
    model = timm.create_model("vit_base_patch16_224", pretrained=False, **kwargs).eval()
    size = 32 if smoke else 224
    calib = [torch.randn(8, 3, size, size) for _ in range(2)]
    x = torch.randn(batch, 3, size, size, device=device)
    rows = {}
    igq_model = igq.quantize(model, igq.IGQConfig(weight_bits=4, act_bits=4, num_groups=8, act_grid=8), calib,
                             progress=False)
    layer_model = igq.quantize(model, igq.IGQConfig(weight_bits=4, act_bits=8, act_scheme="layer"), calib,
                               progress=False)
    half = torch.float16 if device.type == "cuda" else torch.float32
    variants = {  # name: (model, input dtype); the kernels' models keep float32 outside their Linears
        "fp16 model" if device.type == "cuda" else "float model": (model.to(device, half), half),
        "IGQ G=8 W4A4 (kernels)": (K.int8_linears(igq_model.to(device)), torch.float32),
        "layer-wise W4A8 (kernels)": (K.int8_linears(layer_model.to(device)), torch.float32),
    }
    with torch.no_grad():
        fns = {name: (lambda m=m, d=d: m(x.to(d))) for name, (m, d) in variants.items()}
        times = interleaved(fns, runs, device)
    for name, t in times.items():
        rows[name] = round(t * 1e3, 3)
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--reps", type=int, default=20, help="calls per timed sample")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes, any device (CPU: Triton interpreter)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    if args.smoke and not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before the kernels are defined
    if not args.smoke and not torch.cuda.is_available():
        print("gpu_grouped_linear: no CUDA GPU here; run it on a GPU machine (or --smoke to check the script)",
              file=sys.stderr)
        return 2
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    runs = 2 if args.smoke else args.runs
    reps = 1 if args.smoke else args.reps
    batches = [1, 2] if args.smoke else [1, 8, 64]
    blocks = {"tiny": 32} if args.smoke else BLOCKS
    rows = []
    for model, dim in blocks.items():
        for layer, (k, n) in layer_shapes(dim).items():
            for batch in batches:
                tokens = (5 if args.smoke else 197) * batch
                times = interleaved(gemm_variants(tokens, batch, k, n, device), runs, device, reps)
                flop = 2 * tokens * k * n
                row = {"model": model, "layer": layer, "batch": batch, "M": tokens, "K": k, "N": n}
                for name, t in times.items():
                    row[f"{name} TFLOP/s"] = round(flop / t / 1e12, 3)
                if "torch._int_mm" in times:
                    row["IGQ GEMM kernel / _int_mm"] = round(times["torch._int_mm"] / times["IGQ GEMM kernel (G=8)"], 3)
                    row["IGQ GEMM / _int_mm"] = round(times["torch._int_mm"] / times["IGQ GEMM (G=8)"], 3)
                    row["IGQ grid GEMM / _int_mm"] = round(times["torch._int_mm"] / times["IGQ grid GEMM"], 3)
                    row["IGQ GEMM kernel / fp16"] = round(times["fp16 matmul"] / times["IGQ GEMM kernel (G=8)"], 3)
                rows.append(row)
                print(row, flush=True)
    forward = {f"batch {b}": vit_b_forward(b, device, runs, args.smoke) for b in ([2] if args.smoke else [8, 64])}
    gpu = torch.cuda.get_device_name() if device.type == "cuda" else "CPU (Triton interpreter, --smoke)"
    meta = {"device": gpu, "torch": torch.__version__, "triton": __import__("triton").__version__, "runs": runs,
            "smoke": args.smoke}
    name = "gpu_grouped_linear_smoke" if args.smoke else "gpu_grouped_linear"
    save_json(args.out / f"{name}.json", {"meta": meta, "gemm": rows, "vit_b_forward_ms": forward})
    columns = list(rows[0])
    lines = ["# IGQ Triton kernels: GEMM throughput and ViT-B forward", "",
             f"Device: {gpu}; torch {torch.__version__}; {runs} interleaved runs, medians.", "",
             "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(str(r.get(c, "")) for c in columns) + " |" for r in rows]
    lines += ["", "ViT-B/16 forward, ms (Linears on the kernels; attention in fake quantization):", ""]
    for batch, ms in forward.items():
        lines.append(f"- {batch}: " + ", ".join(f"{k} {v}" for k, v in ms.items()))
    save_text(args.out / f"{name}.md", "\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
