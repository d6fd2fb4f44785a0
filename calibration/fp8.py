"""FP8 (float8e4m3fn) Q/DQ for TensorRT on Ada, Hopper and Blackwell, attention included.

INT8 cannot quantize attention usefully (TensorRT's INT8 fused MHA wants sequences <= 512); FP8 can, and it is
where TensorRT fuses attention in 8 bits (FP8 MHA on compute capability 8.9+). The placement follows NVIDIA
ModelOpt's FP8 ONNX recipe (``modelopt/onnx/quantization/fp8.py``, ``graph_utils.py``; read, not run: ModelOpt's
ONNX extra pins onnx 1.21 and onnxruntime-gpu 1.24, which cannot sit beside this toolkit's pins):

* Conv / linear MatMul / Gemm: Q/DQ on the activation input (per tensor) and on the float weight (per output
  channel), biases float;
* each attention block whose head size is in (8, 256]: Q/DQ on both inputs of the first MatMul (Q with the
  1/sqrt(d) scale moved onto it, and K^T), on the Softmax output with the fixed scale 1/448 (its values are in
  [0, 1]), on V, and after the second MatMul - the ``Q->DQ->BMM1->Softmax->Q->DQ->BMM2->Q->DQ`` pattern TensorRT's
  FP8 fMHA matches; Softmax itself stays in high precision;
* everything else FP16, graph inputs and outputs FP32.

Scales are ``amax / 448`` from the maximum over the calibration data (max calibration, ModelOpt's FP8 default),
floored at FP16's smallest normal so that none rounds to zero in the FP16 file. ONNX Runtime's CPU runs float8
Q/DQ, so the file's accuracy is measured here like any other; the TensorRT build needs a GPU of compute
capability 8.9 or newer (the plan refuses others and DLA).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from xattn.data import CalibrationData
from xattn.errors import BadInputError
from xattn.fileio import sha256_file
from xattn.ort_session import LEVEL_CRASHES_KEY, LEVEL_KEY, LEVEL_VERSION_KEY, ort_version_label
from xattn.provenance import get_onnx_metadata, require_fp32, set_onnx_metadata

#: the largest finite float8e4m3fn value
FP8_MAX = 448.0
#: head sizes whose attention TensorRT's FP8 fMHA takes (ModelOpt skips BMM quantization outside (8, 256])
FP8_HEAD_DIM = (8, 256)
#: op types whose activation input and weight are quantized
LINEAR_OPS = ("Conv", "MatMul", "Gemm")
_WEIGHT_AXIS = {"Conv": 0, "MatMul": 1, "Gemm": 0}


@dataclass
class Fp8Result:
    path: Path
    quantized_nodes: list[str]
    attention_blocks: list[str]
    notes: list[str] = field(default_factory=list)


def _fp8_zeros(name: str, shape: tuple[int, ...]):
    from onnx import TensorProto, helper

    count = int(np.prod(shape)) if shape else 1
    return helper.make_tensor(name, TensorProto.FLOAT8E4M3FN, list(shape), [0.0] * count)


def quantize_fp8(float_path: str | os.PathLike, data: CalibrationData, output: str | os.PathLike, *,
                 say: Callable[[str], None] | None = None) -> Fp8Result:
    """Write the FP8 Q/DQ model of ``float_path`` to ``output`` (see the module docstring), calibrated on ``data``."""
    import onnx
    from onnx import helper, numpy_helper, version_converter

    from exporter.attention import find_attention, move_scale_to_query
    from exporter.fp16 import graph_to_fp16
    from xattn.onnxfile import load_onnx
    from runtime.onnxrt import session_with_outputs
    from xattn.onnxfile import refresh_value_info, save_onnx

    say = say or (lambda message: None)
    float_path = Path(float_path)
    model = require_fp32(load_onnx(float_path), float_path, "quantize")
    record = get_onnx_metadata(model)
    if not data.feeds:
        raise BadInputError(f"{data.label} holds no samples")
    work, moved = move_scale_to_query(model)
    opset = next((o.version for o in work.opset_import if o.domain in ("", "ai.onnx")), 0)
    if opset < 19:   # float8 Q/DQ and FP16 scales need opset 19
        work = version_converter.convert_version(work, 19)
    notes = [f"attention scale moved onto Q in {', '.join(moved)}"] if moved else []
    graph = work.graph
    initializers = {i.name: i for i in graph.initializer}
    low, high = FP8_HEAD_DIM
    blocks, attention_nodes = [], {}
    for block in find_attention(work):
        if block.style != "matmul" or block.issues or block.mask is not None:
            notes.append(f"attention {block.softmax} left in FP16: "
                         f"{'; '.join(block.issues) or 'an additive mask on the scores'}")
        elif block.head_dim is None or not low < block.head_dim <= high:
            notes.append(f"attention {block.softmax} left in FP16: head size {block.head_dim} is outside "
                         f"TensorRT's FP8 attention range ({low}, {high}]")
        else:
            blocks.append(block)
            attention_nodes[block.score_node] = "bmm1"
            attention_nodes[block.output_node] = "bmm2"
    probs = {}
    for block in blocks:
        output_node = next(n for n in graph.node if n.name == block.output_node)
        probs[block.output_node] = output_node.input[0]

    # what gets a Q/DQ: (tensor, fixed amax or None); weights separately
    activations: dict[str, float | None] = {}
    weights: dict[str, int] = {}
    quantized = []
    for node in graph.node:
        if node.name in attention_nodes:
            quantized.append(node.name)
            for name in node.input[:2]:
                activations[name] = 1.0 if probs.get(node.name) == name else None   # Softmax output: [0, 1]
            if attention_nodes[node.name] == "bmm2" and node.output[0] not in {o.name for o in graph.output}:
                activations[node.output[0]] = None
        elif node.op_type in LINEAR_OPS and len(node.input) > 1 and node.input[1] in initializers \
                and initializers[node.input[1]].data_type == onnx.TensorProto.FLOAT \
                and node.input[0] not in initializers:
            quantized.append(node.name)
            activations[node.input[0]] = None
            axis = _WEIGHT_AXIS[node.op_type]
            if node.op_type == "Gemm":
                axis = 0 if any(a.name == "transB" and a.i for a in node.attribute) else 1
            weights[node.input[1]] = axis
    if not quantized:
        raise BadInputError(f"{float_path} has no Conv/MatMul/Gemm with weights and no attention to quantize in FP8")

    # max calibration of every tensor without a fixed range
    measured = [name for name, fixed in activations.items() if fixed is None]
    session = session_with_outputs(work, measured)
    amax = dict.fromkeys(measured, 0.0)
    for index, feed in enumerate(data.feeds):
        values = session.run(measured, {k: v for k, v in feed.items()})
        for name, value in zip(measured, values):
            amax[name] = max(amax[name], float(np.abs(value).max()) if value.size else 0.0)
        say(f"FP8 calibration {index + 1}/{len(data.feeds)}")
    del session
    floor = 2.0 ** -14   # FP16's smallest normal: the FP16 file's scales must stay positive

    new_nodes = []
    zero = "xattn_fp8_zero_point"
    graph.initializer.append(_fp8_zeros(zero, ()))

    def pair(name: str, scale_name: str, zero_name: str, **attrs) -> str:
        q, dq = f"{name}_fp8_q", f"{name}_fp8_dq"
        new_nodes.append(helper.make_node("QuantizeLinear", [name, scale_name, zero_name], [q], name=q, **attrs))
        new_nodes.append(helper.make_node("DequantizeLinear", [q, scale_name, zero_name], [dq], name=dq, **attrs))
        return dq

    replaced: dict[str, str] = {}
    for name, fixed in activations.items():
        scale = f"{name}_fp8_scale"
        value = max((fixed if fixed is not None else amax[name]) / FP8_MAX, floor)
        graph.initializer.append(numpy_helper.from_array(np.array(value, np.float32), scale))
        replaced[name] = pair(name, scale, zero)
    for name, axis in weights.items():
        w = numpy_helper.to_array(initializers[name]).astype(np.float32)
        axis = axis % w.ndim
        reduce = tuple(a for a in range(w.ndim) if a != axis)
        scale = np.maximum(np.abs(w).max(axis=reduce) / FP8_MAX, floor).astype(np.float32)
        graph.initializer.append(numpy_helper.from_array(scale, f"{name}_fp8_scale"))
        graph.initializer.append(_fp8_zeros(f"{name}_fp8_zero_point", scale.shape))
        replaced[name] = pair(name, f"{name}_fp8_scale", f"{name}_fp8_zero_point", axis=axis)
    # the quantized nodes read the DQ of their inputs; the second attention MatMul's output is read through its
    # DQ by every reader. Other readers of a quantized input (a residual) keep the float value, as ModelOpt does.
    outputs_quantized = {node.output[0] for node in graph.node if attention_nodes.get(node.name) == "bmm2"}
    for node in graph.node:
        for i, name in enumerate(node.input):
            if name in replaced and (node.name in quantized or name in outputs_quantized):
                node.input[i] = replaced[name]
    graph.node.extend(new_nodes)
    from xattn.onnxfile import topological_sort

    topological_sort(graph)
    converted = graph_to_fp16(work)
    record.update({"precision": "fp8", "target": "tensorrt", "attention_op": "matmul",
                   "quantization": {"format": "QDQ", "type": "float8e4m3fn", "target": "tensorrt",
                                    "method": "max", "samples": len(data.feeds), "data": data.label,
                                    "data_sha256": data.sha256, "synthetic_data": data.synthetic,
                                    "attention_fp8": [b.softmax for b in blocks], "high_precision": "fp16",
                                    "inputs": data.statistics()},
                   "source": {"path": float_path.name, "sha256": sha256_file(float_path)}})
    set_onnx_metadata(converted, record)
    refresh_value_info(converted)
    level, wrong = _level_that_computes_it(converted, data.feeds[0])
    if wrong:
        notes.append(f"ONNX Runtime computes this file wrongly when it optimises it ({wrong}); its record says "
                     f"{level}, which every toolkit session on it uses")
    set_onnx_metadata(converted, {LEVEL_KEY: level, LEVEL_VERSION_KEY: ort_version_label(),
                                  LEVEL_CRASHES_KEY: wrong or "none"})
    save_onnx(converted, output, probe=False)
    return Fp8Result(Path(output), quantized, [b.softmax for b in blocks], notes)


#: Optimised and unoptimised runs of the same FP8 file must agree this closely (they differ by summation order)
SAME_RESULT = 1e-3


def _level_that_computes_it(model, feed) -> tuple[str, str]:
    """The most optimised ONNX Runtime level whose result matches the unoptimised graph's, and what went wrong
    above it. ONNX Runtime 1.32 rewrites float8 Q/DQ wrongly from ORT_ENABLE_BASIC up (relative L2 3.5 against
    0.04 unoptimised on the default model): no crash for the probe to see, so the result itself is compared."""
    from xattn.ort_session import OPTIMIZATION_LEVELS, create_session, import_onnxruntime

    ort = import_onnxruntime()
    data = model.SerializeToString()
    results = {}
    for level in reversed(OPTIMIZATION_LEVELS):   # ORT_DISABLE_ALL first: the graph as written
        options = ort.SessionOptions()
        options.log_severity_level = 3
        options.graph_optimization_level = getattr(ort.GraphOptimizationLevel, level)
        session = create_session(data, options, ["CPUExecutionProvider"], "the FP8 file")
        results[level] = [np.asarray(v, np.float64) for v in session.run(None, dict(feed))]
    reference = results["ORT_DISABLE_ALL"]
    wrong = []
    for level in OPTIMIZATION_LEVELS:
        error = max(float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30)) for a, b in zip(results[level], reference))
        if error <= SAME_RESULT:
            return level, ", ".join(wrong)
        wrong.append(f"{level}: rel. L2 {error:.2g} from the unoptimised result")
    return "ORT_DISABLE_ALL", ", ".join(wrong)
