"""Where accuracy is lost: per-tensor error of a quantized or FP16 model against the float model.

Both models run on the same inputs with their intermediate tensors exposed. For each float tensor
``t``, the candidate's value is its dequantized ``t`` (``t_DequantizeLinear_Output`` in a Q/DQ model)
or its ``t`` (FP16 model). Sums are accumulated sample by sample (no activation is kept), and SQNR
(dB) and relative L2 are reported per tensor, the worst first: the first tensors in graph order with
a low SQNR are where the error enters; later ones inherit it.
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from xattn.data import CalibrationData

_SKIP_OPS = {"Shape", "Concat", "Gather", "Unsqueeze", "Squeeze", "Slice", "Constant", "ConstantOfShape",
             "QuantizeLinear", "DequantizeLinear", "Cast"}


@dataclass
class TensorError:
    tensor: str
    op_type: str
    order: int
    sqnr_db: float
    rel_l2: float

    def as_dict(self) -> dict:
        return asdict(self)


#: Intermediate tensors asked of one session run in :func:`tensor_errors` (bounds its memory).
TENSORS_PER_RUN = 4
_SLICE = 1 << 20


def _squared_sums(ref: np.ndarray, cand: np.ndarray) -> np.ndarray:
    """``sum(ref^2)`` and ``sum((cand - ref)^2)`` in float64, a slice at a time (no float64 copy of the whole)."""
    ref, cand = ref.reshape(-1), cand.reshape(-1)
    total = np.zeros(2)
    for start in range(0, ref.size, _SLICE):
        r = ref[start:start + _SLICE].astype(np.float64)
        total[0] += float(np.dot(r, r))
        d = cand[start:start + _SLICE].astype(np.float64) - r
        total[1] += float(np.dot(d, d))
    return total


def tensor_errors(float_path: str | os.PathLike, candidate_path: str | os.PathLike, data: CalibrationData,
                  max_samples: int = 8) -> list[TensorError]:
    """Per-tensor SQNR of ``candidate_path`` against ``float_path`` over up to ``max_samples`` feeds, worst first."""
    from xattn.onnxfile import load_onnx

    float_model, candidate = load_onnx(float_path), load_onnx(candidate_path)
    _same_inputs(float_model, candidate, Path(float_path).name, Path(candidate_path).name)
    candidate_tensors = {out for node in candidate.graph.node for out in node.output}
    pairs: list[tuple[str, str, str, int]] = []   # (float name, candidate name, op type, graph order)
    for order, node in enumerate(float_model.graph.node):
        if node.op_type in _SKIP_OPS:
            continue
        for out in node.output:
            dequantized = f"{out}_DequantizeLinear_Output"
            if dequantized in candidate_tensors:
                pairs.append((out, dequantized, node.op_type, order))
            elif out in candidate_tensors:
                pairs.append((out, out, node.op_type, order))
    if not pairs:
        from xattn.errors import BadInputError

        raise BadInputError(f"{candidate_path} and {float_path} share no tensor names: they are not files of the "
                            "same graph", hint="compare their outputs instead: xattn validate CANDIDATE --reference OTHER")
    from runtime.onnxrt import session_with_outputs

    # Every intermediate a session returns stays alive until the run ends: asking for all of them at once
    # held 5.8 GB at the default model's 96x96 (its attention scores are 150 MB each, in both models). Runs
    # ask for TENSORS_PER_RUN tensors at a time instead, and sums accumulate in float64 slice by slice.
    float_session = session_with_outputs(float_model, [p[0] for p in pairs])
    candidate_session = session_with_outputs(candidate, [p[1] for p in pairs])
    sums = np.zeros((len(pairs), 2))   # per tensor: sum(ref^2), sum((cand - ref)^2)
    for feed in data.feeds[:max_samples]:
        for start in range(0, len(pairs), TENSORS_PER_RUN):
            group = pairs[start:start + TENSORS_PER_RUN]
            ref_values = float_session.run([p[0] for p in group], feed)
            cand_values = candidate_session.run([p[1] for p in group], feed)
            for index, (ref, cand) in enumerate(zip(ref_values, cand_values), start):
                ref, cand = np.asarray(ref), np.asarray(cand)
                if ref.shape != cand.shape:
                    from xattn.errors import BadInputError

                    raise BadInputError(
                        f"{Path(candidate_path).name} and {Path(float_path).name} are not files of the same graph: "
                        f"tensor {pairs[index][0]!r} is {'x'.join(map(str, cand.shape))} in one and "
                        f"{'x'.join(map(str, ref.shape))} in the other (their tensor names match by chance)",
                        hint="compare their outputs instead: xattn validate CANDIDATE --reference OTHER")
                sums[index] += _squared_sums(ref, cand)
            del ref_values, cand_values
    errors = []
    for (name, _, op_type, order), (signal, noise) in zip(pairs, sums):
        sqnr = math.inf if noise == 0 else (-math.inf if signal == 0 else 10 * math.log10(signal / noise))
        rel = 0.0 if noise == 0 else (math.inf if signal == 0 else math.sqrt(noise / signal))
        errors.append(TensorError(name, op_type, order, sqnr, rel))
    return sorted(errors, key=lambda e: (e.sqnr_db, e.order))


def _same_inputs(reference, candidate, reference_name: str, candidate_name: str) -> None:
    """Files of one graph take the same inputs: names, ranks and fixed sizes (one clear line otherwise)."""
    def inputs(model):
        initializers = {i.name for i in model.graph.initializer}
        return {i.name: [d.dim_value if d.HasField("dim_value") else None for d in i.type.tensor_type.shape.dim]
                for i in model.graph.input if i.name not in initializers}

    ours, theirs = inputs(reference), inputs(candidate)
    problem = None
    if set(ours) != set(theirs):
        problem = f"inputs {', '.join(sorted(theirs))} vs {', '.join(sorted(ours))}"
    else:
        for name in ours:
            a, b = ours[name], theirs[name]
            if len(a) != len(b) or any(x is not None and y is not None and x != y for x, y in zip(a, b)):
                problem = f"input {name} is {b} in one and {a} in the other"
                break
    if problem:
        from xattn.errors import BadInputError

        raise BadInputError(f"{candidate_name} and {reference_name} are not files of the same graph: {problem}",
                            hint="compare their outputs instead: xattn validate CANDIDATE --reference OTHER")


def format_errors(errors: list[TensorError], top: int = 15) -> str:
    lines = [f"{'tensor':<32} {'op':<10} {'SQNR dB':>8} {'rel. L2':>10}"]
    for error in errors[:top]:
        lines.append(f"{error.tensor[:32]:<32} {error.op_type:<10} {error.sqnr_db:>8.1f} {error.rel_l2:>10.2e}")
    if len(errors) > top:
        lines.append(f"... {len(errors) - top} more (--top N to see them)")
    return "\n".join(lines)
