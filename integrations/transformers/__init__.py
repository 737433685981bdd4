"""IGQ for Hugging Face transformers: ``from_pretrained(..., quantization_config=IGQConfig(...))``.

    import igq_plugin.integrations.transformers as igq_hf   # registers quant_method "igq" with transformers
    from transformers import AutoModel

    model = AutoModel.from_pretrained(path, quantization_config=igq_hf.IGQConfig(
        weight_bits=4, act_bits=4, num_groups=8, calibration_dataset=images, processor=processor))
    model.save_pretrained(out)                # safetensors; config.json carries the igq config
    again = AutoModel.from_pretrained(out)    # rebuilt quantized (the plugin must be imported first)

* :class:`IGQConfig` is a transformers ``QuantizationConfigMixin`` whose fields are the core
  :class:`igq_plugin.IGQConfig`'s (read from its definition, validated by it) plus the Hugging Face
  loading options: ``calibration_dataset``, ``processor``, ``calibration_batch_size``,
  ``modules_to_not_convert``.
* :class:`IGQHfQuantizer` swaps the model's Linears for core ``QuantLinear``s before the weights load
  (``igq.prepare(..., inplace=True)``), gives every attention module that calls transformers'
  attention interface Q, K, V and softmax quantizers, and selects the ``"igq_eager"`` attention
  function (:func:`igq_eager_attention`, the core's quantized attention), so ViT, DeiT, Dinov2, Swin
  and BERT-family encoders share one code path. After loading it calibrates on
  ``calibration_dataset`` when given; otherwise the model is uncalibrated and its first forward
  raises an error naming :func:`calibrate`.
* A checkpoint saved by ``save_pretrained`` holds the quantizer state (ranges, weight quantizers,
  flags) next to the float weights; loading it rebuilds the quantized model without calibration.

Importing this module requires transformers (``pip install "igq_plugin[transformers]"``). The
registration is process-global: a process that loads an "igq" checkpoint without importing this
module gets a float model from transformers (it logs "Unknown quantization type"), so import it
before ``from_pretrained``.
"""
from __future__ import annotations

import copy
import dataclasses
import inspect
import logging
import re
import warnings
from collections.abc import Iterable
from typing import Any, Optional

import torch
from torch import nn

import igq_plugin as igq
from igq_plugin.attention import quantized_attention
from igq_plugin.quantize import matches

from .. import require

require("transformers", "transformers")  # a clear ImportError naming the extra when transformers is missing
from transformers import AttentionInterface  # noqa: E402
from transformers.masking_utils import AttentionMaskInterface, eager_mask  # noqa: E402
from transformers.quantizers import HfQuantizer, register_quantization_config, register_quantizer  # noqa: E402
from transformers.quantizers.base import get_keys_to_not_convert  # noqa: E402
from transformers.utils.quantization_config import QuantizationConfigMixin  # noqa: E402

logger = logging.getLogger("igq_plugin")

__all__ = ["IGQConfig", "IGQHfQuantizer", "igq_eager_attention", "calibrate", "QUANT_METHOD", "ATTENTION_NAME"]

QUANT_METHOD = "igq"
ATTENTION_NAME = "igq_eager"
CORE_FIELDS = tuple(f.name for f in dataclasses.fields(igq.IGQConfig))  # the core definition, not a copy
HF_FIELDS = ("calibration_dataset", "processor", "calibration_batch_size", "modules_to_not_convert")
_CALIBRATED_ATTR = "_igq_hf_calibrated"
# state-dict keys the quantizers add (regexes, as transformers' _keys_to_ignore_on_load_missing takes them)


