"""Weights rounded to bfloat16 with error feedback, so a bf16 run loses less than round-to-nearest.

Where the error of a bf16 run comes from (measured on the default model, PyTorch, 16 held-out photo pairs):
rounding the *weights* of one layer to bf16 costs about 1.1-1.4e-3 relative L2 at the output, per layer
(the value projection, the second stem convolution of x2 and the head each), while rounding the activations
costs far less where they are averaged (V: 3e-5). A weight's rounding error is the same at every position, so
it never averages out. OpenVINO's CPU plugin rounds every convolution and MatMul weight to nearest when it
runs bf16 (checked: the INT8 file with its weights pre-rounded to nearest gives OpenVINO bf16 the same bits), and
that is most of its 2.6e-3.

This module picks, for each weight, the bf16 values that keep the layer's *output* closest on calibration
data, by GPTQ's error feedback (Frantar et al., 2022, "GPTQ: Accurate Post-Training Quantization for
Generative Pre-trained Transformers", section 3) on the bf16 grid instead of an integer one: columns are
rounded one at a time, and each rounding error is spread over the columns not yet rounded, weighted by the
inverse of the inputs' second moment ``H = X^T X``. The weights are written back as float32 values that bf16
represents exactly, so the runtime's own rounding leaves them unchanged.

Measured on the default model (2-core AMD EPYC with AVX512-BF16, OpenVINO 2026.4.1): rounding the eight
convolutions' weights alone costs 2.3e-3 relative L2 to nearest, 2.6e-4 with error feedback (PyTorch, median over
held-out photos); ``model.ov.int8.onnx`` on OpenVINO bf16 against PyTorch on 32 held-out photo pairs, worst case,
3.02e-3 -> 2.07e-3. The price is an FP32 run of the file: it moves by about 3e-4 (6e-4 worst), which is why
only files made for a bf16 or INT8 run get it.

Layers handled: ``Conv`` (2-D, one group, explicit or no padding) and ``MatMul`` / ``Gemm`` whose weight is
a float32 initializer, also through a Transpose, and through a Split along its rows first (torch's packed Q/K/V
projection), each block against its own inputs. A weight something else reads too is left as it is and listed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from xattn.data import CalibrationData
from xattn.nodes import attribute, input_readers

#: GPTQ's dampening: this fraction of H's mean diagonal is added to its diagonal, so H inverts when
#: inputs are collinear (dead channels, constant padding)
DAMPING = 0.01
#: columns rounded together before the rest is updated (GPTQ's lazy batch; the result is the same)
BLOCK = 128
#: calibration feeds H is taken from, at most: 16 photo feeds gave the same held-out error as 96 (default model)
MAX_FEEDS = 32
#: a weight meeting more inputs per output than this is left to the runtime: its H (columns^2 float64, 162 MiB
#: here) and the O(columns^3) inversion grow fast, and layers that wide are rare in these models
MAX_COLUMNS = 4608
#: H matrices held at once; more weights than fit are done in further passes over the calibration data
HESSIAN_BUDGET_BYTES = 512 * 2 ** 20
#: layer-input rows turned into H at a time, so a large feature map never becomes one huge im2col matrix
ROWS_PER_STEP = 8192


def bf16_grid(values: np.ndarray) -> np.ndarray:
    """``values`` rounded to the nearest bfloat16 (ties to even), as float32: what a bf16 runtime makes of them.

    Non-finite values pass through unchanged."""
    single = np.ascontiguousarray(values, dtype=np.float32)
    bits = single.view(np.uint32)
    rounded = ((bits + (((bits >> 16) & 1) + 0x7FFF)) & 0xFFFF0000).astype(np.uint32).view(np.float32)
    return np.where(np.isfinite(single), rounded, single)


def round_with_error_feedback(weight: np.ndarray, hessian: np.ndarray, *, damping: float = DAMPING,
                              block: int = BLOCK) -> np.ndarray:
    """``weight`` (rows x columns; a column meets one input) on the bf16 grid, chosen to keep ``x @ weight.T``
    close for inputs whose second moment is ``hessian`` (columns x columns). See the module docstring."""
    work = np.array(weight, dtype=np.float64)
    columns = work.shape[1]
    h = np.array(hessian, dtype=np.float64)
    dead = np.diag(h) <= 0   # an input that is always zero: its weight cannot matter, round it to nearest
    h[dead, dead] = 1.0
    order = np.argsort(-np.diag(h), kind="stable")   # largest inputs first (GPTQ's act-order)
    work, h = work[:, order], h[np.ix_(order, order)]
    h[np.diag_indices(columns)] += damping * float(np.mean(np.diag(h)))
    # the upper Cholesky factor of H^-1 carries every update the feedback needs
    inverse = np.linalg.inv(h)
    inverse = (inverse + inverse.T) / 2
    upper = np.linalg.cholesky(inverse).T
    for start in range(0, columns, block):
        stop = min(start + block, columns)
        part = work[:, start:stop].copy()
        errors = np.zeros_like(part)
        for i in range(stop - start):
            column = part[:, i]
            rounded = bf16_grid(column).astype(np.float64)
            error = (column - rounded) / upper[start + i, start + i]
            part[:, i] = rounded
            part[:, i + 1:] -= np.outer(error, upper[start + i, start + i + 1:stop])
            errors[:, i] = error
        work[:, start:stop] = part
        work[:, stop:] -= errors @ upper[start:stop, stop:]
    result = np.empty_like(work)
    result[:, order] = work
    return bf16_grid(result)   # already on the grid; this only makes the float32 values exact


@dataclass
class _Layer:
    """One reader of a weight block: how its input becomes rows that meet the block's columns."""
    #: "conv": the block is (O, C, kh, kw); "rows": y = x @ block.T (Gemm transB=1, or MatMul on a transposed
    #: slice); "cols": y = x @ block (MatMul / Gemm on the weight as stored)
    kind: str
    input_name: str
    geometry: dict | None = None   # a convolution's kernel, strides, dilations, pads


