"""Activation ranges: statistics over the float model's activations, and the range table we keep them in.

Collection runs the float ONNX on ONNX Runtime with the tensors to calibrate added as outputs
(inputs and outputs of the nodes that will be quantized, Conv by default), and keeps only running
statistics, never the activations themselves, so memory stays flat however many samples there are.

Methods (per tensor, symmetric: the result is ``amax``, the scale is ``amax / 127``):

* ``minmax``: ``max |x|`` over all samples.
* ``percentile`` (default 99.99): the given percentile of ``|x|``, from a 2048-bin histogram over
  ``[0, max |x|]`` (exact to one bin width).
* ``entropy``: TensorRT's KL-divergence calibration (``IInt8EntropyCalibrator2``'s algorithm): the
  clipping threshold whose 128-level quantized distribution is closest (KL) to the 2048-bin histogram.

Histogram methods need ``max |x|`` first, so they make two passes over the data.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from xattn.data import CalibrationData
from xattn import __version__
from xattn.errors import BadInputError, CalibrationError
from xattn.fileio import write_text_atomic
from xattn.onnxfile import require_tensors

METHODS = ("minmax", "entropy", "percentile")
DEFAULT_METHOD = "percentile"
DEFAULT_PERCENTILE = 99.99
NUM_BINS = 2048
NUM_QUANTIZED_BINS = 128
DEFAULT_OP_TYPES = ("Conv",)
RANGE_TABLE_FORMAT = "xattn-ranges/1"


@dataclass(frozen=True)
class CalibrationSettings:
    """How to compute ranges.

    Attributes:
        method: ``minmax``, ``entropy`` or ``percentile`` (default).
        percentile: for ``percentile`` (default 99.99).
        op_types: node types whose activations are calibrated (default Conv; add MatMul to quantize
            attention, against NVIDIA's advice for long sequences).
        num_bins: histogram bins (default 2048, TensorRT's).
    """

    method: str = DEFAULT_METHOD
    percentile: float = DEFAULT_PERCENTILE
    op_types: tuple[str, ...] = DEFAULT_OP_TYPES
    num_bins: int = NUM_BINS

    def check(self) -> None:
        if self.method not in METHODS:
            raise BadInputError(f"unknown calibration method {self.method!r}", hint=f"use one of {', '.join(METHODS)}")
        if not 50.0 < self.percentile <= 100.0:
            raise BadInputError(f"percentile {self.percentile} is out of range", hint="use a value in (50, 100]")


@dataclass
class RangeTable:
    """Per-tensor ``amax`` with everything needed to tell whether it still applies."""

    amax: dict[str, float]
    method: str
    percentile: float | None
    samples: int
    data_sha256: str
    data_label: str
    synthetic: bool
    model_sha256: str
    op_types: tuple[str, ...] = DEFAULT_OP_TYPES
    toolkit_version: str = __version__
    #: per input, the calibration data's mean/std/min/max (:func:`xattn.data.input_statistics`)
    inputs: dict | None = None

    def to_json(self) -> str:
        """Deterministic text: sorted keys, shortest round-trip floats, no timestamps (same inputs, same bytes)."""
        payload = {
            "format": RANGE_TABLE_FORMAT, "toolkit_version": self.toolkit_version, "method": self.method,
            "percentile": self.percentile, "samples": self.samples, "data_sha256": self.data_sha256,
            "data": self.data_label, "synthetic_data": self.synthetic, "model_sha256": self.model_sha256,
            "op_types": list(self.op_types), "amax": {k: float(v) for k, v in sorted(self.amax.items())},
            "inputs": self.inputs,
        }
        return json.dumps(payload, indent=1, sort_keys=True) + "\n"

    def save(self, path: str | os.PathLike) -> Path:
        return write_text_atomic(path, self.to_json())

    @classmethod
    def load(cls, path: str | os.PathLike) -> "RangeTable":
        path = Path(path)
        if not path.is_file():
            raise CalibrationError(f"range table {path} does not exist")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            if not isinstance(data, dict):
                raise ValueError(f"a JSON {type(data).__name__}, not an object")
            if data.get("format") != RANGE_TABLE_FORMAT:
                raise ValueError(f"format {data.get('format')!r}")
            amax = {str(k): float(v) for k, v in data["amax"].items()}
            bad = [k for k, v in amax.items() if not (math.isfinite(v) and v > 0)]
            if bad:
                raise ValueError(f"range of {bad[0]!r} is {amax[bad[0]]}, not a finite positive number")
            return cls(amax, data["method"], data.get("percentile"), int(data["samples"]), data["data_sha256"],
                       data.get("data", ""), bool(data.get("synthetic_data")), data["model_sha256"],
                       tuple(data.get("op_types", DEFAULT_OP_TYPES)), data.get("toolkit_version", ""),
                       data.get("inputs") if isinstance(data.get("inputs"), dict) else None)
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, ValueError, AttributeError) as exc:
            raise CalibrationError(f"{path} is not an xattn range table ({exc})",
                                   hint="make one with 'xattn calibrate'") from exc

    def check_model(self, model, source: str) -> None:
        """Refuse a table made for another model (its tensor names are not this model's).

        Names, not the graph hash: a re-export of the same model keeps its names and its ranges apply.
        """
        require_tensors(model, self.amax, source)

    def matches(self, model_sha: str, data_sha: str, settings: CalibrationSettings) -> bool:
        return (self.model_sha256 == model_sha and self.data_sha256 == data_sha and self.method == settings.method
                and (self.method != "percentile" or self.percentile == settings.percentile)
                and tuple(self.op_types) == tuple(settings.op_types))


def model_sha256(model) -> str:
    """Hash of the graph (nodes and weights), not of the file: re-saving or new metadata keeps it."""
    return hashlib.sha256(model.graph.SerializeToString(deterministic=True)).hexdigest()


def calibration_tensors(model, op_types: Sequence[str]) -> list[str]:
    """Float activations entering or leaving nodes of ``op_types`` (initializers excluded), in graph order."""
    from onnx import TensorProto

    initializers = {i.name for i in model.graph.initializer}
    float_inputs = {i.name for i in model.graph.input if i.type.tensor_type.elem_type == TensorProto.FLOAT}
    produced_by_float = set(float_inputs)
    shape_ops = {"Shape", "Concat", "Gather", "Unsqueeze", "Squeeze", "Slice", "Constant", "ConstantOfShape"}
    for node in model.graph.node:
        if node.op_type not in shape_ops:
            produced_by_float.update(node.output)
    from xattn.nodes import selected

    wanted: list[str] = []
    for node in model.graph.node:
        if not selected(node, op_types, initializers):
            continue
        for name in list(node.input[:1] if node.op_type in ("Conv", "ConvTranspose") else node.input) + list(node.output):
            if name and name not in initializers and name in produced_by_float and name not in wanted:
                wanted.append(name)
    return wanted


# -- statistics -----------------------------------------------------------------------------------

def percentile_from_histogram(hist: np.ndarray, amax: float, percentile: float) -> float:
    """The ``percentile`` of |x| from a histogram of |x| over [0, amax]: the upper edge of the bin it falls in."""
    total = hist.sum()
    if total == 0 or amax == 0.0:
        return 0.0
    cdf = np.cumsum(hist) / total
    index = int(np.searchsorted(cdf, percentile / 100.0, side="left"))
    index = min(index, len(hist) - 1)
    return float((index + 1) * amax / len(hist))


def entropy_threshold(hist: np.ndarray, amax: float, num_quantized_bins: int = NUM_QUANTIZED_BINS) -> float:
    """TensorRT's entropy calibration: the threshold minimising KL(P || Q) over candidate clip points."""
    hist = hist.astype(np.float64)
    # As NVIDIA's reference implementation does (pytorch-quantization's _compute_amax_entropy): the
    # zero bin takes bin 1's count. After a ReLU half of all values are exactly 0, and that spike
    # would otherwise dominate the divergence and pull the threshold far too low.
    hist[0] = hist[1]
    bins = len(hist)
    if hist.sum() == 0 or amax == 0.0:
        return 0.0
    bin_width = amax / bins
    best_kl, best_i = math.inf, bins
    for i in range(num_quantized_bins, bins + 1):
        reference = hist[:i].copy()
        reference[i - 1] += hist[i:].sum()          # clip: outliers go to the last kept bin
        # Quantize the first i bins into num_quantized_bins levels, then expand each level's count
        # evenly over its non-empty bins (non-empty in P, outliers included, as MXNet does).
        nonzero = reference != 0
        level = np.minimum((np.arange(i) * num_quantized_bins) // i, num_quantized_bins - 1)
        level_sum = np.bincount(level, weights=hist[:i], minlength=num_quantized_bins)
        level_count = np.bincount(level, weights=nonzero.astype(np.float64), minlength=num_quantized_bins)
        expanded = np.where(nonzero, level_sum[level] / np.maximum(level_count[level], 1.0), 0.0)
        p, q = _smooth(reference), _smooth(expanded)
        if p is None or q is None:
            continue
        p, q = p / p.sum(), q / q.sum()
        kl = float(np.sum(p * np.log(p / q)))
        if kl <= best_kl:  # the last minimum, as the reference implementation picks
            best_kl, best_i = kl, i
    return float(best_i * bin_width)


def _smooth(counts: np.ndarray, eps: float = 1e-4) -> np.ndarray | None:
    """MXNet's smoothing: move ``eps`` of mass onto every empty bin so KL stays finite.

    Without it, a threshold that clips a few far outliers always scores KL = inf (the clip bin is
    empty in Q but holds the outliers in P), and the calibrator would keep every outlier.
    """
    zeros = counts == 0
    n_nonzero = counts.size - int(zeros.sum())
    if n_nonzero == 0:
        return None
    eps1 = eps * float(zeros.sum()) / n_nonzero
    smoothed = counts + eps * zeros - eps1 * ~zeros
    return smoothed if np.all(smoothed > 0) else None


class _Collector:
    """Running max |x| and (second pass) histograms of |x| for a set of tensors."""

    def __init__(self, names: list[str], num_bins: int):
        self.names = names
        self.amax = {n: 0.0 for n in names}
        self.hist = {n: np.zeros(num_bins, np.int64) for n in names}
        self.num_bins = num_bins

    def update_amax(self, values: dict[str, np.ndarray]) -> None:
        for name, value in values.items():
            if value.size:
                self.amax[name] = max(self.amax[name], float(np.max(np.abs(value))))

    def update_hist(self, values: dict[str, np.ndarray]) -> None:
        for name, value in values.items():
            top = self.amax[name]
            if top > 0 and value.size:
                counts, _ = np.histogram(np.abs(value), bins=self.num_bins, range=(0.0, top))
                self.hist[name] += counts


def collect_ranges(model, data: CalibrationData, settings: CalibrationSettings | None = None, *,
                   threads: int | None = None, progress: Callable[[str], None] | None = None) -> RangeTable:
    """Compute a :class:`RangeTable` for ``model`` (an ``onnx.ModelProto``) over ``data``."""
    settings = settings or CalibrationSettings()
    settings.check()
    say = progress or (lambda message: None)
    if not data.feeds:
        raise BadInputError(f"{data.label} holds no samples",
                            hint="check the folder holds readable images, or the .npz holds arrays")
    names = calibration_tensors(model, settings.op_types)
    if not names:
        raise CalibrationError(f"the model has no {'/'.join(settings.op_types)} nodes to calibrate")
    from runtime.onnxrt import session_with_outputs

    # Full optimisation is safe (measured: the same ranges to 2e-7, 10% faster than with it off).
    session = session_with_outputs(model, names, threads=threads)
    collector = _Collector(names, settings.num_bins)
    passes = 1 if settings.method == "minmax" else 2
    for pass_index in range(passes):
        for index, feed in enumerate(data.feeds):
            values = dict(zip(names, session.run(names, feed)))
            if pass_index == 0:
                collector.update_amax(values)
            else:
                collector.update_hist(values)
            if (index + 1) % 16 == 0 or index + 1 == len(data.feeds):
                say(f"calibration pass {pass_index + 1}/{passes}: {index + 1}/{len(data.feeds)} samples")
    amax = {}
    for name in names:
        if settings.method == "minmax":
            amax[name] = collector.amax[name]
        elif settings.method == "percentile":
            amax[name] = percentile_from_histogram(collector.hist[name], collector.amax[name], settings.percentile)
        else:
            amax[name] = entropy_threshold(collector.hist[name], collector.amax[name])
    return RangeTable(amax, settings.method, settings.percentile if settings.method == "percentile" else None,
                      len(data.feeds), data.sha256, data.label, data.synthetic, model_sha256(model),
                      tuple(settings.op_types), inputs=data.statistics())


def calibrate(model, data: CalibrationData, settings: CalibrationSettings | None = None, *,
              output: str | os.PathLike | None = None, progress=None) -> tuple[RangeTable, bool]:
    """Ranges for ``model``, reusing ``output`` when it was made from the same model, data and settings.

    Returns ``(table, reused)``; writes ``output`` (atomically) when it computed a new table.
    """
    settings = settings or CalibrationSettings()
    settings.check()
    if output is not None and Path(output).is_file():
        try:
            existing = RangeTable.load(output)
        except CalibrationError:
            existing = None
        if existing is not None and existing.matches(model_sha256(model), data.sha256, settings):
            return existing, True
    table = collect_ranges(model, data, settings, progress=progress)
    if output is not None:
        table.save(output)
    return table, False
