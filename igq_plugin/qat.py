"""Variation-aware quantization-aware training (Huang et al., 2023) of a quantized model.

    qmodel = igq.quantize(model, igq.IGQConfig(weight_bits=2, act_bits=2), calibration_data)
    student = igq.qat.train(qmodel, images, steps=1000, checkpoint="qat.pt")   # a trained copy

Starting from a calibrated model (``igq.quantize``, every site's ranges fitted), every step takes
``batch_size`` images, ``crops`` random resized crops of each (multi-crop: area ``crop_scale`` of the
image, random horizontal flip, resized back to the input size), and trains the student to match the
float teacher on every crop:

* loss: ``distillation_loss(student(crops), teacher(crops))`` (``ops.distillation_loss``: "kl" on
  logits, "mse" / "cosine" on features) plus ``oscillation_weight`` times the mean over quantized
  layers of the oscillation-aware bin regularizer of their latent weights (``ops.bin_regularizer``);
* learned: every float parameter of the model (latent weights, biases, norms, embeddings; Adam,
  ``lr``), the per-channel weight step sizes (LSQ, ``scale_lr``, in log units: a relative change per step,
  so 8-bit and 2-bit layers share one rate; ``learn_weight_scales``) and the
  activation group ranges and post-softmax row maxima (``range_lr``, default by bits: 3e-2 when an
  activation site has <= 3 bits, else 1e-2; ``learn_ranges``), with a cosine
  decay of all three rates to 0 over ``steps``. The IGQ assignment stays Eq. 5 on the current ranges;
  group counts and bits do not change (module-dependent bit widths: ``IGQConfig.module_bits``);
* teacher: ``teacher`` (a float model taking the same inputs) or, by default, ``qmodel`` itself with
  fake quantization off: its float weights (rounded layers: their float weights, not the codes).

``train`` returns a trained copy; ``qmodel`` is left as it was (``inplace=True`` trains it instead and
then keeps a float copy as teacher). The model runs in eval mode (no dropout; the quantizers have no
train-mode behaviour), so a run is deterministic on the CPU for a given ``seed``. ``checkpoint``: a file
written every ``checkpoint_every`` steps and at the end (student state, optimizer state, random
generator, step, the run's settings); ``resume=True`` continues from it (or starts at step 0 while the
file does not exist yet, so a preemptible job can always pass it) and reproduces the run that was not
interrupted; settings or a starting model that differ are refused. Layers whose codes came from GPTQ or block
reconstruction start from those codes (``learn_weight_scale`` writes them back as latent weights).
Tested with models from ``igq.quantize`` (timm ViTs); the quantizers learned are those ``igq.sites``
finds, so other adapters' models train the same way but are not tested here.
"""
from __future__ import annotations

import copy
import logging
import math
import os
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

from . import ops
from ._inputs import concat_inputs, model_device, to_device
from ._io import atomic_write, check_output_path
from .modules import ActQuantizer, SoftmaxQuantizer, _QuantWeightMixin, fake_quant_disabled
from .registry import sites

__all__ = ["train", "multi_crop", "model_outputs", "fingerprint", "default_range_lr", "QAT_CHECKPOINT_VERSION",
           "SCALE_LR"]

logger = logging.getLogger("igq_plugin")

QAT_CHECKPOINT_VERSION = 2  # 2: step sizes learned in log units (_UnitAdam state)
SCALE_LR = 3e-3  # weight step sizes: relative change per step (Adam on log step size; _UnitAdam)


def multi_crop(x: torch.Tensor, crops: int, *, scale: Sequence[float] = (0.35, 1.0), ratio: Sequence[float] = (3 / 4, 4 / 3),
               flip: bool = True, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """``crops`` random resized crops of every image in x [B, C, H, W], as [crops * B, C, H, W] (crop-major:
    rows ``k * B + i`` are crop k of image i). Each crop covers a random fraction ``scale`` of the image
    area at an aspect ratio in ``ratio`` (log-uniform), is resized back to H x W (bilinear) and, with
    ``flip``, mirrored with probability 1/2. Random numbers come from ``generator`` (on the CPU)."""
    if x.dim() != 4:
        raise ValueError(f"multi_crop takes image batches [B, C, H, W], got shape {tuple(x.shape)}")
    if not 0 < scale[0] <= scale[1] <= 1:
        raise ValueError(f"crop scale must satisfy 0 < min <= max <= 1, got {tuple(scale)}")
    b, _, h, w = x.shape
    n = crops * b
    area = torch.empty(n).uniform_(scale[0], scale[1], generator=generator) * h * w
    log_r = torch.empty(n).uniform_(math.log(ratio[0]), math.log(ratio[1]), generator=generator)
    aspect = torch.exp(log_r)
    ch = torch.sqrt(area / aspect).round().clamp(1, h).long()
    cw = torch.sqrt(area * aspect).round().clamp(1, w).long()
    top = (torch.rand(n, generator=generator) * (h - ch + 1).float()).floor().long()
    left = (torch.rand(n, generator=generator) * (w - cw + 1).float()).floor().long()
    mirror = torch.rand(n, generator=generator) < 0.5 if flip else torch.zeros(n, dtype=torch.bool)
    out = []
    for k in range(n):
        i = k % b
        t, l_, hh, ww = int(top[k]), int(left[k]), int(ch[k]), int(cw[k])
        view = x[i:i + 1, :, t:t + hh, l_:l_ + ww]
        view = F.interpolate(view, size=(h, w), mode="bilinear", align_corners=False)
        out.append(view.flip(-1) if bool(mirror[k]) else view)
    return torch.cat(out)


def model_outputs(output: Any) -> torch.Tensor:
    """The tensor to distil from a model's output: a Tensor, ``.logits`` (transformers) or ``["logits"]``."""
    if isinstance(output, torch.Tensor):
        return output
    logits = getattr(output, "logits", None)
    if logits is None and isinstance(output, dict):
        logits = output.get("logits")
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"cannot distil a model output of type {type(output).__name__}: the model must return a "
                        "Tensor or an object with .logits")
    return logits


