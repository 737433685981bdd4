"""IGQ on OpenVINO INT8: export a quantized model, compile it for the CPU, check what runs INT8.

::

    import igq_plugin as igq
    from igq_plugin.integrations.openvino import export_openvino, compile_openvino, int8_report

    qmodel = igq.quantize(model, igq.IGQConfig(weight_bits=4, act_bits=4, act_grid=8), calib_images)
    ov_model = export_openvino(qmodel, example_images, "igq_vit.xml")   # ov.Model, and .xml/.bin
    compiled = compile_openvino(ov_model)                              # CPU, f32 inference precision
    features = compiled(images.numpy())[0]
    print(int8_report(compiled))                                       # precision of every GEMM

How: :func:`igq_plugin.lowering.lower` rewrites every registered site (igq.quantize, torch.ao FX /
pt2e, transformers: all register theirs) as the patterns OpenVINO's low-precision transformations
run on INT8 kernels: the per-instance group assignment and group quantization in float32 ops,
then one static per-tensor FakeQuantize on the site's common integer grid feeding the GEMM, and
per-channel FakeQuantize on constant weights. ``torch.export`` records the lowered model and
``ov.convert_model`` converts it (a conversion extension turns the one new op, igq::grid_fake_quant,
into a FakeQuantize). With ``IGQConfig(act_grid=8)`` an IGQ Linear is one u8 x i8 FullyConnected;
``act_grid=16`` (8-bit groups) two (high and low byte); a one-group 8-bit site one.

Precision: the assignment (per-instance channel min/max, distances to the group ranges, TopK)
must run in float32. Under bf16 inference precision (the CPU plugin's default where the CPU has
bf16) the distances round and channels go to the wrong group (12-22% relative output error measured on
small ViTs), so
:func:`compile_openvino` sets ``INFERENCE_PRECISION_HINT=f32``, and the exported model records the
same hint in its rt_info (``runtime_options``) for tools that read it. The GEMMs run INT8 either way.
"""
from __future__ import annotations

import os
from typing import Any, Optional, Union

import torch
from torch import nn

from igq_plugin.lowering import lower, lowering_report

from .. import require

__all__ = ["export_openvino", "compile_openvino", "conversion_extensions", "int8_report", "check_int8",
           "REQUIRED_CONFIG", "GEMM_TYPES", "lower", "lowering_report"]

REQUIRED_CONFIG = {"INFERENCE_PRECISION_HINT": "f32"}  # IGQ's assignment must not run in bf16 / f16
GEMM_TYPES = ("FullyConnected", "MatMul", "Convolution")


def _ov():
    return require("openvino", "openvino")


def _grid_fake_quant_converter(ctx):
    """igq::grid_fake_quant -> one OpenVINO FakeQuantize (per tensor, qmax - qmin + 1 levels)."""
    import numpy as np
    from openvino import opset13 as ops_ov

    x = ctx.get_input(0)
    scale = float(ctx.get_values_from_const_input(1))
    zero_point, qmin, qmax = (int(ctx.get_values_from_const_input(i)) for i in (2, 3, 4))
    lo = np.array((qmin - zero_point) * scale, dtype=np.float32)
    hi = np.array((qmax - zero_point) * scale, dtype=np.float32)
    lo_c, hi_c = ops_ov.constant(lo), ops_ov.constant(hi)
    return [ops_ov.fake_quantize(x, lo_c, hi_c, lo_c, hi_c, qmax - qmin + 1).output(0)]


_SHAPE_OPS = ("Reshape", "Broadcast", "Convert")  # Broadcast: torch's expand of P to its own shape  # between the quantized probabilities and the P V matmul


def _row_scaled_codes(matmul) -> Optional[tuple]:
    """(chain head input, FakeQuantize output, row scale output) when ``matmul``'s left input is
    ``codes_fq * row_scale`` (a lowered softmax site) through shape-only ops; else None."""
    node = matmul.input_value(0).get_node()
    head = matmul.input(0)
    while node.get_type_name() in _SHAPE_OPS:
        if len(node.output(0).get_target_inputs()) != 1:
            return None  # the chain feeds something else too: it must keep the scaled values
        head = node.input(0)
        node = node.input_value(0).get_node()
    if node.get_type_name() != "Multiply":
        return None
    values = [node.input_value(i) for i in range(2)]
    fq = [v for v in values if v.get_node().get_type_name() == "FakeQuantize"]
    if len(fq) != 1 or int(fq[0].get_node().get_attributes()["levels"]) != 256:
        return None
    if len(node.output(0).get_target_inputs()) != 1:
        return None  # the scaled probabilities are used elsewhere too
    scale = values[1] if values[0] is fq[0] or values[0] == fq[0] else values[0]
    shape = scale.get_partial_shape()
    if shape.rank.is_dynamic or shape.rank.get_length() < 2 or not shape[shape.rank.get_length() - 1].is_static \
            or shape[shape.rank.get_length() - 1].get_length() != 1:
        return None  # not one factor per row
    return head, fq[0], scale


