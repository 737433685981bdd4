"""Block reconstruction after calibration: learned rounding and ranges, block by block (BRECQ / QDrop style).

    qmodel = igq.quantize(model, cfg, calibration_data)
    igq.reconstruct(qmodel, reconstruction_data, iters=200)     # in place; returns qmodel

For each transformer block in forward order (``blocks``: default, the numbered children of the
model's block list, e.g. ``blocks.0`` ... ``blocks.11``), with the quantized model's own blocks
upstream:

* inputs: the block's input in the quantized model (upstream blocks already reconstructed) and in the
  float model (every fake quantization off); target: the float block's output on the float input.
  For the next block of one nn.Sequential (timm's ``blocks``) they are the previous block's outputs,
  so the model runs up to the first block only;
* learned: the soft rounding of every weight in the block (AdaRound: ``ops.soft_quantize_weight``,
  starting from the layer's codes: GPTQ's where ``weight_rounding="gptq"`` chose them, else at the
  float weights (``ops.soft_rounding_start``); a regularizer annealed from beta 20 to 2 after a
  20 % warm-up pushes them to hard decisions) and, with ``learn_ranges``, the block's activation
  group ranges and post-softmax row maxima (LSQ-style gradients of the igq ops); the Eq. 5 assignment
  stays the op's, on the current ranges;
* loss: mean squared error of the block's output; with ``qdrop`` = p each input element is the float
  one with probability p (QDrop), else the quantized one;
* then the hard codes are stored (``weight_int``, as GPTQ's) and the ranges frozen.

The float model is the quantized model with fake quantization off (its weights stay float), so no
second copy is kept; block inputs and targets for the reconstruction images stay in memory (about
3 x images x tokens x width floats, briefly 4 x between blocks: 400 / 530 MB for DINOv2-S on 1024
images). Blocks must take one tensor and return one tensor (timm ViT / DeiT / DINOv2 blocks), and hold their quantizers as modules
(``igq.quantize``; not NNCF hooks or torch.ao graphs, whose quantizers run outside the block: refused).
Weight step sizes stay those of calibration (not learned). A block that fails keeps its weights and ranges. Ranges learned here are not moved
back onto an ``act_grid`` grid (an exported model re-codes them onto the approximate 16-bit grid).
"""
from __future__ import annotations

import logging
from typing import Any, Optional, Sequence

import torch
from torch import nn

from . import ops
from ._inputs import concat_inputs, model_device, run_model, to_device
from .modules import ActQuantizer, SoftmaxQuantizer, _QuantWeightMixin, fake_quant_disabled
from .registry import sites

__all__ = ["reconstruct", "find_blocks"]

logger = logging.getLogger("igq_plugin")


class _Stop(Exception):
    pass


def find_blocks(model: nn.Module) -> list[str]:
    """Names of the model's transformer blocks: the numbered children of its first block list
    (nn.Sequential / nn.ModuleList) holding quantization sites."""
    site_names = [s.name for s in sites(model)]
    for name, module in model.named_modules():
        if isinstance(module, (nn.Sequential, nn.ModuleList)) and len(module) >= 1:
            children = [f"{name}.{i}" if name else str(i) for i in range(len(module))]
            if all(any(s.startswith(c + ".") for s in site_names) for c in children):
                return children
    raise ValueError("no block list found (an nn.Sequential / nn.ModuleList whose children all hold quantization "
                     "sites): pass blocks=[...] module names")


def _one_tensor(block: nn.Module, value: Any, what: str) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"block {type(block).__name__} {what} a {type(value).__name__}: reconstruction needs blocks of "
                        "one tensor in, one tensor out (timm ViT / DeiT / DINOv2)")
    return value


def _capture(model: nn.Module, block: nn.Module, inputs: torch.Tensor, batch_size: int) -> torch.Tensor:
    """The block's input for every image, run through ``model`` up to that block."""
    found = []

    def hook(_module, args, _result):
        found.append(_one_tensor(block, args[0] if args else None, "takes").detach())
        raise _Stop

    handle = block.register_forward_hook(hook)
    try:
        for start in range(0, inputs.shape[0], batch_size):
            try:
                run_model(model, inputs[start:start + batch_size])
            except _Stop:
                pass
    finally:
        handle.remove()
    return torch.cat(found)


def _run_block(block: nn.Module, x: torch.Tensor, batch_size: int) -> torch.Tensor:
    return torch.cat([_one_tensor(block, block(x[i:i + batch_size]), "returns") for i in range(0, x.shape[0], batch_size)])


