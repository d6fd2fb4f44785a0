"""ONNX export with dynamic batch and spatial axes, verified against PyTorch before it counts.

``export_onnx(model, settings)``:

1. picks an example input whose every dynamic size is above 1 and distinct from the others
   (torch.export specialises sizes 0/1, and may merge equal sizes);
2. exports with the torch.export-based exporter (``dynamic_shapes`` with named ``Dim``s) or the legacy
   TorchScript exporter;
3. records provenance in ``metadata_props``;
4. verifies: ``onnx.checker`` (full check), strict shape inference, then ONNX Runtime (CPU) against
   PyTorch at three or more shape sets unlike the example (x1 and x2 of different sizes, batch > 1, odd
   sizes), relative L2 error <= ``settings.rel_l2_tolerance``;
5. only then moves the file into place (atomically) and writes the JSON export report beside it.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from exporter.registry import LoadedModel
from xattn.errors import ArtifactError, BadInputError, CheckFailedError, ShapeError, VerificationError
from xattn.fileio import atomic_path, check_writable, sha256_file
from xattn.provenance import base_record, set_onnx_metadata
from xattn.shapes import ShapeSet, check_profile, format_shape_set

#: TensorRT 10.3 (JetPack 6) parses opsets up to 20; 18 is also what the dynamo exporter emits natively.
DEFAULT_OPSET = 18
MIN_OPSET, MAX_OPSET = 17, 21
#: Default dynamic ranges (inclusive): (min, opt, max) per axis kind.
DEFAULT_BATCH = (1, 1, 8)
DEFAULT_SPATIAL = (4, 64, 128)
#: FP32 export must match PyTorch this closely (relative L2 error).
FP32_REL_L2_TOLERANCE = 1e-5
AXIS_KINDS = ("batch", None, "height", "width")  # NCHW; channels are fixed


class ExportError(CheckFailedError):
    """The exporter could not turn the module into ONNX."""


@dataclass
class ExportSettings:
    """How to export. ``None`` means the documented default.

    Attributes:
        opset: ONNX opset (default :data:`DEFAULT_OPSET`; :data:`MIN_OPSET`..:data:`MAX_OPSET`).
        exporter: ``"dynamo"`` (torch.export-based, default) or ``"legacy"`` (TorchScript).
        min_shapes / opt_shapes / max_shapes: the dynamic ranges to declare, per input (defaults:
            batch 1/1/8, height and width 4/64/128). Recorded in the ONNX for profiles and checks.
        verify_shapes: shape sets to verify at (default: three derived from the ranges).
        rel_l2_tolerance: the FP32 bound for verification (default 1e-5).
        simplify: run onnxslim and verify the simplified graph the same way.
        verify_seed: seed of the random verification inputs.
    """

    opset: int = DEFAULT_OPSET
    exporter: str = "dynamo"
    min_shapes: ShapeSet | None = None
    opt_shapes: ShapeSet | None = None
    max_shapes: ShapeSet | None = None
    verify_shapes: list[ShapeSet] | None = None
    rel_l2_tolerance: float = FP32_REL_L2_TOLERANCE
    simplify: bool = False
    verify_seed: int = 0


@dataclass
class ShapeCheck:
    shapes: str
    rel_l2: float
    max_abs: float
    passed: bool


@dataclass
class ExportResult:
    path: Path
    report_path: Path
    opset: int
    exporter: str
    min_shapes: ShapeSet
    opt_shapes: ShapeSet
    max_shapes: ShapeSet
    example_shapes: ShapeSet
    checks: list[ShapeCheck] = field(default_factory=list)
    tolerance: float = FP32_REL_L2_TOLERANCE
    seconds: float = 0.0
    sha256: str = ""

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["path"], data["report_path"] = str(self.path), str(self.report_path)
        for key in ("min_shapes", "opt_shapes", "max_shapes", "example_shapes"):
            data[key] = format_shape_set(getattr(self, key))
        return data


def report_path_for(path: str | os.PathLike) -> Path:
    path = Path(path)
    return path.with_name(path.stem + ".export.json")


def resolve_profile(model: LoadedModel, settings: ExportSettings) -> tuple[ShapeSet, ShapeSet, ShapeSet]:
    """Complete the min/opt/max shape sets from the defaults and check them against the model."""
    shapes: dict[str, ShapeSet] = {}
    for index, (label, given) in enumerate((("min", settings.min_shapes), ("opt", settings.opt_shapes),
                                            ("max", settings.max_shapes))):
        result: ShapeSet = {}
        for name, channels in model.io.inputs.items():
            default = (DEFAULT_BATCH[index], channels, DEFAULT_SPATIAL[index], DEFAULT_SPATIAL[index])
            result[name] = tuple(given[name]) if given and name in given else default
        if given:
            unknown = sorted(set(given) - set(model.io.inputs))
            if unknown:
                raise ShapeError(f"--{label}-shapes names unknown input {', '.join(map(repr, unknown))}; "
                                 f"model {model.name!r} has inputs {', '.join(map(repr, model.io.inputs))}")
        shapes[label] = result
    low, opt, high = shapes["min"], shapes["opt"], shapes["max"]
    for name, channels in model.io.inputs.items():
        for label, shape in (("min", low[name]), ("opt", opt[name]), ("max", high[name])):
            if len(shape) != 4:
                raise ShapeError(f"--{label}-shapes for {name!r} has rank {len(shape)}, expected 4 (NxCxHxW)")
            if shape[1] != channels:
                raise ShapeError(f"--{label}-shapes for {name!r} has {shape[1]} channels; model "
                                 f"{model.name!r} takes {channels}")
    # Defaults fill what was not given, so e.g. a given max below the default opt is clamped, not an error.
    for name in opt:
        opt[name] = tuple(min(max(o, a), b) for a, o, b in zip(low[name], opt[name], high[name]))
    check_profile(low, opt, high)
    ranges = {(low[n][0], high[n][0]) for n in low}
    if len(ranges) > 1:   # one named "batch" axis is shared by every input
        raise ShapeError(f"inputs must share one batch range, got {', '.join(f'{a}..{b}' for a, b in sorted(ranges))}")
    return low, opt, high


def _pick(low: int, high: int, preferred: int, taken: set[int]) -> int:
    """A size in [low, high], near ``preferred``, > 1 where possible, not in ``taken`` where possible."""
    candidates = [v for v in range(max(low, 2), high + 1) if v not in taken] or [min(max(preferred, low), high)]
    return min(candidates, key=lambda v: (abs(v - preferred), v))


def example_shapes(model: LoadedModel, low: ShapeSet, high: ShapeSet) -> ShapeSet:
    """The tracing example: every dynamic size > 1 and, where the range allows, distinct from the rest."""
    taken: set[int] = set()
    names = list(model.io.inputs)
    batch = _pick(low[names[0]][0], high[names[0]][0], 2, taken)
    taken.add(batch)
    preferred = {0: (24, 20), 1: (16, 30)}  # 24*20 == 16*30: equal positions for the seed model
    result: ShapeSet = {}
    for index, name in enumerate(names):
        channels = model.io.inputs[name]
        dims = []
        for axis, want in zip((2, 3), preferred.get(index, (12 + 2 * index, 18 + 2 * index))):
            value = _pick(low[name][axis], high[name][axis], want, taken | {channels})
            taken.add(value)
            dims.append(value)
        result[name] = (batch, channels, *dims)
    if model.equal_positions and len(names) == 2:
        a, b = (result[n] for n in names)
        if a[2] * a[3] != b[2] * b[3]:
            result[names[1]] = (b[0], b[1], a[3], a[2]) if _fits((a[3], a[2]), low[names[1]], high[names[1]]) else a
    return result


def verification_shapes(model: LoadedModel, low: ShapeSet, high: ShapeSet, example: ShapeSet) -> list[ShapeSet]:
    """Three shape sets unlike the example: odd sizes with batch 1, batch 3, and x1 smaller than x2.

    Each is clamped into the declared ranges; sets that collapse onto the example or onto each other
    are dropped (only possible with very narrow ranges).
    """
    names = list(model.io.inputs)
    plans = [(1, [(17, 23), (9, 31)]), (3, [(40, 24), (24, 40)]), (2, [(12, 20), (33, 13)])]
    result: list[ShapeSet] = []
    for batch, sizes in plans:
        shape_set: ShapeSet = {}
        for index, name in enumerate(names):
            h, w = sizes[min(index, len(sizes) - 1)] if index < 2 else (10 + index, 14 + index)
            if model.equal_positions and index == 1:
                first = shape_set[names[0]]
                h, w = first[3], first[2]  # transposed: same position count, different shape
            shape_set[name] = _clamp((batch, model.io.inputs[name], h, w), low[name], high[name])
        if model.equal_positions and len(names) == 2:
            a, b = (shape_set[n] for n in names)
            if a[2] * a[3] != b[2] * b[3]:
                shape_set[names[1]] = a
        if shape_set != example and shape_set not in result:
            result.append(shape_set)
    return result


def _clamp(shape, low, high) -> tuple[int, ...]:
    return tuple(min(max(v, a), b) for v, a, b in zip(shape, low, high))


def _fits(hw, low, high) -> bool:
    return all(a <= v <= b for v, a, b in zip(hw, low[2:], high[2:]))


def dynamic_axes(model: LoadedModel, low: ShapeSet, high: ShapeSet) -> dict[str, dict[int, str]]:
    """Named dynamic axes per input: ``batch``, ``<input>_height``, ``<input>_width`` (fixed ones omitted)."""
    axes: dict[str, dict[int, str]] = {}
    for name in model.io.inputs:
        named = {}
        for axis, kind in enumerate(AXIS_KINDS):
            if kind is None or low[name][axis] == high[name][axis]:
                continue
            named[axis] = "batch" if kind == "batch" else f"{name}_{kind}"
        axes[name] = named
    return axes


def export_onnx(model: LoadedModel, output: str | os.PathLike, settings: ExportSettings | None = None,
                progress=None) -> ExportResult:
    """Export ``model`` to ``output`` (verified; see the module docstring) and return the result.

    Raises:
        BadInputError / ShapeError: bad settings (nothing is written).
        ExportError: the exporter failed.
        VerificationError: the ONNX does not match PyTorch; the failed file is kept beside the output
            as ``<name>.unverified.onnx`` for inspection and ``output`` is left untouched.
    """
    settings = settings or ExportSettings()
    say = progress or (lambda message: None)
    output = check_writable(output)
    if not MIN_OPSET <= settings.opset <= MAX_OPSET:
        raise BadInputError(f"opset {settings.opset} is out of range",
                            hint=f"use {MIN_OPSET}..{MAX_OPSET}; TensorRT 10.3 parses up to 20")
    if settings.exporter not in ("dynamo", "legacy"):
        raise BadInputError(f"unknown exporter {settings.exporter!r}", hint="use dynamo or legacy")
    low, opt, high = resolve_profile(model, settings)
    example = example_shapes(model, low, high)
    for shapes in settings.verify_shapes or ():   # refused before exporting: bad input, not a mismatch
        for name, shape in shapes.items():
            if name not in low or len(shape) != len(low[name]) or not all(
                    a <= v <= b for v, a, b in zip(shape, low[name], high[name])):
                raise ShapeError(f"--verify-shapes {format_shape_set(shapes)}: {name} is outside the exported range "
                                 f"{format_shape_set({name: low[name]})} .. {format_shape_set({name: high[name]})}"
                                 if name in low else f"--verify-shapes names unknown input {name!r}",
                                 hint="verify inside --min-shapes/--max-shapes, or widen them")
    checks_at = settings.verify_shapes or verification_shapes(model, low, high, example)
    axes = dynamic_axes(model, low, high)
    start = time.perf_counter()

    import onnx

    with atomic_path(output) as tmp:
        say(f"exporting {model.name} with the {settings.exporter} exporter (opset {settings.opset})")
        _run_exporter(model, example, axes, low, high, settings, tmp)
        proto = onnx.load(str(tmp))
        _name_output_axes(proto, model, axes)
        record = {
            **base_record(), **model.record(),
            "precision": "fp32", "opset": settings.opset, "exporter": settings.exporter,
            "dynamic_axes": {n: {str(k): v for k, v in a.items()} for n, a in axes.items()},
            "min_shapes": format_shape_set(low), "opt_shapes": format_shape_set(opt),
            "max_shapes": format_shape_set(high),
        }
        record.pop("checkpoint", None)  # a local path means nothing elsewhere; the hash identifies it
        set_onnx_metadata(proto, record)
        from xattn.onnxfile import check_onnx, topological_sort

        topological_sort(proto.graph)   # the same checks every other writer passes (xattn.onnxfile.save_onnx)
        check_onnx(proto, output.name)
        onnx.save(proto, str(tmp))
        if settings.simplify:
            say("simplifying the graph with onnxslim")
            simplify_onnx(tmp)
        say(f"verifying against PyTorch at {len(checks_at)} shape sets")
        checks = verify_onnx(model, tmp, checks_at, settings.rel_l2_tolerance, seed=settings.verify_seed)
        failed = [c for c in checks if not c.passed]
        if failed:
            keep = output.with_name(output.stem + ".unverified.onnx")
            os.replace(tmp, keep)
            worst = max(failed, key=lambda c: c.rel_l2)
            raise VerificationError(
                f"exported ONNX does not match PyTorch at {worst.shapes}: relative L2 error {worst.rel_l2:.3g} > "
                f"{settings.rel_l2_tolerance:g} ({len(failed)} of {len(checks)} shape sets failed); the file is kept "
                f"as {keep} for inspection",
                hint="a size baked into a Reshape is the usual cause (int() or .item() on a shape, Python ints "
                     "in view()): keep sizes symbolic in the model's forward")
        # The report is written (to a temporary file) before the model is moved into place, so a full disk
        # fails the export as a whole: both files or neither, never a new model without its report.
        result = ExportResult(output, report_path_for(output), settings.opset, settings.exporter, low, opt, high,
                              example, checks, settings.rel_l2_tolerance, time.perf_counter() - start, sha256_file(tmp))
        report_tmp = result.report_path.with_name(f".{result.report_path.name}.{os.getpid()}.tmp")
        try:
            report_tmp.write_text(json.dumps({**result.as_dict(), "model": model.record()}, indent=2) + "\n")
        except OSError as exc:
            report_tmp.unlink(missing_ok=True)
            raise ArtifactError(f"cannot write the export report {result.report_path}: {exc.strerror or exc}; "
                                "nothing was written", hint="free some disk space") from exc
    os.replace(report_tmp, result.report_path)   # a rename needs no space
    return result


def _run_exporter(model: LoadedModel, example: ShapeSet, axes: dict[str, dict[int, str]],
                  low: ShapeSet, high: ShapeSet, settings: ExportSettings, path: Path) -> None:
    from xattn.data import random_feed

    feed = random_feed(example, seed=settings.verify_seed)
    args = tuple(torch.from_numpy(feed[name]) for name in model.io.inputs)
    input_names, output_names = list(model.io.inputs), list(model.io.outputs)
    chatter = io.StringIO()
    try:
        # The exporters print progress and warnings of their own; keep them for --debug only.
        with warnings.catch_warnings(), contextlib.redirect_stdout(chatter), _quiet_torch_logs():
            warnings.simplefilter("ignore")
            if settings.exporter == "dynamo":
                from torch.export import Dim

                dims: dict[str, Any] = {}
                shapes_arg = {}
                for name, named in axes.items():
                    spec = {}
                    for axis, axis_name in named.items():
                        if axis_name not in dims:
                            dims[axis_name] = Dim(axis_name, min=low[name][axis], max=high[name][axis])
                        spec[axis] = dims[axis_name]
                    shapes_arg[name] = spec
                program = torch.onnx.export(model.module, args, None, input_names=input_names,
                                            output_names=output_names, dynamic_shapes=shapes_arg,
                                            opset_version=settings.opset, dynamo=True, optimize=True)
                program.save(str(path))
            else:
                legacy_axes: dict[str, dict[int, str]] = {n: dict(a) for n, a in axes.items()}
                for out in output_names:
                    legacy_axes[out] = _legacy_output_axes(model, axes)
                torch.onnx.export(model.module, args, str(path), input_names=input_names, output_names=output_names,
                                  dynamic_axes=legacy_axes, opset_version=settings.opset, dynamo=False,
                                  do_constant_folding=True)
    except Exception as exc:
        # Ctrl-C (or SIGTERM) inside torch's lazy imports can arrive wrapped in torch's own error:
        # it is an interruption, not an exporter failure
        cause = exc
        while cause is not None:
            if not isinstance(cause, Exception):
                raise cause from None
            cause = cause.__cause__ or cause.__context__
        message = " ".join(str(exc).split())[:400]
        logging.getLogger("xattn").debug("exporter output:\n%s", chatter.getvalue())
        raise ExportError(f"the {settings.exporter} exporter failed on model {model.name!r}: "
                          f"{type(exc).__name__}: {message}",
                          hint="try --exporter legacy" if settings.exporter == "dynamo" else None) from exc


def _legacy_output_axes(model: LoadedModel, axes: dict[str, dict[int, str]]) -> dict[int, str]:
    """The TorchScript exporter needs output axes named up front: built-ins keep x1's batch and size."""
    first = axes[next(iter(model.io.inputs))]
    return {axis: name for axis, name in first.items()}