class IGQConfig(QuantizationConfigMixin):
    """transformers quantization config of IGQ (``quant_method="igq"``).

    Every field of :class:`igq_plugin.IGQConfig` (same names, defaults and validation), plus:
        calibration_dataset: calibration data, run inside ``from_pretrained``: a list (or any
            iterable / ``datasets.Dataset``) of images (PIL), image tensors [3, H, W] or [B, 3, H, W],
            dicts of model inputs (``{"pixel_values": ...}``, ``{"input_ids": ..., "attention_mask": ...}``)
            or texts; images and texts go through ``processor``. Not saved with the model.
        processor: an image processor or tokenizer for images / texts / dataset rows. Not saved.
        calibration_batch_size: instances per calibration batch (default 8).
        modules_to_not_convert: module names left in full precision (with their children); None
            (default): transformers' choice for the model (its classifier / output head).
    """

    def __init__(self, calibration_dataset: Any = None, processor: Any = None, calibration_batch_size: int = 8,
                 modules_to_not_convert: Optional[list[str]] = None, quant_method: str = QUANT_METHOD,
                 **fields: Any) -> None:
        if quant_method != QUANT_METHOD:
            raise ValueError(f"quant_method must be {QUANT_METHOD!r} for IGQConfig, got {quant_method!r}")
        unknown = sorted(set(fields) - set(CORE_FIELDS) - {"type"})
        if unknown:
            raise ValueError(f"unknown IGQConfig field(s) {unknown}; valid: {sorted(set(CORE_FIELDS) - {'version'})} "
                             f"and the loading options {list(HF_FIELDS)}")
        if isinstance(calibration_batch_size, bool) or not isinstance(calibration_batch_size, int) \
                or calibration_batch_size < 1:
            raise ValueError(f"calibration_batch_size must be an int >= 1, got {calibration_batch_size!r}")
        if modules_to_not_convert is not None and (isinstance(modules_to_not_convert, str) or not all(
                isinstance(n, str) for n in modules_to_not_convert)):
            raise ValueError(f"modules_to_not_convert must be a list of module names, got {modules_to_not_convert!r}")
        fields.pop("type", None)
        self.core = igq.IGQConfig(**fields)  # raises, naming the field and what is valid
        self.quant_method = QUANT_METHOD
        self.calibration_dataset = calibration_dataset
        self.processor = processor
        self.calibration_batch_size = calibration_batch_size
        self.modules_to_not_convert = list(modules_to_not_convert) if modules_to_not_convert is not None else None

    @classmethod
    def from_core(cls, core: igq.IGQConfig, **options: Any) -> "IGQConfig":
        """The transformers config of a core :class:`igq_plugin.IGQConfig` (plus loading options)."""
        if not isinstance(core, igq.IGQConfig):
            raise TypeError(f"core must be an igq_plugin.IGQConfig, got {type(core).__name__}")
        fields = {f.name: getattr(core, f.name) for f in dataclasses.fields(core)}
        return _quietly(cls, **fields, **options)  # the core config already said what it ignores

    @classmethod
    def igq_plus(cls, bits: int = 4, **options: Any) -> "IGQConfig":
        """:meth:`igq_plugin.IGQConfig.igq_plus` (core field changes and loading options in ``options``)."""
        return cls._preset(igq.IGQConfig.igq_plus, bits, options)

    @classmethod
    def repq_vit(cls, bits: int = 4, **options: Any) -> "IGQConfig":
        """:meth:`igq_plugin.IGQConfig.repq_vit`."""
        return cls._preset(igq.IGQConfig.repq_vit, bits, options)

    @classmethod
    def dopq_vit(cls, bits: int = 4, **options: Any) -> "IGQConfig":
        """:meth:`igq_plugin.IGQConfig.dopq_vit`."""
        return cls._preset(igq.IGQConfig.dopq_vit, bits, options)

    @classmethod
    def _preset(cls, preset, bits: int, options: dict) -> "IGQConfig":
        loading = {k: options.pop(k) for k in list(options) if k in HF_FIELDS}
        return cls.from_core(preset(bits, **options), **loading)

    def __setattr__(self, name: str, value: Any) -> None:
        core = self.__dict__.get("core")
        if core is not None and name in CORE_FIELDS:  # cfg.weight_bits = 8, transformers' update(): validated
            self.__dict__["core"] = _quietly(core.replace, **{name: value})
            return
        super().__setattr__(name, value)

    def __getattr__(self, name: str) -> Any:  # the core fields read as attributes: cfg.weight_bits
        core = self.__dict__.get("core")
        if core is not None and name in CORE_FIELDS:
            return getattr(core, name)
        raise AttributeError(f"{type(self).__name__} has no attribute {name!r}")

    def to_dict(self) -> dict[str, Any]:
        d = self.core.to_dict()
        d.pop("type", None)
        d["quant_method"] = QUANT_METHOD
        d["calibration_batch_size"] = self.calibration_batch_size
        d["modules_to_not_convert"] = self.modules_to_not_convert
        return d

    def to_diff_dict(self) -> dict[str, Any]:
        return self.to_dict()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.to_json_string(use_diff=False).strip()})"


