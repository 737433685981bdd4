"""Save and load quantized models: config + state dict (plain tensors), loadable with weights_only."""
from __future__ import annotations

import logging
import os
from typing import Union

import torch
from torch import nn

from .allocation.cost import SHAPES_ATTR
from .config import IGQConfig
from .quantize import CONFIG_ATTR, prepare
from .reparam import REPARAM_ATTR
from ._io import atomic_write
from .modules import iter_quantizers
from .registry import sites

__all__ = ["save", "load", "FORMAT"]

logger = logging.getLogger("igq_plugin")

FORMAT = "igq_plugin.quantized_model"
FORMAT_VERSION = 2  # 2: every range contains 0 (ops.quant zero policy); checkpoints record their sites


def save(qmodel: nn.Module, path: Union[str, os.PathLike]) -> None:
    """Write a quantized model (from igq.quantize / igq.convert) to ``path``, atomically: an existing
    file there is replaced only by a complete checkpoint (a failed write leaves it as it was)."""
    config = getattr(qmodel, CONFIG_ATTR, None)
    if not isinstance(config, IGQConfig):
        raise ValueError("qmodel is not an igq_plugin quantized model (no igq_config): quantize it with igq.quantize first")
    pending = [name for name, q in iter_quantizers(qmodel) if q.observing or not q.is_calibrated]
    if pending:
        raise ValueError(
            f"{len(pending)} quantizer(s) are not calibrated (e.g. '{pending[0]}'): run calibration data through the "
            "prepared model and call igq.convert() before igq.save (a saved model must run)"
        )
    state = {k: v.detach().cpu().contiguous() for k, v in qmodel.state_dict().items()}
    ckpt = {"format": FORMAT, "format_version": FORMAT_VERSION, "config": config.to_dict(), "state_dict": state,
            "sites": [[s.name, s.kind] for s in sites(qmodel)]}
    shapes = getattr(qmodel, SHAPES_ATTR, None)
    if shapes:
        ckpt["site_shapes"] = shapes  # per-instance shapes for igq.report (plain ints and strings)
    if getattr(qmodel, REPARAM_ATTR, None) is not None:
        ckpt["reparameterized"] = list(getattr(qmodel, REPARAM_ATTR))
    atomic_write(path, lambda tmp: torch.save(ckpt, tmp))


def load(path: Union[str, os.PathLike], model: nn.Module, *, map_location: Union[str, torch.device] = "cpu") -> nn.Module:
    """Rebuild the quantized model saved at ``path`` on a copy of the float ``model`` (same architecture).

    The returned model's outputs are bit-identical to the saved one's; ``model`` is not modified.
    Unreadable files, checkpoints of another architecture or config, and quantizer state that would
    not run (uncalibrated, non-finite ranges, wrongly shaped weight codes) are refused with a ValueError
    naming the problem.
    """
    name = os.fspath(path)
    if os.path.isdir(name):
        raise ValueError(f"{name!r} is a directory, not an igq_plugin checkpoint file")
    if any(True for _ in iter_quantizers(model)) or sites(model):
        raise ValueError("igq.load rebuilds the quantized model on the float model it was quantized from; this model "
                         "already holds igq quantizers: pass the float model")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as err:  # truncated, empty, random or unsafe-pickle files
        raise ValueError(f"{name!r} is not a readable igq_plugin checkpoint ({type(err).__name__}: "
                         f"{str(err).splitlines()[0] if str(err) else 'no detail'})") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise ValueError(f"{name!r} is not an igq_plugin checkpoint (written by igq.save)")
    for key in ("config", "state_dict"):
        if not isinstance(ckpt.get(key), dict):
            raise ValueError(f"igq_plugin checkpoint {name!r} has no {key!r} entry: the file is damaged or was not "
                             "written by igq.save")
    if ckpt.get("format_version", 0) > FORMAT_VERSION:
        raise ValueError(
            f"{os.fspath(path)!r} has format version {ckpt['format_version']}; this igq_plugin reads up to "
            f"{FORMAT_VERSION}: upgrade igq_plugin"
        )
    if ckpt.get("format_version", 0) < 2:
        logger.warning(
            "%r was saved by igq_plugin 0.1 (format 1), before every quantization range was widened to contain 0: "
            "groups whose range excludes 0 now quantize with a coarser step, so outputs can differ from those of "
            "the saved model; re-quantize to reproduce them under the current numerics", os.fspath(path),
        )
    config = IGQConfig.from_dict(ckpt["config"])
    qmodel = prepare(model, config, observe=False)
    _add_folded_biases(qmodel, ckpt["state_dict"])
    try:
        missing, unexpected = qmodel.load_state_dict(ckpt["state_dict"], strict=False)
    except RuntimeError as err:  # size mismatches: name the keys
        detail = "; ".join(line.strip() for line in str(err).splitlines()[1:6] if line.strip())
        raise ValueError(f"checkpoint {name!r} does not fit this model: {detail or err}") from None
    missing = [k for k in missing if not k.endswith(".weight_int")]  # older checkpoints: round-to-nearest
    if missing or unexpected:
        raise ValueError(
            f"checkpoint does not match this model architecture: missing keys {missing[:5]}"
            f"{'...' if len(missing) > 5 else ''}, unexpected keys {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}"
        )
    saved_sites = ckpt.get("sites")
    if saved_sites is not None:
        rebuilt = [[s.name, s.kind] for s in sites(qmodel)]
        if [list(s) for s in saved_sites] != rebuilt:
            lost = sorted({tuple(s) for s in map(tuple, saved_sites)} ^ {tuple(s) for s in rebuilt})
            raise ValueError(
                f"checkpoint {os.fspath(path)!r} was saved with other quantization sites than this model and config "
                f"give (differing (site, kind): {lost[:5]}{'...' if len(lost) > 5 else ''}): load it onto the "
                "architecture it was quantized from"
            )
    _check_loaded(qmodel, ckpt["state_dict"], name)
    if ckpt.get("site_shapes"):
        setattr(qmodel, SHAPES_ATTR, ckpt["site_shapes"])
    if "reparameterized" in ckpt:
        setattr(qmodel, REPARAM_ATTR, list(ckpt["reparameterized"]))
    return qmodel.eval()


