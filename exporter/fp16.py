"""FP16 conversion: weights and activations in FP16, graph inputs/outputs and the attention score path in FP32.

FP16 has 5 exponent bits: attention scores (Q.K^T over hundreds of channels) and the softmax over
thousands of keys overflow or lose accuracy (TensorRT issues 3999, 3101, 2564). By default every
Softmax and the nodes that compute its input back to the score MatMul (MatMul -> Mul/Div -> Softmax)
stay FP32; the conversion inserts the Casts. The result runs on ONNX Runtime (CPU here) and builds
strongly typed on TensorRT 10/11, which take precision from the graph.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from xattn.errors import BadInputError
from xattn.fileio import atomic_path, sha256_file
from xattn.provenance import get_onnx_metadata, set_onnx_metadata

_SCORE_PATH_OPS = ("Mul", "Div", "Add", "Where", "Cast")


@dataclass(frozen=True)
class Fp16Settings:
    """Attributes:
        keep_attention_fp32: keep every Softmax and its score path (back to the MatMul) in FP32 (default True).
        fp32_ops: op types to keep in FP32 as well (e.g. ``("Softmax", "MatMul")``).
        fp32_nodes: node names to keep in FP32 as well.
        fp32_keep: node names or op types, resolved against the model (the command line's --keep-fp32).
    """

    keep_attention_fp32: bool = True
    fp32_ops: tuple[str, ...] = ()
    fp32_nodes: tuple[str, ...] = ()
    #: Names to resolve against the model: each must be a node name or an op type in it.
    fp32_keep: tuple[str, ...] = ()


def attention_score_nodes(model) -> list[str]:
    """Each Softmax and its producers back to (and including) the MatMul that computes the scores."""
    producer = {out: node for node in model.graph.node for out in node.output}
    found: list[str] = []
    for node in model.graph.node:
        if node.op_type != "Softmax":
            continue
        found.append(node.name)
        current = producer.get(node.input[0])
        while current is not None:
            found.append(current.name)
            if current.op_type == "MatMul" or current.op_type not in _SCORE_PATH_OPS:
                break
            current = producer.get(current.input[0])
    return list(dict.fromkeys(found))


@dataclass
class Fp16Result:
    path: Path
    fp32_nodes: list[str]
    sha256: str


def convert_fp16(float_path: str | os.PathLike, output: str | os.PathLike, settings: Fp16Settings | None = None) -> Fp16Result:
    """Write the FP16 model of ``float_path`` to ``output`` (atomically)."""
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    from exporter.inspect_onnx import load_onnx

    settings = settings or Fp16Settings()
    float_path = Path(float_path)
    model = load_onnx(float_path)
    record = get_onnx_metadata(model)
    if record.get("precision", "fp32") != "fp32":
        raise BadInputError(f"{float_path} is already {record['precision']}", hint="convert the fp32 ONNX")
    names = {n.name for n in model.graph.node}
    op_types = {n.op_type for n in model.graph.node}
    unknown = sorted((set(settings.fp32_nodes) - names) | {k for k in settings.fp32_keep if k not in names | op_types})
    if unknown:
        raise BadInputError(f"--keep-fp32 names {', '.join(unknown)}: neither a node nor an op type of {float_path.name}",
                            hint="see the node names with 'xattn inspect --json'")
    nodes = list(settings.fp32_nodes) + [k for k in settings.fp32_keep if k in names]
    ops = set(settings.fp32_ops) | {k for k in settings.fp32_keep if k not in names}
    blocked = list(nodes)
    if settings.keep_attention_fp32:
        blocked += attention_score_nodes(model)
    blocked += [n.name for n in model.graph.node if n.op_type in ops]
    blocked = list(dict.fromkeys(blocked))
    with contextlib.redirect_stdout(io.StringIO()), _quiet():
        converted = convert_float_to_float16(model, keep_io_types=True, node_block_list=blocked,
                                             disable_shape_infer=False)
    record.update({"precision": "fp16", "fp16": {"fp32_nodes": blocked, "io": "fp32"},
                   "source": {"path": float_path.name, "sha256": sha256_file(float_path)}})
    set_onnx_metadata(converted, record)
    with atomic_path(output) as tmp:
        onnx.save(converted, str(tmp))
    return Fp16Result(Path(output), blocked, sha256_file(output))


@contextlib.contextmanager
def _quiet():
    logger = logging.getLogger()
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)
