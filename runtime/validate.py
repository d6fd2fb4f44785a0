"""Validation: run a candidate and the PyTorch reference on identical inputs and judge the difference.

``validate(candidate, reference, shape_sets, ...)`` returns a :class:`ValidationResult` with, per
output and per shape set, the figures of :mod:`runtime.metrics` and a verdict from
:mod:`runtime.tolerances`. Several samples of one shape set are pooled: the figures describe all of
them together (relative L2 over the whole stack), which is what a user's data would see.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Mapping, Sequence

import numpy as np

from runtime.base import InputError, Runner, check_shapes
from xattn.data import feeds_digest, random_feed
from runtime.metrics import ErrorMetrics, compare
from runtime.tolerances import Tolerances, judge, tolerances_for
from xattn.errors import ArtifactError, BadInputError, CheckpointError
from xattn.fileio import sha256_file
from xattn.shapes import ShapeSet, format_shape_set, parse_shape_set

if TYPE_CHECKING:   # running and benchmarking artifacts never imports torch; only the PyTorch reference does
    from xattn.registry import LoadedModel

Feed = dict[str, np.ndarray]


@dataclass
class Case:
    """One output at one shape set."""

    shapes: str
    output: str
    samples: int
    metrics: ErrorMetrics
    reasons: list[str]

    @property
    def passed(self) -> bool:
        return not self.reasons

    def as_dict(self) -> dict:
        return {"shapes": self.shapes, "output": self.output, "samples": self.samples, "passed": self.passed,
                "reasons": self.reasons, **self.metrics.as_dict()}


@dataclass
class ValidationResult:
    """The verdict on one artifact."""

    artifact: str
    candidate: dict
    reference: dict
    precision: str
    tolerances: Tolerances
    seed: int
    data: str
    cases: list[Case] = field(default_factory=list)
    synthetic: bool = True
    sha256: str | None = None
    regressions: list[str] = field(default_factory=list)
    #: what a reader must know to interpret the figures (where they were measured, and what that means)
    notes: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return bool(self.cases) and all(c.passed for c in self.cases) and not self.regressions

    def __bool__(self) -> bool:
        return self.passed

    def worst(self) -> Case | None:
        return max(self.cases, key=lambda c: (not c.passed, _finite(c.metrics.rel_l2)), default=None)

    def as_dict(self) -> dict:
        return {"artifact": self.artifact, "sha256": self.sha256, "passed": self.passed, "precision": self.precision,
                "tolerances": self.tolerances.as_dict(), "seed": self.seed, "data": self.data,
                "synthetic_data": self.synthetic, "candidate": self.candidate, "reference": self.reference,
                "cases": [c.as_dict() for c in self.cases], "regressions": self.regressions, "notes": self.notes}


def _finite(value: float) -> float:
    return value if np.isfinite(value) else 1e300


def validate(candidate: Runner, reference: Runner, shape_sets: Sequence[ShapeSet] = (), *, samples: int = 1,
             seed: int = 0, data: Iterable[Feed] | None = None, data_label: str | None = None,
             precision: str = "fp32", tolerances: Tolerances | None = None,
             reference_cache: dict | None = None, artifact: str | None = None) -> ValidationResult:
    """Compare ``candidate`` with ``reference`` and judge every output at every shape set.

    Args:
        candidate, reference: runners (activated here if they are not already).
        shape_sets: shape sets for random standard-normal inputs (ignored when ``data`` is given).
        samples: random samples per shape set (default 1).
        seed: seed of the random inputs; sample ``i`` of shape set ``j`` uses its own derived seed.
        data: real inputs instead: an iterable of feed dicts, grouped by their shapes.
        data_label: how to name ``data`` in reports (a path, "shipped photos"...).
        precision: ``fp32``/``fp16``/``int8``: selects the default tolerances.
        tolerances: explicit tolerances (default: :func:`~runtime.tolerances.tolerances_for`).
        reference_cache: a dict reused across calls so the reference runs once per distinct input.
    """
    if samples < 1:
        raise BadInputError(f"samples must be at least 1, got {samples}")
    tol = tolerances or tolerances_for(precision)
    groups: dict[str, list[Feed]] = {}
    if data is not None:
        for feed in data:
            groups.setdefault(format_shape_set({k: v.shape for k, v in feed.items()}), []).append(feed)
        if not groups:
            raise BadInputError("the validation data holds no samples")
        label, synthetic = data_label or "given data", False
    else:
        if not shape_sets:
            raise BadInputError("no shape sets to validate at", hint="give --shapes, e.g. x1:1x3x64x64,x2:1x3x32x32")
        label, synthetic = f"random normal, seed {seed}", True
    cache = reference_cache if reference_cache is not None else {}
    cases: list[Case] = []
    with contextlib.ExitStack() as active:
        active.enter_context(_active(candidate))
        # Every shape is checked against what the candidate accepts before any array is drawn and before
        # the (possibly slow, memory-hungry) reference runs: a refusal costs nothing.
        meta = candidate.input_metadata
        for shape_set in ([{k: v.shape for k, v in feeds[0].items()} for feeds in groups.values()] if data is not None
                          else shape_sets):
            check_shapes(shape_set, meta)
        if data is None:
            for shape_set in shape_sets:
                key = format_shape_set(shape_set)
                # Inputs depend on (seed, shape set, sample) only, never on list position, so an artifact
                # listing a shape set elsewhere sees the same inputs (and the cached reference outputs).
                groups[key] = [random_feed(shape_set, seed=zlib.crc32(f"{seed}|{key}|{i}".encode()))
                               for i in range(samples)]
        active.enter_context(_active(reference))
        for key, feeds in groups.items():
            got: dict[str, list[np.ndarray]] = {}
            want: dict[str, list[np.ndarray]] = {}
            crashed: str | None = None
            for feed in feeds:
                # Keyed by the inputs themselves: a reference runs once per distinct input, whatever
                # artifact, shape list or data source asked for it.
                ref_key = (id(reference), feeds_digest([feed]))
                expected = cache.get(ref_key)
                if expected is None:
                    expected = cache[ref_key] = reference.infer(feed)
                try:
                    outputs = candidate.infer(feed)
                except InputError:
                    raise  # the inputs are wrong for this artifact: bad usage, not a failed check
                except ArtifactError as exc:
                    # Inputs within the artifact's declared ranges that it cannot run (a size baked
                    # into a Reshape, typically): that is the artifact failing, so a failed case.
                    crashed = exc.message
                    break
                for name, value in expected.items():
                    want.setdefault(name, []).append(value)
                    if name not in outputs:
                        raise ArtifactError(f"{candidate.name} has no output {name!r}; it has "
                                            f"{', '.join(map(repr, outputs))}")
                    got.setdefault(name, []).append(outputs[name])
            if crashed is not None:
                for name in reference.output_names:
                    metrics = compare(np.full(1, np.nan), np.zeros(1))
                    cases.append(Case(key, name, len(feeds), metrics, [f"candidate failed to run: {crashed}"]))
                continue
            for name in want:
                metrics = _pooled_compare(got[name], want[name], tol)
                cases.append(Case(key, name, len(feeds), metrics, judge(metrics, tol)))
    described = candidate.describe()
    path = described.get("artifact")
    return ValidationResult(artifact=artifact or candidate.name, candidate=described, reference=reference.describe(),
                            precision=precision, tolerances=tol, seed=seed, data=label, cases=cases,
                            synthetic=synthetic, sha256=sha256_file(path) if path and Path(path).is_file() else None)


def _pooled_compare(candidates: list[np.ndarray], references: list[np.ndarray], tol: Tolerances) -> ErrorMetrics:
    if any(c.shape != r.shape for c, r in zip(candidates, references)):
        bad = next(i for i, (c, r) in enumerate(zip(candidates, references)) if c.shape != r.shape)
        return compare(candidates[bad], references[bad], atol=tol.atol, rtol=tol.rtol)
    c = np.stack(candidates) if len(candidates) > 1 else candidates[0]
    r = np.stack(references) if len(references) > 1 else references[0]
    return compare(c, r, atol=tol.atol, rtol=tol.rtol)


class _active:
    """Activate a runner for the block unless the caller already did (then leave it active)."""

    def __init__(self, runner: Runner):
        self.runner, self.owned = runner, not runner.is_active

    def __enter__(self):
        if self.owned:
            self.runner.activate()
        return self.runner

    def __exit__(self, *exc):
        if self.owned:
            self.runner.deactivate()


# -- finding the reference and the shapes an artifact was made for -----------------------------------

def artifact_record(path: str | os.PathLike) -> dict[str, Any]:
    """The provenance an artifact carries: ONNX ``metadata_props`` or an engine's JSON sidecar."""
    from runtime.open import artifact_kind

    kind = artifact_kind(path)
    if kind == "onnx":
        from xattn.onnxfile import load_onnx
        from xattn.provenance import get_onnx_metadata

        return get_onnx_metadata(load_onnx(path))
    if kind == "engine":
        from xattn.trt_plan import read_sidecar

        data = read_sidecar(path) or {}
        return dict(data.get("source") or {}) | {"precision": data.get("precision", "fp32")}
    return {}


