"""Measuring what a quantized model keeps: features, linear probe, fidelity and per-site SQNR.

* :func:`probe_features`: the usual frozen-backbone probe feature of a ViT, CLS token
  concatenated with the mean patch token (after the final norm).
* :func:`extract_features`: run a feature function over many inputs in batches (progress bar).
* :class:`LinearProbe`: multinomial logistic regression on standardized features (L-BFGS,
  deterministic), fit once on full-precision features and reused for every quantized backbone.
* :func:`fidelity`: mean per-sample cosine and SQNR of quantized features against FP features.
* :class:`SiteSQNR`: hooks that measure the local error of every quantized site: a quantized
  Linear's output against the float Linear on the same input, and each attention quantizer's
  output against its input.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .._inputs import model_device
from ..modules import QuantConv2d, QuantLinear, _Quantizer
from ..ops.metrics import sqnr_db

__all__ = ["probe_features", "extract_features", "LinearProbe", "fidelity", "SiteSQNR"]


def probe_features(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Frozen-backbone feature of a timm-style model: CLS ‖ mean patch token for token outputs
    [B, N, D] (ViT, DeiT, DINOv2), the spatial mean for [B, H, W, C] (Swin), the output itself for [B, D].
    ``x`` is moved to the model's device."""
    x = x.to(model_device(model))
    out = model.forward_features(x) if hasattr(model, "forward_features") else model(x)
    if out.ndim == 3:
        prefix = int(getattr(model, "num_prefix_tokens", 1))
        if prefix == 0:
            return out.mean(dim=1)
        return torch.cat([out[:, 0], out[:, prefix:].mean(dim=1)], dim=1)
    if out.ndim == 4:
        return out.mean(dim=(1, 2))
    return out


