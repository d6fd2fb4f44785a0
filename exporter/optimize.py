"""``xattn optimize --target onnxruntime|openvino``: the FP32 model with attention in the form a CPU runtime runs best.

* ``onnxruntime`` (``model.ort.onnx``): each attention block becomes ``com.microsoft.MultiHeadAttention`` (see
  :mod:`exporter.attention`): ONNX Runtime's CPU kernel then runs tiled and never holds the ``B x N1 x N2``
  scores (measured: 187 instead of 2306 MiB at 128x128, README). TensorRT cannot parse ``com.microsoft`` ops,
  so ``xattn build`` refuses it.
* ``openvino`` (``model.ov.onnx``): each block computes its query rows in slices (:func:`chunk_queries`), plain
  ops only, its heads split from and joined into the convolutions' channels-last view
  (:func:`heads_from_channels_last`). OpenVINO's CPU plugin runs plain MatMul -> Softmax -> MatMul at full bf16 speed but holds the whole
  scores, and its own tiled attention (what it makes of ``MultiHeadAttention``) ran slower in bf16 here; in
  slices it is both fast and flat (``benchmarks/cpu_backends.py``).

The file is verified against PyTorch like an export (ONNX Runtime vs the rebuilt PyTorch model at the export's
verification shapes, relative L2 <= 1e-5) before it is moved into place.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from xattn.errors import BadInputError, VerificationError
from xattn.fileio import check_writable, sha256_file
from xattn.provenance import get_onnx_metadata, set_onnx_metadata
from xattn.shapes import recorded_max_shapes

#: Relative L2 an FP32 rewrite must reach against PyTorch (the export's bound).
FUSED_FP32_TOLERANCE = 1e-5


#: target -> (the runtime's name, what the record calls the form)
TARGETS = {"onnxruntime": ("ONNX Runtime", "com.microsoft.MultiHeadAttention"), "openvino": ("OpenVINO", "query slices")}


@dataclass
class OptimizeResult:
    path: Path
    fused: list[str]
    left: list[tuple[str, str]]
    checks: list = field(default_factory=list)
    sha256: str = ""
    #: OpenVINO's query slices per block rewritten (Softmax name -> count); empty for ONNX Runtime
    chunks: dict[str, int] = field(default_factory=dict)


def optimize_for_onnxruntime(float_path: str | os.PathLike, output: str | os.PathLike, **kwargs) -> OptimizeResult:
    return optimize_onnx(float_path, output, target="onnxruntime", **kwargs)


def optimize_onnx(float_path: str | os.PathLike, output: str | os.PathLike, *, target: str = "onnxruntime",
                  reference=None, shape_sets=None) -> OptimizeResult:
    """Rewrite attention for ``target`` (a key of :data:`TARGETS`) and verify the result against ``reference``
    (a LoadedModel).

    ``reference`` defaults to the model recorded in the file (built-in models only: a file never
    chooses code to import); ``shape_sets`` to the export's verification shapes from the recorded ranges.
    """
    from exporter.attention import (chunk_queries, fuse_for_onnxruntime, heads_from_channels_last,
                                    plan_query_chunks)
    from xattn.onnxfile import load_onnx
    from exporter.onnx_export import verify_onnx
    from xattn.onnxfile import refresh_value_info, save_onnx

    if target not in TARGETS:
        raise BadInputError(f"optimize target {target!r} is not one of {', '.join(TARGETS)}")
    float_path = Path(float_path)
    check_writable(output)
    model = load_onnx(float_path)
    record = get_onnx_metadata(model)
    if record.get("precision", "fp32") != "fp32":
        raise BadInputError(f"{float_path} is {record['precision']}; optimize the fp32 ONNX",
                            hint="for INT8 on ONNX Runtime use 'xattn quantize --target onnxruntime'")
    if record.get("target") in TARGETS:
        raise BadInputError(f"{float_path} is already optimized for {TARGETS[record['target']][0]}",
                            hint="optimize the plain fp32 ONNX the export wrote")
    relaid, chunks = [], {}
    if target == "openvino":   # the heads from the convolutions' channels-last view first (measured faster)
        model, relaid = heads_from_channels_last(model)
        chunks = plan_query_chunks(model, recorded_max_shapes(record))
        fused_model, fused, left = chunk_queries(model, chunks)
        chunks = {name: chunks[name] for name in fused}   # the blocks sliced
    else:
        fused_model, fused, left = fuse_for_onnxruntime(model)
    if not fused:
        reasons = "; ".join(f"{name}: {why}" for name, why in left) or "no attention block was found"
        raise BadInputError(f"nothing to rewrite for {target} in {float_path.name} ({reasons})",
                            hint="run the plain ONNX; 'xattn inspect' lists attention blocks and why they do not fuse")
    refresh_value_info(fused_model)
    attention = {"op": TARGETS[target][1], "fused": fused, "left": [list(x) for x in left]}
    if target == "openvino":
        from exporter.attention import MIN_CHUNK_ROWS

        attention.update(chunks=chunks, min_rows=MIN_CHUNK_ROWS, channels_last=relaid)
    record.update({"target": target, "attention": attention,
                   "source": {"path": float_path.name, "sha256": sha256_file(float_path)}})
    set_onnx_metadata(fused_model, record)
    if reference is None:
        from runtime.validate import resolve_reference

        reference = resolve_reference(record, artifact=str(float_path))
    if shape_sets is None:
        from runtime.validate import default_shape_sets

        shape_sets = default_shape_sets(reference, record)
    with tempfile.TemporaryDirectory(prefix="xattn-optimize-") as scratch:
        trial = save_onnx(fused_model, Path(scratch) / "fused.onnx", probe=False)
        checks = verify_onnx(reference, trial, shape_sets, FUSED_FP32_TOLERANCE)
        failed = [c for c in checks if not c.passed]
        if failed:
            worst = max(failed, key=lambda c: c.rel_l2)
            raise VerificationError(f"the rewritten model does not match PyTorch at {worst.shapes}: relative L2 "
                                    f"{worst.rel_l2:.3g} > {FUSED_FP32_TOLERANCE:g}; nothing was written",
                                    hint="please report it with 'xattn inspect --json' of the model")
    save_onnx(fused_model, output)
    return OptimizeResult(Path(output), fused, left, checks, sha256_file(output), chunks=chunks)
