"""Sensitivity psi(g, l) of the model output to quantizing one site with g groups (paper Eq. 9).

psi(g, l) = mean over calibration instances of D(out_FP, out_{l,g}), where out_{l,g} is the
output with only site l's activations quantized, with g groups fitted on the calibration
statistics, and every other site (weights included) in float. D is:

* ``"kl"``: KL(softmax(out_FP) || softmax(out_{l,g})) over the last dim: for classifiers, or for a
  backbone through a task ``head`` (any callable features -> logits);
* ``"mse"``: ||out_{l,g} - out_FP||^2 / ||out_FP||^2 per instance: a feature distance for a
  backbone without a head.

Speed: the FP outputs of every transformer block are cached once; perturbing a site in block i
replays blocks < i from the cache (their modules are swapped for replay stubs) and recomputes
only block i onward. Blocks are the longest ``nn.ModuleList`` / ``nn.Sequential`` whose children
hold quantizers (timm ``blocks``, HF ``encoder.layer``); a model without one runs whole.
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..config import SENSITIVITY_METRICS as METRICS
from ..modules import fake_quant_disabled, set_input_error_weights
from ..registry import sites

__all__ = ["METRICS", "output_distance", "find_blocks", "site_sensitivity"]

def _output_tensor(out: Any) -> torch.Tensor:
    """The tensor a metric compares: a tensor, HF ``logits`` / ``pooler_output``, or a tuple's first item."""
    if isinstance(out, torch.Tensor):
        return out
    for key in ("logits", "pooler_output", "last_hidden_state"):
        value = getattr(out, key, None)
        if isinstance(value, torch.Tensor):
            return value
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    raise TypeError(f"cannot compare model outputs of type {type(out).__name__}: give output_fn returning a Tensor")


def output_distance(reference: torch.Tensor, output: torch.Tensor, metric: str) -> torch.Tensor:
    """Per-instance distance [B] between a reference output and a perturbed one (see module docstring)."""
    ref, out = reference.flatten(1).double(), output.flatten(1).double()
    if metric == "kl":
        log_p = F.log_softmax(ref, dim=1)
        return (log_p.exp() * (log_p - F.log_softmax(out, dim=1))).sum(1).clamp_min(0)
    if metric == "mse":
        return (out - ref).pow(2).sum(1) / ref.pow(2).sum(1).clamp_min(1e-30)
    raise ValueError(f"sensitivity metric must be one of {METRICS}, got {metric!r}")


def find_blocks(model: nn.Module) -> Optional[tuple[str, nn.Module]]:
    """(name, container) of the model's sequence of transformer blocks (each holding a registered site), or None."""
    quantizers = {id(s.quantizer) for s in sites(model)}

    def has_site(module: nn.Module) -> bool:
        return any(id(m) in quantizers for m in module.modules())

    best = None
    for name, module in model.named_modules():
        if isinstance(module, (nn.ModuleList, nn.Sequential)) and len(module) >= 2:
            if all(has_site(child) for child in module):
                if best is None or len(module) > len(best[1]):
                    best = (name, module)
    return best


class _Replay(nn.Module):
    """Stands in for block j: returns its cached FP output for the current batch."""

    def __init__(self, cache: list, state: dict) -> None:
        super().__init__()
        self.cache, self.state = cache, state

    def forward(self, *args, **kwargs):
        return self.cache[self.state["batch"]]


def _detached_copy(out: Any) -> Any:
    if isinstance(out, torch.Tensor):
        return out.detach().clone()
    if isinstance(out, tuple) and not hasattr(out, "_fields"):
        return tuple(_detached_copy(o) for o in out)
    return out


def _call(model: nn.Module, inputs: Any) -> Any:
    return model(**inputs) if isinstance(inputs, dict) else model(inputs)