def _layer(node, index: int, weight: np.ndarray, transposed: bool) -> tuple[_Layer | None, str]:
    """How ``node`` reads ``weight`` (``transposed``: through a Transpose) as its input ``index``: a layer, or
    why it cannot be handled."""
    if node.op_type == "Conv" and index == 1 and not transposed:
        if weight.ndim != 4:
            return None, f"{weight.ndim - 2}-D convolution"
        auto_pad = attribute(node, "auto_pad", b"NOTSET")
        auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else auto_pad
        if attribute(node, "group", 1) != 1:
            return None, "grouped convolution"
        if auto_pad not in ("NOTSET", "VALID"):
            return None, f"convolution with auto_pad {auto_pad}"
        pads = list(attribute(node, "pads", [0] * 4)) if auto_pad == "NOTSET" else [0] * 4
        return _Layer("conv", node.input[0], {"kernel": tuple(weight.shape[2:]), "pads": pads,
                                              "strides": tuple(attribute(node, "strides", (1, 1))),
                                              "dilations": tuple(attribute(node, "dilations", (1, 1)))}), ""
    if node.op_type in ("MatMul", "Gemm") and index == 1:
        if weight.ndim != 2:
            return None, f"{node.op_type} with a {weight.ndim}-D weight"
        if attribute(node, "transA", 0):
            return None, "Gemm with transA"
        return _Layer("rows" if bool(attribute(node, "transB", 0)) != transposed else "cols", node.input[0]), ""
    return None, f"also read by {node.op_type} {node.name or '?'} as its input {index}"


def _split_rows(node, rows: int, initializers) -> list[tuple[int, int]] | None:
    """The row ranges of a Split along axis 0 of a ``rows``-row weight, or None when they cannot be read."""
    from onnx import numpy_helper

    if attribute(node, "axis", 0) not in (0, -2):
        return None
    if len(node.input) > 1 and node.input[1]:
        if node.input[1] not in initializers:
            return None
        sizes = [int(v) for v in numpy_helper.to_array(initializers[node.input[1]])]
    elif attribute(node, "split") is not None:
        sizes = [int(v) for v in attribute(node, "split")]
    else:   # equal parts (the last one smaller when rows do not divide)
        parts = len(node.output)
        size = -(-rows // parts)
        sizes = [min(size, rows - i * size) for i in range(parts)]
    if len(sizes) != len(node.output) or sum(sizes) != rows or min(sizes) < 0:
        return None
    bounds = np.cumsum([0] + sizes)
    return [(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:])]


