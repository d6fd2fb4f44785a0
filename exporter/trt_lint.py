"""``xattn check``: what TensorRT at a given version would refuse or run slowly, before anyone copies a file.

No TensorRT runs here, so this stands in for its ONNX parser with facts read from the sources
(shared/notes/tensorrt-review.md, tensorrt-facts.md): each rule names where it comes from.

Findings (the build would fail or be wrong) make the check exit 1; warnings (it builds, but slower
or untested) are listed apart. ``xattn build`` and ``xattn deploy`` run it first and print trtexec
lines only for files that pass.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

from packaging.version import Version

from xattn.memory import format_size
from xattn.shapes import ShapeSet

def opset_range(trt_version: str) -> tuple[int, int, bool]:
    """``(lowest, highest, documented)`` opset TensorRT's ONNX parser reads at ``trt_version``.

    onnx-tensorrt documents 9..20 for 10.0 (release/10.1-GA; nothing more specific for 10.3), 9..24 for
    10.15, and NVIDIA's 11.x docs say "maximum opset 25" (added in 11.5). Between 10.4 and 10.13 no source
    states a bound: 20 is assumed and a higher opset is a warning, not a finding. 10.14 added the importer of
    opset 23's ``Attention`` (CHANGELOG "10.14 GA"), so it reads opset 23 at least (assumed, undocumented).
    """
    version = Version(trt_version)
    if version < Version("10.4"):
        return 9, 20, True
    if version < Version("10.14"):
        return 9, 20, False
    if version < Version("10.15"):
        return 9, 23, False
    if version < Version("11.5"):
        return 9, 24, True
    return 9, 25, True


ATTENTION_MIN = Version("10.14")   # IAttention and the ONNX Attention importer (CHANGELOG 10.14)
DEFAULT_MEMORY_BUDGET = 4 << 30    # bytes of naive attention scores at the max shapes before warning


@dataclass
class Issue:
    rule: str
    message: str
    node: str | None = None


@dataclass
class CheckReport:
    path: str
    trt_version: str
    findings: list[Issue] = field(default_factory=list)
    warnings: list[Issue] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not self.findings

    def as_dict(self) -> dict[str, Any]:
        return {"path": self.path, "trt_version": self.trt_version, "passed": self.passed,
                "findings": [asdict(i) for i in self.findings], "warnings": [asdict(i) for i in self.warnings]}

    def format(self) -> str:
        lines = [f"{'PASS' if self.passed else 'FAIL'} {self.path} for TensorRT {self.trt_version}: "
                 f"{len(self.findings)} findings, {len(self.warnings)} warnings"]
        lines += [f"  finding [{i.rule}] {i.message}" for i in self.findings]
        lines += [f"  warning [{i.rule}] {i.message}" for i in self.warnings]
        return "\n".join(lines)


def check_for_tensorrt(path: str | os.PathLike, trt_version: str = "10.3.0", *, dla: bool = False,
                       memory_budget: int = DEFAULT_MEMORY_BUDGET, weak_fp16: bool = False,
                       profile_maxima: Sequence[ShapeSet] | None = None) -> CheckReport:
    """Lint the ONNX at ``path`` for TensorRT ``trt_version`` (see the module docstring).

    ``profile_maxima``: the max shapes of the profiles being built; the memory check uses them (default:
    the max shapes recorded at export).

    ``weak_fp16``: the legacy weakly typed build with ``BuilderFlag.FP16``, where TensorRT may run an FP32
    graph's attention in FP16 itself; attention precision is then not a reason it cannot fuse.
    """
    import onnx
    from onnx import numpy_helper

    from exporter.attention import find_attention, naive_memory_at
    from xattn.onnxfile import load_onnx
    from xattn.provenance import get_onnx_metadata
    from xattn.shapes import format_shape_set, parse_shape_set

    model = load_onnx(path)
    report = CheckReport(str(path), trt_version)
    version = Version(trt_version)
    add, warn = report.findings.append, report.warnings.append

    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    low, high, documented = opset_range(trt_version)
    if opset is not None and not low <= opset <= high:
        text = f"opset {opset} is outside the parser's range {low}..{high} for TensorRT {trt_version}"
        (add if documented or opset < low else warn)(
            Issue("opset", text if documented else f"{text} (no source states this version's bound)"))

    produced = set()
    available = {i.name for i in model.graph.input} | {i.name for i in model.graph.initializer}
    for node in model.graph.node:
        missing = [n for n in node.input if n and n not in available and n not in produced]
        if missing:
            add(Issue("order", f"the graph is not topologically sorted: {node.name or node.op_type} reads "
                               f"{missing[0]!r} before it is produced", node.name))
            break
        produced.update(node.output)

    initializers = {i.name: i for i in model.graph.initializer}
    for node in model.graph.node:
        if node.domain not in ("", "ai.onnx"):
            add(Issue("op", f"{node.domain}.{node.op_type} is not an ONNX op; TensorRT's parser looks for a plugin "
                            f"of that name and fails ('Plugin not found')", node.name))
        elif node.op_type == "Attention" and version < ATTENTION_MIN:
            add(Issue("op", f"ONNX Attention needs TensorRT {ATTENTION_MIN}+ (this is {trt_version})", node.name))
        if node.op_type in ("QuantizeLinear", "DequantizeLinear"):
            zero = initializers.get(node.input[2]) if len(node.input) > 2 else None
            if zero is not None and numpy_helper.to_array(zero).any():
                add(Issue("qdq", "non-zero zero point: TensorRT takes symmetric Q/DQ only", node.name))
            source = initializers.get(node.input[0])
            if node.op_type == "DequantizeLinear" and source is not None and source.data_type == onnx.TensorProto.INT32:
                add(Issue("qdq", "INT32 (bias) DequantizeLinear: reported rejected by TensorRT's parser "
                                 "(onnxruntime#17738, TensorRT#3360); keep biases float", node.name))

    record = get_onnx_metadata(model)
    unfused = []
    for block in find_attention(model):
        if weak_fp16 and block.precision == "fp32":
            block.precision = "fp16"
        ok, why = block.fusible("tensorrt")
        if not ok:
            unfused.append(block)
            warn(Issue("attention", f"attention block {block.softmax} will not fuse: {why}", block.softmax))
    maxima = list(profile_maxima or ([parse_shape_set(record["max_shapes"])] if record.get("max_shapes") else []))
    if maxima and unfused:
        # only blocks that will not fuse hold their scores; TensorRT's fused kernel never materialises them
        needed, at = None, None
        for shapes in maxima:
            try:
                here = naive_memory_at(model, unfused, shapes)
            except Exception:   # shapes inference cannot follow: no figure
                here = None
            if here is not None and (needed is None or here > needed):
                needed, at = here, format_shape_set(shapes)
        if needed and needed > memory_budget:
            warn(Issue("memory", f"unfused attention at the max shapes {at} holds "
                                 f"{format_size(needed)} of scores (budget {format_size(memory_budget)}): "
                                 "lower --max-shapes or make sure attention fuses"))
    if dla:
        dynamic = [i.name for i in model.graph.input if i.name not in initializers and any(
            not d.HasField("dim_value") for d in i.type.tensor_type.shape.dim)]
        if dynamic:
            warn(Issue("dla", f"inputs {', '.join(dynamic)} have dynamic dimensions: a DLA build needs one fixed "
                              "shape (--min-shapes = --opt-shapes = --max-shapes)"))
        if Version("11.0") <= version < Version("11.4.1"):
            add(Issue("dla", f"TensorRT {trt_version} has no DLA on Jetson (back in 11.4.1 with JetPack 7.2.2+)"))
    return report