def _quietly(fn, *args: Any, **kwargs: Any) -> Any:
    """``fn(...)`` without the core config's "has no effect" notes (already given for this config)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return fn(*args, **kwargs)


def _is_hf_attention(module: nn.Module) -> bool:
    """A module whose forward calls transformers' attention interface (ALL_ATTENTION_FUNCTIONS)."""
    cls = type(module)
    cached = _INTERFACE_USERS.get(cls)
    if cached is None:
        try:
            source = inspect.getsource(cls.forward)
        except (OSError, TypeError):
            source = ""
        cached = _INTERFACE_USERS[cls] = "ALL_ATTENTION_FUNCTIONS" in source
    return cached


_INTERFACE_USERS: dict[type, bool] = {}


def _projection(module: nn.Module) -> Optional[nn.Module]:
    for name in ("q_proj", "query", "q"):
        layer = getattr(module, name, None)
        if isinstance(layer, nn.Module) and hasattr(layer, "out_features"):
            return layer
    return None


def _head_dim(module: nn.Module, channels: int) -> int:
    for name in ("head_dim", "attention_head_size"):
        value = getattr(module, name, None)
        if isinstance(value, int) and value > 0:
            return value
    heads = getattr(module, "num_attention_heads", None) or getattr(module, "num_heads", None)
    return channels // heads if heads else channels


def _add_attention_sites(model: nn.Module, cfg: igq.IGQConfig) -> list[str]:
    """Q, K, V and softmax quantizers on every module that calls the attention interface; returns their names."""
    names = []
    for name, module in model.named_modules():
        if not name or not _is_hf_attention(module) or matches(name, cfg.skip):
            continue
        projection = _projection(module)
        if projection is None:
            logger.warning("attention module '%s' (%s) has no q_proj / query Linear: its Q, K, V and softmax sites "
                           "stay in full precision", name, type(module).__name__)
            continue
        channels = projection.out_features
        quantizers = {tag: igq.attention_quantizer(cfg, name, tag, channels) for tag in ("q", "k", "v", "softmax")}
        for tag, quantizer in quantizers.items():
            module.add_module(f"{tag}_quantizer", quantizer)
        igq.register_attention_sites(model, name, quantizers, _head_dim(module, channels))
        names.append(name)
    return names


