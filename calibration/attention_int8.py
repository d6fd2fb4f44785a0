"""INT8 attention for OpenVINO's CPU plugin: ``xattn quantize --target openvino``.

Where the time goes on a CPU is attention (about 700 of the default model's 730 GFLOP at 192x192), and INT8
convolutions leave it untouched. Per block, this file quantizes

* the scores ``Q K^T`` (always): Q/DQ, int8, symmetric, one scale per tensor from the maximum over the
  calibration data, on Q and on K^T;
* the output ``P V`` (``products="both"``, ``--int8-products both``): each row of the probabilities divided by
  its own maximum (so the row's largest weight is exactly 1) through uint8 Q/DQ at the fixed scale 1/255, V
  through int8 Q/DQ with one scale per channel (and head), the product multiplied back by both. Exact but for
  the rounding: ``(P / r) (V / c) * r * c = P V`` for any ``r > 0`` per row and ``c > 0`` per channel, and neither
  factor runs along the reduction axis, so both come out of an integer dot product. The per-channel scale is
  written as a Mul before a per-tensor Q/DQ and one after the product (ONNX Runtime 1.32 refuses a per-axis zero
  point on a 4-D right operand when it fuses the Q/DQ). Dividing by the row maximum keeps the probabilities'
  resolution: quantized as they are (one scale for values in [0, 1]), with thousands of keys most weights sit
  below one uint8 step (2.6-2.7e-2 relative L2, measured in an earlier round).

OpenVINO's low-precision transformations run those MatMuls as integer products (VNNI where the CPU has it) and
keep the rest (Softmax, convolutions) at the precision asked, bf16 where the CPU has it. The queries are in slices
and the heads laid out as in ``model.ov.onnx`` (:func:`exporter.attention.chunk_queries`,
:func:`exporter.attention.heads_from_channels_last`), so the memory stays flat.

Why the scores alone by default (the default model, OpenVINO 2026.4 bf16, 2-core AMD EPYC with AVX512-VNNI/BF16,
``benchmarks/cpu_backends.py``; the README has the table): both products in int8 ran 5-16% faster again (2.22-2.39x
ONNX Runtime's fused file at 64-192 against 2.02-2.12x, two runs), but V in 8 bits is what costs accuracy where
attention is peaked, as on photos: worst of 32 held-out photo pairs against ONNX Runtime FP32, 4.25e-3 in bf16
instead of 3.05e-3 (2.77e-3 in FP32 instead of 5.1e-4), over the 3e-3 the toolkit holds its recommended CPU form to,
though inside the INT8 bound. On a random input, where attention is spread, the difference is smaller (2.74e-3
against 1.94e-3).

Scales are per tensor where a scale would vary along the reduction axis (per channel of K), because such a
scale cannot be taken out of an integer dot product. ONNX Runtime runs the file too (its Q/DQ computed in float),
so it validates anywhere.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import numpy as np

from xattn.data import CalibrationData
from xattn.errors import BadInputError
from xattn.fileio import sha256_file
from xattn.provenance import get_onnx_metadata, require_fp32, set_onnx_metadata

if TYPE_CHECKING:
    from calibration.bf16_weights import Bf16WeightsResult

#: the largest magnitude of a symmetric int8 value
INT8_MAX = 127.0
#: the largest uint8 value: the probabilities over their row maximum lie in [0, 1] and are quantized at 1 / this
UINT8_MAX = 255.0
#: which attention products are int8: ``scores`` (Q K^T) or ``both`` (Q K^T and P V); module docstring
INT8_PRODUCTS = ("scores", "both")
#: the row maximum is never below this, so a row of zeros (SDPA's NaN guard on a fully masked row) stays zeros
ROW_MAX_FLOOR = 1e-30


@dataclass
class AttentionInt8Result:
    path: Path
    blocks: list[str]
    #: quantized tensor -> its scale
    scales: dict[str, float | list[float]]   # V (products="both"): one scale per channel (and head)
    left: list[tuple[str, str]] = field(default_factory=list)
    #: the weights put on the bf16 grid (None: not asked)
    bf16_weights: "Bf16WeightsResult | None" = None
    #: query slices per block (Softmax name -> count, :func:`exporter.attention.plan_query_chunks`)
    chunks: dict[str, int] = field(default_factory=dict)
    #: the blocks whose second product (probabilities and V) is int8 too (``products="both"``)
    output_int8: list[str] = field(default_factory=list)
    #: ``(softmax, reason)`` of the blocks whose second product stays float although ``"both"`` was asked
    output_left: list[tuple[str, str]] = field(default_factory=list)


def quantize_attention_scores(float_path: str | os.PathLike, data: CalibrationData, output: str | os.PathLike, *,
                              bf16_weights: bool = True, products: str = "scores",
                              say: Callable[[str], None] | None = None) -> AttentionInt8Result:
    """Write ``float_path`` with each attention block's queries in slices and int8 Q/DQ on Q and K^T (module
    docstring), calibrated by maximum on ``data``. Refused when no block can be rewritten.

    ``products``: ``"both"`` puts the probabilities (uint8, over their row maximum) and V (int8 per channel)
    of each block's second product in 8 bits too, where that product reads a Softmax's output (or SDPA's NaN
    guard over one) and V; a block where it does not keeps that product float and is listed in
    ``AttentionInt8Result.output_left``.

    ``bf16_weights``: put the convolution and MatMul weights on the bf16 grid by error feedback on ``data``
    (:mod:`calibration.bf16_weights`): the file is for a bf16 run where the CPU has it, and there this keeps
    the weights' rounding error off the output (measured: 3.02e-3 -> 2.07e-3 worst on held-out photos); an
    FP32 run moves by about 3e-4 (6e-4 worst), far inside the INT8 bound."""
    from onnx import helper, numpy_helper

    from exporter.attention import (MIN_CHUNK_ROWS, chunk_queries, find_attention, heads_from_channels_last,
                                    plan_query_chunks)
    from xattn.shapes import recorded_max_shapes
    from xattn.onnxfile import load_onnx
    from runtime.onnxrt import session_with_outputs
    from xattn.cpu import describe_cpu
    from xattn.onnxfile import refresh_value_info, save_onnx, topological_sort

    if products not in INT8_PRODUCTS:
        raise BadInputError(f"products must be one of {', '.join(INT8_PRODUCTS)}, not {products!r}")
    say = say or (lambda message: None)
    float_path = Path(float_path)
    model = require_fp32(load_onnx(float_path), float_path, "quantize")
    record = get_onnx_metadata(model)
    if record.get("target") in ("onnxruntime", "openvino"):
        raise BadInputError(f"{float_path} is already rewritten for {record['target']}",
                            hint="quantize the plain fp32 ONNX the export wrote")
    if not data.feeds:
        raise BadInputError(f"{data.label} holds no samples")
    weights = None
    if bf16_weights:   # first, and in its own pass over the data: the int8 scales below must see the rounded weights
        from calibration.bf16_weights import round_weights_for_bf16

        weights = round_weights_for_bf16(model, data, say=say)
    # the layout model.ov.onnx has (exporter.optimize), then the score MatMuls' inputs are found in it
    normalised, relaid = heads_from_channels_last(model)
    # the score MatMul's inputs and V by block; chunk_queries keeps these names (the slices read Q, every copy
    # reads K^T and V)
    inputs, values = {}, {}
    for block in find_attention(normalised):
        score = next(n for n in normalised.graph.node if n.name == block.score_node)
        inputs[block.softmax] = (score.input[0], score.input[1])
        values[block.softmax] = (block.value, block.output)
    chunks = plan_query_chunks(normalised, recorded_max_shapes(record))
    work, done, left = chunk_queries(normalised, chunks)
    chunks = {name: chunks[name] for name in done}   # the blocks sliced
    if not done:
        reasons = "; ".join(f"{name}: {why}" for name, why in left) or "no attention block was found"
        raise BadInputError(f"no attention block in {float_path.name} can be quantized for OpenVINO ({reasons})",
                            hint="run model.ov.onnx ('xattn optimize --target openvino') at bf16 instead")
    readers = {name: _output_products(work, *values[name]) for name in done} if products == "both" else {}
    output_int8 = [name for name in done if readers.get(name)]
    output_left = [(name, "its second product does not read a Softmax's output and V")
                   for name in readers if not readers[name]]
    score_inputs = {name for block in done for name in inputs[block]}
    value_inputs = {values[block][0] for block in output_int8}
    tensors = sorted(score_inputs | value_inputs)

    session = session_with_outputs(work, tensors)
    amax = dict.fromkeys(tensors, 0.0)
    channel_amax: dict[str, np.ndarray] = {}
    for index, feed in enumerate(data.feeds):
        for name, value in zip(tensors, session.run(tensors, dict(feed))):
            amax[name] = max(amax[name], float(np.abs(value).max()) if value.size else 0.0)
            if name in value_inputs and value.size:
                per_channel = _channel_amax(value)
                channel_amax[name] = np.maximum(channel_amax.get(name, per_channel), per_channel)
        say(f"attention calibration {index + 1}/{len(data.feeds)}")
    del session

    graph = work.graph
    zero = "xattn_attention_int8_zero_point"
    graph.initializer.append(numpy_helper.from_array(np.array(0, np.int8), zero))
    scales, dequantized, new_nodes = {}, {}, []
    for name in sorted(score_inputs):
        scale = max(amax[name], 1e-12) / INT8_MAX   # an all-zero tensor stays zero at any positive scale
        scales[name] = scale
        scale_name, q, dq = f"{name}_int8_scale", f"{name}_int8_q", f"{name}_int8_dq"
        graph.initializer.append(numpy_helper.from_array(np.array(scale, np.float32), scale_name))
        new_nodes += [helper.make_node("QuantizeLinear", [name, scale_name, zero], [q], name=q),
                      helper.make_node("DequantizeLinear", [q, scale_name, zero], [dq], name=dq)]
        dequantized[name] = dq
    for node in graph.node:   # Q and K^T: every reader (the slices, their Shape, the score MatMul copies)
        for i, name in enumerate(node.input):
            if name in score_inputs:
                node.input[i] = dequantized[name]
    if output_int8:
        _add_output_constants(graph)
        opset = next((o.version for o in work.opset_import if o.domain in ("", "ai.onnx")), 0)
        for value in sorted(value_inputs):   # once per V, however many blocks read it
            # (a V that was empty on every feed has no maxima: one floor scale, so the product stays ~0)
            nodes, per_channel = _value_per_channel(graph, value, channel_amax.get(value, np.zeros(1)), zero)
            new_nodes += nodes
            scales[value] = [float(x) / INT8_MAX for x in per_channel.ravel()]
        for block in output_int8:   # V only where the output products read it: another reader keeps it float
            value = values[block][0]
            for matmul in readers[block]:
                new_nodes += _output_in_uint8(matmul, f"{value}_channels_int8_dq", f"{value}_channel_scale", opset)
    graph.node.extend(new_nodes)
    topological_sort(graph)
    refresh_value_info(work)
    placement = ("attention scores: Q and K^T of each block's first MatMul, int8 symmetric per tensor; "
                 + ("attention output: the probabilities over their row maximum uint8 at 1/255, V int8 symmetric "
                    "per channel (blocks: " + ", ".join(output_int8) + "); " if output_int8 else "")
                 + "everything else float")
    record.update({"precision": "int8", "target": "openvino",
                   "attention": {"op": "query slices", "fused": done, "left": [list(x) for x in left],
                                 "chunks": chunks, "min_rows": MIN_CHUNK_ROWS,
                                 "channels_last": relaid},
                   "quantization": {"format": "QDQ", "target": "openvino", "method": "max",
                                    "placement": placement, "products": products,
                                    "output_int8": output_int8,
                                    "scales": scales, "samples": len(data.feeds), "data": data.label,
                                    "data_sha256": data.sha256, "synthetic_data": data.synthetic,
                                    "inputs": data.statistics(), "cpu": describe_cpu(),
                                    "bf16_weights": weights.record(data) if weights is not None else None},
                   "source": {"path": float_path.name, "sha256": sha256_file(float_path)}})
    set_onnx_metadata(work, record)
    save_onnx(work, output)   # probed: the ONNX Runtime level it loads at is recorded, as for every file
    return AttentionInt8Result(Path(output), done, scales, left, weights, chunks, output_int8, output_left)


def _output_products(model, value: str, output: str) -> list:
    """The output MatMul of each query slice of the block reading ``value`` and writing ``output`` in ``model``
    (sliced by :func:`exporter.attention.chunk_queries`): the producers of the Concat that writes ``output``, when
    every one is ``MatMul(P, value)`` with P a Softmax output (or SDPA's NaN guard over one,
    :func:`exporter.attention.past_nan_guard`), so its rows are weights in [0, 1]. Empty otherwise: then the
    block's second product stays float."""
    from exporter.attention import past_nan_guard

    producer = {out: node for node in model.graph.node for out in node.output}
    consumers: dict[str, list] = {}
    for node in model.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    weights = {past_nan_guard(consumers, node.output[0]) for node in model.graph.node if node.op_type == "Softmax"}
    concat = producer.get(output)
    if concat is None or concat.op_type != "Concat":
        return []
    products = [producer.get(piece) for piece in concat.input]
    if all(m is not None and m.op_type == "MatMul" and m.input[1] == value and m.input[0] in weights
           for m in products):
        return products
    return []