def _follows(model: nn.Module, before: str, name: str) -> bool:
    """True when block ``name`` takes exactly block ``before``'s output: consecutive children of one
    nn.Sequential (timm's ``blocks``), so its inputs come from running one block, not the model."""
    parent, _, index = name.rpartition(".")
    parent_before, _, index_before = before.rpartition(".")
    if parent != parent_before or not (index.isdigit() and index_before.isdigit()):
        return False
    return int(index) == int(index_before) + 1 and isinstance(model.get_submodule(parent), nn.Sequential)


def _block_weights(model: nn.Module, name: str) -> list:
    prefix = name + "."
    found = {}
    for site in sites(model):
        wq = site.weight_quantizer
        if wq is not None and site.consumer.startswith(prefix) and isinstance(wq, _QuantWeightMixin):
            found[id(wq)] = wq
    return list(found.values())


def _block_quantizers(model: nn.Module, name: str) -> list:
    prefix = name + "."
    return [s.quantizer for s in sites(model) if s.name.startswith(prefix)
            and isinstance(s.quantizer, (ActQuantizer, SoftmaxQuantizer)) and s.quantizer.is_calibrated]


def _check(qmodel: nn.Module, iters: int, batch_size: int, qdrop: float, round_weight: float) -> None:
    if not sites(qmodel):
        raise ValueError("the model has no quantization sites: quantize it (igq.quantize) before reconstructing")
    if any(getattr(s.quantizer, "observing", False) for s in sites(qmodel)):
        raise ValueError("the model is still calibrating (quantizers observing): convert it first")
    for field, value, ok in (("iters", iters, isinstance(iters, int) and iters >= 0),
                             ("batch_size", batch_size, isinstance(batch_size, int) and batch_size >= 1),
                             ("qdrop", qdrop, 0.0 <= qdrop <= 1.0),
                             ("round_weight", round_weight, round_weight >= 0)):
        if not ok:
            raise ValueError(f"reconstruct: {field} = {value!r} is out of range (iters >= 0, batch_size >= 1, "
                             "0 <= qdrop <= 1, round_weight >= 0)")


def reconstruct(
    qmodel: nn.Module,
    data: Any,
    *,
    blocks: Optional[Sequence[str]] = None,
    iters: int = 200,
    batch_size: int = 32,
    lr: float = 1e-2,
    range_lr: float = 1e-3,
    learn_ranges: bool = True,
    qdrop: float = 0.5,
    round_weight: float = 0.01,
    seed: int = 0,
    progress: bool = True,
) -> nn.Module:
    """Reconstruct a quantized model block by block (module docstring); in place, returned.

    data: image batches (a Tensor or a list of Tensors, as calibration data): 32 to 1024 images.
    iters: optimizer steps per block, each on ``batch_size`` random images. lr: Adam's for the rounding
    variables; range_lr: for the group ranges. round_weight: weight of the rounding regularizer.
    """
    _check(qmodel, iters, batch_size, qdrop, round_weight)
    names = list(blocks) if blocks is not None else find_blocks(qmodel)
    inputs = concat_inputs(data)
    if not isinstance(inputs, torch.Tensor):
        raise TypeError("reconstruct takes image tensors (a Tensor or a list of Tensors)")
    device = model_device(qmodel)
    inputs = to_device(inputs, device)
    generator = torch.Generator().manual_seed(seed)
    was_training = qmodel.training
    qmodel.eval()
    from tqdm.auto import tqdm

    for name in names:  # before anything changes
        _check_block(qmodel, name, qmodel.get_submodule(name))
    try:
        previous = None  # (name, block, its quantized input, its float output)
        for name in tqdm(names, desc="igq reconstruct", unit="block", disable=not progress):
            block = qmodel.get_submodule(name)
            with torch.no_grad():
                if previous is not None and _follows(qmodel, previous[0], name):
                    # the next block of one nn.Sequential: its inputs are the previous block's outputs
                    x_q, x_fp = _run_block(previous[1], previous[2], batch_size), previous[3]
                else:  # run the model up to the block
                    x_q = _capture(qmodel, block, inputs, batch_size)
                    with fake_quant_disabled(qmodel):
                        x_fp = _capture(qmodel, block, inputs, batch_size)
                previous = None
                with fake_quant_disabled(qmodel):
                    y_fp = _run_block(block, x_fp, batch_size)
            _reconstruct_block(qmodel, name, block, x_q, x_fp, y_fp, iters=iters, batch_size=batch_size, lr=lr,
                               range_lr=range_lr, learn_ranges=learn_ranges, qdrop=qdrop, round_weight=round_weight,
                               generator=generator)
            previous = (name, block, x_q, y_fp)
    finally:
        qmodel.train(was_training)
    return qmodel


