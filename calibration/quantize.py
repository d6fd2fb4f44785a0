"""Explicit INT8 quantization: a Q/DQ ONNX placed for the backend that will run it.

Our range table decides the scales; where the Q/DQ pairs go depends on the target, because the two
backends want different things (measured on the default model, README):

* ``target="tensorrt"`` (default): NVIDIA's placement for TensorRT (as ModelOpt does it): Q/DQ on the
  *inputs* of quantized ops and on their weights only (per output channel, symmetric, zero points 0,
  float bias), never on Softmax; everything not quantized in FP16 (``high_precision="fp16"``) with the
  attention scale on Q, so TensorRT can quantize the convolutions and fuse attention in FP16. Q/DQ on
  convolution *outputs* would add a second rounding that TensorRT does not need.
* ``target="onnxruntime"``: ONNX Runtime's CPU forms ``QLinearConv`` only with Q/DQ on outputs too,
  so its own quantizer places them; activations are uint8 (ReLU outputs use the full 0..255 range) and
  weights are 7-bit (``reduce_range``) for x86 CPUs without VNNI, ONNX Runtime's guidance, where 8-bit
  u8s8 products saturate (measured on an AVX2 machine: relative L2 10% with full-range int8, 1.7% with
  this choice), and full 8-bit for CPUs with VNNI or AMX (``cpu_target``, default: this machine's
  features), where the products cannot saturate. Attention is then rewritten to
  ``com.microsoft.MultiHeadAttention``.

By default only convolutions are quantized: attention stays float (FP16 for TensorRT), the placement
NVIDIA recommends for long sequences (a 64x64 map is 4096 tokens).

``quantize_to_target`` adds the automatic fallback: when the quantized model misses an accuracy
target on held-out data, the most sensitive nodes are kept in float, one at a time, until it holds.
"""

from __future__ import annotations

import logging
import os
import tempfile
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from xattn.data import CalibrationData
from calibration.ranges import DEFAULT_OP_TYPES, RangeTable
from xattn.errors import BadInputError, CheckFailedError
from xattn.fileio import sha256_file
from xattn.nodes import LINEAR
from xattn.provenance import get_onnx_metadata, require_fp32, set_onnx_metadata


@dataclass(frozen=True)
class QuantizeSettings:
    """What to quantize.

    Attributes:
        op_types: node types to quantize (default Conv; ``MatMul`` quantizes attention too).
        exclude_nodes: node names to keep in float.
        per_channel: per-output-channel weight scales (default True; TensorRT's recommendation).
    """

    op_types: tuple[str, ...] = DEFAULT_OP_TYPES
    exclude_nodes: tuple[str, ...] = ()
    per_channel: bool = True
    #: ``"tensorrt"`` or ``"onnxruntime"`` (see the module docstring).
    target: str = "tensorrt"
    #: Precision of what is not quantized, for the TensorRT target: ``"fp16"`` (default) or ``"fp32"``.
    high_precision: str = "fp16"
    #: TensorRT target: ``"matmul"`` (default) or ``"onnx"`` (opset-23 ``Attention``; TensorRT >= 10.14 / 11.x).
    attention_op: str = "matmul"
    #: ONNX Runtime target: the CPU the file is for. ``"this"`` (default: this machine's features), ``"vnni"``
    #: (VNNI/AMX: full 8-bit weights) or ``"no-vnni"`` (AVX2 only: 7-bit weights, see the module docstring).
    cpu_target: str = "this"

    def reduce_range(self) -> bool:
        """7-bit weights unless the target CPU has VNNI/AMX (u8 x s8 dot products without saturation)."""
        from xattn.cpu import cpu_features, has_vnni

        if self.cpu_target == "this":
            return not has_vnni(cpu_features())
        return self.cpu_target == "no-vnni"

    def check(self) -> None:
        if self.cpu_target not in CPU_TARGETS:
            raise BadInputError(f"unknown --cpu-target {self.cpu_target!r}", hint=f"use one of {', '.join(CPU_TARGETS)}")
        if self.target not in TARGETS:
            raise BadInputError(f"unknown target {self.target!r}", hint=f"use one of {', '.join(TARGETS)}")
        if self.high_precision not in ("fp16", "fp32"):
            raise BadInputError(f"--high-precision {self.high_precision!r} is not fp16 or fp32")
        if self.attention_op not in ("matmul", "onnx"):
            raise BadInputError(f"unknown --attention-op {self.attention_op!r}", hint="use matmul or onnx")
        if self.attention_op == "onnx" and self.target != "tensorrt":
            raise BadInputError("--attention-op onnx is for the TensorRT target",
                                hint="ONNX Runtime's CPU runs ONNX Attention slower than the plain graph (README)")
        if self.attention_op == "onnx" and self.high_precision == "fp32":
            # TensorRT imports ONNX Attention as a non-decomposable IAttention (onnx-tensorrt reads
            # TRT_decomposable, default 0, which onnx.checker will not let a file carry), so a build must find
            # one fused kernel for it, and FP32 attention has none to count on: the build would fail
            raise BadInputError("--attention-op onnx with --high-precision fp32: TensorRT imports ONNX Attention as "
                                "non-decomposable and needs a fused kernel, which FP32 attention may not have",
                                hint="use --high-precision fp16 (attention in FP16), or the default --attention-op matmul")
        if self.attention_op == "onnx" and "MatMul" in self.op_types:
            raise BadInputError("--attention-op onnx keeps attention in FP16: do not quantize MatMul with it")
        if "Softmax" in self.op_types:
            raise BadInputError("Softmax cannot be quantized (no INT8 kernel, and its outputs are far below 1/127)",
                                hint="quantize Conv and/or MatMul")


