"""Describe an ONNX file: I/O with dynamic axes, opsets, op counts, metadata, size, parameters."""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from xattn.onnxfile import load_onnx
from xattn.provenance import get_onnx_metadata


def _tensor_info(value_info) -> dict[str, Any]:
    from onnx import helper

    tensor_type = value_info.type.tensor_type
    dims = []
    for dim in tensor_type.shape.dim:
        dims.append(dim.dim_value if dim.HasField("dim_value") else (dim.dim_param or "?"))
    return {"name": value_info.name, "dtype": helper.tensor_dtype_to_np_dtype(tensor_type.elem_type).name,
            "shape": dims}


def inspect_onnx(path: str | os.PathLike) -> dict[str, Any]:
    """A JSON-able description of the ONNX file at ``path``."""
    import onnx
    from onnx import numpy_helper

    model = load_onnx(path)
    graph = model.graph
    initializer_names = {init.name for init in graph.initializer}
    # Parameters are the floating-point weight tensors; int64 initializers are Reshape targets and
    # scalars are constants (the attention scale), neither is a parameter.
    float_types = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16,
                   onnx.TensorProto.DOUBLE, onnx.TensorProto.INT8}
    params = int(sum(int(np.prod(init.dims)) for init in graph.initializer
                     if init.data_type in float_types and init.dims))
    ops = Counter(node.op_type if not node.domain or node.domain == "ai.onnx" else f"{node.domain}.{node.op_type}"
                  for node in graph.node)
    weight_dtypes = Counter(numpy_helper.to_array(i).dtype.name for i in graph.initializer)
    return {
        "path": str(path),
        "file_size": Path(path).stat().st_size,
        "ir_version": model.ir_version,
        "producer": f"{model.producer_name} {model.producer_version}".strip(),
        "opsets": {(o.domain or "ai.onnx"): o.version for o in model.opset_import},
        "inputs": [_tensor_info(i) for i in graph.input if i.name not in initializer_names],
        "outputs": [_tensor_info(o) for o in graph.output],
        "nodes": len(graph.node),
        "op_counts": dict(sorted(ops.items(), key=lambda kv: (-kv[1], kv[0]))),
        "parameters": params,   # every float initializer: weights and buffers alike (see "metadata")
        "initializer_dtypes": dict(weight_dtypes),
        "metadata": get_onnx_metadata(model),
        "other_metadata": {p.key: p.value for p in model.metadata_props if not p.key.startswith("xattn.")},
        "attention": attention_summary(model),
    }


def attention_summary(model) -> dict[str, Any]:
    """Attention blocks, whether each fuses per target (and why not), and the memory the naive form needs.

    ``naive_scores_bytes_at_max``: bytes of the ``B x H x N1 x N2`` score tensors that a MatMul ->
    Softmax -> MatMul graph holds at the recorded max shapes, in float32 (one per block). A fused
    kernel (TensorRT's MHA, ONNX Runtime's MultiHeadAttention) does not hold them.
    """
    from exporter.attention import describe_blocks, find_attention, find_linear_attention, naive_memory_at
    from xattn.shapes import parse_shape_set

    record = get_onnx_metadata(model)
    blocks = find_attention(model)
    fused = [n for n in model.graph.node if n.op_type == "MultiHeadAttention" or n.op_type == "Attention"]
    summary: dict[str, Any] = {"blocks": describe_blocks(blocks), "fused_ops": len(fused),
                               "naive_scores_bytes_at_max": None, "max_shapes": record.get("max_shapes"),
                               "linear": find_linear_attention(model)}
    if blocks and record.get("max_shapes"):
        try:
            summary["naive_scores_bytes_at_max"] = naive_memory_at(model, blocks, parse_shape_set(record["max_shapes"]))
        except Exception:   # shapes that inference cannot follow: the figure is unknown, not an error
            summary["naive_scores_bytes_at_max"] = None
    return summary


def format_inspection(info: dict[str, Any]) -> str:
    """Human-readable text for :func:`inspect_onnx`'s result."""
    meta = info["metadata"]
    if isinstance(meta.get("weights"), int) and isinstance(meta.get("buffers"), int):
        # the module's own split, recorded at export; an ONNX file alone cannot tell weights from buffers
        counts = f"{meta['weights']:,} weights + {meta['buffers']:,} buffer values"
        if meta.get("buffer_names"):
            counts += f" ({', '.join(meta['buffer_names'][:3])}{', ...' if len(meta['buffer_names']) > 3 else ''})"
    else:
        counts = f"{info['parameters']:,} weight and buffer values (no export record to tell them apart)"
    lines = [f"{info['path']}  ({_size(info['file_size'])}, {counts}, {info['nodes']} nodes)",
             "opsets: " + ", ".join(f"{d} {v}" for d, v in info["opsets"].items()) + f"; producer: {info['producer']}"]
    for label in ("inputs", "outputs"):
        lines.append(f"{label}:")
        for t in info[label]:
            lines.append(f"  {t['name']:<8} {t['dtype']:<8} [{', '.join(str(d) for d in t['shape'])}]")
    lines.append("ops: " + ", ".join(f"{k} x{v}" for k, v in info["op_counts"].items()))
    attention = info.get("attention") or {}
    blocks = attention.get("blocks") or []
    if meta.get("target") == "openvino" and blocks:
        # every slice is a block of its own: one line, not a verdict per slice
        lines.append(f"attention: {len(blocks)} block(s) as MatMul/Softmax/MatMul, the query slices of the plain "
                     "file's blocks (OpenVINO's form; 'xattn inspect' of the plain file gives each block's verdicts)")
    elif blocks or attention.get("fused_ops"):
        lines.append(f"attention: {len(blocks)} block(s) as MatMul/Softmax/MatMul"
                     + (f", {attention['fused_ops']} fused op(s)" if attention.get("fused_ops") else ""))
        for block in blocks:
            written = f" (written as {block['written_as']})" if block.get("written_as") else ""
            mask = ", masked" if block.get("mask") else ""
            kv = (f", {block['kv_heads']} K/V head(s)" if block.get("kv_heads") not in (None, block["heads"]) else "")
            lines.append(f"  {block['softmax']}: {block['style']}{written} in {block['precision']}, heads {block['heads']}"
                         f"{kv}, head size {block['head_dim']}, scale {block['scale']:.4g} on {block['scale_position']}{mask}")
            for target, verdict in block["targets"].items():
                lines.append(f"    {target:<12} {'fusible' if verdict['fusible'] else 'not fusible'}: {verdict['why']}")
        if attention.get("naive_scores_bytes_at_max"):
            lines.append(f"  naive score tensors at max shapes {attention['max_shapes']}: "
                         f"{_size(attention['naive_scores_bytes_at_max'])} (float32; fused kernels do not hold them)")
    for block in attention.get("linear") or []:
        lines.append(f"linear attention at {' + '.join(block['feature_maps'])}: {block['why']}")
    if meta:
        lines.append("provenance:")
        for key in sorted(meta):
            value = meta[key]
            lines.append(f"  {key}: {value if isinstance(value, str) else json.dumps(value)}")
    return "\n".join(lines)


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)