def resolve_reference(record: Mapping[str, Any], reference: str | None = None, checkpoint: str | None = None,
                      model_args: Mapping[str, Any] | None = None, artifact: str = "the artifact") -> LoadedModel:
    """The PyTorch model to compare with.

    An explicit ``reference`` wins. Otherwise the model recorded in the artifact is rebuilt: from its
    init seed, or from ``checkpoint``, whose sha256 must equal the recorded one. A recorded user factory
    (``pkg.mod:factory``) is rebuilt only when ``reference`` names that same factory: an artifact never
    chooses code to import by itself (see :func:`xattn.registry.load_model_from_record`).
    """
    registry = import_registry()
    load_model, load_model_from_record = registry.load_model, registry.load_model_from_record
    if reference and reference != record.get("model"):
        return load_model(reference, checkpoint, model_args)
    if not record.get("model"):
        raise BadInputError(f"{artifact} does not record which model it was made from",
                            hint="pass --reference MODEL (and --checkpoint) explicitly")
    if reference and model_args:
        # The user named the recorded model and also gave arguments: theirs win over the file's.
        return load_model(reference, checkpoint, model_args)
    recorded = record.get("checkpoint_sha256")
    if recorded:
        if not checkpoint:
            raise CheckpointError(f"{artifact} was exported from a checkpoint (sha256 {str(recorded)[:12]}...)",
                                  hint="pass the same file with --checkpoint")
        actual = sha256_file(checkpoint) if Path(checkpoint).is_file() else None
        if actual is not None and actual != recorded:
            raise CheckpointError(f"checkpoint {checkpoint} (sha256 {actual[:12]}...) is not the one {artifact} was "
                                  f"exported from (sha256 {str(recorded)[:12]}...)",
                                  hint="pass the original checkpoint, or re-export from this one")
    elif checkpoint:
        raise CheckpointError(f"{artifact} was exported from seeded weights, not a checkpoint; "
                              f"{checkpoint} would not be its reference",
                              hint="drop --checkpoint, or pass --reference explicitly")
    return load_model_from_record(record, checkpoint if recorded else None, user_factory=reference, where=artifact)