TARGETS = ("tensorrt", "onnxruntime")
CPU_TARGETS = ("this", "vnni", "no-vnni")
#: Held-out feeds used to rank nodes by sensitivity (the target itself is judged on all of them).
RANK_FEEDS = 16


@dataclass
class QuantizeResult:
    path: Path
    quantized_nodes: list[str]
    excluded_nodes: list[str]
    sha256: str
    history: list[dict] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def quantizable_nodes(model, op_types: Sequence[str]) -> list[str]:
    from xattn.nodes import selected_nodes

    return [node.name for node in selected_nodes(model, op_types)]


def _cpu_record(settings: QuantizeSettings) -> dict:
    """What the ONNX Runtime INT8 file was made for: the CPU target, whether it needs VNNI, and the features of
    the machine that made it."""
    from xattn.cpu import describe_cpu

    return {"target": settings.cpu_target, "needs_vnni": not settings.reduce_range(), **describe_cpu()}


def _qdq_onnxruntime(float_path: Path, ranges: RangeTable, settings: QuantizeSettings):
    """ONNX Runtime's placement: its QDQ quantizer with our ranges (inputs and outputs of quantized ops)."""
    from onnxruntime.quantization.calibrate import CalibrationMethod, TensorData, TensorsData
    from onnxruntime.quantization.qdq_quantizer import QDQQuantizer
    from onnxruntime.quantization.quant_utils import QuantType, load_model_with_shape_infer

    with tempfile.TemporaryDirectory(prefix="xattn-quant-") as scratch:
        # ONNX Runtime's loader writes '<name>-inferred.onnx' beside the file it is given: give it a
        # private copy, never the user's folder (that file could be the user's, or the folder read-only).
        private = Path(scratch) / "model.onnx"
        private.write_bytes(Path(float_path).read_bytes())
        model = load_model_with_shape_infer(private)
    producer = {out: n for n in model.graph.node for out in n.output}
    consumers: dict[str, list] = {}
    for node in model.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)

    def non_negative(name: str) -> bool:
        """A ReLU output, or a tensor only a ReLU reads (ONNX Runtime fuses Conv+Relu): range [0, amax]."""
        source = producer.get(name)
        users = consumers.get(name, [])
        return (source is not None and source.op_type == "Relu") or (bool(users) and all(u.op_type == "Relu" for u in users))

    tensors = TensorsData(CalibrationMethod.MinMax, {
        name: TensorData(lowest=np.array(0.0 if non_negative(name) else -amax, np.float32),
                         highest=np.array(amax, np.float32))
        for name, amax in ranges.amax.items()})
    extra = {
        "ActivationSymmetric": False,  # uint8 activations: a ReLU output gets zero point 0 and all 256 codes
        "WeightSymmetric": True,
        "QuantizeBias": False,         # float bias, as TensorRT's explicit-quantization guide does
        "QDQOpTypePerChannelSupportToAxis": {"Conv": 0, "ConvTranspose": 1, "MatMul": 1},
    }
    quiet = logging.getLogger()
    level = quiet.level
    quiet.setLevel(logging.ERROR)  # the quantizer logs advice about pre-processing on every call
    try:
        # reduce_range: 7-bit weights, so u8 x s8 pairs cannot saturate int16 on CPUs without VNNI; with VNNI
        # (or AMX) the products are summed in int32 and full 8-bit weights are as fast and more accurate
        op_types, exclude = list(settings.op_types), list(settings.exclude_nodes)
        if LINEAR in op_types:   # ONNX Runtime knows op types only: MatMul/Gemm minus the attention matmuls
            from xattn.nodes import selected

            op_types = sorted((set(op_types) - {LINEAR}) | {"MatMul", "Gemm"})
            weights = {i.name for i in model.graph.initializer}
            exclude += [n.name for n in model.graph.node if n.op_type in ("MatMul", "Gemm")
                        and not selected(n, settings.op_types, weights)]
        quantizer = QDQQuantizer(model, settings.per_channel, settings.reduce_range(), QuantType.QInt8,
                                 QuantType.QUInt8, tensors,
                                 [], exclude, op_types, extra)
        quantizer.quantize_model()
    finally:
        quiet.setLevel(level)
    return quantizer.model.model


