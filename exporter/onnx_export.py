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
import re
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from exporter.guards import RecordedGuard, analyse_guards, recorded_asserts, symbols_of_inputs
from xattn.registry import LoadedModel, resolve_profile, verification_shapes
from xattn.errors import ArtifactError, BadInputError, CheckFailedError, ShapeError, VerificationError
from exporter.peak_memory import estimate_peak_bytes, fit_in_budget
from xattn.fileio import atomic_path, check_writable, sha256_file
from xattn.memory import format_size, physical_memory, verify_memory_budget
from xattn.provenance import base_record, set_onnx_metadata
from xattn.shapes import ShapeSet, format_shape_set

#: TensorRT 10.3 (JetPack 6) parses opsets up to 20; 18 is also what the dynamo exporter emits natively.
DEFAULT_OPSET = 18
MIN_OPSET, MAX_OPSET = 17, 21
#: FP32 export must match PyTorch this closely (relative L2 error).
FP32_REL_L2_TOLERANCE = 1e-5
#: exporter warnings kept in the report (deduplicated)
MAX_WARNINGS = 50
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
        verify_memory: bytes one verification run may use (default: :func:`xattn.memory.verify_memory_budget`,
            the smaller of 2 GiB and 1/8 of this machine's memory, or ``$XATTN_VERIFY_MEMORY``). Shape sets
            that would need more are scaled down (the max corner) or skipped, and said.
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
    verify_memory: int | None = None


@dataclass
class ShapeCheck:
    shapes: str
    rel_l2: float
    max_abs: float
    passed: bool
    #: why this shape set: "varied sizes", "min corner", "max corner", "guard ...: true/false side"
    purpose: str = ""
    output_shapes: dict[str, list[int]] = field(default_factory=dict)
    #: why PyTorch itself refused these sizes (a guard's false side outside the model's domain); such
    #: checks are dropped from the result and said in its notes
    refused: str = field(default="", repr=False)

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data.pop("refused")
        return data


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
    guards: list[RecordedGuard] = field(default_factory=list)
    exporter_warnings: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["guards"] = [g.as_dict() for g in self.guards]
        data["checks"] = [c.as_dict() for c in self.checks]
        data["path"], data["report_path"] = str(self.path), str(self.report_path)
        for key in ("min_shapes", "opt_shapes", "max_shapes", "example_shapes"):
            data[key] = format_shape_set(getattr(self, key))
        return data


def report_path_for(path: str | os.PathLike) -> Path:
    path = Path(path)
    return path.with_name(path.stem + ".export.json")


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
    low, opt, high = resolve_profile(model, settings.min_shapes, settings.opt_shapes, settings.max_shapes)
    example = example_shapes(model, low, high)
    for shapes in settings.verify_shapes or ():   # refused before exporting: bad input, not a mismatch
        for name, shape in shapes.items():
            if name not in low or len(shape) != len(low[name]) or not all(
                    a <= v <= b for v, a, b in zip(shape, low[name], high[name])):
                raise ShapeError(f"--verify-shapes {format_shape_set(shapes)}: {name} is outside the exported range "
                                 f"{format_shape_set({name: low[name]})} .. {format_shape_set({name: high[name]})}"
                                 if name in low else f"--verify-shapes names unknown input {name!r}",
                                 hint="verify inside --min-shapes/--max-shapes, or widen them")
    budget = verify_memory_budget(settings.verify_memory)
    for shapes in settings.verify_shapes or ():
        refusal = MemoryNeeds(model).over_budget(shapes, budget, example)
        if refusal:
            raise ShapeError(f"--verify-shapes {format_shape_set(shapes)}: {refusal}",
                             hint="verify at smaller shapes, or raise --verify-memory")
    axes = dynamic_axes(model, low, high)
    start = time.perf_counter()

    import onnx

    capture_notes: list[str] = []
    with atomic_path(output) as tmp:
        say(f"exporting {model.name} with the {settings.exporter} exporter (opset {settings.opset})")
        try:
            guards, exporter_warnings, exporter_used = _capture_with_fallback(model, example, axes, low, high, settings, tmp,
                                                                capture_notes)
        except RangesNarrowed as narrowed:
            if settings.min_shapes or settings.max_shapes:   # the user's own ranges: theirs to change
                raise ExportError(f"model {model.name!r} cannot run on the whole of the declared ranges: {narrowed}",
                                  hint=f"export with {narrowed.flags(low, high)}") from None
            # the default ranges are the toolkit's guess, not the user's claim: narrow them, and say so
            low, high = narrowed.apply(low), narrowed.apply(high)
            opt = {n: tuple(min(max(o, a), b) for a, o, b in zip(low[n], opt[n], high[n])) for n in opt}
            example = example_shapes(model, low, high)
            axes = dynamic_axes(model, low, high)
            capture_notes.append(f"the default ranges were narrowed: {narrowed} (torch.export's guard); "
                                 f"declared instead: {narrowed.flags(low, high)}")
            guards, exporter_warnings, exporter_used = _capture_with_fallback(model, example, axes, low, high, settings, tmp,
                                                                capture_notes)
        proto = onnx.load(str(tmp))
        _name_output_axes(proto, model, axes)
        record = {
            **base_record(), **model.record(),
            "precision": "fp32", "opset": settings.opset, "exporter": exporter_used,
            "dynamic_axes": {n: {str(k): v for k, v in a.items()} for n, a in axes.items()},
            "min_shapes": format_shape_set(low), "opt_shapes": format_shape_set(opt),
            "max_shapes": format_shape_set(high),
            **weight_counts(model.module),
        }
        record.pop("checkpoint", None)  # a local path means nothing elsewhere; the hash identifies it
        set_onnx_metadata(proto, record)
        from xattn.onnxfile import check_onnx, topological_sort
        from xattn.ort_session import record_safe_level

        topological_sort(proto.graph)   # the same checks every other writer passes (xattn.onnxfile.save_onnx)
        check_onnx(proto, output.name)
        record_safe_level(proto, output.name)
        onnx.save(proto, str(tmp))
        _say_exporter_findings(say, guards, exporter_warnings)
        notes: list[str] = list(capture_notes)
        if settings.simplify:
            nodes_before = len(proto.graph.node)
            nodes_after = simplify_onnx(tmp)
            notes.append(f"simplified with onnxslim: {nodes_before} -> {nodes_after} nodes (verified below like the export)")
            say(notes[-1])
        if settings.verify_shapes:
            plan = [(shapes, "given") for shapes in settings.verify_shapes]
        else:
            plan = verification_plan(model, proto, low, high, example, guards, notes, budget)
        for note in notes:
            say(f"note: {note}")
        checks_at = [shapes for shapes, _ in plan]
        say(f"verifying against PyTorch at {len(checks_at)} shape sets ("
            + ", ".join(sorted({purpose.split(':')[0] for _, purpose in plan})) + ")")
        guard_sides = {i for i, (_, purpose) in enumerate(plan) if purpose.startswith("guard ")}
        checks = verify_onnx(model, tmp, checks_at, settings.rel_l2_tolerance, seed=settings.verify_seed,
                             may_refuse=guard_sides)
        for check, (_, purpose) in zip(checks, plan):
            check.purpose = purpose
        for check in [c for c in checks if c.refused]:
            # the model's own check raised (seed-cross-attention's H1*W1 == H2*W2): outside its domain
            notes.append(f"PyTorch refuses {check.shapes} ({check.purpose}): {check.refused}")
            say(f"note: {notes[-1]}")
        kept = [(shapes, check) for shapes, check in zip(checks_at, checks) if not check.refused]
        checks = [check for _, check in kept]
        failed = [c for c in checks if not c.passed]
        if failed:
            keep = output.with_name(output.stem + ".unverified.onnx")
            os.replace(tmp, keep)
            # a recorded guard whose false side failed explains the mismatch better than any guess
            broken = [g for g in guards if g.holds_in_range is False and any(c.shapes == g.false_at for c in failed)]
            raise VerificationError(_mismatch_message(failed, checks, broken, settings, keep),
                                    hint=_mismatch_hint(broken, settings, model))
        if exporter_used == "legacy":
            _name_legacy_output_axes(tmp, axes, [shapes for shapes, _ in kept], checks)
        # The report is written (to a temporary file) before the model is moved into place, so a full disk
        # fails the export as a whole: both files or neither, never a new model without its report.
        result = ExportResult(output, report_path_for(output), settings.opset, exporter_used, low, opt, high,
                              example, checks, settings.rel_l2_tolerance, time.perf_counter() - start, sha256_file(tmp),
                              guards, exporter_warnings, notes)
        report_tmp = result.report_path.with_name(f".{result.report_path.name}.{os.getpid()}.tmp")
        try:
            report_tmp.write_text(json.dumps({**result.as_dict(), "model": model.record()}, indent=2) + "\n")
        except OSError as exc:
            report_tmp.unlink(missing_ok=True)
            raise ArtifactError(f"cannot write the export report {result.report_path}: {exc.strerror or exc}; "
                                "nothing was written", hint="free some disk space") from exc
    os.replace(report_tmp, result.report_path)   # a rename needs no space
    return result


def verification_plan(model: LoadedModel, proto, low: ShapeSet, high: ShapeSet, example: ShapeSet,
                      guards: list[RecordedGuard], notes: list[str],
                      budget: tuple[int, str] | None = None) -> list[tuple[ShapeSet, str]]:
    """Shape sets to verify at, each with why: varied sizes unlike the example, the range corners (min, and
    max scaled into the memory budget), and both sides of every recorded guard. Every set is held to the
    verification memory budget (estimated before it runs, see :class:`MemoryNeeds`): a set over it is
    dropped and said in ``notes``; the max corner is first lowered to the largest set that fits."""
    budget = budget or verify_memory_budget()
    needs = MemoryNeeds(model, proto)
    plan = [(shapes, "varied sizes") for shapes in verification_shapes(model, low, high, example)]
    plan.append((dict(low), "min corner"))
    top, why = _max_corner(needs, low, high, budget, notes)
    if top is not None:
        plan.append((top, "max corner" + why))
    else:
        notes.append(f"max corner not verified: {why}")
    for guard in guards:
        if guard.holds_in_range is False and guard.true_shapes is not None:
            plan.append((guard.true_shapes, f"guard {guard.expression}: true side"))
            plan.append((guard.false_shapes, f"guard {guard.expression}: false side"))
    unique: list[tuple[ShapeSet, str]] = []
    for shapes, purpose in plan:
        if shapes == example or any(shapes == seen for seen, _ in unique):
            continue
        if not purpose.startswith("max corner"):
            refusal = needs.over_budget(shapes, budget, example)
            if refusal:
                notes.append(f"{purpose} {format_shape_set(shapes)} not verified: {refusal}")
                continue
        unique.append((shapes, purpose))
    return unique


class MemoryNeeds:
    """Estimated bytes one verification run (PyTorch, then ONNX Runtime on the plain graph) needs at a shape
    set: the larger of PyTorch's peak (:func:`exporter.peak_memory.estimate_peak_bytes`, fake tensors) and
    twice the attention scores ONNX Runtime materialises (from ONNX shape inference; PyTorch's SDPA may run
    a flash kernel that holds none, the exported graph still does). ``None`` when neither can be known."""

    def __init__(self, model: LoadedModel, proto=None):
        self.model, self.proto = model, proto
        self._blocks = None

    def __call__(self, shapes: ShapeSet) -> int | None:
        torch_peak = estimate_peak_bytes(self.model.module, shapes)
        scores = self._onnx_scores(shapes)
        if torch_peak is None:
            # scores, their softmax and one more live copy, as PyTorch eager holds them
            return None if scores is None else 3 * scores
        return max(torch_peak, 2 * (scores or 0))

    def _onnx_scores(self, shapes: ShapeSet) -> int | None:
        if self.proto is None:
            return None
        from exporter.attention import find_attention, naive_memory_at

        if self._blocks is None:
            self._blocks = find_attention(self.proto)
        try:
            return naive_memory_at(self.proto, self._blocks, shapes) if self._blocks else None
        except Exception:   # shape inference could not follow this graph
            return None

    def over_budget(self, shapes: ShapeSet, budget: tuple[int, str], example: ShapeSet) -> str | None:
        """Why a run at ``shapes`` may not fit ``budget`` (None when it fits). Fails closed: a set whose memory
        cannot be estimated passes only when it is no larger than 4x the traced example."""
        budget_bytes, source = budget
        needed = self(shapes)
        if needed is None:
            if _elements(shapes) > 4 * _elements(example):
                return ("its memory cannot be estimated (the model does not run on fake tensors, and ONNX shape "
                        "inference cannot follow it) and it is over 4x the traced example's size")
            return None
        if needed > budget_bytes:
            return (f"it needs about {format_size(needed)}, over the verification budget of "
                    f"{format_size(budget_bytes)} ({source}); raise it with --verify-memory")
        return None


def _elements(shapes: ShapeSet) -> int:
    return sum(int(np.prod(shape)) for shape in shapes.values())


def _max_corner(needs: MemoryNeeds, low: ShapeSet, high: ShapeSet, budget: tuple[int, str],
                notes: list[str]) -> tuple[ShapeSet | None, str]:
    """The max shapes, or the largest scaled-down version of them within ``budget`` (min batch first, then
    smaller spatial sizes); why it was changed. Adds a warning to ``notes`` when the max shapes need more
    memory than this machine has. Fails closed: when no estimate can be made, the max corner is skipped."""
    budget_bytes, source = budget
    needed = needs(high)
    if needed is None:
        return None, ("its memory at the max shapes cannot be estimated (the model does not run on fake tensors, "
                      "and ONNX shape inference cannot follow it); verify a large shape with --verify-shapes")
    memory = physical_memory()
    if memory and needed > memory:
        notes.append(f"warning: at the max shapes {format_shape_set(high)} a plain run needs about "
                     f"{format_size(needed)}, more than this machine's {format_size(memory)}: the plain ONNX form "
                     "cannot run there (the fused forms, 'xattn optimize' or TensorRT FP16, do not hold the "
                     "attention scores); or lower --max-shapes")
    if needed <= budget_bytes:
        return dict(high), ""
    fitted, fitted_needs = fit_in_budget(needs, high, low, budget_bytes)
    if fitted is None:
        return None, (f"even its smallest scaled-down form needs more than the verification budget of "
                      f"{format_size(budget_bytes)} ({source})")
    return fitted, (f" scaled into the verification budget of {format_size(budget_bytes)} ({source}; about "
                    f"{format_size(fitted_needs)} here, {format_size(needed)} at {format_shape_set(high)})")


def _say_exporter_findings(say, guards: list[RecordedGuard], exporter_warnings: list[str]) -> None:
    restricting = [g for g in guards if g.holds_in_range is False]
    if guards:
        # divisibility checks of reshape(-1) that hold everywhere are counted, not listed (the report has them)
        routine = [g for g in guards if g.holds_in_range is True and ("Mod(" in g.expression or "//" in g.expression)]
        say(f"the exporter recorded {len(guards)} shape guard(s) it cannot put in the ONNX; "
            f"{len(restricting)} restrict the declared ranges"
            + (f"; {len(routine)} divisibility check(s) that hold everywhere are in the report" if routine else "")
            + (":" if len(routine) < len(guards) else ""))
        for guard in guards:
            if guard in routine:
                continue
            state = {True: "holds everywhere in the ranges", False: f"FALSE at {guard.false_at}",
                     None: "not decidable from the input sizes"}[guard.holds_in_range]
            say(f"  {guard.expression}  ({state})")
    tracer = [w for w in exporter_warnings if w.startswith("TracerWarning")]
    if tracer:
        say(f"warning: the exporter warned {len(tracer)} time(s) that values were traced as constants "
            "(TracerWarning): sizes may be baked; they are in the report, and shown with --debug")
    for warning in exporter_warnings:
        logging.getLogger("xattn").debug("exporter warning: %s", warning)


def _mismatch_message(failed, checks, broken: list[RecordedGuard], settings, keep) -> str:
    worst = max(failed, key=lambda c: c.rel_l2)
    text = (f"exported ONNX does not match PyTorch at {worst.shapes}"
            + (f" ({worst.purpose})" if worst.purpose else "")
            + f": relative L2 error {worst.rel_l2:.3g} > {settings.rel_l2_tolerance:g} ({len(failed)} of "
            f"{len(checks)} shape sets failed)")
    if broken:
        text += ("; the export traced one side of " + ", ".join(f"'{g.expression}'" for g in broken)
                 + " (a branch or fixed size in the model's forward), which these sizes violate")
    return text + f"; the file is kept as {keep} for inspection"


def _mismatch_hint(broken: list[RecordedGuard], settings, model) -> str:
    if broken:
        guard = broken[0]
        if guard.expression.startswith("Eq("):
            return (f"the model needs {guard.expression} (a fixed-size parameter, such as a learned positional "
                    f"embedding?): fix that input's size with --min-shapes/--max-shapes, e.g. at {guard.true_at}")
        return (f"narrow --min-shapes/--max-shapes to one side of {guard.expression} (holds at {guard.true_at}), "
                "or write the branch with tensors (torch.where, torch.cond)")
    if settings.exporter == "legacy" and any(isinstance(m, torch.nn.MultiheadAttention) for m in model.module.modules()):
        return ("torch's nn.MultiheadAttention bakes sizes under the legacy (TorchScript) exporter: the default "
                "exporter handles it (drop --exporter legacy)")
    return ("a size baked into a Reshape is the usual cause (int() or .item() on a shape, Python ints in view()): "
            "keep sizes symbolic in the model's forward")


def weight_counts(module: torch.nn.Module) -> dict[str, Any]:
    """Learned weights and buffers (position tables, running statistics) counted apart: an ONNX file
    stores both as initializers, so only the module can tell them apart."""
    buffers = [(name, b) for name, b in module.named_buffers() if b.is_floating_point()]
    return {"weights": int(sum(p.numel() for p in module.parameters())),
            "buffers": int(sum(b.numel() for _, b in buffers)),
            "buffer_names": [name for name, _ in buffers][:20]}


class RangesNarrowed(Exception):
    """torch.export proved the model cannot run on part of the declared ranges (a kernel larger than the
    smallest map, say) and suggested narrower ones: ``ranges`` maps ``(input, axis)`` to ``(min, max)``."""

    def __init__(self, ranges: dict[tuple[str, int], tuple[int, int]], axes: dict[str, dict[int, str]]):
        super().__init__()
        self.ranges, self.axes = ranges, axes

    def __str__(self) -> str:
        seen, parts = set(), []
        for (name, axis), (a, b) in self.ranges.items():
            label = self.axes.get(name, {}).get(axis, f"{name}[{axis}]")
            if label not in seen:
                seen.add(label)
                parts.append(f"{label} {a}..{b}")
        return "torch.export needs " + ", ".join(parts)

    def apply(self, shapes: ShapeSet) -> ShapeSet:
        out = {}
        for name, shape in shapes.items():
            out[name] = tuple(min(max(v, self.ranges[(name, i)][0]), self.ranges[(name, i)][1])
                              if (name, i) in self.ranges else v for i, v in enumerate(shape))
        return out

    def flags(self, low: ShapeSet, high: ShapeSet) -> str:
        return f"--min-shapes {format_shape_set(self.apply(low))} --max-shapes {format_shape_set(self.apply(high))}"


def _capture_program(module, args, shapes_arg, axes, low, high, notes: list[str]):
    """torch.export the module the way torch.onnx.export would, keeping the program (its runtime asserts are
    the shape guards): non-strict, under ``backed_size_oblivious`` (sizes 0/1 stay symbolic), guards deferred;
    on a range violation, the narrower ranges torch suggests (raised as :class:`RangesNarrowed`); on any other
    failure, strict mode. Returns ``(program, None)``, or ``(None, first failure)`` when both failed: the caller
    then lets torch.onnx.export try its own strategies on the module (the guards cannot be read then), and
    reports the first failure, the most telling, if that fails too."""
    import torch.fx.experimental._config as fx_config

    attempts = []
    for strict in (False, True):
        try:
            with fx_config.patch(backed_size_oblivious=True):
                return torch.export.export(module, args, dynamic_shapes=shapes_arg, strict=strict,
                                           prefer_deferred_runtime_asserts_over_guards=True), None
        except torch._dynamo.exc.UserError as exc:
            narrowed = _suggested_ranges(exc, shapes_arg, axes, low, high)
            if narrowed is not None:
                raise narrowed from None
            attempts.append(exc)
            break   # a specialised size: strict mode specialises the same way
        except Exception as exc:   # noqa: BLE001 - every capture failure moves on to the next strategy
            _reraise_interruption(exc)
            attempts.append(exc)
    first = attempts[0]
    if isinstance(first, torch._dynamo.exc.UserError):
        raise first
    notes.append(f"torch.export could not capture the model ({type(first).__name__}: "
                 f"{' '.join(str(first).split())[:200]}); torch.onnx.export's own strategies were used, so its "
                 "shape guards could not be read")
    return None, first


def _reraise_interruption(exc: BaseException) -> None:
    """Ctrl-C (or SIGTERM) inside torch's lazy imports can arrive wrapped in torch's own error: it is an
    interruption, not an exporter failure."""
    cause = exc
    while cause is not None:
        if not isinstance(cause, Exception):
            raise cause from None
        cause = cause.__cause__ or cause.__context__


def _suggested_ranges(exc, shapes_arg, axes, low, high) -> RangesNarrowed | None:
    """The narrower ranges torch.export suggests for a constraint violation, when it suggests ranges (not a
    constant: that is a specialised size, a different fault)."""
    try:
        refined = torch.export.dynamic_shapes.refine_dynamic_shapes_from_suggested_fixes(exc.msg, shapes_arg)
    except Exception:   # noqa: BLE001 - no usable suggestion
        return None
    ranges = {}
    for name, spec in refined.items():
        for axis, dim in spec.items():
            lo, hi = getattr(dim, "min", None), getattr(dim, "max", None)
            if not isinstance(lo, int) or not isinstance(hi, int):
                return None   # specialised to a constant
            lo, hi = max(lo, low[name][axis]), min(hi, high[name][axis])
            if lo > hi:
                return None
            if (lo, hi) != (low[name][axis], high[name][axis]):
                ranges[(name, axis)] = (lo, hi)
    return RangesNarrowed(ranges, axes) if ranges else None


def _run_exporter(model: LoadedModel, example: ShapeSet, axes: dict[str, dict[int, str]],
                  low: ShapeSet, high: ShapeSet, settings: ExportSettings,
                  path: Path, notes: list[str] | None = None) -> tuple[list[RecordedGuard], list[str]]:
    """Export to ``path``; return the shape guards the exporter recorded and the warnings it gave."""
    notes = [] if notes is None else notes
    from xattn.data import random_feed

    feed = random_feed(example, seed=settings.verify_seed)
    args = tuple(torch.from_numpy(feed[name]) for name in model.io.inputs)
    input_names, output_names = list(model.io.inputs), list(model.io.outputs)
    chatter = io.StringIO()
    guards: list[RecordedGuard] = []
    try:
        # The exporters print progress and warnings of their own: progress is dropped (shown with
        # --debug), warnings are kept for the report (a TracerWarning says a size may be baked).
        with warnings.catch_warnings(record=True) as caught, contextlib.redirect_stdout(chatter), \
                contextlib.redirect_stderr(chatter), _native_output_to(chatter), _quiet_torch_logs():
            warnings.simplefilter("always")
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
                # torch.export first, as torch.onnx would run it (non-strict, guards deferred to runtime
                # asserts), so the asserts can be read before the ONNX translation drops them.
                program, capture_failure = _capture_program(model.module, args, shapes_arg, axes, low, high, notes)
                if program is not None:
                    guards = analyse_guards(recorded_asserts(program), symbols_of_inputs(program, input_names),
                                            axes, low, high, example)
                try:
                    onnx_program = torch.onnx.export(program if program is not None else model.module, args, None,
                                                     input_names=input_names, output_names=output_names,
                                                     opset_version=settings.opset, dynamo=True, optimize=True,
                                                     **({} if program is not None else {"dynamic_shapes": shapes_arg}))
                except Exception as exc:
                    _reraise_interruption(exc)
                    if capture_failure is None:
                        raise
                    raise capture_failure from exc
                onnx_program.save(str(path))
            else:
                legacy_axes: dict[str, dict[int, str]] = {n: dict(a) for n, a in axes.items()}
                with torch.no_grad():
                    ranks = [t.dim() for t in _as_tuple(model.module(*args))]
                for out, rank in zip(output_names, ranks):
                    # every axis but channels declared dynamic under a placeholder name; the real names
                    # come from measured output shapes after verification (_name_legacy_output_axes)
                    legacy_axes[out] = {axis: f"{out}_dim{axis}" for axis in range(rank) if axis != 1}
                torch.onnx.export(model.module, args, str(path), input_names=input_names, output_names=output_names,
                                  dynamic_axes=legacy_axes, opset_version=settings.opset, dynamo=False,
                                  do_constant_folding=True)
        exporter_warnings = _distinct_warnings(caught)
    except RangesNarrowed:
        raise
    except Exception as exc:
        _reraise_interruption(exc)
        from xattn.errors import no_space_cause

        full = no_space_cause(exc)
        if full is not None:   # the disk, not the exporter: xattn.fileio.atomic_path names the file and the reason
            raise full from None
        message = _exporter_message(exc)
        logging.getLogger("xattn").debug("exporter output:\n%s", chatter.getvalue())
        raise ExportError(f"the {settings.exporter} exporter failed on model {model.name!r}: "
                          f"{type(exc).__name__}: {message}", hint=_failure_hint(message, settings, example)) from exc
    logging.getLogger("xattn").debug("exporter output:\n%s", chatter.getvalue())
    return guards, exporter_warnings


@contextlib.contextmanager
def _native_output_to(sink: io.StringIO):
    """File descriptors 1 and 2 into ``sink`` while torch's exporters run: the TorchScript exporter prints its
    whole IR graph from C++ when it fails ("Torch IR graph at exception"), past Python's redirects."""
    import tempfile

    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    with tempfile.TemporaryFile() as spool:
        os.dup2(spool.fileno(), 1)
        os.dup2(spool.fileno(), 2)
        try:
            yield
        finally:
            for fd, original in zip((1, 2), saved):
                os.dup2(original, fd)
                os.close(original)
            spool.seek(0)
            sink.write(spool.read().decode("utf-8", errors="replace"))


def _exporter_message(exc: BaseException) -> str:
    """One readable line from an exporter's exception: torch.onnx's reports carry colour codes, next steps and
    links around the cause, which is the "Exception summary" when there is one."""
    import re

    text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc))
    if "## Exception summary" in text:
        text = text.split("## Exception summary", 1)[1]
    return " ".join(text.split())[:400]