#: Seed of the crops validation draws from real data: calibration draws with 0, so these are held out.
HELD_OUT_SEED = 1000


def import_registry():
    """``xattn.registry`` (which needs torch), or one line saying what is missing."""
    try:
        import xattn.registry as registry
    except ImportError as exc:
        from xattn.errors import MissingDependencyError

        raise MissingDependencyError(f"the PyTorch reference needs torch, which cannot be imported here ({exc})",
                                     hint="pip install torch (CPU: torch==2.13.0); running and benchmarking "
                                          "artifacts work without it (xattn bench --no-torch)") from exc
    return registry


def runtime_precision(providers) -> str | None:
    """The precision a runtime computes an FP32 file in when asked to (OpenVINO's bf16/f16), else None."""
    from runtime.openvino_runner import PROVIDERS

    asked = [PROVIDERS.get(str(p).lower()) for p in providers or ()]
    return {"bf16": "bf16", "f16": "fp16"}.get(asked[0]) if asked else None


def calibration_overlap(calibrated_on: str, validated_on: str) -> str:
    """Whether validation data is the data an INT8 file was calibrated on, from the two labels."""
    import re

    def source(label: str) -> tuple[str, str | None]:
        match = re.match(r"^(.*), seed (\d+)$", label)
        return (match.group(1), match.group(2)) if match else (label, None)

    (cal_source, cal_seed), (val_source, val_seed) = source(calibrated_on), source(validated_on)
    if calibrated_on == validated_on:
        return f"validation data OVERLAPS calibration: both are {calibrated_on} (not held out)"
    if cal_source == val_source:
        return (f"validation data is held out from calibration by crops: same source ({cal_source}), seed "
                f"{val_seed} vs {cal_seed}; the photos themselves are shared")
    return f"validation data ({validated_on}) is not the calibration data ({calibrated_on})"