#: Per-channel axis of a quantized op's weight: the output channels.
_WEIGHT_AXIS = {"Conv": 0, "ConvTranspose": 1, "MatMul": 1, "Gemm": 0}
#: Weight inputs by op (index); other initializer inputs (bias) stay float, as TensorRT's guide does.
_WEIGHT_INPUT = {"Conv": 1, "ConvTranspose": 1, "MatMul": 1, "Gemm": 1}


def _qdq_tensorrt(model, ranges: RangeTable, settings: QuantizeSettings):
    """NVIDIA's placement for TensorRT: Q/DQ on each quantized op's activation inputs (per tensor, from
    the range table) and weights (per output channel), zero points 0, nothing on outputs or Softmax."""
    import onnx
    from onnx import helper, numpy_helper

    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    initializers = {i.name: i for i in graph.initializer}
    excluded = set(settings.exclude_nodes)
    done: dict[str, str] = {}
    new_nodes = []
    zero = "xattn_qdq_zero_point"
    graph.initializer.append(numpy_helper.from_array(np.array(0, np.int8), zero))

    def activation(name: str) -> str:
        if name not in done:
            if name not in ranges.amax:
                raise BadInputError(f"the range table has no range for {name!r}, an input of a quantized node",
                                    hint="calibrate with the same --quantize-ops")
            scale = f"{name}_qdq_scale"
            # at least FP16's smallest normal, as weights: the FP16 file's scales are FP16, and an activation with
            # amax < 7.6e-6 would otherwise round to a zero scale that TensorRT's parser refuses (review 2, N16)
            graph.initializer.append(numpy_helper.from_array(
                np.array(max(float(ranges.amax[name]) / 127.0, 2.0 ** -14), np.float32), scale))
            new_nodes.append(helper.make_node("QuantizeLinear", [name, scale, zero], [f"{name}_q"], name=f"{name}_q"))
            new_nodes.append(helper.make_node("DequantizeLinear", [f"{name}_q", scale, zero], [f"{name}_dq"],
                                              name=f"{name}_dq"))
            done[name] = f"{name}_dq"
        return done[name]

    def weight(name: str, axis: int) -> str:
        key = f"weight:{name}"
        if key not in done:
            w = numpy_helper.to_array(initializers[name]).astype(np.float32)
            axis_ = axis % w.ndim
            reduce = tuple(a for a in range(w.ndim) if a != axis_)
            amax = np.abs(w).max(axis=reduce) if settings.per_channel else np.abs(w).max(keepdims=True).ravel()
            # at least fp16's smallest normal, so the scale survives conversion to FP16 exactly enough
            scale = np.maximum(amax / 127.0, 2.0 ** -14).astype(np.float32)
            shape = [1] * w.ndim
            if settings.per_channel:
                shape[axis_] = -1
            q = np.clip(np.rint(w / scale.reshape(shape)), -127, 127).astype(np.int8)
            qname, sname = f"{name}_int8", f"{name}_int8_scale"
            graph.initializer.extend([numpy_helper.from_array(q, qname), numpy_helper.from_array(scale, sname)])
            zname = zero
            if settings.per_channel:
                zname = f"{name}_int8_zero_point"
                graph.initializer.append(numpy_helper.from_array(np.zeros(scale.shape, np.int8), zname))
            attrs = {"axis": axis_} if settings.per_channel else {}
            new_nodes.append(helper.make_node("DequantizeLinear", [qname, sname, zname], [f"{name}_dq"],
                                              name=f"{name}_dq", **attrs))
            done[key] = f"{name}_dq"
        return done[key]

    from xattn.nodes import selected

    weights = set(initializers)
    for node in list(graph.node):
        if not selected(node, settings.op_types, weights) or node.name in excluded:
            new_nodes.append(node)
            continue
        for index, name in enumerate(node.input):
            if not name:
                continue
            if name in initializers:
                if index == _WEIGHT_INPUT.get(node.op_type) and initializers[name].data_type == onnx.TensorProto.FLOAT:
                    axis = _WEIGHT_AXIS.get(node.op_type, 0)
                    if node.op_type == "Gemm":   # B is (out, in) with transB=1 (nn.Linear's export), else (in, out)
                        axis = 0 if any(a.name == "transB" and a.i for a in node.attribute) else 1
                    node.input[index] = weight(name, axis)
            elif index in (0, 1):
                node.input[index] = activation(name)
        new_nodes.append(node)
    del graph.node[:]
    graph.node.extend(new_nodes)
    used = {n for node in graph.node for n in node.input}
    for init in [i for i in graph.initializer if i.name not in used]:
        graph.initializer.remove(init)
    return out