def igq_eager_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                        attention_mask: Optional[torch.Tensor], scaling: Optional[float] = None, dropout: float = 0.0,
                        **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers attention function ``"igq_eager"``: eager attention with the module's IGQ quantizers
    (``igq_plugin.attention.quantized_attention``, the core's; float where a module has none).
    query / key / value: [B, H, N, d]; returns ([B, N, H, d] output, the quantized probabilities)."""
    if scaling is None:
        scaling = query.size(-1) ** -0.5
    quantizers = tuple(getattr(module, f"{tag}_quantizer", None) for tag in ("q", "k", "v", "softmax"))
    if key.shape[1] != query.shape[1]:  # grouped-query attention: repeat K / V heads
        repeat = query.shape[1] // key.shape[1]
        key, value = key.repeat_interleave(repeat, dim=1), value.repeat_interleave(repeat, dim=1)
    mask = attention_mask
    if mask is not None and mask.dtype == torch.bool:
        mask = torch.zeros_like(mask, dtype=query.dtype).masked_fill(~mask, torch.finfo(query.dtype).min)
    if mask is not None and mask.shape[-1] != key.shape[-2]:
        mask = mask[..., : key.shape[-2]]

    def drop(probs: torch.Tensor) -> torch.Tensor:
        return nn.functional.dropout(probs, p=dropout, training=module.training)

    out, probs = quantized_attention(query * scaling, key, value, mask, quantizers, drop)
    return out.transpose(1, 2).contiguous(), probs


AttentionInterface.register(ATTENTION_NAME, igq_eager_attention)
# transformers builds attention masks only for implementations its mask interface knows (else it passes
# None, dropping padding and causal masks): igq_eager takes the additive masks eager attention takes
AttentionMaskInterface.register(ATTENTION_NAME, eager_mask)


# --- calibration -----------------------------------------------------------------------------------

def _as_batches(model: nn.Module, data: Any, processor: Any, batch_size: int) -> Iterable:
    """Calibration batches (tensors or dicts of model inputs) from what a user of transformers has."""
    if isinstance(data, (torch.Tensor, dict)):
        data = [data]
    if not isinstance(data, Iterable) or isinstance(data, (str, bytes)):
        raise TypeError(f"calibration data must be a list / iterable / datasets.Dataset of images, tensors, dicts of "
                        f"model inputs or texts, got {type(data).__name__}")
    pending: list = []
    kind = None
    for index, item in enumerate(data):
        item_kind = _kind(item)
        if kind is not None and item_kind != kind:
            raise TypeError(f"calibration item {index} is {item_kind}, item 0 is {kind}: use one kind of item")
        kind = item_kind
        if item_kind in ("tensor batch", "inputs"):
            if pending:
                yield _collate(model, pending, processor)
                pending = []
            yield _inputs(model, item, processor)
            continue
        pending.append(item)
        if len(pending) == batch_size:
            yield _collate(model, pending, processor)
            pending = []
    if pending:
        yield _collate(model, pending, processor)
    if kind is None:
        raise ValueError("calibration data is empty: give at least one image, tensor, dict or text")


_BATCH_DIMS = {"pixel_values": 4, "input_ids": 2}  # dims of a batch of the main inputs (one instance: one less)


def _kind(item: Any) -> str:
    if isinstance(item, torch.Tensor):
        return "tensor batch" if item.dim() == 4 else "tensor"
    if isinstance(item, dict):
        for key, dims in _BATCH_DIMS.items():
            value = item.get(key)
            if isinstance(value, torch.Tensor):
                return "inputs" if value.dim() == dims else "row"
        return "row"
    if isinstance(item, str):
        return "text"
    return "image"


def _inputs(model: nn.Module, item: Any, processor: Any) -> Any:
    if isinstance(item, dict):
        return {k: v for k, v in item.items() if k != "labels"}
    return {_main_input(model): item}


def _main_input(model: nn.Module) -> str:
    return getattr(model, "main_input_name", "pixel_values")


def _collate(model: nn.Module, items: list, processor: Any) -> Any:
    first = items[0]
    if isinstance(first, torch.Tensor):
        return {_main_input(model): torch.stack(items)}
    if isinstance(first, dict):  # dataset rows: {"image": ..., "label": ...}, {"text": ...}, or model inputs
        if "input_ids" in first:  # tokenized rows: pad them into a batch
            if processor is None or not hasattr(processor, "pad"):
                raise ValueError("tokenized calibration rows need the tokenizer to pad them: IGQConfig(processor=...)")
            keep = [k for k in ("input_ids", "attention_mask", "token_type_ids") if k in first]
            out = processor.pad([{k: row[k] for k in keep} for row in items], return_tensors="pt")
            return {k: v for k, v in dict(out).items() if isinstance(v, torch.Tensor)}
        for key in ("pixel_values", "image", "img", "text", "sentence"):
            if key in first:
                values = [row[key] for row in items]
                if key == "pixel_values" and not isinstance(values[0], torch.Tensor):
                    values = [torch.as_tensor(v) for v in values]
                return _collate(model, values, processor)
        raise ValueError(f"calibration rows have keys {sorted(first)}: none of pixel_values / image / img / text / "
                         "sentence / input_ids; give model inputs instead")
    if processor is None:
        raise ValueError(f"calibration data holds {_kind(first)}s: pass the model's image processor or tokenizer as "
                         "IGQConfig(processor=...) (or calibrate(..., processor=...))")
    if isinstance(first, str):
        out = processor(items, return_tensors="pt", padding=True, truncation=True)
    else:
        out = processor(images=items, return_tensors="pt")
    return {k: v for k, v in dict(out).items() if isinstance(v, torch.Tensor)}


def _require_calibrated(model: nn.Module, args: Any) -> None:
    if not model.__dict__.get(_CALIBRATED_ATTR, True):
        raise RuntimeError(
            f"{type(model).__name__} was loaded with IGQ quantizers but no calibration: run "
            "igq_plugin.integrations.transformers.calibrate(model, data) first (or pass "
            "IGQConfig(calibration_dataset=...) to from_pretrained)")


def _reset_quantizers(model: nn.Module, observe: bool) -> None:
    """Every site uncalibrated (observing with ``observe``), every weight quantizer fitted afresh from the
    current weights (dropping GPTQ codes of a former run)."""
    for site in igq.sites(model):
        site.quantizer.mark_calibrated(False)
        if observe:
            site.quantizer.start_observer()
        if site.weight_quantizer is not None:
            site.weight_quantizer.calibrate_weight()


def calibrate(model: nn.Module, data: Any, *, processor: Any = None, batch_size: int = 8,
              progress: bool = True) -> nn.Module:
    """Calibrate a model loaded with an IGQConfig (in place; returned): observe ``data`` (see
    :class:`IGQConfig` ``calibration_dataset``), then what igq.quantize does after preparing (the core's
    igq.calibrate_and_convert, with progress bars): fit the group ranges and weight quantizers, and
    reparameterize / allocate groups / GPTQ-round when the config asks."""
    qconfig = getattr(getattr(model, "config", None), "quantization_config", None)
    method = qconfig.get("quant_method") if isinstance(qconfig, dict) else getattr(qconfig, "quant_method", None)
    if not igq.sites(model):
        if method == QUANT_METHOD:
            raise ValueError("this model's config says quant_method 'igq' but it has no IGQ quantizers: it was loaded "
                             "before igq_plugin.integrations.transformers was imported, so transformers loaded it in "
                             "float. Import the plugin, then from_pretrained again")
        raise ValueError("this model has no IGQ quantizers: load it with from_pretrained(..., "
                         "quantization_config=IGQConfig(...)) first")
    from igq_plugin.reparam import REPARAM_ATTR

    if getattr(model, REPARAM_ATTR, None):
        raise ValueError("this model is calibrated and reparameterized (IGQConfig.reparam), which changed its weights: "
                         "to calibrate again, load the float checkpoint again with the IGQConfig")
    batches = list(_as_batches(model, data, processor, batch_size))  # checked before any state changes
    _reset_quantizers(model, observe=True)
    was_training = model.training
    model.eval()
    model.__dict__[_CALIBRATED_ATTR] = True  # the guard lets the calibration batches through
    try:  # the core's flow after prepare: calibrate, reparameterize, allocate, convert, GPTQ-round
        igq.calibrate_and_convert(model, batches, progress=progress)
    except BaseException:
        model.__dict__[_CALIBRATED_ATTR] = False
        for site in igq.sites(model):
            site.quantizer.observer = None
        raise
    finally:
        model.train(was_training)
    return model


# --- the quantizer ---------------------------------------------------------------------------------

class IGQHfQuantizer(HfQuantizer):
    """transformers HfQuantizer of IGQ (see the module docstring)."""

    requires_calibration = False

    def __init__(self, quantization_config: IGQConfig, **kwargs: Any) -> None:
        if isinstance(quantization_config, dict):
            quantization_config = IGQConfig.from_dict(quantization_config)
        # a copy: the resolved modules_to_not_convert is recorded on it, and the calibration data dropped
        super().__init__(copy.copy(quantization_config), **kwargs)

    def is_serializable(self, safe_serialization: bool = True) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return False

    def update_attn_implementation(self, config):
        if self.quantization_config.core.quantize_attention:
            requested = getattr(config, "_attn_implementation", None)
            if requested not in (None, "eager", ATTENTION_NAME):
                logger.info("IGQ quantizes Q, K, V and the softmax through the %r attention function: using it "
                            "instead of %r", ATTENTION_NAME, requested)
            config._attn_implementation = ATTENTION_NAME
        return config

    def _core_config(self, model: nn.Module) -> igq.IGQConfig:
        hf = self.quantization_config
        if hf.modules_to_not_convert is None:  # transformers' default: the output head / last layer; recorded
            hf.modules_to_not_convert = sorted({n.removesuffix(".weight").removesuffix(".bias")  # in config.json
                                                for n in get_keys_to_not_convert(model) if n})
        patterns = tuple(p for name in hf.modules_to_not_convert for p in (name, f"{name}.*"))
        return _quietly(hf.core.replace, skip=tuple(hf.core.skip) + patterns)  # the config said what it ignores

    def _process_model_before_weight_loading(self, model: nn.Module, **kwargs: Any) -> nn.Module:
        cfg = self._core_config(model)
        float_keys = set(model.state_dict(keep_vars=True))
        igq.prepare(model, cfg, inplace=True, observe=False, attention=False)  # attention: below, by this adapter
        if cfg.quantize_attention:
            if not _add_attention_sites(model, cfg):
                logger.warning("%s has no attention module that calls transformers' attention interface: its Q, K, V "
                               "and softmax stay in full precision", type(model).__name__)
        model.__dict__[_CALIBRATED_ATTR] = False
        model.register_forward_pre_hook(_require_calibrated)
        state_keys = sorted(set(model.state_dict(keep_vars=True)) - float_keys)  # what the quantizers added
        if self.pre_quantized:
            _match_checkpoint(model, state_keys, kwargs.get("checkpoint_files") or [], self)
        else:  # a float checkpoint has no quantizer state: not "missing" weights to report
            ignored = {f"^{re.escape(key)}$" for key in state_keys}
            model._keys_to_ignore_on_load_missing = set(model._keys_to_ignore_on_load_missing or ()) | ignored
        return model

    def _process_model_after_weight_loading(self, model: nn.Module, **kwargs: Any) -> nn.Module:
        if self.pre_quantized:  # the checkpoint holds the quantizer state: restore the Python-side flags
            igq.sync_calibration_state(model)
            uncalibrated = [s.name for s in igq.sites(model) if not s.quantizer.is_calibrated]
            if uncalibrated:
                raise ValueError(f"this igq checkpoint holds uncalibrated sites ({', '.join(uncalibrated[:3])}): save "
                                 "calibrated models only")
            model.__dict__[_CALIBRATED_ATTR] = True
            return model
        hf = self.quantization_config  # fresh quantization: nothing of the quantizers came from the checkpoint
        if hf.calibration_dataset is not None:  # (calibrate resets them)
            calibrate(model, hf.calibration_dataset, processor=hf.processor, batch_size=hf.calibration_batch_size)
        else:
            _reset_quantizers(model, observe=False)
        hf.calibration_dataset = hf.processor = None  # not part of the model (nor kept alive by it)
        return model


def _key_mapper(model: nn.Module, quantizer: HfQuantizer):
    """checkpoint key -> the model's name of it: transformers 5 renames legacy checkpoint keys
    (``encoder.layer.0.attention.attention.query`` -> ``layers.0.attention.q_proj``) while loading."""
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightRenaming, rename_source_key

    transforms = get_model_conversion_mapping(model, None, quantizer)
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    converters = [t for t in transforms if not isinstance(t, WeightRenaming)]
    meta = dict(model.state_dict(keep_vars=True))
    prefix = getattr(model, "base_model_prefix", None)
    return lambda key: rename_source_key(key, renamings, converters, prefix, meta)[0]


def _match_checkpoint(model: nn.Module, state_keys: list[str], files: list, quantizer: HfQuantizer) -> None:
    """Before a pre-quantized checkpoint loads: every quantizer tensor must be in it (transformers would fill a
    missing one with uninitialized memory), and tensors whose shape the checkpoint sets (group counts after
    allocation, GPTQ weight codes) are resized to it (transformers assigns tensors without resizing)."""
    shapes: dict[str, tuple] = {}
    for path in files:
        path = str(path)
        if path.endswith(".safetensors"):
            from safetensors import safe_open

            with safe_open(path, framework="pt") as f:
                for key in f.keys():
                    shapes[key] = tuple(f.get_slice(key).get_shape())
        else:
            state = torch.load(path, map_location="meta", weights_only=True)
            shapes.update({k: tuple(v.shape) for k, v in state.items()})
    if not shapes:
        return
    to_model = _key_mapper(model, quantizer)
    shapes = {to_model(key): shape for key, shape in shapes.items()}
    missing = []
    for name in state_keys:
        found = shapes.get(name)
        if found is None:
            missing.append(name)
            continue
        owner_name, _, attr = name.rpartition(".")
        owner = model.get_submodule(owner_name)
        current = getattr(owner, attr)
        if tuple(current.shape) != found:
            new = torch.empty(found, dtype=current.dtype, device=current.device)
            if attr in owner._parameters:
                owner._parameters[attr] = nn.Parameter(new, requires_grad=current.requires_grad)
            else:
                owner._buffers[attr] = new
    if missing:
        raise ValueError(
            f"this igq checkpoint has no quantizer state for {len(missing)} tensor(s) of {type(model).__name__} "
            f"(e.g. {', '.join(missing[:3])}): it was saved from a model with other quantized layers (another model "
            "class, or other modules_to_not_convert). Load it with the class it was saved from, or quantize the float "
            "model again")


def _register() -> None:
    """Register quant_method "igq" with transformers (once per process; a second import of this module
    under another name replaces the first registration instead of failing)."""
    from transformers.quantizers.auto import AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING

    for mapping, cls, register in ((AUTO_QUANTIZATION_CONFIG_MAPPING, IGQConfig, register_quantization_config),
                                   (AUTO_QUANTIZER_MAPPING, IGQHfQuantizer, register_quantizer)):
        existing = mapping.get(QUANT_METHOD)
        if existing is not None and existing.__qualname__ == cls.__qualname__:
            del mapping[QUANT_METHOD]
        register(QUANT_METHOD)(cls)


_register()
