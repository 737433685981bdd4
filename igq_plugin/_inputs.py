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