def _settings(**kwargs) -> dict:
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in kwargs.items()}


def _check(qmodel: nn.Module, settings: dict) -> None:
    if not sites(qmodel):
        raise ValueError("the model has no quantization sites: quantize it (igq.quantize) before QAT")
    if any(getattr(s.quantizer, "observing", False) for s in sites(qmodel)):
        raise ValueError("the model is still calibrating (quantizers observing): convert it first")
    ints = {"steps": 1, "batch_size": 1, "crops": 1, "checkpoint_every": 1}
    for name, minimum in ints.items():
        value = settings[name]
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise ValueError(f"qat.train: {name} must be an int >= {minimum}, got {value!r}")
    for name in ("lr", "scale_lr", "range_lr", "oscillation_weight"):
        value = settings[name]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < float("inf"):
            raise ValueError(f"qat.train: {name} must be a number >= 0, got {value!r}")
    if settings["distill"] not in ops.DISTILLATION_LOSSES:
        raise ValueError(f"qat.train: distill must be one of {ops.DISTILLATION_LOSSES}, got {settings['distill']!r}")
    if not settings["temperature"] > 0:
        raise ValueError(f"qat.train: temperature must be > 0, got {settings['temperature']!r}")
    lo, hi = settings["crop_scale"]
    if not 0 < lo <= hi <= 1:
        raise ValueError(f"qat.train: crop_scale must satisfy 0 < min <= max <= 1, got {settings['crop_scale']!r}")


def _weight_quantizers(model: nn.Module) -> list:
    found = {}
    for site in sites(model):
        wq = site.weight_quantizer
        if (isinstance(wq, _QuantWeightMixin) and wq.weight_fake_quant_enabled and wq.weight_is_calibrated):
            found.setdefault(id(wq), wq)
    return list(found.values())


def _range_quantizers(model: nn.Module) -> list:
    found = {}
    for site in sites(model):
        q = site.quantizer
        if isinstance(q, (ActQuantizer, SoftmaxQuantizer)) and q.is_calibrated and q.fake_quant_enabled:
            found.setdefault(id(q), q)
    return list(found.values())