#: image pairs validated on when --data is given without --samples
DATA_SAMPLES = 16


def validation_data_settings(options: "ValidateOptions"):
    """How to draw real inputs: ``--samples`` pairs (default :data:`DATA_SAMPLES`), crops seeded with
    ``--seed`` (default :data:`HELD_OUT_SEED`), rendered at every ``--shapes`` set's sizes and batch (default:
    the data source's own sizes, fitted to the recorded ranges)."""
    import dataclasses as _dc

    from xattn.data import DataSettings

    settings = options.data_settings or DataSettings(samples=options.samples or DATA_SAMPLES,
                                                     seed=HELD_OUT_SEED if options.seed is None else options.seed)
    if options.shapes:
        batches = {shape[0] for shapes in options.shapes for shape in shapes.values()}
        if len(batches) > 1:
            raise BadInputError(f"with --data, every --shapes set needs the same batch, got {sorted(batches)}",
                                hint="validate each batch size in its own run")
        settings = _dc.replace(settings, sizes=[{name: tuple(shape[2:4]) for name, shape in shapes.items()}
                                                for shapes in options.shapes], batch_size=batches.pop())
    return settings


def default_shape_sets(model: LoadedModel, record: Mapping[str, Any]) -> list[ShapeSet]:
    """Shape sets to validate at when none are given: the profile's opt shapes plus three asymmetric sets."""
    from xattn.registry import resolve_profile, verification_shapes

    recorded = [parse_shape_set(record[key]) if record.get(key) else None
                for key in ("min_shapes", "opt_shapes", "max_shapes")]
    low, opt, high = resolve_profile(model, *recorded)
    return [opt] + verification_shapes(model, low, high, opt)


