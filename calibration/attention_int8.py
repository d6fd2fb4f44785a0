"""INT8 attention scores for OpenVINO's CPU plugin: ``xattn quantize --target openvino``.

Where the time goes on a CPU is attention (about 700 of the default model's 730 GFLOP at 192x192), and INT8
convolutions leave it untouched. This file quantizes the first attention product: per block, Q/DQ (int8,
symmetric, one scale per tensor from the maximum over the calibration data) on Q and on K^T, the two inputs of
the score MatMul. OpenVINO's low-precision transformations run that MatMul as an integer product (VNNI where the
CPU has it) and keep the rest (Softmax, the product with V, convolutions) at the precision asked, bf16 where the
CPU has it. The queries are in slices and the heads laid out as in ``model.ov.onnx``
(:func:`exporter.attention.chunk_queries`, :func:`exporter.attention.heads_from_channels_last`), so the memory
stays flat.

Why only Q and K^T (measured on the default model, OpenVINO 2026.4 bf16, 2-core AMD EPYC with AVX512-VNNI/BF16, one
process, 64x64 and 128x128): Q and K^T in int8 ran 1.80-2.01x ONNX Runtime's fused file at the error of bf16 alone
(relative L2 2.6-2.7e-3 on random inputs); adding the Softmax output (uint8) and V ran 2.34-2.39x but at 2.6-2.7e-2,
beyond the INT8 bound: with thousands of keys the probabilities are far below one uint8 step.

Scales are per tensor because a scale that varies along the reduction axis (per channel of K) cannot be taken out
of an integer dot product. ONNX Runtime runs the file too (its Q/DQ computed in float), so it validates anywhere.
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


@dataclass
class AttentionInt8Result:
    path: Path
    blocks: list[str]
    #: quantized tensor -> its scale
    scales: dict[str, float]
    left: list[tuple[str, str]] = field(default_factory=list)
    #: the weights put on the bf16 grid (None: not asked)
    bf16_weights: "Bf16WeightsResult | None" = None
    #: query slices per block (Softmax name -> count, :func:`exporter.attention.plan_query_chunks`)
    chunks: dict[str, int] = field(default_factory=dict)


def quantize_attention_scores(float_path: str | os.PathLike, data: CalibrationData, output: str | os.PathLike, *,
                              bf16_weights: bool = True,
                              say: Callable[[str], None] | None = None) -> AttentionInt8Result:
    """Write ``float_path`` with each attention block's queries in slices and int8 Q/DQ on Q and K^T (module
    docstring), calibrated by maximum on ``data``. Refused when no block can be rewritten.

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
    # the score MatMul's inputs by block; chunk_queries keeps these names (the slices read Q, every copy reads K^T)
    inputs = {}
    for block in find_attention(normalised):
        score = next(n for n in normalised.graph.node if n.name == block.score_node)
        inputs[block.softmax] = (score.input[0], score.input[1])
    chunks = plan_query_chunks(normalised, recorded_max_shapes(record))
    work, done, left = chunk_queries(normalised, chunks)
    chunks = {name: chunks[name] for name in done}   # the blocks sliced
    if not done:
        reasons = "; ".join(f"{name}: {why}" for name, why in left) or "no attention block was found"
        raise BadInputError(f"no attention block in {float_path.name} can be quantized for OpenVINO ({reasons})",
                            hint="run model.ov.onnx ('xattn optimize --target openvino') at bf16 instead")
    tensors = sorted({name for block in done for name in inputs[block]})

    session = session_with_outputs(work, tensors)
    amax = dict.fromkeys(tensors, 0.0)
    for index, feed in enumerate(data.feeds):
        for name, value in zip(tensors, session.run(tensors, dict(feed))):
            amax[name] = max(amax[name], float(np.abs(value).max()) if value.size else 0.0)
        say(f"attention calibration {index + 1}/{len(data.feeds)}")
    del session

    graph = work.graph
    zero = "xattn_attention_int8_zero_point"
    graph.initializer.append(numpy_helper.from_array(np.array(0, np.int8), zero))
    scales, replaced, new_nodes = {}, {}, []
    for name in tensors:
        scale = max(amax[name], 1e-12) / INT8_MAX   # an all-zero tensor stays zero at any positive scale
        scales[name] = scale
        scale_name, q, dq = f"{name}_int8_scale", f"{name}_int8_q", f"{name}_int8_dq"
        graph.initializer.append(numpy_helper.from_array(np.array(scale, np.float32), scale_name))
        new_nodes += [helper.make_node("QuantizeLinear", [name, scale_name, zero], [q], name=q),
                      helper.make_node("DequantizeLinear", [q, scale_name, zero], [dq], name=dq)]
        replaced[name] = dq
    for node in graph.node:   # every reader: the slices (and their Shape) and the score MatMul copies
        for i, name in enumerate(node.input):
            if name in replaced:
                node.input[i] = replaced[name]
    graph.node.extend(new_nodes)
    topological_sort(graph)
    refresh_value_info(work)
    record.update({"precision": "int8", "target": "openvino",
                   "attention": {"op": "query slices", "fused": done, "left": [list(x) for x in left],
                                 "chunks": chunks, "min_rows": MIN_CHUNK_ROWS,
                                 "channels_last": relaid},
                   "quantization": {"format": "QDQ", "target": "openvino", "method": "max",
                                    "placement": "attention scores: Q and K^T of each block's first MatMul, int8 "
                                                 "symmetric per tensor; everything else float",
                                    "scales": scales, "samples": len(data.feeds), "data": data.label,
                                    "data_sha256": data.sha256, "synthetic_data": data.synthetic,
                                    "inputs": data.statistics(), "cpu": describe_cpu(),
                                    "bf16_weights": weights.record(data) if weights is not None else None},
                   "source": {"path": float_path.name, "sha256": sha256_file(float_path)}})
    set_onnx_metadata(work, record)
    save_onnx(work, output)   # probed: the ONNX Runtime level it loads at is recorded, as for every file
    return AttentionInt8Result(Path(output), done, scales, left, weights, chunks)