def _move_row_scales(ov_model) -> int:
    """Rewrite MatMul(codes * s_row, V) as MatMul(codes, V) * s_row (the same numbers: s_row scales whole
    rows), so the CPU plugin runs the P V matmul on u8 codes. Returns how many matmuls it moved."""
    import numpy as np
    from openvino import opset13 as ops_ov

    moved = 0
    for op in ov_model.get_ordered_ops():
        if op.get_type_name() != "MatMul" or op.get_attributes().get("transpose_a"):
            continue
        found = _row_scaled_codes(op)
        if found is None:
            continue
        head, fq, scale = found
        head.replace_source_output(fq)  # the chain now carries the codes
        rank = op.get_input_partial_shape(0).rank.get_length()
        rows = ops_ov.gather(ops_ov.shape_of(op.input_value(0)), ops_ov.constant(np.arange(rank - 1, dtype=np.int64)),
                             ops_ov.constant(np.int64(0)))
        row_shape = ops_ov.concat([rows, ops_ov.constant(np.array([1], dtype=np.int64))], 0)
        row_scale = ops_ov.reshape(scale, row_shape, special_zero=False)
        consumers = list(op.output(0).get_target_inputs())
        scaled = ops_ov.multiply(op.output(0), row_scale)
        for target in consumers:
            target.replace_source_output(scaled.output(0))
        moved += 1
    if moved:
        ov_model.validate_nodes_and_infer_types()
    return moved


def conversion_extensions() -> list:
    """The ``ov.convert_model(..., extension=...)`` list that converts the igq ops a lowered model exports."""
    from openvino.frontend import ConversionExtension

    return [ConversionExtension("igq.grid_fake_quant.default", _grid_fake_quant_converter)]


def _example_args(example_input: Any) -> tuple[tuple, dict]:
    if isinstance(example_input, torch.Tensor):
        return (example_input,), {}
    if isinstance(example_input, dict):
        return (), dict(example_input)
    if isinstance(example_input, (tuple, list)):
        return tuple(example_input), {}
    raise TypeError(f"example_input must be a tensor, a tuple of tensors or a dict of keyword tensors, "
                    f"got {type(example_input).__name__}")


def _dynamic_batch(args: tuple, kwargs: dict) -> Any:
    batch = torch.export.Dim("batch", min=1, max=4096)

    def spec(value):
        return {0: batch} if isinstance(value, torch.Tensor) and value.dim() > 0 else None

    if kwargs:
        return {name: spec(value) for name, value in kwargs.items()}
    return tuple(spec(a) for a in args)


def _batch_of_two(value: Any) -> Any:
    """torch.export specializes a dim of size 1: trace a dynamic batch with two copies of a single example."""
    if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == 1:
        return torch.cat([value, value])
    return value