def train(
    qmodel: nn.Module,
    data: Any,
    *,
    teacher: Optional[nn.Module] = None,
    steps: int = 500,
    batch_size: int = 32,
    crops: int = 4,
    crop_scale: Sequence[float] = (0.35, 1.0),
    lr: float = 1e-4,
    scale_lr: float = SCALE_LR,
    range_lr: Optional[float] = None,
    learn_weight_scales: bool = True,
    learn_ranges: bool = True,
    distill: str = "kl",
    temperature: float = 1.0,
    oscillation_weight: float = 1e-3,
    checkpoint: Optional[Union[str, os.PathLike]] = None,
    checkpoint_every: int = 100,
    resume: bool = False,
    inplace: bool = False,
    seed: int = 0,
    progress: bool = True,
) -> nn.Module:
    """Variation-aware QAT of a quantized model (module docstring); returns the trained model.

    data: training images, a Tensor [N, C, H, W] or a list of Tensors (labels are not used: the teacher
    labels every crop). steps: optimizer steps, each on ``batch_size`` images x ``crops`` crops.
    """
    if range_lr is None:
        range_lr = default_range_lr(qmodel)
    settings = _settings(steps=steps, batch_size=batch_size, crops=crops, crop_scale=tuple(crop_scale), lr=lr,
                         scale_lr=scale_lr, range_lr=range_lr, learn_weight_scales=learn_weight_scales,
                         learn_ranges=learn_ranges, distill=distill, temperature=temperature,
                         oscillation_weight=oscillation_weight, checkpoint_every=checkpoint_every, seed=seed)
    _check(qmodel, settings)
    if resume and checkpoint is None:
        raise ValueError("resume=True needs checkpoint= (the file to resume from)")
    if checkpoint is not None:
        check_output_path(checkpoint)
    inputs = concat_inputs(data)
    if not isinstance(inputs, torch.Tensor) or inputs.dim() != 4:
        raise TypeError("qat.train takes image tensors [N, C, H, W] (a Tensor or a list of Tensors)")
    device = model_device(qmodel)
    inputs = to_device(inputs, device)

    state, start = None, fingerprint(qmodel)
    if resume and Path(checkpoint).exists():
        state = torch.load(checkpoint, map_location=device, weights_only=False)
        _check_resume(state, settings, checkpoint, start)

    if inplace:
        student = qmodel
        if teacher is None:
            teacher = copy.deepcopy(qmodel)
            teacher_ctx_model = teacher
        else:
            teacher_ctx_model = None
    else:
        student = copy.deepcopy(qmodel)
        teacher_ctx_model = qmodel if teacher is None else None
        teacher = qmodel if teacher is None else teacher
    was_training = (student.training, teacher.training)
    student.eval()
    teacher.eval()

    weights = _weight_quantizers(student)
    range_quantizers = _range_quantizers(student) if learn_ranges else []
    try:
        for wq in weights:
            if learn_weight_scales:
                wq.learn_weight_scale(True)
            elif wq.weight_rounded:  # latent weights must carry the rounded codes
                with torch.no_grad():
                    wq.weight.copy_(wq.quantized_weight())
                wq.weight_int = wq.weight_int.new_empty(0)
        for q in range_quantizers:
            q.learn_ranges(True)
        optimizer = _optimizer(student, weights, range_quantizers, settings)
        generator = torch.Generator().manual_seed(seed)
        if state is not None:
            student.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            generator.set_state(state["generator"])
        step = int(state["step"]) if state is not None else 0
        save = None if checkpoint is None else (
            lambda done: _save(checkpoint, student, optimizer, generator, done, settings, start))
        _loop(student, teacher, teacher_ctx_model, weights, optimizer, generator, inputs, settings, step, save,
              progress)
    finally:
        for wq in weights:
            wq.learn_weight_scale(False)
        for q in range_quantizers:
            q.learn_ranges(False)
        student.train(was_training[0])
        teacher.train(was_training[1])
    return student


class _UnitAdam(torch.optim.Adam):
    """torch's Adam with a per-group ``unit``: "abs" (plain Adam: each step moves a parameter by about ``lr``) or
    "log" (positive parameters, Adam on log p: each step changes p by a factor of about exp(+-lr), so one rate
    fits step sizes of any magnitude, e.g. an 8-bit patch embedding's 2e-4 next to a 4-bit MLP's 2e-2, and a
    step size never crosses 0). A log group is stepped as log p with gradient p * dL/dp, then mapped back."""

    @torch.no_grad()
    def step(self, closure=None):
        logs = [p for g in self.param_groups if g.get("unit") == "log" for p in g["params"] if p.grad is not None]
        for p in logs:
            p.grad.mul_(p)  # d loss / d log p
            p.log_()
        try:
            return super().step(closure)
        finally:
            for p in logs:
                p.exp_()


def _optimizer(student: nn.Module, weights: list, range_quantizers: list, settings: dict) -> _UnitAdam:
    """The optimizer of train(): float parameters (latent weights included) and activation ranges in absolute
    units (``lr``, ``range_lr``), weight step sizes in log units (``scale_lr``)."""
    scale_params = [wq.weight_scale for wq in weights if settings["learn_weight_scales"]]
    range_params = [p for q in range_quantizers for p in q.parameters(recurse=False)]
    special = {id(p) for p in scale_params + range_params}
    float_params = [p for p in student.parameters() if id(p) not in special and p.is_floating_point()]
    for p in float_params + scale_params + range_params:
        p.requires_grad_(True)
    groups = [{"params": float_params, "lr": settings["lr"], "base_lr": settings["lr"], "unit": "abs"},
              {"params": scale_params, "lr": settings["scale_lr"], "base_lr": settings["scale_lr"], "unit": "log"},
              {"params": range_params, "lr": settings["range_lr"], "base_lr": settings["range_lr"], "unit": "abs"}]
    return _UnitAdam([g for g in groups if g["params"]])


