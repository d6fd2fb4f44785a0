"""FP16 conversion: the whole graph in FP16 with FP32 inputs/outputs, attention in the form TensorRT fuses.

TensorRT 10/11 take precision from a strongly typed graph. Its fused multi-head-attention kernel is
chosen only when both attention matmuls take FP16 inputs and the 1/sqrt(d) scale sits on Q or K
before the first matmul; inside, it accumulates and normalises in FP32, so FP16 softmax overflow
(TensorRT issues 3999, 3101, 2564) does not arise there. So by default (``target="tensorrt"``):

1. the score scale is moved onto Q (:func:`exporter.attention.move_scale_to_query`, exact in real
   arithmetic);
2. every float tensor becomes FP16, except graph inputs and outputs (Casts at the edges) and the
   inputs that ONNX requires in FP32 (Resize scales);
3. whether attention may stay FP16 is *measured*, not assumed: :func:`convert_fp16` compares the
   FP16 model with the FP32 one on the data given, and if the FP16 bound is missed it keeps each
   block's score path (score MatMul, its scale, Softmax) in FP32, says which and why, and measures
   again. ``keep_attention_fp32=True`` forces that.

The converter is our own (not ``onnxruntime.transformers.float16``, whose output was not topologically
sorted and carried value_info contradicting its Casts): every tensor's type is decided once, Casts
are inserted where a consumer needs the other type (one Cast per tensor and type), stale value_info
is dropped and inferred again strictly, and the file is saved through :func:`xattn.onnxfile.save_onnx`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np

from xattn.errors import BadInputError
from xattn.fileio import sha256_file
from xattn.nodes import input_readers
from xattn.provenance import get_onnx_metadata, require_fp32, set_onnx_metadata

FLOAT, FLOAT16 = 1, 10
#: (op, input index) that ONNX requires to stay float32 whatever the data type.
_FP32_SLOTS = {("Resize", 2), ("Upsample", 1)}
#: Ops whose inputs may be of any type (no Cast needed in front of them).
_ANY_TYPE_INPUTS = {"Cast", "Shape", "Size", "CastLike"}
FP16_MAX = float(np.finfo(np.float16).max)
#: The FP16 bound a converted model must meet against its FP32 model (relative L2; runtime.tolerances).
DEFAULT_FP16_BOUND = 1e-3


@dataclass(frozen=True)
class Fp16Settings:
    """Attributes:
        target: ``"tensorrt"`` (default: attention FP16, scale on Q) or ``"onnxruntime"`` (same graph; ONNX
            Runtime's CPU runs FP16 slower than FP32, see the README).
        keep_attention_fp32: ``None`` (default) decides by measurement; ``True`` keeps every block's score
            path FP32; ``False`` keeps it FP16 even when the bound is missed.
        fp32_keep: node names or op types to keep in FP32 as well (the command line's ``--keep-fp32``).
        bound: the relative L2 the FP16 model must reach against the FP32 model on the check data.
    """

    target: str = "tensorrt"
    keep_attention_fp32: bool | None = None
    #: ``"matmul"`` (default: MatMul -> Softmax -> MatMul, every TensorRT 10.x/11.x fuses it) or ``"onnx"``
    #: (ONNX's opset-23 ``Attention``: TensorRT >= 10.14 and 11.x only).
    attention_op: str = "matmul"
    fp32_keep: tuple[str, ...] = ()
    bound: float = DEFAULT_FP16_BOUND


@dataclass
class Fp16Result:
    path: Path
    fp32_nodes: list[str]
    sha256: str
    attention_fp16: bool = True
    scale_moved: list[str] = field(default_factory=list)
    #: attention blocks found in the graph (see exporter.attention.find_attention)
    blocks: int = 0
    rel_l2: float | None = None
    rel_l2_all_fp16: float | None = None
    check_data: str | None = None
    notes: list[str] = field(default_factory=list)


def _elem_types(model) -> dict[str, int]:
    import onnx

    inferred = onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True)
    types = {}
    for info in list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output):
        types[info.name] = info.type.tensor_type.elem_type
    for init in model.graph.initializer:
        types[init.name] = init.data_type
    for node in model.graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            types[node.output[0]] = node.attribute[0].t.data_type
    return types


def _to_fp16_tensor(tensor):
    from onnx import numpy_helper

    array = numpy_helper.to_array(tensor).astype(np.float32)
    return numpy_helper.from_array(np.clip(array, -FP16_MAX, FP16_MAX).astype(np.float16), tensor.name)


def graph_to_fp16(model, keep_fp32: Iterable[str] = ()):
    """A copy of ``model`` with every float tensor in FP16, except graph I/O, FP32-only inputs and the
    nodes named in ``keep_fp32`` (their float inputs and outputs stay FP32, with Casts at the borders).

    Q/DQ nodes convert like others (their scales become FP16); ONNX needs opset >= 19 for that, so the
    default-domain opset is raised to 19 when the graph has Q/DQ (no other op between 18 and 19 changed
    meaning, and the caller verifies the result numerically).
    """
    import onnx
    from onnx import helper

    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    types = _elem_types(out)
    keep = set(keep_fp32)
    consumers = input_readers(graph)

    def wants(node, index) -> int:
        if node.name in keep or (node.op_type, index) in _FP32_SLOTS:
            return FLOAT
        return FLOAT16

    current: dict[str, int] = {}   # float tensor -> its type in the new graph
    for graph_input in graph.input:
        if types.get(graph_input.name) == FLOAT:
            current[graph_input.name] = FLOAT
    for init in graph.initializer:
        if init.data_type != FLOAT:
            continue
        users = consumers.get(init.name, [])
        if users and all(wants(n, i) == FLOAT16 for n, i in users):
            init.CopyFrom(_to_fp16_tensor(init))
            current[init.name] = FLOAT16
        else:
            current[init.name] = FLOAT
    for node in graph.node:
        converted = node.name not in keep
        for attribute in node.attribute:
            if not converted:
                break
            if node.op_type == "Cast" and attribute.name == "to" and attribute.i == FLOAT:
                attribute.i = FLOAT16
            elif attribute.name == "value" and attribute.type == onnx.AttributeProto.TENSOR \
                    and attribute.t.data_type == FLOAT:
                attribute.t.CopyFrom(_to_fp16_tensor(attribute.t))
        for name in node.output:
            if types.get(name) == FLOAT:
                current[name] = FLOAT16 if converted else FLOAT
    casts: dict[tuple[str, int], str] = {}
    new_nodes = []
    for node in graph.node:
        if node.op_type not in _ANY_TYPE_INPUTS:
            for index, name in enumerate(node.input):
                if name not in current:
                    continue
                need = wants(node, index)
                if current[name] == need:
                    continue
                key = (name, need)
                if key not in casts:
                    casts[key] = f"{name}_to_{'fp16' if need == FLOAT16 else 'fp32'}"
                    new_nodes.append(helper.make_node("Cast", [name], [casts[key]], to=need,
                                                      name=f"cast_{casts[key]}"))
                node.input[index] = casts[key]
        new_nodes.append(node)
    del graph.node[:]
    graph.node.extend(new_nodes)
    for graph_output in graph.output:
        name = graph_output.name
        if current.get(name) == FLOAT16:
            inner = f"{name}_fp16"
            for node in graph.node:
                node.output[:] = [inner if o == name else o for o in node.output]
                node.input[:] = [inner if i == name else i for i in node.input]
            graph.node.append(helper.make_node("Cast", [inner], [name], to=FLOAT, name=f"cast_{name}_to_fp32"))
    if any(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in graph.node):
        for opset in out.opset_import:
            if opset.domain in ("", "ai.onnx") and opset.version < 19:
                opset.version = 19
    from xattn.onnxfile import refresh_value_info

    refresh_value_info(out)
    return out


def score_path_nodes(model, blocks) -> list[str]:
    """The nodes of each block's score path: the score MatMul, the scale nodes and the Softmax."""
    names = []
    for block in blocks:
        names += [block.score_node, *block.scale_nodes, block.softmax]
    return list(dict.fromkeys(names))


def resolve_keep(model, keep: Sequence[str], where: str) -> list[str]:
    """Node names for ``--keep-fp32`` items (each a node name or an op type of the model)."""
    names = {n.name for n in model.graph.node}
    op_types = {n.op_type for n in model.graph.node}
    unknown = [k for k in keep if k not in names and k not in op_types]
    if unknown:
        raise BadInputError(f"--keep-fp32 names {', '.join(unknown)}: neither a node nor an op type of {where}",
                            hint="see the node names with 'xattn inspect --json'")
    return [n.name for n in model.graph.node if n.name in keep or n.op_type in keep]


def convert_fp16(float_path: str | os.PathLike, output: str | os.PathLike, settings: Fp16Settings | None = None, *,
                 check_feeds: Sequence[dict] | None = None, check_label: str | None = None,
                 say: Callable[[str], None] | None = None) -> Fp16Result:
    """Write the FP16 model of ``float_path`` to ``output`` (checked, atomically). See the module docstring.

    ``check_feeds`` are the inputs the FP16 bound is measured on (default: two random-normal feeds at
    the model's recorded opt shapes, labelled as such).
    """
    from exporter.attention import find_attention, move_scale_to_query
    from xattn.onnxfile import load_onnx
    from xattn.onnxfile import save_onnx

    settings = settings or Fp16Settings()
    say = say or (lambda message: None)
    float_path = Path(float_path)
    model = require_fp32(load_onnx(float_path), float_path, "convert")
    record = get_onnx_metadata(model)
    if settings.target not in ("tensorrt", "onnxruntime"):
        raise BadInputError(f"unknown target {settings.target!r}", hint="use tensorrt or onnxruntime")
    extra_fp32 = resolve_keep(model, settings.fp32_keep, float_path.name)
    work, moved = move_scale_to_query(model)
    if settings.attention_op == "onnx":
        from exporter.attention import to_onnx_attention

        work, replaced, _ = to_onnx_attention(work)
        if not replaced:
            raise BadInputError(f"--attention-op onnx: no attention block of {float_path.name} can be written as "
                                "ONNX Attention", hint="see 'xattn inspect'; use the default --attention-op matmul")
    elif settings.attention_op != "matmul":
        raise BadInputError(f"unknown --attention-op {settings.attention_op!r}", hint="use matmul or onnx")
    blocks = find_attention(work)
    score_nodes = score_path_nodes(work, blocks) + [n.name for n in work.graph.node if n.op_type == "Attention"]
    result = Fp16Result(Path(output), [], "", scale_moved=moved, blocks=len(blocks))
    if settings.keep_attention_fp32:
        keep = extra_fp32 + score_nodes
        result.attention_fp16 = False
        result.notes.append("attention score path kept FP32 (--keep-attention-fp32)")
    else:
        keep = extra_fp32
    converted = graph_to_fp16(work, keep)
    if blocks and settings.keep_attention_fp32 is None:
        feeds, label = (check_feeds, check_label) if check_feeds else (_default_feeds(model, record), None)
        label = label or "random-normal inputs at the recorded opt shapes"
        reference = _run(model, feeds)
        rel = _rel_l2(_run(converted, feeds), reference)
        result.rel_l2 = result.rel_l2_all_fp16 = rel
        result.check_data = label
        if rel > settings.bound:
            keep_scores = extra_fp32 + score_nodes
            candidate = graph_to_fp16(work, keep_scores)
            rel_fp32_scores = _rel_l2(_run(candidate, feeds), reference)
            blocks_text = ", ".join(b.softmax for b in blocks)
            if rel_fp32_scores < rel:
                converted, keep, result.rel_l2, result.attention_fp16 = candidate, keep_scores, rel_fp32_scores, False
                note = (f"FP16 attention missed the FP16 bound on {label} (rel. L2 {rel:.3g} > {settings.bound:g}): "
                        f"kept the score path of {blocks_text} in FP32 (TensorRT cannot fuse it then); "
                        f"now rel. L2 {rel_fp32_scores:.3g}")
            else:
                note = (f"FP16 misses the FP16 bound on {label} (rel. L2 {rel:.3g} > {settings.bound:g}), and keeping "
                        f"the score path of {blocks_text} in FP32 does not help ({rel_fp32_scores:.3g}): the error "
                        "comes from elsewhere, so attention stays FP16 (fusible); see 'xattn debug' for where")
            result.notes.append(note)
            say(note)
    result.fp32_nodes = keep
    record.update({"precision": "fp16", "target": settings.target, "attention_op": settings.attention_op,
                   "fp16": {"io": "fp32", "fp32_nodes": keep, "attention_fp16": result.attention_fp16,
                            "scale_moved_to_query": moved, "check_rel_l2": result.rel_l2,
                            "check_data": result.check_data},
                   "source": {"path": float_path.name, "sha256": sha256_file(float_path)}})
    set_onnx_metadata(converted, record)
    save_onnx(converted, output)
    result.sha256 = sha256_file(output)
    return result


def _default_feeds(model, record) -> list[dict]:
    from xattn.shapes import parse_shape_set

    opt = record.get("opt_shapes")
    if opt:
        shapes = parse_shape_set(opt)
    else:
        shapes = {}
        for graph_input in model.graph.input:
            dims = [d.dim_value if d.dim_value > 0 else 32 for d in graph_input.type.tensor_type.shape.dim]
            dims[0] = 1
            shapes[graph_input.name] = tuple(dims)
    rng = np.random.default_rng(0)
    return [{name: rng.standard_normal(shape).astype(np.float32) for name, shape in shapes.items()} for _ in range(2)]


def _run(model, feeds) -> list[dict]:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    from xattn.ort_session import create_session

    session = create_session(model.SerializeToString(), options, ["CPUExecutionProvider"], "the FP16 candidate")
    names = [o.name for o in session.get_outputs()]
    return [dict(zip(names, session.run(None, feed))) for feed in feeds]


def _rel_l2(got: list[dict], want: list[dict]) -> float:
    worst = 0.0
    for name in want[0]:
        c = np.concatenate([g[name].astype(np.float64).ravel() for g in got])
        r = np.concatenate([w[name].astype(np.float64).ravel() for w in want])
        worst = max(worst, float(np.linalg.norm(c - r) / max(np.linalg.norm(r), 1e-30)))
    return worst