@dataclass
class ValidateOptions:
    """Everything :func:`validate_artifact` needs besides the artifact. ``None`` means the default.

    Attributes:
        reference: model name or ``pkg.mod:factory`` (default: the model the artifact records).
        checkpoint: the reference's checkpoint (must match the artifact's recorded sha256).
        model_args: the reference's constructor arguments (with an explicit ``reference``).
        shapes: shape sets of random inputs (default: the artifact's opt shapes + three asymmetric sets).
        samples: random samples per shape set (default 1), or image pairs drawn from ``data`` (default 16).
        seed: seed of the random inputs (default 0), or of the crops drawn from ``data`` (default
            :data:`HELD_OUT_SEED`: other crops than calibration, which draws with seed 0).
        data: real inputs, any source of :mod:`xattn.data` (replaces random inputs).
        precision: ``fp32``/``fp16``/``int8`` (default: what the artifact records, else fp32).
        tolerance_overrides: ``max_rel_l2``, ``min_cosine``, ``atol``, ``rtol``, ``max_outlier_fraction``.
        providers: ONNX Runtime providers (default: best available).
        threads: ONNX Runtime intra-op threads.
        data_settings: a :class:`xattn.data.DataSettings` for ``data`` (samples, sizes, seed).
        reference_dtype: ``"fp32"`` (default) or ``"fp16-fused"``: compare with an emulation of an FP16
            network whose attention runs in TensorRT's fused kernel (see :class:`runtime.torch_runner.TorchRunner`).
    """

    reference: str | None = None
    checkpoint: str | None = None
    model_args: dict[str, Any] | None = None
    shapes: list[ShapeSet] | None = None
    samples: int | None = None
    seed: int | None = None
    data: str | None = None
    precision: str | None = None
    tolerance_overrides: dict[str, float] = field(default_factory=dict)
    providers: list[str] | None = None
    threads: int | None = None
    data_settings: Any = None
    reference_dtype: str = "fp32"


def validate_artifact(path: str | os.PathLike, options: ValidateOptions | None = None, *, name: str | None = None,
                      reference_runners: dict | None = None, reference_cache: dict | None = None) -> ValidationResult:
    """Validate the artifact at ``path`` against its reference (see :class:`ValidateOptions`): the PyTorch
    model it records (or ``options.reference``), or another artifact named by ``options.reference``.

    ``reference_runners``/``reference_cache`` may be shared across calls (the gate does) so one
    reference is built once and run once per input set.
    """
    from runtime.open import open_runner

    options = options or ValidateOptions()
    record = artifact_record(path)
    runners = reference_runners if reference_runners is not None else {}
    if is_artifact_path(options.reference):
        reference, names, default_shapes = _artifact_reference(path, record, options, runners)
    else:
        model = resolve_reference(record, options.reference, options.checkpoint, options.model_args,
                                  artifact=str(path))
        from runtime.torch_runner import TorchRunner   # after resolve_reference: a missing torch is one line
        key = json.dumps([model.record(), options.reference_dtype], sort_keys=True, default=str)
        reference = runners.get(key)
        if reference is None:
            reference = runners[key] = TorchRunner(model, dtype=options.reference_dtype)
        names = list(model.io.inputs)
        default_shapes = lambda: default_shape_sets(model, record)   # noqa: E731
    precision = options.precision or record.get("precision") or "fp32"
    computed_in = runtime_precision(options.providers)
    if computed_in and not options.precision and precision == "fp32":
        precision = computed_in   # the file is FP32, the runtime computes it lower: judged as computed
    tolerances = tolerances_for(precision, **options.tolerance_overrides)
    data = data_label = None
    calibrated_on = ((record.get("quantization") or {}).get("data") or "") if precision == "int8" else ""
    if not options.data and not options.shapes and calibrated_on.startswith("shipped photos"):
        # an INT8 file is made for the data it was calibrated on: judge it on held-out data of that source
        options = dataclasses.replace(options, data="shipped")
    if options.data:
        from xattn.data import load_data

        data, data_label = load_data(options.data, names, model_record=record,
                                     settings=validation_data_settings(options))
    shapes = options.shapes or ([] if data else default_shapes())
    candidate = open_runner(path, providers=options.providers, threads=options.threads, name=name, memory_arena=False)
    result = validate(candidate, reference, shapes, samples=options.samples or 1, seed=options.seed or 0, data=data,
                      data_label=data_label, precision=precision, tolerances=tolerances,
                      reference_cache=reference_cache, artifact=name or Path(path).name)
    if record.get("target") == "tensorrt" and precision in ("fp16", "int8") and candidate.backend == "onnxruntime":
        result.notes.append("a TensorRT-targeted file run on ONNX Runtime's CPU, which computes FP16 MatMul and Softmax "
                            "in FP32 and rounds only stored FP16 tensors, as TensorRT's fused attention kernel does; "
                            "an unfused TensorRT FP16 build may differ: validate the engine on the device")
    if computed_in and precision == computed_in:
        result.notes.append(f"judged at {precision} bounds: the runtime computes this file in {precision} "
                            "(runtime/tolerances.py says why these bounds)")
    if calibrated_on and data_label:
        result.notes.append(calibration_overlap(calibrated_on, data_label))
        from xattn.data import input_statistics, statistics_mismatch

        unlike = statistics_mismatch((record.get("quantization") or {}).get("inputs"), input_statistics(data))
        if unlike:
            result.notes.append("WARNING: validation data unlike the calibration data (" + "; ".join(unlike)
                                + "): INT8 ranges fit what they were calibrated on; judge on data of that kind")
    if calibrated_on and not options.data:
        result.notes.append(f"INT8 judged on random inputs, but it was calibrated on {calibrated_on}: pass --data with "
                            "held-out data of that kind for a meaningful figure")
    if is_artifact_path(options.reference):
        result.notes.append(f"reference: the artifact {options.reference} "
                            f"({artifact_record(options.reference).get('precision', 'fp32')}, {reference.backend}), "
                            "not PyTorch")
    elif options.reference_dtype == "fp16-fused":
        result.notes.append("reference: PyTorch emulating FP16 layers with FP32 attention (TensorRT's fused kernel)")
    return result