def _check_block(qmodel: nn.Module, name: str, block: nn.Module) -> None:
    inside = {id(m) for m in block.modules()}
    prefix = name + "."
    for site in sites(qmodel):
        if site.consumer.startswith(prefix) or site.consumer == name:
            for module in (site.quantizer, site.weight_quantizer):
                if module is not None and id(module) not in inside:
                    raise ValueError(
                        f"site '{site.name}' is quantized outside the modules of block '{name}' (NNCF hooks, a torch.ao "
                        "graph): calling the block alone would run it unquantized. Reconstruct a model from "
                        "igq.quantize (or the transformers adapter)")


def _reconstruct_block(qmodel, name, block, x_q, x_fp, y_fp, *, iters, batch_size, lr, range_lr, learn_ranges, qdrop,
                       round_weight, generator) -> None:
    weights = _block_weights(qmodel, name)
    quantizers = _block_quantizers(qmodel, name) if learn_ranges else []
    saved = [(wq, wq.weight_int.clone(), wq.weight_scale.clone(), wq.weight_zero_point.clone()) for wq in weights]
    saved_ranges = [(q, {r: getattr(q, r).detach().clone() for r in q._RANGES}) for q in quantizers]
    soft, frozen, done = [], [], False
    try:
        for wq in weights:  # from the layer's codes (GPTQ's, or round-to-nearest of the float weights)
            base, v = ops.soft_rounding_start(wq.weight.detach(), wq.weight_scale, wq.weight_zero_point,
                                              wq.weight_int if wq.weight_rounded else None)
            v.requires_grad_(True)
            wq.__dict__["soft_rounding"], wq.__dict__["soft_rounding_base"] = v, base
            soft.append(v)
        for q in quantizers:
            q.learn_ranges(True)
        range_params = [p for q in quantizers for p in q.parameters(recurse=False)]
        groups = [{"params": soft, "lr": lr}] + ([{"params": range_params, "lr": range_lr}] if range_params else [])
        frozen = [p for p in block.parameters() if p.requires_grad and all(p is not r for r in range_params)]
        for p in frozen:
            p.requires_grad_(False)
        _train(block, soft, groups, x_q, x_fp, y_fp, iters=iters, batch_size=batch_size, qdrop=qdrop,
               round_weight=round_weight, generator=generator)
        done = True
    finally:
        for p in frozen:
            p.requires_grad_(True)
        with torch.no_grad():
            for wq, codes, scale, zero_point in saved:
                v = wq.__dict__.pop("soft_rounding", None)
                base = wq.__dict__.pop("soft_rounding_base", None)
                if done:
                    codes = ops.soft_rounding_codes(wq.weight, wq.weight_scale, wq.weight_zero_point, wq.w_bits, v,
                                                    base)
                    wq.set_weight_codes(codes, wq.weight_scale.clone(), wq.weight_zero_point.clone())
                else:  # a failed block keeps the weights it had
                    wq.weight_int = codes
                    wq.weight_scale.copy_(scale)
                    wq.weight_zero_point.copy_(zero_point)
        for q, ranges in saved_ranges:
            q.learn_ranges(False)
            if not done:  # and the ranges it had
                for r, value in ranges.items():
                    getattr(q, r).copy_(value)


def _train(block, soft, groups, x_q, x_fp, y_fp, *, iters, batch_size, qdrop, round_weight, generator) -> None:
    with torch.enable_grad():
        optimizer = torch.optim.Adam(groups)
        warmup = int(0.2 * iters)
        n = x_q.shape[0]
        for step in range(iters):
            idx = torch.randperm(n, generator=generator)[:batch_size].to(x_q.device)
            x = x_q[idx]
            if qdrop > 0:
                keep_fp = torch.rand(x.shape, generator=generator).to(x.device) < qdrop
                x = torch.where(keep_fp, x_fp[idx], x)
            loss = torch.nn.functional.mse_loss(block(x), y_fp[idx])
            if step >= warmup and soft and round_weight > 0:
                t = (step - warmup) / max(1, iters - warmup)
                beta = 20.0 + (2.0 - 20.0) * t
                loss = loss + round_weight * sum(ops.rounding_regularizer(v, beta) for v in soft) / sum(
                    v.numel() for v in soft)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