_SHAPE_ONLY = {"Reshape", "Transpose", "Squeeze", "Unsqueeze", "Flatten", "Identity"}
_ATTENTION_OPS = {"MatMul", "Gemm", "Softmax"}


def keep_float_inputs_float(model, op_types) -> list[str]:
    """Remove activation Q/DQ pairs whose values reach only non-quantized attention ops.

    ONNX Runtime's quantizer also quantizes a quantized node's *output*. For the projection convs that
    output flows (through Reshape/Transpose) straight into the attention MatMuls, and ONNX Runtime
    (MatMulIntegerToFloat) and TensorRT then fuse the DQ into an integer attention matmul: attention
    would no longer stay in float. Such pairs are removed here; pairs feeding another quantized node
    stay (ONNX Runtime needs them to form QLinearConv). Returns the tensors whose Q/DQ was removed.
    """
    consumers: dict[str, list] = {}
    for node in model.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    graph_outputs = {o.name for o in model.graph.output}
    initializers = {i.name for i in model.graph.initializer}
    float_ops = _ATTENTION_OPS - set(op_types)

    def reaches_only_float_attention(tensor: str) -> bool:
        users = consumers.get(tensor, [])
        if not users or tensor in graph_outputs:
            return False
        for user in users:
            if user.op_type in _SHAPE_ONLY:
                if not reaches_only_float_attention(user.output[0]):
                    return False
            elif user.op_type not in float_ops:
                return False
        return True

    removed, drop = [], []
    for q in model.graph.node:
        if q.op_type != "QuantizeLinear" or q.input[0] in initializers:
            continue
        dqs = consumers.get(q.output[0], [])
        if not dqs or any(d.op_type != "DequantizeLinear" for d in dqs):
            continue
        if all(reaches_only_float_attention(d.output[0]) for d in dqs):
            for dq in dqs:
                for user in consumers.get(dq.output[0], []):
                    for index, name in enumerate(user.input):
                        if name == dq.output[0]:
                            user.input[index] = q.input[0]
                drop.append(dq)
            drop.append(q)
            removed.append(q.input[0])
    for node in drop:
        model.graph.node.remove(node)
    used = {name for node in model.graph.node for name in node.input}
    for init in [i for i in model.graph.initializer if i.name not in used]:
        model.graph.initializer.remove(init)
    return removed


