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
from .registry import sites

__all__ = ["save", "load", "FORMAT"]

logger = logging.getLogger("igq_plugin")

FORMAT = "igq_plugin.quantized_model"
FORMAT_VERSION = 2  # 2: every range contains 0 (ops.quant zero policy); checkpoints record their sites


def save(qmodel: nn.Module, path: Union[str, os.PathLike]) -> None:
    """Write a quantized model (from igq.quantize / igq.convert) to ``path``."""
    config = getattr(qmodel, CONFIG_ATTR, None)
    if not isinstance(config, IGQConfig):
        raise ValueError("qmodel is not an igq_plugin quantized model (no igq_config): quantize it with igq.quantize first")
    state = {k: v.detach().cpu().contiguous() for k, v in qmodel.state_dict().items()}
    ckpt = {"format": FORMAT, "format_version": FORMAT_VERSION, "config": config.to_dict(), "state_dict": state,
            "sites": [[s.name, s.kind] for s in sites(qmodel)]}
    shapes = getattr(qmodel, SHAPES_ATTR, None)
    if shapes:
        ckpt["site_shapes"] = shapes  # per-instance shapes for igq.report (plain ints and strings)
    if getattr(qmodel, REPARAM_ATTR, None) is not None:
        ckpt["reparameterized"] = list(getattr(qmodel, REPARAM_ATTR))
    torch.save(ckpt, path)


def load(path: Union[str, os.PathLike], model: nn.Module, *, map_location: Union[str, torch.device] = "cpu") -> nn.Module:
    """Rebuild the quantized model saved at ``path`` on a copy of the float ``model`` (same architecture).

    The returned model's outputs are bit-identical to the saved one's; ``model`` is not modified.
    """
    ckpt = torch.load(path, map_location=map_location, weights_only=True)
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise ValueError(f"{os.fspath(path)!r} is not an igq_plugin checkpoint (written by igq.save)")
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
    missing, unexpected = qmodel.load_state_dict(ckpt["state_dict"], strict=False)
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