def _add_folded_biases(qmodel: nn.Module, state: dict) -> None:
    """Reparameterization gives a bias-free Linear / LayerNorm a bias: create it before loading."""
    modules = dict(qmodel.named_modules())
    for key, value in state.items():
        name, _, attr = key.rpartition(".")
        module = modules.get(name)
        if attr == "bias" and module is not None and hasattr(module, "weight") and getattr(module, "bias", 0) is None:
            module.bias = nn.Parameter(torch.zeros(value.shape, dtype=module.weight.dtype, device=module.weight.device))


def _check_loaded(qmodel: nn.Module, state: dict, name: str) -> None:
    """Refuse a checkpoint whose quantizer state would not run: one clear error per problem, naming the key."""
    problems = []
    for qname, q in iter_quantizers(qmodel):
        if not q.is_calibrated:
            problems.append(f"{qname}.calibrated is False (the quantizer was saved uncalibrated)")
        for buf in ("lo", "hi"):
            t = getattr(q, buf, None)
            if isinstance(t, torch.Tensor) and not bool(torch.isfinite(t).all()):
                problems.append(f"{qname}.{buf} holds NaN or Inf")
        if hasattr(q, "lo") and q.lo.shape != q.hi.shape:
            problems.append(f"{qname}.lo has shape {tuple(q.lo.shape)} but {qname}.hi {tuple(q.hi.shape)}")
    for m, mname in {id(s.weight_quantizer): (s.weight_quantizer, s.consumer) for s in sites(qmodel)
                     if s.weight_quantizer is not None}.values():
        prefix = f"{mname}." if mname else ""
        if not m.weight_is_calibrated:
            problems.append(f"{prefix}weight_calibrated is False")
        codes = state.get(prefix + "weight_int")
        if codes is not None and codes.numel() and (codes.shape != m.weight.shape or codes.dtype != torch.uint8):
            problems.append(f"{prefix}weight_int is {codes.dtype} {tuple(codes.shape)}; expected empty or torch.uint8 "
                            f"{tuple(m.weight.shape)}")
        for buf in ("weight_scale", "weight_zero_point"):
            t = getattr(m, buf)
            if t.shape != (m.weight.shape[0],) or not bool(torch.isfinite(t).all()):
                problems.append(f"{prefix}{buf} must be {m.weight.shape[0]} finite values, got shape {tuple(t.shape)}")
    if problems:
        raise ValueError(f"checkpoint {name!r} does not hold a runnable quantized model: " + "; ".join(problems[:8])
                         + (f" (and {len(problems) - 8} more)" if len(problems) > 8 else ""))