def _blocks(name: str, weight: np.ndarray, consumers, initializers):
    """The blocks of rows of weight ``name`` that layers read, as ``{(start, stop): [layer, ...]}``, and why not
    when some reader cannot be handled. Besides direct weights (Conv, MatMul, Gemm), a 2-D weight may reach a
    MatMul through Transpose, and through Split along its rows first: how torch's nn.MultiheadAttention exports
    its packed Q/K/V projection."""
    blocks: dict[tuple[int, int], list[_Layer]] = {}
    whole = (0, weight.shape[0])

    def reach(tensor, rows, transposed, depth=0) -> str:
        for node, index in consumers.get(tensor, []):
            if node.op_type == "Transpose" and weight.ndim == 2 and not transposed and depth < 2 and \
                    list(attribute(node, "perm", [1, 0])) == [1, 0]:
                why = reach(node.output[0], rows, True, depth + 1)
            elif node.op_type == "Split" and weight.ndim == 2 and not transposed and depth == 0:
                ranges = _split_rows(node, weight.shape[0], initializers)
                if ranges is None:
                    return f"split by {node.name or '?'} in a way not read here"
                why = next((w for out, r in zip(node.output, ranges) if (w := reach(out, r, False, depth + 1))), "")
            else:
                layer, why = _layer(node, index, weight, transposed)
                if layer is not None:
                    if layer.kind == "cols" and rows != whole:
                        why = f"a slice of it read by {node.op_type} {node.name or '?'} untransposed"
                    else:
                        blocks.setdefault(rows, []).append(layer)
            if why:
                return why
        return ""

    why = reach(name, whole, False)
    if not why and any(len({layer.kind for layer in layers}) > 1 for layers in blocks.values()):
        why = "read by layers of different kinds"
    ranges = sorted(blocks)
    if not why and any(a[1] > b[0] for a, b in zip(ranges, ranges[1:])):
        why = "read in overlapping blocks of rows"   # each block is rounded against its own inputs: one answer per row
    return (None, why) if why else (blocks, "")


def _read_as_weight(tensor: str, consumers, depth: int = 0) -> bool:
    """Whether a Conv, MatMul or Gemm reads ``tensor`` as its weight, directly or through the Transpose / Split
    that :func:`_blocks` follows. A tensor that none does (a transposed position table, say) is no weight, and
    not worth a line about being left."""
    for node, index in consumers.get(tensor, []):
        if node.op_type in ("Conv", "MatMul", "Gemm") and index == 1:
            return True
        if node.op_type in ("Transpose", "Split") and index == 0 and depth < 2 and \
                any(_read_as_weight(out, consumers, depth + 1) for out in node.output):
            return True
    return False