# -- one artifact against another -----------------------------------------------------------------------

def is_artifact_path(reference: str | None) -> bool:
    """Whether ``--reference`` names an artifact file (ONNX, engine) rather than a PyTorch model."""
    if not reference:
        return False
    from runtime.open import artifact_kind

    try:
        return artifact_kind(reference) in ("onnx", "engine")
    except ArtifactError:
        return False


def record_shape_sets(record: Mapping[str, Any], where: str) -> list[ShapeSet]:
    """The recorded opt shapes plus three varied sets within the recorded ranges (no torch needed)."""
    from xattn.shapes import varied_shape_sets

    if not all(record.get(k) for k in ("min_shapes", "opt_shapes", "max_shapes")) or not record.get("inputs"):
        raise BadInputError(f"{where} records no dynamic ranges to choose shapes from",
                            hint="give --shapes (repeatable) or --data")
    low, opt, high = (parse_shape_set(record[k]) for k in ("min_shapes", "opt_shapes", "max_shapes"))
    # files exported before equal_positions was recorded: only the seed snippet needs it
    equal = record.get("equal_positions", record.get("model") == "seed-cross-attention")
    return [opt] + varied_shape_sets(dict(record["inputs"]), bool(equal), low, high, opt)


def _artifact_reference(path, record: Mapping[str, Any], options: ValidateOptions, runners: dict):
    """Another artifact as the reference, as Polygraphy's ``run --onnxrt --trt`` compares two backends: same
    inputs, every output compared, no PyTorch. Returns (runner, input names, default shape sets)."""
    from runtime.open import open_runner

    if Path(path).resolve() == Path(options.reference).resolve():
        raise BadInputError(f"--reference {options.reference} is the artifact itself", hint="name another file")
    reference_record = artifact_record(options.reference)
    key = json.dumps(["artifact", str(Path(options.reference).resolve())])
    reference = runners.get(key)
    if reference is None:
        reference = runners[key] = open_runner(options.reference, providers=options.providers, threads=options.threads,
                                               name=Path(options.reference).name, memory_arena=False)
    names = record.get("inputs") or reference_record.get("inputs")
    if not names:   # neither file records its inputs (not written by this toolkit): ask the reference itself
        with _active(reference):
            names = list(reference.input_metadata)
    return reference, list(names), lambda: record_shape_sets(record or reference_record, str(path))
