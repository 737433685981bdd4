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
        return batch[0]
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