def conv_rows(x: np.ndarray, geometry: dict):
    """Yield ``x`` (N, C, H, W) as im2col rows (positions x C*kh*kw, in the weight's ``reshape(O, -1)`` order),
    a few output rows at a time."""
    kh, kw = geometry["kernel"]
    sh, sw = geometry["strides"]
    dh, dw = geometry["dilations"]
    top, left, bottom, right = geometry["pads"]
    padded = np.pad(x, ((0, 0), (0, 0), (top, bottom), (left, right)))
    span_h, span_w = dh * (kh - 1) + 1, dw * (kw - 1) + 1
    if padded.shape[2] < span_h or padded.shape[3] < span_w:
        return
    windows = np.lib.stride_tricks.sliding_window_view(padded, (span_h, span_w), axis=(2, 3))
    windows = windows[:, :, ::sh, ::sw, ::dh, ::dw]            # N, C, OH, OW, kh, kw
    n, c, oh, ow = windows.shape[:4]
    step = max(1, ROWS_PER_STEP // max(1, ow))
    for item in range(n):
        for row in range(0, oh, step):
            part = windows[item, :, row:row + step]           # C, rows, OW, kh, kw
            yield part.transpose(1, 2, 0, 3, 4).reshape(-1, c * kh * kw)


@dataclass
class Bf16WeightsResult:
    #: weight initializer -> relative change of the layer output on the calibration data vs round-to-nearest
    #: (output error with error feedback / output error rounded to nearest), both against the float weights
    layers: dict[str, float] = field(default_factory=dict)
    #: weights left as they were, with why
    left: list[tuple[str, str]] = field(default_factory=list)

    #: calibration feeds the layer inputs were taken from
    feeds: int = 0

    def record(self, data: CalibrationData) -> dict:
        return {"method": "bf16 grid with GPTQ error feedback on the calibration data", "damping": DAMPING,
                "weights": sorted(self.layers), "error_vs_nearest": {k: round(v, 4) for k, v in self.layers.items()},
                "left": [list(x) for x in self.left], "feeds": self.feeds, "data": data.label}


def _output_error(candidate: np.ndarray, weight: np.ndarray, hessian: np.ndarray) -> float:
    """The layer output's error on the calibration inputs, sqrt(trace(D H D^T)) for D = candidate - weight."""
    d = candidate.astype(np.float64) - weight
    return float(np.sqrt(max(np.sum((d @ hessian) * d), 0.0)))


def _columns(weight: np.ndarray, layers: list[_Layer]) -> int:
    return weight.shape[0] if layers[0].kind == "cols" else int(np.prod(weight.shape[1:]))


def _passes(plans) -> list[list[str]]:
    """The weights grouped so that one group's H matrices fit :data:`HESSIAN_BUDGET_BYTES`."""
    groups, size = [[]], 0
    for name, (weight, blocks) in plans.items():
        need = sum(8 * _columns(weight, layers) ** 2 for layers in blocks.values())
        if groups[-1] and size + need > HESSIAN_BUDGET_BYTES:
            groups.append([])
            size = 0
        groups[-1].append(name)
        size += need
    return groups


def _round_group(plans, model, feeds, initializers, result: "Bf16WeightsResult", say) -> None:
    """One pass over ``feeds`` for the H of ``plans``' blocks, then their weights rounded and written."""
    from onnx import numpy_helper

    from runtime.onnxrt import session_with_outputs

    inputs = sorted({layer.input_name for _, blocks in plans.values() for layers in blocks.values()
                     for layer in layers})
    hessians = {(name, rows): None for name, (_, blocks) in plans.items() for rows in blocks}
    session, values = session_with_outputs(model, inputs), {}
    for index, feed in enumerate(feeds):
        values = dict(zip(inputs, session.run(inputs, dict(feed))))
        for name, (weight, blocks) in plans.items():
            for rows, layers in blocks.items():
                for layer in layers:
                    x = values[layer.input_name]
                    if layer.kind == "conv":
                        chunks = conv_rows(x, layer.geometry)
                    else:
                        flat = x.reshape(-1, weight.shape[1] if layer.kind == "rows" else weight.shape[0])
                        chunks = (flat[i:i + ROWS_PER_STEP] for i in range(0, len(flat), ROWS_PER_STEP))
                    for part in chunks:
                        part = part.astype(np.float64)
                        moment = part.T @ part
                        key = (name, rows)
                        hessians[key] = moment if hessians[key] is None else hessians[key] + moment
        say(f"bf16 weight calibration {index + 1}/{len(feeds)}")
    del session, values

    for name, (weight, blocks) in plans.items():
        new, ratios = weight.copy(), []
        for (start, stop), layers in blocks.items():
            kind = layers[0].kind
            # rows x columns, a column meeting one input: conv (O, C*kh*kw), "rows" as stored, "cols" transposed
            matrix = weight.reshape(weight.shape[0], -1)[start:stop] if kind != "cols" else weight.T
            h = hessians.pop((name, (start, stop)))
            if h is None or not np.all(np.isfinite(h)) or not np.all(np.isfinite(matrix)):
                result.left.append((name, "no finite calibration input"))
                break
            rounded = round_with_error_feedback(matrix, h)
            near = _output_error(bf16_grid(matrix), matrix, h)
            ratio = _output_error(rounded, matrix, h) / near if near > 0 else 0.0
            if ratio > 1.0:   # feedback made it worse (never seen): round to nearest, which a runtime does anyway
                rounded, ratio = bf16_grid(matrix), 1.0
            if kind == "cols":
                new = rounded.T
            else:
                new.reshape(weight.shape[0], -1)[start:stop] = rounded
            ratios.append(ratio)
        else:
            initializers[name].CopyFrom(numpy_helper.from_array(np.ascontiguousarray(new, dtype=np.float32), name))
            result.layers[name] = max(ratios)
            say(f"bf16 weights: {name} at {max(ratios):.2f} of round-to-nearest's output error")


def round_weights_for_bf16(model, data: CalibrationData, *, say: Callable[[str], None] | None = None
                           ) -> Bf16WeightsResult:
    """Put every supported weight of ``model`` (an fp32 ``onnx.ModelProto``, changed in place) on the bf16 grid
    by error feedback against the layer inputs ``data`` produces (module docstring)."""
    from onnx import numpy_helper

    say = say or (lambda message: None)
    initializers = {init.name: init for init in model.graph.initializer}
    consumers = input_readers(model.graph)
    result = Bf16WeightsResult()
    plans = {}   # weight -> (array, {(start, stop): [layer, ...]})
    for name, init in initializers.items():
        if init.data_type != 1 or not _read_as_weight(name, consumers):   # FLOAT weights only
            continue
        weight = numpy_helper.to_array(init)
        if weight.ndim not in (2, 4):
            continue
        blocks, why = _blocks(name, weight, consumers, initializers)
        if not why and blocks and _columns(weight, next(iter(blocks.values()))) > MAX_COLUMNS:
            why = f"{_columns(weight, next(iter(blocks.values())))} inputs per output, more than {MAX_COLUMNS}"
        if why:
            result.left.append((name, why))
        elif blocks:
            plans[name] = (weight, blocks)
    if not plans:
        return result

    feeds = data.feeds[:MAX_FEEDS]
    result.feeds = len(feeds)
    for group in _passes(plans):
        _round_group({name: plans[name] for name in group}, model, feeds, initializers, result, say)
    return result