# Bit-aware default of the range learning rate: (max activation bits, lr), chosen on validation images by
# benchmarks/qat.py (Fashion-MNIST ViT: at W2A2 3e-2 gave 83.15 % against 79.80 % for 1e-2; W3A3 86.15 / 86.10;
# W4A4 86.75 / 86.95): 3e-2 when the model's narrowest activation site has <= 3 bits, else 1e-2.
RANGE_LRS = ((3, 3e-2),)
DEFAULT_RANGE_LR = 1e-2


def default_range_lr(qmodel: nn.Module) -> float:
    """``range_lr`` when train() is given None: by the narrowest activation site's bits (RANGE_LRS)."""
    bits = [q.bits for q in _range_quantizers(qmodel)]
    narrowest = min(bits) if bits else 8
    return next((lr for max_bits, lr in RANGE_LRS if narrowest <= max_bits), DEFAULT_RANGE_LR)


def fingerprint(model: nn.Module) -> list[float]:
    """[count, sum, sum of squares] of the model's floating-point state (parameters and buffers): a resumed
    run must start from the model the checkpointed run started from."""
    values = [t.detach().double() for t in model.state_dict().values() if t.is_floating_point()]
    return [float(sum(v.numel() for v in values)), float(sum(v.sum() for v in values)),
            float(sum((v * v).sum() for v in values))]


def _check_resume(state: Any, settings: dict, path, start: list[float]) -> None:
    if not isinstance(state, dict) or state.get("format") != "igq_qat" or "settings" not in state:
        raise ValueError(f"{path} is not an igq QAT checkpoint (written by igq_plugin.qat.train(checkpoint=...))")
    if state.get("version") != QAT_CHECKPOINT_VERSION:
        raise ValueError(f"{path}: QAT checkpoint version {state.get('version')} is not supported "
                         f"(this igq_plugin writes {QAT_CHECKPOINT_VERSION})")
    differ = {k: (state["settings"].get(k), v) for k, v in settings.items() if state["settings"].get(k) != v}
    if differ:
        detail = ", ".join(f"{k}: checkpoint {a!r}, now {b!r}" for k, (a, b) in differ.items())
        raise ValueError(f"cannot resume from {path}: the run's settings differ ({detail}); resume with the same "
                         "settings or start a new checkpoint")
    if not all(math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-9) for a, b in zip(state["start"], start)):
        raise ValueError(f"cannot resume from {path}: the model differs from the one that run started from (resume "
                         "with the quantized model training started from, e.g. igq.load of it, not a trained one)")


def _save(path, student, optimizer, generator, step: int, settings: dict, start: list[float]) -> None:
    state = {"format": "igq_qat", "version": QAT_CHECKPOINT_VERSION, "step": step, "settings": settings, "start": start,
             "model": student.state_dict(), "optimizer": optimizer.state_dict(), "generator": generator.get_state()}
    atomic_write(path, lambda tmp: torch.save(state, tmp))


def _loss(student, teacher, teacher_ctx_model, weights, views, settings) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        if teacher_ctx_model is not None:
            with fake_quant_disabled(teacher_ctx_model):
                target = model_outputs(teacher(views))
        else:
            target = model_outputs(teacher(views))
    out = model_outputs(student(views))
    distill = ops.distillation_loss(out, target, settings["distill"], settings["temperature"])
    reg = torch.zeros((), device=out.device)
    if settings["oscillation_weight"] > 0 and weights:
        reg = sum(ops.bin_regularizer(wq.weight, wq.weight_scale, wq.weight_zero_point, wq.w_bits)
                  for wq in weights) / len(weights)
    return distill, reg


def _loop(student, teacher, teacher_ctx_model, weights, optimizer, generator, inputs, settings, start, save,
          progress) -> None:
    from tqdm.auto import tqdm

    steps, n = settings["steps"], inputs.shape[0]
    bar = tqdm(total=steps, initial=start, desc="igq qat", unit="step", disable=not progress)
    with torch.enable_grad():
        for step in range(start, steps):
            factor = 0.5 * (1.0 + math.cos(math.pi * step / steps))
            for group in optimizer.param_groups:
                group["lr"] = group["base_lr"] * factor
            idx = torch.randperm(n, generator=generator)[:settings["batch_size"]].to(inputs.device)
            views = multi_crop(inputs[idx], settings["crops"], scale=settings["crop_scale"], generator=generator)
            distill, reg = _loss(student, teacher, teacher_ctx_model, weights, views, settings)
            loss = distill + settings["oscillation_weight"] * reg
            if not torch.isfinite(loss):
                raise FloatingPointError(f"qat.train: the loss is {loss.item()} at step {step}: lower lr / scale_lr / "
                                         "range_lr")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()  # step sizes stay positive: they are learned in log units
            bar.update(1)
            bar.set_postfix(distill=f"{distill.item():.4f}", reg=f"{reg.item():.3f}")
            done = step + 1
            if save is not None and (done % settings["checkpoint_every"] == 0 or done == steps):
                save(done)
    bar.close()
