"""Explicit INT8 quantization: a Q/DQ ONNX that TensorRT 10 and 11 build and ONNX Runtime runs.

Our range table decides the scales; ONNX Runtime's ``QDQQuantizer`` places the Q/DQ pairs. The
result is checked for what TensorRT requires before it is written: every zero point 0 (symmetric),
weights quantized per output channel (axis 0). By default only convolutions are quantized: the
attention matmuls and softmax stay in float (NVIDIA's own placement for long sequences; a 64x64
map is 4096 tokens).

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

from calibration.data import CalibrationData
from calibration.ranges import DEFAULT_OP_TYPES, RangeTable
from xattn.errors import BadInputError, CheckFailedError
from xattn.fileio import atomic_path, sha256_file
from xattn.provenance import get_onnx_metadata, set_onnx_metadata


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


@dataclass
class QuantizeResult:
    path: Path
    quantized_nodes: list[str]
    excluded_nodes: list[str]
    sha256: str
    history: list[dict] = field(default_factory=list)


def quantizable_nodes(model, op_types: Sequence[str]) -> list[str]:
    return [node.name for node in model.graph.node if node.op_type in op_types]


def _quantize_proto(float_path: Path, ranges: RangeTable, settings: QuantizeSettings):
    """Run ONNX Runtime's QDQ quantizer with our ranges; return the quantized ModelProto."""
    from onnxruntime.quantization.calibrate import CalibrationMethod, TensorData, TensorsData
    from onnxruntime.quantization.qdq_quantizer import QDQQuantizer
    from onnxruntime.quantization.quant_utils import QuantType, load_model_with_shape_infer

    model = load_model_with_shape_infer(float_path)
    tensors = TensorsData(CalibrationMethod.MinMax, {
        name: TensorData(lowest=np.array(-amax, np.float32), highest=np.array(amax, np.float32))
        for name, amax in ranges.amax.items()})
    extra = {
        "ActivationSymmetric": True,   # zero points 0: TensorRT accepts nothing else
        "WeightSymmetric": True,
        "QuantizeBias": False,         # float bias, as TensorRT's explicit-quantization guide does
        "QDQOpTypePerChannelSupportToAxis": {"Conv": 0, "ConvTranspose": 1, "MatMul": 1},
    }
    quiet = logging.getLogger()
    level = quiet.level
    quiet.setLevel(logging.ERROR)  # the quantizer logs advice about pre-processing on every call
    try:
        quantizer = QDQQuantizer(model, settings.per_channel, False, QuantType.QInt8, QuantType.QInt8, tensors,
                                 [], list(settings.exclude_nodes), list(settings.op_types), extra)
        quantizer.quantize_model()
    finally:
        quiet.setLevel(level)
    return quantizer.model.model


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
    """Raise unless every zero point is 0 and every quantized weight is per-channel on axis 0."""
    from onnx import numpy_helper

    initializers = {i.name: i for i in model.graph.initializer}
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
            if len(weight.dims) == 4 and (scale.ndim != 1 or scale.shape[0] != weight.dims[0] or axis != 0):
                raise CheckFailedError(f"weight {weight.name} is not quantized per output channel")


def quantize_onnx(float_path: str | os.PathLike, ranges: RangeTable, output: str | os.PathLike,
                  settings: QuantizeSettings | None = None) -> QuantizeResult:
    """Write the Q/DQ INT8 model of ``float_path`` to ``output`` (atomically); deterministic bytes."""
    import onnx

    from exporter.inspect_onnx import load_onnx

    settings = settings or QuantizeSettings()
    float_path = Path(float_path)
    model = load_onnx(float_path)
    if get_onnx_metadata(model).get("precision", "fp32") != "fp32":
        raise BadInputError(f"{float_path} is already {get_onnx_metadata(model)['precision']}",
                            hint="quantize the fp32 ONNX")
    ranges.check_model(model, "the range table")
    candidates = quantizable_nodes(model, settings.op_types)
    unknown = sorted(set(settings.exclude_nodes) - {n.name for n in model.graph.node})
    if unknown:
        raise BadInputError(f"--exclude-nodes names unknown nodes {', '.join(unknown)}",
                            hint=f"quantizable nodes: {', '.join(candidates)}")
    if not candidates:
        raise BadInputError(f"{float_path} has no {'/'.join(settings.op_types)} nodes to quantize")
    proto = _quantize_proto(float_path, ranges, settings)
    keep_float_inputs_float(proto, settings.op_types)
    check_qdq_for_tensorrt(proto)
    record = get_onnx_metadata(model)
    record.update({
        "precision": "int8",
        "quantization": {"format": "QDQ", "symmetric": True, "per_channel": settings.per_channel,
                         "op_types": list(settings.op_types), "excluded_nodes": sorted(settings.exclude_nodes),
                         "method": ranges.method, "percentile": ranges.percentile, "samples": ranges.samples,
                         "data": ranges.data_label, "data_sha256": ranges.data_sha256,
                         "synthetic_data": ranges.synthetic},
        "source": {"path": float_path.name, "sha256": sha256_file(float_path)},
    })
    set_onnx_metadata(proto, record)
    with atomic_path(output) as tmp:
        onnx.save(proto, str(tmp))
    quantized = [n for n in candidates if n not in settings.exclude_nodes]
    return QuantizeResult(Path(output), quantized, sorted(settings.exclude_nodes), sha256_file(output))


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

    with OnnxRuntimeRunner(float_path, ["cpu"]) as runner:
        return [runner.infer(feed) for feed in data.feeds]


def accuracy_against(candidate_path: Path, data: CalibrationData, reference: list[dict[str, np.ndarray]]) -> tuple[float, float]:
    """Pooled relative L2 and cosine of every output over ``data`` (candidate vs reference outputs)."""
    from runtime.metrics import compare
    from runtime.onnxrt import OnnxRuntimeRunner

    with OnnxRuntimeRunner(candidate_path, ["cpu"]) as runner:
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
    with tempfile.TemporaryDirectory(prefix="xattn-quant-") as scratch:
        def trial(excluded: Sequence[str]) -> tuple[float, float]:
            path = Path(scratch) / "trial.onnx"
            quantize_onnx(float_path, ranges, path, replace(settings, exclude_nodes=tuple(excluded)))
            return accuracy_against(path, heldout, reference)

        excluded = list(settings.exclude_nodes)
        rel, cos = trial(excluded)
        history = [{"kept_in_float": None, "rel_l2": rel, "cosine": cos}]
        say(f"quantized: rel. L2 {rel:.4g}, cosine {cos:.6f} on held-out data (target {target.describe()})")
        if not target.met_by(rel, cos):
            from exporter.inspect_onnx import load_onnx

            candidates = [n for n in quantizable_nodes(load_onnx(float_path), settings.op_types) if n not in excluded]
            gains = []
            for node in candidates:
                node_rel, _ = trial(excluded + [node])
                gains.append((rel - node_rel, node))
                say(f"sensitivity of {node}: keeping it in float gives rel. L2 {node_rel:.4g}")
            for _, node in sorted(gains, key=lambda g: (-g[0], g[1])):
                excluded.append(node)
                rel, cos = trial(excluded)
                history.append({"kept_in_float": node, "rel_l2": rel, "cosine": cos})
                say(f"kept {node} in float: rel. L2 {rel:.4g}, cosine {cos:.6f}")
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

