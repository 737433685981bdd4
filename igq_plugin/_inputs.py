"""Calibration-input handling shared by quantize and allocation: items, devices, validation."""
from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn


def model_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def to_device(obj: Any, device: torch.device) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, Mapping):
        return {k: to_device(v, device) for k, v in obj.items()}
    return obj


def run_model(model: nn.Module, inputs: Any) -> Any:
    """``model(**inputs)`` for a dict of keyword arguments, else ``model(inputs)`` (inputs moved to the model's device)."""
    inputs = to_device(inputs, model_device(model))
    return model(**inputs) if isinstance(inputs, Mapping) else model(inputs)


def model_input(batch: Any, index: int) -> Any:
    """The model input of one calibration item: a tensor, (input, label, ...) or a dict of kwargs."""
    if isinstance(batch, torch.Tensor):
        return batch
    if isinstance(batch, Mapping):
        return dict(batch)
    if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], (torch.Tensor, Mapping)):
        first = batch[0]
        later = [t for t in batch[1:] if isinstance(t, torch.Tensor)]
        if (isinstance(first, torch.Tensor) and not first.is_floating_point() and first.dim() <= 1
                and any(t.is_floating_point() and t.dim() > first.dim() for t in later)):
            raise TypeError(
                f"calibration item {index} looks like (label, image): its first element is an integer tensor of "
                f"shape {tuple(first.shape)} and a later one a float tensor; give (image, label) pairs"
            )
        return first
    raise TypeError(
        f"calibration item {index} is a {type(batch).__name__}; expected a Tensor, an (input, label) "
        "tuple/list whose first element is a Tensor, or a dict of model keyword arguments"
    )


def check_calibration_data(data: Any) -> None:
    """TypeError unless ``data`` is a Tensor (one batch) or an iterable of batches."""
    if isinstance(data, torch.Tensor):
        return
    if data is None or isinstance(data, (str, bytes, Mapping)) or not isinstance(data, Iterable):
        raise TypeError(
            f"calibration_data must be a Tensor batch, an iterable of Tensors or (input, label) tuples, or a "
            f"DataLoader; got {type(data).__name__}"
        )


def concat_inputs(calibration_data: Any) -> Any:
    """All calibration items as one model input: Tensors concatenated on dim 0, dicts key by key.

    In dicts, tensors with a batch dimension are concatenated; other values must agree across items.
    """
    check_calibration_data(calibration_data)
    if isinstance(calibration_data, torch.Tensor):
        return calibration_data
    items = [model_input(batch, index) for index, batch in enumerate(calibration_data)]
    if not items:
        raise ValueError("calibration_data is empty: give at least one batch")
    first = items[0]
    if isinstance(first, torch.Tensor):
        if not all(isinstance(item, torch.Tensor) for item in items):
            raise TypeError("calibration items mix Tensors and dicts; give one kind")
        return torch.cat(items, 0)
    if not all(isinstance(item, Mapping) and item.keys() == first.keys() for item in items):
        raise TypeError("calibration dicts must all have the same keys")
    merged = {}
    for key, value in first.items():
        values = [item[key] for item in items]
        if isinstance(value, torch.Tensor) and value.dim() > 0:
            merged[key] = torch.cat(values, 0)
        elif all(v is value or v == value for v in values):
            merged[key] = value
        else:
            raise ValueError(f"calibration input {key!r} is not a batched tensor and differs between items")
    return merged


def model_dtype(model: nn.Module) -> torch.dtype | None:
    """The dtype of the model's first floating-point parameter (None without one)."""
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return None


def check_batch(inputs: Any, index: int, dtype: torch.dtype | None, first_shape: tuple | None) -> tuple | None:
    """Check one calibration batch before it runs; returns its per-instance shape (tensor inputs).

    A tensor batch must be floating point of the model's dtype, and every batch must have the
    first batch's per-instance shape (later flows, GPTQ rounding and allocation, concatenate them).
    """
    if not isinstance(inputs, torch.Tensor):
        return first_shape
    if not inputs.is_floating_point():
        raise TypeError(
            f"calibration batch {index} is a {inputs.dtype} tensor; the model takes floating-point inputs: "
            "convert (and normalize) the images as for inference, e.g. batch.float() / 255 then the model's transform"
        )
    if dtype is not None and inputs.dtype != dtype:
        raise TypeError(
            f"calibration batch {index} has dtype {inputs.dtype} but the model's parameters are {dtype}: "
            f"give batch.to({dtype}) (or convert the model)"
        )
    if inputs.dim() == 0:
        raise ValueError(f"calibration batch {index} is a 0-d tensor; give a batch [B, ...] of model inputs")
    shape = tuple(inputs.shape[1:])
    if first_shape is not None and shape != first_shape:
        raise ValueError(
            f"calibration batch {index} has per-instance shape {shape} but batch 0 has {first_shape}: resize every "
            "calibration image to one size (as the model's transform does)"
        )
    return shape