def _name_output_axes(proto, model: LoadedModel, axes: dict[str, dict[int, str]]) -> None:
    """Give output axes the input axis names they equal (the exporters sometimes invent their own)."""
    by_param: dict[str, str] = {}
    for graph_input in proto.graph.input:
        for axis, dim in enumerate(graph_input.type.tensor_type.shape.dim):
            wanted = axes.get(graph_input.name, {}).get(axis)
            if wanted and dim.dim_param and dim.dim_param != wanted:
                by_param[dim.dim_param] = wanted
                dim.dim_param = wanted
    for graph_output in proto.graph.output:
        for dim in graph_output.type.tensor_type.shape.dim:
            if dim.dim_param in by_param:
                dim.dim_param = by_param[dim.dim_param]


def verify_onnx(model: LoadedModel, path: str | os.PathLike, shape_sets: list[ShapeSet], tolerance: float,
                *, seed: int = 0) -> list[ShapeCheck]:
    """Check the ONNX structurally, then against PyTorch on ONNX Runtime's CPU provider."""
    import onnx

    from xattn.data import random_feed
    from runtime.metrics import compare
    from runtime.onnxrt import OnnxRuntimeRunner
    from runtime.torch_runner import TorchRunner

    try:
        # full_check also runs strict shape inference (type checks, errors on inconsistent shapes).
        onnx.checker.check_model(str(path), full_check=True)
    except Exception as exc:
        raise VerificationError(f"exported ONNX fails onnx.checker/shape inference: {' '.join(str(exc).split())[:300]}") from exc
    checks = []
    with OnnxRuntimeRunner(path, ["CPUExecutionProvider"]) as candidate, TorchRunner(model) as reference:
        for index, shape_set in enumerate(shape_sets):
            feed = random_feed(shape_set, seed=seed + index + 1)
            expected = reference.infer(feed)
            try:
                got = candidate.infer(feed)
            except Exception as exc:  # e.g. a Reshape with a baked size fails outright at other sizes
                label = format_shape_set(shape_set)
                checks.append(ShapeCheck(label, float("inf"), float("inf"), False))
                logging.getLogger("xattn").debug("ONNX Runtime failed at %s: %s", label, exc)
                continue
            worst_rel, worst_abs = 0.0, 0.0
            for name, ref in expected.items():
                metrics = compare(got[name], ref)
                worst_rel, worst_abs = max(worst_rel, metrics.rel_l2), max(worst_abs, metrics.max_abs)
            checks.append(ShapeCheck(format_shape_set(shape_set), worst_rel, worst_abs,
                                     bool(np.isfinite(worst_rel) and worst_rel <= tolerance)))
    return checks


def simplify_onnx(path: Path) -> None:
    """Simplify in place with onnxslim (keeps metadata_props)."""
    try:
        import onnxslim
    except ImportError as exc:
        from xattn.errors import MissingDependencyError

        raise MissingDependencyError("--simplify needs onnxslim", hint="pip install 'xattn-deploy[simplify]'") from exc
    import onnx

    original = onnx.load(str(path))
    props = {p.key: p.value for p in original.metadata_props}
    with contextlib.redirect_stdout(io.StringIO()):
        slim = onnxslim.slim(original)
    del slim.metadata_props[:]
    for key, value in props.items():
        entry = slim.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.save(slim, str(path))


@contextlib.contextmanager
def _quiet_torch_logs():
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "torch.export", "torch._dynamo", "torch.fx",
                                               "torch._export", "onnxscript")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)