def check_qdq_for_tensorrt(model) -> None:
    """Raise unless every zero point is 0 and every quantized 4-D weight is per-channel on its op's output-channel
    axis (:data:`_WEIGHT_AXIS`: 0 for Conv's KCRS, 1 for ConvTranspose's CKRS)."""
    from onnx import numpy_helper

    initializers = {i.name: i for i in model.graph.initializer}
    readers: dict[str, str] = {}
    for node in model.graph.node:
        for name in node.input:
            readers.setdefault(name, node.op_type)
    for node in model.graph.node:
        if node.op_type not in ("QuantizeLinear", "DequantizeLinear"):
            continue
        if len(node.input) > 2 and node.input[2] in initializers:
            zero = numpy_helper.to_array(initializers[node.input[2]])
            if np.any(zero != 0):
                raise CheckFailedError(f"node {node.name} has non-zero zero points: TensorRT needs symmetric Q/DQ")
        if node.op_type == "DequantizeLinear" and node.input[0] in initializers:
            scale = numpy_helper.to_array(initializers[node.input[1]])
            weight = initializers[node.input[0]]
            axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
            want = _WEIGHT_AXIS.get(readers.get(node.output[0], "Conv"), 0)
            if len(weight.dims) == 4 and (scale.ndim != 1 or axis != want or scale.shape[0] != weight.dims[want]):
                raise CheckFailedError(f"weight {weight.name} is not quantized per output channel")


#: The fused Q/DQ graph must match the unfused one this closely (relative L2 on random inputs). Attention stays
#: float in both, but a summation-order difference can flip a later quantization step (2.1e-4 measured on the
#: default model); a wrong rewrite is off by O(1), and INT8's own error is about 1e-2.
FUSED_REWRITE_TOLERANCE = 1e-3


def _rewrite_difference(before, after, record) -> float | None:
    """Relative L2 between two graphs' outputs on random inputs at the recorded opt shapes (None if they
    cannot be run)."""
    from xattn.ort_session import create_session, import_onnxruntime
    from xattn.data import random_feed
    from xattn.shapes import parse_shape_set

    try:
        shapes = parse_shape_set(record["opt_shapes"])
        feed = random_feed(shapes, seed=7)
        ort = import_onnxruntime()
        outputs = []
        for proto in (before, after):
            options = ort.SessionOptions()
            options.log_severity_level = 3
            session = create_session(proto.SerializeToString(), options, ["CPUExecutionProvider"], "the fused graph")
            outputs.append(session.run(None, feed))
    except Exception:   # noqa: BLE001 - no record or not runnable: unknown, so not trusted
        return None
    worst = 0.0
    for a, b in zip(*outputs):
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        worst = max(worst, float(np.linalg.norm(a - b) / max(np.linalg.norm(a), 1e-30)))
    return worst