@contextlib.contextmanager
def _only_site(quantizer, ranges):
    """Enable one quantizer with the given ranges; restore its state (observer, buffers, calibration flag) afterwards."""
    saved = (quantizer.observer, {k: v.clone() for k, v in quantizer._buffers.items()}, quantizer.fake_quant_enabled,
             quantizer.is_calibrated)
    quantizer.observer = None
    if isinstance(ranges, tuple):
        quantizer.load_ranges(*ranges)  # (lo, hi) of a channel site
    else:
        quantizer.load_ranges(ranges)  # u_g of a softmax site
    quantizer.fake_quant_enabled = True
    try:
        yield
    finally:
        quantizer.fake_quant_enabled = saved[2]
        quantizer.observer = saved[0]
        for k, v in saved[1].items():
            quantizer._buffers[k] = v
        quantizer.is_calibrated = saved[3]


@torch.no_grad()
def site_sensitivity(
    prepared: nn.Module,
    inputs: Sequence[Any],
    sites: dict[str, nn.Module],
    candidates: dict[str, Sequence[int]],
    *,
    metric: str = "kl",
    head: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
    output_fn: Optional[Callable[[nn.Module, Any], Any]] = None,
    progress: bool = True,
) -> dict[str, list[float]]:
    """psi[site][k] for ``candidates[site][k]`` groups, on a calibrated (still observing) prepared model.

    ``inputs``: model inputs (batches); ``sites``: name -> quantizer (ActQuantizer "igq" or
    SoftmaxQuantizer) whose observers hold the calibration statistics; ``output_fn(model, x)``:
    what to compare (default: the model output); ``head``: applied to that before the metric.
    The prepared model is left as it was (but for the "mse" rule's error weights, which convert sets
    the same way).
    """
    set_input_error_weights(prepared)
    from tqdm.auto import tqdm

    if metric not in METRICS:
        raise ValueError(f"sensitivity metric must be one of {METRICS}, got {metric!r}")
    if not inputs:
        raise ValueError("sensitivity needs at least one calibration batch")
    for name, q in sites.items():
        if q.observer is None or q.observer.num_instances == 0:
            raise ValueError(
                f"site '{name}' has no calibration statistics: run igq.calibrate first, and measure before "
                "igq.convert (which drops them)"
            )

    def evaluate(x):
        out = _output_tensor(_call(prepared, x) if output_fn is None else output_fn(prepared, x))
        return head(out) if head is not None else out

    blocks = find_blocks(prepared)
    block_of = {}
    if blocks is not None:
        for j, child in enumerate(blocks[1]):
            for m in child.modules():
                block_of[id(m)] = j
    container = blocks[1] if blocks is not None else None
    caches: list[list] = [[] for _ in range(len(container))] if container is not None else []
    references = []
    handles = []

    def keep(j):
        def hook(module, args, out):
            caches[j].append(_detached_copy(out))  # a copy: a later block may modify its input in place
        return hook

    with contextlib.ExitStack() as stack:
        stack.enter_context(fake_quant_disabled(prepared))
        stack.callback(lambda: [h.remove() for h in handles])
        if container is not None:
            for j in range(len(container) - 1):  # the last block is never replayed
                handles.append(container[j].register_forward_hook(keep(j)))
        for x in inputs:
            references.append(evaluate(x))
        for h in handles:
            h.remove()
        handles = []
        if container is not None and any(len(c) != len(inputs) for c in caches[:-1]):
            # A block ran zero or several times per forward: replay would misalign, so run models whole.
            container, caches, block_of = None, [], {}

        state = {"batch": 0}
        fits_total = sum(len(c) for c in candidates.values())
        psi: dict[str, list[float]] = {}
        bar = tqdm(total=fits_total, desc="igq sensitivity", unit="eval", disable=not progress)
        for name, quantizer in sites.items():
            start = block_of.get(id(quantizer), 0)
            originals = [container[j] for j in range(start)] if container is not None else []
            for j in range(start):
                container[j] = _Replay(caches[j], state)
            try:
                values = []
                for g in candidates[name]:
                    ranges = quantizer.fit_ranges(g)
                    total, count = 0.0, 0
                    with _only_site(quantizer, ranges):
                        for b, x in enumerate(inputs):
                            state["batch"] = b
                            d = output_distance(references[b], evaluate(x), metric)
                            total += float(d.sum())
                            count += d.numel()
                    values.append(total / count)
                    bar.update(1)
                psi[name] = values
            finally:
                for j, original in enumerate(originals):
                    container[j] = original
        bar.close()
    return psi