#: words of a dynamo failure that is a finding about the model's sizes, not an exporter limitation
_SHAPE_DIAGNOSES = ("Constraints violated", "inconsistencies were found", "is inconsistent")


def _capture_with_fallback(model, example, axes, low, high, settings, path, notes):
    """:func:`_run_exporter`, and when the dynamo exporter fails, torch's other exporter (TorchScript):
    torch.onnx offers both, and a user's model that one cannot capture the other often can (SDPA with a float
    mask fails dynamo's decomposition on dynamic shapes in torch 2.13). The file is verified the same way."""
    from xattn.interrupts import deferred_interrupts

    try:
        with deferred_interrupts("torch's exporter"):
            return (*_run_exporter(model, example, axes, low, high, settings, path, notes), settings.exporter)
    except ExportError as dynamo_failure:
        from xattn.errors import no_space_cause

        if settings.exporter != "dynamo" or no_space_cause(dynamo_failure) is not None:
            raise   # a full disk is not the exporter's fault: atomic_path names it
        if any(sign in dynamo_failure.message for sign in _SHAPE_DIAGNOSES):
            raise   # torch proved the sizes cannot stay dynamic: TorchScript would bake them, verification fail
        import dataclasses

        try:
            with deferred_interrupts("torch's exporter"):
                found = _run_exporter(model, example, axes, low, high,
                                      dataclasses.replace(settings, exporter="legacy"), path, notes)
        except ExportError as legacy_failure:
            cause = legacy_failure.__cause__ or legacy_failure
            raise ExportError(dynamo_failure.message, hint=(
                f"torch's TorchScript exporter failed too ({type(cause).__name__}: {_exporter_message(cause)[:160]}); "
                "the op named above has no ONNX translation in this torch: rewrite that part of the model, or "
                "keep it out of the exported module")) from legacy_failure
        traced_blind = [w for w in found[1] if w.startswith("TracerWarning")]
        if traced_blind:
            # TorchScript traced one path through data-dependent code: the file could pass verification by luck
            raise ExportError(dynamo_failure.message, hint=(
                f"torch's TorchScript exporter traced it only with a warning that the trace may be wrong "
                f"({traced_blind[0][:200]}); no file is written: make that part of the model traceable")) from None
        cause = dynamo_failure.__cause__ or dynamo_failure
        notes.append(f"the dynamo exporter failed ({type(cause).__name__}: {_exporter_message(cause)[:240]}); "
                     "exported with the legacy (TorchScript) exporter instead: it records no shape guards, and the "
                     "file is verified at the corners of the ranges as always")
        return (*found, "legacy")