def quantize_onnx(float_path: str | os.PathLike, ranges: RangeTable, output: str | os.PathLike,
                  settings: QuantizeSettings | None = None) -> QuantizeResult:
    """Write the Q/DQ INT8 model of ``float_path`` to ``output`` (atomically); deterministic bytes."""
    from xattn.onnxfile import load_onnx

    settings = settings or QuantizeSettings()
    settings.check()
    float_path = Path(float_path)
    model = require_fp32(load_onnx(float_path), float_path, "quantize")
    ranges.check_model(model, "the range table")
    candidates = quantizable_nodes(model, settings.op_types)
    unknown = sorted(set(settings.exclude_nodes) - {n.name for n in model.graph.node})
    if unknown:
        raise BadInputError(f"--exclude-nodes names unknown nodes {', '.join(unknown)}",
                            hint=f"quantizable nodes: {', '.join(candidates)}")
    if not candidates:
        raise BadInputError(f"{float_path} has no {'/'.join(settings.op_types)} nodes to quantize")
    notes = []
    if settings.target == "tensorrt":
        from exporter.attention import move_scale_to_query

        work, moved = move_scale_to_query(model)
        if moved:
            notes.append(f"attention scale moved onto Q in {', '.join(moved)}")
        proto = _qdq_tensorrt(work, ranges, settings)
        check_qdq_for_tensorrt(proto)
        if settings.attention_op == "onnx":
            from exporter.attention import to_onnx_attention

            proto, replaced, _ = to_onnx_attention(proto)
            notes.append(f"attention written as ONNX Attention (opset 23): {', '.join(replaced) or 'none'}")
        if settings.high_precision == "fp16":
            from exporter.fp16 import graph_to_fp16

            proto = graph_to_fp16(proto)
    else:
        from exporter.attention import fuse_for_onnxruntime

        proto = _qdq_onnxruntime(float_path, ranges, settings)
        keep_float_inputs_float(proto, settings.op_types)
        unfused = proto
        proto, fused, left = fuse_for_onnxruntime(proto)
        if fused:   # a rewrite is verified before it is written: against the same Q/DQ graph unfused
            difference = _rewrite_difference(unfused, proto, get_onnx_metadata(model))
            if difference is None or difference > FUSED_REWRITE_TOLERANCE:
                notes.append(f"attention left unfused: the fused graph differs from the unfused one (relative L2 "
                             f"{difference if difference is not None else 'unknown'}); the unfused one is written")
                proto, fused = unfused, []
        notes += [f"attention fused (com.microsoft.MultiHeadAttention): {', '.join(fused)}"] if fused else []
        notes += [f"attention left unfused: {name} ({why})" for name, why in left]
    record = get_onnx_metadata(model)
    record.update({
        "precision": "int8",
        "target": settings.target,
        "attention_op": settings.attention_op,
        "quantization": {"format": "QDQ", "target": settings.target,
                         "symmetric": settings.target == "tensorrt", "per_channel": settings.per_channel,
                         "activations": "int8" if settings.target == "tensorrt" else "uint8",
                         "weights": "int8" if settings.target == "tensorrt" or not settings.reduce_range()
                         else "int8 reduce_range (7-bit)",
                         "cpu": _cpu_record(settings) if settings.target == "onnxruntime" else None,
                         "placement": "inputs+weights" if settings.target == "tensorrt" else "inputs+outputs+weights",
                         "high_precision": settings.high_precision if settings.target == "tensorrt" else "fp32",
                         "op_types": list(settings.op_types), "excluded_nodes": sorted(settings.exclude_nodes),
                         "method": ranges.method, "percentile": ranges.percentile, "samples": ranges.samples,
                         "data": ranges.data_label, "data_sha256": ranges.data_sha256,
                         "synthetic_data": ranges.synthetic, "inputs": ranges.inputs},
        "source": {"path": float_path.name, "sha256": sha256_file(float_path)},
    })
    set_onnx_metadata(proto, record)
    from xattn.onnxfile import refresh_value_info, save_onnx

    refresh_value_info(proto)
    save_onnx(proto, output)
    quantized = [n for n in candidates if n not in settings.exclude_nodes]
    return QuantizeResult(Path(output), quantized, sorted(settings.exclude_nodes), sha256_file(output), notes=notes)


# -- accuracy on held-out data and the automatic fallback --------------------------------------------

@dataclass(frozen=True)
class AccuracyTarget:
    """Quantization must reach ``max_rel_l2`` and/or ``min_cosine`` against the float model."""

    max_rel_l2: float | None = None
    min_cosine: float | None = None

    def met_by(self, rel_l2: float, cosine: float) -> bool:
        return ((self.max_rel_l2 is None or rel_l2 <= self.max_rel_l2)
                and (self.min_cosine is None or cosine >= self.min_cosine))

    def describe(self) -> str:
        parts = []
        if self.max_rel_l2 is not None:
            parts.append(f"rel. L2 <= {self.max_rel_l2:g}")
        if self.min_cosine is not None:
            parts.append(f"cosine >= {self.min_cosine:g}")
        return " and ".join(parts)


def float_outputs(float_path: Path, data: CalibrationData) -> list[dict[str, np.ndarray]]:
    from runtime.onnxrt import OnnxRuntimeRunner

    with OnnxRuntimeRunner(float_path, ["cpu"], memory_arena=False) as runner:
        return [runner.infer(feed) for feed in data.feeds]


def accuracy_against(candidate_path: Path, data: CalibrationData, reference: list[dict[str, np.ndarray]]) -> tuple[float, float]:
    """Pooled relative L2 and cosine of every output over ``data`` (candidate vs reference outputs)."""
    from runtime.metrics import compare
    from runtime.onnxrt import OnnxRuntimeRunner

    with OnnxRuntimeRunner(candidate_path, ["cpu"], memory_arena=False) as runner:
        got = [runner.infer(feed) for feed in data.feeds]
    worst_rel, worst_cos = 0.0, 1.0
    for name in reference[0]:
        c = np.concatenate([g[name].ravel() for g in got])
        r = np.concatenate([ref[name].ravel() for ref in reference])
        metrics = compare(c, r)
        worst_rel, worst_cos = max(worst_rel, metrics.rel_l2), min(worst_cos, metrics.cosine)
    return worst_rel, worst_cos