class ForwardFeatures(nn.Module):
    """``model`` with ``forward_features`` as its ``forward`` (and its ``num_prefix_tokens``), for frameworks
    whose quantization runs only through ``forward``: NNCF 3.x wraps the instance's ``forward`` alone, so
    calling ``forward_features`` on an NNCF-quantized model skips every quantizer (and, after SmoothQuant,
    feeds unscaled inputs to scaled weights: garbage features). :func:`probe_features` calls it as ``model(x)``."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.num_prefix_tokens = int(getattr(model, "num_prefix_tokens", 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.forward_features(x)


@torch.no_grad()
def extract_features(
    fn: Callable[[torch.Tensor], torch.Tensor],
    inputs: torch.Tensor,
    *,
    batch_size: int = 50,
    transform: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
    progress: bool = True,
    desc: str = "features",
) -> torch.Tensor:
    """``fn`` applied to ``inputs`` in batches (after ``transform`` per batch); results concatenated on the CPU."""
    from tqdm.auto import tqdm

    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    out = []
    for start in tqdm(range(0, len(inputs), batch_size), desc=desc, unit="batch", disable=not progress):
        batch = inputs[start:start + batch_size]
        if transform is not None:
            batch = transform(batch)
        out.append(fn(batch).float().cpu())
    if not out:
        raise ValueError("no inputs to extract features from")
    return torch.cat(out)


class LinearProbe:
    """Multinomial logistic regression (softmax + L2) on standardized features, fit by L-BFGS."""

    def __init__(self, weight_decay: float = 1e-3, max_iter: int = 500) -> None:
        if weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
        self.weight_decay = weight_decay
        self.max_iter = max_iter
        self.mean = self.std = self.linear = None

    def fit(self, features: torch.Tensor, labels: torch.Tensor) -> "LinearProbe":
        if features.ndim != 2 or labels.shape != features.shape[:1]:
            raise ValueError(f"features must be [N, D] and labels [N]; got {tuple(features.shape)}, {tuple(labels.shape)}")
        x = features.double()
        self.mean = x.mean(0)
        self.std = x.std(0).clamp_min(1e-6)
        x = (x - self.mean) / self.std
        num_classes = int(labels.max()) + 1
        self.linear = nn.Linear(x.shape[1], num_classes, dtype=torch.float64)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)
        opt = torch.optim.LBFGS(
            self.linear.parameters(), lr=1.0, max_iter=self.max_iter, history_size=20,
            tolerance_grad=1e-7, tolerance_change=1e-10, line_search_fn="strong_wolfe",
        )

        def closure():
            opt.zero_grad()
            loss = F.cross_entropy(self.linear(x), labels) + 0.5 * self.weight_decay * self.linear.weight.pow(2).sum()
            loss.backward()
            return loss

        with torch.enable_grad():
            opt.step(closure)
        return self

    @torch.no_grad()
    def logits(self, features: torch.Tensor) -> torch.Tensor:
        """Class logits [N, K] (float64) of features [N, D]: the probe as a task head."""
        if self.linear is None:
            raise RuntimeError("LinearProbe used before fit")
        return self.linear((features.detach().to("cpu", torch.float64) - self.mean) / self.std)

    def predict(self, features: torch.Tensor) -> torch.Tensor:
        return self.logits(features).argmax(1)

    def accuracy(self, features: torch.Tensor, labels: torch.Tensor) -> float:
        """Top-1 accuracy in percent."""
        return 100.0 * float((self.predict(features) == labels).double().mean())


def fidelity(ref: torch.Tensor, out: torch.Tensor) -> dict[str, float]:
    """Mean per-sample cosine similarity and SQNR (dB) of ``out`` against ``ref`` (both [N, ...])."""
    if ref.shape != out.shape:
        raise ValueError(f"shapes differ: reference {tuple(ref.shape)} vs quantized {tuple(out.shape)}")
    cos = F.cosine_similarity(ref.flatten(1).double(), out.flatten(1).double(), dim=1).mean()
    return {"cosine": float(cos), "sqnr_db": sqnr_db(ref, out)}


class SiteSQNR:
    """Context manager recording the local SQNR (dB) of every quantized site of a converted model.

        with SiteSQNR(qmodel) as rec:
            qmodel(x)
        rec.results()   # {"blocks.0.attn.qkv": 31.2, "blocks.0.attn.softmax_quantizer": 24.5, ...}

    A QuantLinear / QuantConv2d site compares its output with the float layer applied to the
    same (unquantized) input, so input and weight quantization both count; an attention
    quantizer (Q, K, V, softmax) compares its output with its input. Signal and noise powers are
    summed over all batches seen.
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self._power: dict[str, list[float]] = {}
        self._handles = []

    def _add(self, site: str, ref: torch.Tensor, out: torch.Tensor) -> None:
        ref, out = ref.detach().double(), out.detach().double()
        acc = self._power.setdefault(site, [0.0, 0.0])
        acc[0] += float(ref.pow(2).sum())
        acc[1] += float((ref - out).pow(2).sum())

    def __enter__(self) -> "SiteSQNR":
        layer_inputs = {id(m.input_quantizer) for m in self.model.modules()
                        if isinstance(m, (QuantLinear, QuantConv2d)) and m.input_quantizer is not None}
        for name, module in self.model.named_modules():
            if isinstance(module, QuantLinear):
                self._handles.append(module.register_forward_hook(self._linear_hook(name)))
            elif isinstance(module, QuantConv2d):
                self._handles.append(module.register_forward_hook(self._conv_hook(name)))
            elif isinstance(module, _Quantizer) and id(module) not in layer_inputs:
                self._handles.append(module.register_forward_hook(self._quantizer_hook(name)))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _linear_hook(self, site: str):
        def hook(module, inputs, output):
            self._add(site, F.linear(inputs[0], module.weight, module.bias), output)
        return hook

    def _conv_hook(self, site: str):
        def hook(module, inputs, output):
            ref = F.conv2d(inputs[0], module.weight, module.bias, module.stride, module.padding, module.dilation,
                           module.groups)
            self._add(site, ref, output)
        return hook

    def _quantizer_hook(self, site: str):
        def hook(module, inputs, output):
            if module.observing:
                return
            self._add(site, inputs[0], output)
        return hook

    def results(self) -> dict[str, float]:
        """Site -> SQNR in dB (inf when a site's output was exact)."""
        out = {}
        for site, (signal, noise) in self._power.items():
            out[site] = float("inf") if noise == 0 else float(10 * torch.log10(torch.tensor(signal / noise)))
        return out

    @staticmethod
    def worst(results: dict[str, float], k: int = 5) -> list[tuple[str, float]]:
        """The ``k`` sites with the lowest SQNR."""
        return sorted(results.items(), key=lambda kv: kv[1])[:k]