def _failure_hint(message: str, settings: ExportSettings, example: ShapeSet) -> str | None:
    if "Constraints violated" in message:
        # a dynamic size was specialised to the traced example's value
        return ("the model turns a dynamic size into a constant (int() or .item() on a shape, Python ints in "
                "view() or reshape()): keep sizes symbolic; or, if the size is truly fixed, declare it so with "
                f"equal --min-shapes and --max-shapes (the traced example was {format_shape_set(example)})")
    if "inconsistent" in message:
        # torch proved a size relation that the declared ranges contradict, e.g. Eq(s71*s74, 1024): a
        # parameter of fixed length (a learned positional embedding) meets a flattened map
        return ("the model fixes an input's size (torch's reason above: a fixed-size parameter such as a "
                "learned positional embedding?): declare that input's size fixed with equal --min-shapes and "
                f"--max-shapes (the traced example was {format_shape_set(example)})")
    return "try --exporter legacy" if settings.exporter == "dynamo" else None


def _as_tuple(value) -> tuple:
    if isinstance(value, torch.Tensor):
        return (value,)
    if isinstance(value, dict):
        return tuple(value.values())
    return tuple(value)


def _distinct_warnings(caught) -> list[str]:
    seen: list[str] = []
    for item in caught:
        if issubclass(item.category, (DeprecationWarning, FutureWarning)):
            continue   # about torch's own API, not about the model
        text = f"{item.category.__name__}: {' '.join(str(item.message).split())[:300]}"
        if text not in seen:
            seen.append(text)
    return seen[:MAX_WARNINGS]