def quantize_to_target(float_path: str | os.PathLike, ranges: RangeTable, output: str | os.PathLike,
                       heldout: CalibrationData, target: AccuracyTarget, settings: QuantizeSettings | None = None,
                       progress: Callable[[str], None] | None = None) -> QuantizeResult:
    """Quantize; while ``target`` is missed on ``heldout``, keep the most sensitive node in float.

    Sensitivity of a node = how much the held-out relative L2 improves when that node alone is kept
    in float (measured, one quantization per node). Nodes are then kept in float in that order, one
    at a time, until the target holds or nothing is left to keep. The history (node kept, accuracy
    after) is returned with the result; a target that cannot be met raises :class:`CheckFailedError`
    after writing the last model tried (every measured node kept in float).
    """
    settings = settings or QuantizeSettings()
    say = progress or (lambda message: None)
    float_path = Path(float_path)
    reference = float_outputs(float_path, heldout)
    # Ranking nodes takes one quantization per node: it runs on at most RANK_FEEDS feeds with the rest of
    # the graph in FP32 (ONNX Runtime's CPU runs FP16 about 2x slower; the INT8 error it ranks is the same).
    # Every accuracy figure reported (and the target) uses the real settings on all held-out feeds.
    rank_data = replace(heldout, feeds=heldout.feeds[:RANK_FEEDS])
    rank_reference = reference[:RANK_FEEDS]
    rank_settings = replace(settings, high_precision="fp32", attention_op="matmul")   # the attention form does
    # not change a node's INT8 error, and FP32 ONNX Attention is refused for TensorRT (QuantizeSettings.check)
    with tempfile.TemporaryDirectory(prefix="xattn-quant-") as scratch:
        def trial(excluded: Sequence[str], ranking: bool = False) -> tuple[float, float]:
            path = Path(scratch) / "trial.onnx"
            quantize_onnx(float_path, ranges, path,
                          replace(rank_settings if ranking else settings, exclude_nodes=tuple(excluded)))
            if ranking:
                return accuracy_against(path, rank_data, rank_reference)
            return accuracy_against(path, heldout, reference)

        excluded = list(settings.exclude_nodes)
        rel, cos = trial(excluded)
        history = [{"kept_in_float": None, "rel_l2": rel, "cosine": cos}]
        say(f"quantized: rel. L2 {rel:.4g}, cosine {cos:.6f} on held-out data (target {target.describe()})")
        if not target.met_by(rel, cos):
            from xattn.onnxfile import load_onnx

            from xattn.nodes import module_of, node_label

            float_model = load_onnx(float_path)
            modules = {n.name: module_of(n) for n in float_model.graph.node}
            candidates = [n for n in quantizable_nodes(float_model, settings.op_types) if n not in excluded]
            base_rel, _ = trial(excluded, ranking=True)
            gains = []
            for node in candidates:
                node_rel, _ = trial(excluded + [node], ranking=True)
                gains.append((base_rel - node_rel, node))
                say(f"sensitivity of {node_label(node, modules.get(node))}: keeping it in float gives rel. L2 "
                    f"{node_rel:.4g} (ranking run)")
            for _, node in sorted(gains, key=lambda g: (-g[0], g[1])):
                excluded.append(node)
                rel, cos = trial(excluded)
                history.append({"kept_in_float": node, "module": modules.get(node), "rel_l2": rel, "cosine": cos})
                say(f"kept {node_label(node, modules.get(node))} in float: rel. L2 {rel:.4g}, cosine {cos:.6f}")
                if target.met_by(rel, cos):
                    break
    result = quantize_onnx(float_path, ranges, output, replace(settings, exclude_nodes=tuple(excluded)))
    result.history = history
    if not target.met_by(rel, cos):
        raise CheckFailedError(f"quantization cannot reach {target.describe()} on held-out data: best rel. L2 "
                               f"{rel:.4g}, cosine {cos:.6f} with {len(excluded)} nodes in float (that model is written "
                               f"to {output})",
                               hint="calibrate with more or better data, or another --method")
    return result