def _channel_amax(value: np.ndarray) -> np.ndarray:
    """The largest magnitude of V ``(..., [H,] N, d)`` per channel (and head, for 4-D V), with kept axes of size 1
    where it was reduced, so that it broadcasts over V and over the product's output ``(..., [H,] N1, d)``."""
    keep = {value.ndim - 1} | ({value.ndim - 3} if value.ndim >= 4 else set())
    axes = tuple(a for a in range(value.ndim) if a not in keep)
    return np.abs(value).max(axis=axes, keepdims=True).astype(np.float32)


def _add_output_constants(graph) -> None:
    """The constants every rewritten output product shares."""
    from onnx import numpy_helper

    graph.initializer.extend([
        numpy_helper.from_array(np.array(0, np.uint8), "xattn_attention_uint8_zero_point"),
        numpy_helper.from_array(np.array(1 / UINT8_MAX, np.float32), "xattn_attention_uint8_scale"),
        numpy_helper.from_array(np.array(1 / INT8_MAX, np.float32), "xattn_attention_unit_int8_scale"),
        numpy_helper.from_array(np.array(ROW_MAX_FLOOR, np.float32), "xattn_attention_row_max_floor"),
        numpy_helper.from_array(np.array([-1], np.int64), "xattn_attention_last_axis")])