def _name_legacy_output_axes(path: Path, axes: dict[str, dict[int, str]], shape_sets: list[ShapeSet],
                             checks: list[ShapeCheck]) -> None:
    """Name each output axis of a legacy export from the output shapes measured during verification: the
    input axis it equalled at every shape set, a fixed size if it never changed, else its own name
    (LoFTR's outputs lie at 1/4 of x1's or x2's grid: no input axis name fits them)."""
    import onnx

    proto = onnx.load(str(path))
    for graph_output in proto.graph.output:
        observed = [c.output_shapes.get(graph_output.name) for c in checks]
        if not observed or any(o is None for o in observed):
            continue
        for axis, dim in enumerate(graph_output.type.tensor_type.shape.dim):
            values = [shape[axis] for shape in observed]
            match = next((axes[name][a] for name in axes for a in axes[name]
                          if all(sets[name][a] == v for sets, v in zip(shape_sets, values))), None)
            if match:
                dim.Clear()
                dim.dim_param = match
            elif len(set(values)) == 1 and len(values) > 1:
                dim.Clear()
                dim.dim_value = values[0]
    from xattn.onnxfile import check_onnx

    check_onnx(proto, path.name)
    onnx.save(proto, str(path))


def _name_output_axes(proto, model: LoadedModel, axes: dict[str, dict[int, str]]) -> None:
    """Give output axes the input axis names they equal (the exporters sometimes invent their own)."""
    by_param: dict[str, str] = {}
    for graph_input in proto.graph.input:
        for axis, dim in enumerate(graph_input.type.tensor_type.shape.dim):
            wanted = axes.get(graph_input.name, {}).get(axis)
            if wanted and dim.dim_param and dim.dim_param != wanted:
                by_param[dim.dim_param] = wanted
                dim.dim_param = wanted
    if not by_param:
        return
    # output axes are expressions of the input symbols ('(s71//4)'): written with the axis names instead
    symbol = re.compile("|".join(rf"\b{re.escape(name)}\b" for name in sorted(by_param, key=len, reverse=True)))
    for info in list(proto.graph.output) + list(proto.graph.value_info):
        for dim in info.type.tensor_type.shape.dim:
            if dim.dim_param:
                dim.dim_param = symbol.sub(lambda match: by_param[match.group(0)], dim.dim_param)


def verify_onnx(model: LoadedModel, path: str | os.PathLike, shape_sets: list[ShapeSet], tolerance: float,
                *, seed: int = 0, may_refuse: set[int] | frozenset[int] = frozenset()) -> list[ShapeCheck]:
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
    with OnnxRuntimeRunner(path, ["CPUExecutionProvider"], memory_arena=False) as candidate, TorchRunner(model) as reference:
        for index, shape_set in enumerate(shape_sets):
            feed = random_feed(shape_set, seed=seed + index + 1)
            try:
                expected = reference.infer(feed)
            except Exception as exc:
                if index not in may_refuse:
                    raise
                checks.append(ShapeCheck(format_shape_set(shape_set), 0.0, 0.0, True,
                                         refused=" ".join(str(exc).split())[:200]))
                continue
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
                                     bool(np.isfinite(worst_rel) and worst_rel <= tolerance),
                                     output_shapes={n: list(a.shape) for n, a in got.items()}))
    return checks


def simplify_onnx(path: Path) -> int:
    """Simplify in place with onnxslim (keeps metadata_props); return the node count after."""
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
    return len(slim.graph.node)


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
