"""Evaluation tasks shared by ``igq demo`` and ``benchmarks/accuracy.py``.

* :class:`ProbeTask`: Fashion-MNIST linear probe on frozen backbone features (DINOv2-S by
  default). The probe is fit once on full-precision features of ``num_train`` training images
  and scores every quantized backbone's features of ``num_test`` test images; fidelity is the
  feature cosine / SQNR against full precision. FP features of the built-in DINOv2-S are cached
  in the user cache directory.
* :class:`ClassifierTask`: top-1 of a classifier on Fashion-MNIST's test set (the project's
  from-scratch ViT); fidelity on the logits.
* :func:`site_report`: per-site local SQNR of a quantized model on a few inputs.
"""
from __future__ import annotations

import functools
from collections.abc import Callable, Iterable
from typing import Optional

import torch
from torch import nn

from .._inputs import run_model
from .data import IMAGENET_MEAN, IMAGENET_STD, fashion_mnist, gray_to_imagenet
from .evaluation import LinearProbe, SiteSQNR, extract_features, fidelity, probe_features
from .zoo import cache_dir, save_atomic

__all__ = ["ProbeTask", "ClassifierTask", "site_report"]


def _subset(num: int, total: int, seed: int) -> torch.Tensor:
    if not 1 <= num <= total:
        raise ValueError(f"asked for {num} images, the split has {total}")
    return torch.randperm(total, generator=torch.Generator().manual_seed(seed))[:num].sort().values


class ProbeTask:
    """Fashion-MNIST linear probe on a frozen backbone (see module docstring).

    ``cache_tag`` names the backbone for the FP-feature cache (None: no caching); training
    images are a seeded random subset of the 60k, test images the first ``num_test`` of the 10k.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        num_train: int = 2000,
        num_test: int = 2000,
        img_size: int = 224,
        mean: tuple[float, float, float] = IMAGENET_MEAN,
        std: tuple[float, float, float] = IMAGENET_STD,
        batch_size: int = 50,
        cache_tag: Optional[str] = None,
        progress: bool = True,
        seed: int = 0,
    ) -> None:
        self.img_size, self.batch_size, self.progress = img_size, batch_size, progress
        self.mean, self.std = tuple(mean), tuple(std)
        x_train, y_train = fashion_mnist("train")
        x_test, y_test = fashion_mnist("test")
        idx = _subset(num_train, len(x_train), seed)
        self.train_indices = idx  # into the 60k training split (held-out images are the others)
        self.train_images, self.train_labels = x_train[idx], y_train[idx]
        if not 1 <= num_test <= len(x_test):
            raise ValueError(f"num_test must be in [1, {len(x_test)}], got {num_test}")
        self.test_images, self.test_labels = x_test[:num_test], y_test[:num_test]
        cached = None
        if cache_tag is not None:
            cached = cache_dir() / f"probe_{cache_tag}_{img_size}px_train{num_train}_test{num_test}_seed{seed}.pt"
        if cached is not None and cached.is_file():
            feats = torch.load(cached, map_location="cpu", weights_only=True)
            self.train_features, self.test_features = feats["train"], feats["test"]
        else:
            self.train_features = self.features(model, self.train_images, "FP features (probe train)")
            self.test_features = self.features(model, self.test_images, "FP features (test)")
            if cached is not None:
                save_atomic({"train": self.train_features, "test": self.test_features}, cached)
        self.probe = LinearProbe().fit(self.train_features, self.train_labels)
        self.fp_top1 = self.probe.accuracy(self.test_features, self.test_labels)

    @property
    def transform(self) -> Callable[[torch.Tensor], torch.Tensor]:
        return functools.partial(gray_to_imagenet, size=self.img_size, mean=self.mean, std=self.std)

    def features(self, model: nn.Module, images: torch.Tensor, desc: str = "features") -> torch.Tensor:
        return extract_features(
            functools.partial(probe_features, model), images, batch_size=self.batch_size, transform=self.transform,
            progress=self.progress, desc=desc,
        )

    def evaluate(self, qmodel: nn.Module, desc: str = "quantized features") -> dict[str, float]:
        """{"top1", "cosine", "sqnr_db"} of a (quantized) backbone on the test images."""
        feats = self.features(qmodel, self.test_images, desc)
        return {"top1": self.probe.accuracy(feats, self.test_labels), **fidelity(self.test_features, feats)}

    def site_inputs(self, n: int = 8) -> torch.Tensor:
        return self.transform(self.test_images[:n])

    def allocation_kwargs(self) -> dict:
        """Keyword arguments of igq.allocation.allocate: KL through the probe on the probe's features."""
        return {"output_fn": probe_features, "head": self.probe.logits}


class ClassifierTask:
    """Top-1 of a classifier on a fixed labelled set; fidelity of the logits against FP.

    ``batches`` is called once per evaluation and yields model-ready input batches in the order
    of ``labels`` (a generator over a DataLoader works: nothing is held in memory but logits).
    """

    def __init__(self, model: nn.Module, batches: Callable[[], Iterable[torch.Tensor]], labels: torch.Tensor, *,
                 progress: bool = True) -> None:
        self.batches, self.labels, self.progress = batches, labels, progress
        self.fp_logits = self.logits(model, "FP logits")
        self.fp_top1 = self._top1(self.fp_logits)

    @classmethod
    def fashion_mnist(cls, model: nn.Module, transform: Callable[[torch.Tensor], torch.Tensor], *,
                      num_test: int = 10000, batch_size: int = 500, progress: bool = True) -> "ClassifierTask":
        """The Fashion-MNIST test set (first ``num_test`` images) through ``transform``."""
        x_test, y_test = fashion_mnist("test")
        if not 1 <= num_test <= len(x_test):
            raise ValueError(f"num_test must be in [1, {len(x_test)}], got {num_test}")
        images = x_test[:num_test]
        return cls(model, lambda: (transform(images[i:i + batch_size]) for i in range(0, num_test, batch_size)),
                   y_test[:num_test], progress=progress)

    @torch.no_grad()
    def logits(self, model: nn.Module, desc: str = "logits") -> torch.Tensor:
        from tqdm.auto import tqdm

        batches = tqdm(self.batches(), desc=desc, unit="batch", disable=not self.progress)
        out = [run_model(model, x).float().cpu() for x in batches]
        logits = torch.cat(out)
        if logits.shape[0] != self.labels.shape[0]:
            raise ValueError(f"{logits.shape[0]} logits for {self.labels.shape[0]} labels")
        return logits

    def _top1(self, logits: torch.Tensor) -> float:
        return 100.0 * float((logits.argmax(1) == self.labels).double().mean())

    def evaluate(self, qmodel: nn.Module, desc: str = "quantized logits") -> dict[str, float]:
        logits = self.logits(qmodel, desc)
        return {"top1": self._top1(logits), **fidelity(self.fp_logits, logits)}

    def site_inputs(self, n: int = 8) -> torch.Tensor:
        return next(iter(self.batches()))[:n]

    def allocation_kwargs(self) -> dict:
        """Keyword arguments of igq.allocation.allocate: KL of the classifier's own logits."""
        return {}


@torch.no_grad()
def site_report(qmodel: nn.Module, inputs: torch.Tensor) -> dict[str, float]:
    """Local SQNR (dB) of every quantized site of ``qmodel`` on ``inputs`` (see evaluation.SiteSQNR)."""
    with SiteSQNR(qmodel) as rec:
        run_model(qmodel, inputs)
    return rec.results()