def _value_per_channel(graph, value: str, channel_amax: np.ndarray, zero: str) -> tuple[list, np.ndarray]:
    """V over its per-channel maximum (a Mul), through int8 Q/DQ at 1/127: ``{value}_channels_int8_dq`` (named
    apart from the scores' Q/DQ, which V may share a tensor with); the maxima are stored as
    ``{value}_channel_scale`` for the Mul after the product. A channel that was zero on every calibration feed
    gets the floor 1e-12 (V there times 1e12 saturates: the product's column stays ~0)."""
    from onnx import helper, numpy_helper

    per_channel = np.maximum(channel_amax, 1e-12).astype(np.float32)
    graph.initializer.extend([numpy_helper.from_array(per_channel, f"{value}_channel_scale"),
                              numpy_helper.from_array((1 / per_channel).astype(np.float32), f"{value}_channel_inv")])
    unit, q, dq = f"{value}_over_channel_max", f"{value}_channels_int8_q", f"{value}_channels_int8_dq"
    scale = "xattn_attention_unit_int8_scale"
    return [helper.make_node("Mul", [value, f"{value}_channel_inv"], [unit], name=unit),
            helper.make_node("QuantizeLinear", [unit, scale, zero], [q], name=q),
            helper.make_node("DequantizeLinear", [q, scale, zero], [dq], name=dq)], per_channel