def export_openvino(qmodel: nn.Module, example_input: Any, path: Optional[Union[str, os.PathLike]] = None, *,
                    dynamic_batch: bool = True) -> Any:
    """Lower the quantized ``qmodel`` (see the module docstring) and convert it to an ``ov.Model``.

    example_input: a tensor (e.g. [B, 3, 224, 224] images), a tuple of tensors, or a dict of keyword
        tensors (e.g. ``{"pixel_values": x}`` for a transformers model).
    path: also save it there (``.xml`` + ``.bin``, weights kept in float32: OpenVINO's default fp16
        compression of weight constants would change the quantized weights' grid).
    dynamic_batch: the first dim of every input is dynamic.
    The user's model is not modified.
    """
    ov = _ov()
    if path is not None:  # checked before the work
        path = os.fspath(path)
        if not path.endswith(".xml"):
            raise ValueError(f"path must name the .xml file of the OpenVINO IR (its .bin goes next to it), got {path!r}")
        if not os.path.isdir(os.path.dirname(os.path.abspath(path))):
            raise ValueError(f"the directory of path {path!r} does not exist")
    args, kwargs = _example_args(example_input)
    lowered = lower(qmodel).eval()
    shapes = None
    if dynamic_batch:
        args, kwargs = tuple(_batch_of_two(a) for a in args), {k: _batch_of_two(v) for k, v in kwargs.items()}
        shapes = _dynamic_batch(args, kwargs)
    with torch.no_grad():
        exported = torch.export.export(lowered, args, kwargs or None, dynamic_shapes=shapes)
    ov_model = ov.convert_model(exported, extension=conversion_extensions())
    _move_row_scales(ov_model)
    for key, value in REQUIRED_CONFIG.items():
        ov_model.set_rt_info(value, ["runtime_options", key])
    report = lowering_report(lowered)
    ov_model.set_rt_info(str(len(report)), ["igq", "sites"])
    ov_model.set_rt_info(str(sum(1 for r in report if r.grid is not None and not r.grid.exact)),
                         ["igq", "inexact_grid_sites"])
    if path is not None:
        ov.save_model(ov_model, path, compress_to_fp16=False)
    return ov_model


def compile_openvino(model: Any, device: str = "CPU", config: Optional[dict] = None) -> Any:
    """``ov.Core().compile_model`` with the precision IGQ needs (``REQUIRED_CONFIG``): ``model`` is an
    ``ov.Model`` or the path of its .xml. ``config`` adds properties (e.g. {"PERFORMANCE_HINT": "LATENCY"});
    an INFERENCE_PRECISION_HINT other than f32 is refused (module docstring: why)."""
    ov = _ov()
    merged = dict(config or {})
    hint = merged.get("INFERENCE_PRECISION_HINT")
    if hint is not None and str(hint).lower() not in ("f32", "<type: 'float32'>", "float32"):
        raise ValueError(f"INFERENCE_PRECISION_HINT={hint!r} would run IGQ's channel assignment in low precision and "
                         "assign channels to the wrong groups; IGQ models need 'f32' (the GEMMs still run INT8)")
    merged.update(REQUIRED_CONFIG)
    core = ov.Core()
    if isinstance(model, (str, os.PathLike)):
        model = core.read_model(os.fspath(model))
    return core.compile_model(model, device, merged)


def int8_report(compiled: Any) -> list[dict]:
    """Every GEMM of the compiled model as the plugin runs it, in execution order, from
    ``compiled.get_runtime_model()``: {"name", "type" (layerType), "precision" (runtimePrecision),
    "primitive" (the kernel, e.g. brgemm_avx512_I8), "int8"}. ``int8`` is True when the kernel is an
    integer one and its activation input is u8 / i8: runtimePrecision alone says i8 also for a float GEMM
    that decompresses i8 weights."""
    rows = []
    for op in compiled.get_runtime_model().get_ordered_ops():
        info = op.get_rt_info()
        layer_type = info["layerType"].astype(str)
        if layer_type in GEMM_TYPES:
            primitive = info["primitiveType"].astype(str) if "primitiveType" in info else ""
            activation = str(op.input(0).get_element_type()) if op.get_input_size() else ""
            int8 = primitive.lower().endswith(("_i8", "_u8")) and activation in ("<Type: 'uint8_t'>", "<Type: 'int8_t'>")
            rows.append({"name": op.get_friendly_name(), "type": layer_type,
                         "precision": info["runtimePrecision"].astype(str), "primitive": primitive, "int8": int8})
    return rows


def check_int8(compiled: Any, allow: tuple[str, ...] = ()) -> list[dict]:
    """:func:`int8_report`, raising ValueError when a GEMM whose name contains none of ``allow`` does not run
    on an integer kernel (e.g. allow=("head",) for a classifier left in float)."""
    rows = int8_report(compiled)
    if not rows:
        raise ValueError("the compiled model has no FullyConnected / MatMul / Convolution layer")
    bad = [r for r in rows if not r["int8"] and not any(a in r["name"] for a in allow)]
    if bad:
        listed = ", ".join(f"{r['name']} ({r['type']}, {r['primitive'] or r['precision']})" for r in bad[:8])
        raise ValueError(f"{len(bad)} of {len(rows)} GEMMs do not run INT8: {listed}")
    return rows