def _output_in_uint8(matmul, value_dq: str, channel_scale: str, opset: int) -> list:
    """Rewrite ``matmul`` (``P V``, one query slice) in place to read uint8 ``P / r`` and int8 ``V / c``, and return
    the nodes around it: ``r = max(ReduceMax(P), floor)`` per row, ``P / r`` through uint8 Q/DQ at 1/255, the
    product times ``r`` and ``c`` written to the MatMul's old output (module docstring)."""
    from onnx import helper

    probs, out = matmul.input[0], matmul.output[0]
    base = matmul.name or out
    names = {k: f"{base}_{k}" for k in ("row_max", "row_max_floor", "unit", "unit_q", "unit_dq", "int8", "rows")}
    if opset >= 18:   # ReduceMax takes its axes as an input from opset 18, as an attribute before
        reduce = helper.make_node("ReduceMax", [probs, "xattn_attention_last_axis"], [names["row_max"]], keepdims=1,
                                  name=names["row_max"])
    else:
        reduce = helper.make_node("ReduceMax", [probs], [names["row_max"]], axes=[-1], keepdims=1,
                                  name=names["row_max"])
    scale, zero = "xattn_attention_uint8_scale", "xattn_attention_uint8_zero_point"
    nodes = [reduce,
             helper.make_node("Max", [names["row_max"], "xattn_attention_row_max_floor"], [names["row_max_floor"]],
                              name=names["row_max_floor"]),
             helper.make_node("Div", [probs, names["row_max_floor"]], [names["unit"]], name=names["unit"]),
             helper.make_node("QuantizeLinear", [names["unit"], scale, zero], [names["unit_q"]], name=names["unit_q"]),
             helper.make_node("DequantizeLinear", [names["unit_q"], scale, zero], [names["unit_dq"]],
                              name=names["unit_dq"]),
             helper.make_node("Mul", [names["int8"], names["row_max_floor"]], [names["rows"]], name=names["rows"]),
             helper.make_node("Mul", [names["rows"], channel_scale], [out], name=f"{base}_channels")]
    matmul.input[0], matmul.input[1], matmul.output[0] = names["unit_dq"], value_dq, names["int8"]
    return nodes
