"""TensorRT build decisions in plain Python: versions, precision plans, profiles, sidecars, compatibility, trtexec.

Nothing here imports TensorRT, so every decision is tested on a CPU. The few calls into TensorRT live
in :mod:`exporter.trt_build` and :mod:`runtime.tensorrt_runner` and only execute what a
:class:`BuildPlan` says.

Precision (see ../shared/notes/tensorrt-facts.md):

* TensorRT 11.x is strongly typed only: precision comes from the ONNX graph. ``fp16`` means building
  the FP16 ONNX (``xattn convert --fp16``), ``int8`` the Q/DQ ONNX (``xattn quantize``); no precision
  flags, no calibrators.
* TensorRT 10.x builds the same explicit way by default (strongly typed). For JetPack 6 users it also
  keeps the legacy path: an fp32 ONNX with ``--precision fp16`` uses ``BuilderFlag.FP16``, and with
  ``--precision int8`` implicit INT8 (``BuilderFlag.INT8`` + FP16 fallback) with a calibrator that reads
  TensorRT's calibration cache (or creates it from calibration data and writes it).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from packaging.version import InvalidVersion, Version

from xattn.errors import BadInputError, ShapeError
from xattn.fileio import write_text_atomic
from xattn.shapes import ShapeSet, check_profile, format_shape_set, parse_shape_set

SIDECAR_FORMAT = "xattn-engine/1"
PRECISIONS = ("fp32", "fp16", "int8", "fp8")
#: FP8 Q/DQ builds on compute capability 8.9+ (Ada, Hopper, Blackwell); Jetson AGX Orin is 8.7
FP8_MIN_COMPUTE = (8, 9)
HARDWARE_LEVELS = {"none": "NONE", "ampere+": "AMPERE_PLUS", "same-cc": "SAME_COMPUTE_CAPABILITY"}
TRTEXEC_HARDWARE_LEVELS = {"none": "none", "ampere+": "ampere+", "same-cc": "sameComputeCapability"}
DEFAULT_WORKSPACE = 4 << 30
#: What the README calls "the device": JetPack 6 on Jetson Orin.
DEVICE_TRT_VERSION = "10.3.0"


class PlanError(BadInputError):
    """The requested build cannot be done with this TensorRT version / ONNX / options."""


class EngineMismatchError(BadInputError):
    """An engine was built for another TensorRT version or GPU."""


def parse_trt_version(text: str) -> Version:
    try:
        version = Version(str(text))
    except InvalidVersion as exc:
        raise BadInputError(f"bad TensorRT version {text!r}", hint="write it like 10.3.0") from exc
    if version.major not in (10, 11):
        raise PlanError(f"TensorRT {version} is not supported", hint="xattn-deploy builds with TensorRT 10.x or 11.x")
    return version


# -- profiles ----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Profile:
    """One optimization profile: min/opt/max shapes per input."""

    min: ShapeSet
    opt: ShapeSet
    max: ShapeSet

    def as_dict(self) -> dict[str, str]:
        return {"min": format_shape_set(self.min), "opt": format_shape_set(self.opt), "max": format_shape_set(self.max)}

    @classmethod
    def from_dict(cls, data: Mapping[str, str]) -> "Profile":
        return cls(parse_shape_set(data["min"]), parse_shape_set(data["opt"]), parse_shape_set(data["max"]))

    def contains(self, shapes: Mapping[str, Sequence[int]]) -> bool:
        return all(name in self.min and len(shape) == len(self.min[name])
                   and all(a <= s <= b for a, s, b in zip(self.min[name], shape, self.max[name]))
                   for name, shape in shapes.items())


def derive_profiles(record: Mapping[str, Any], mins: Sequence[ShapeSet] = (), opts: Sequence[ShapeSet] = (),
                    maxs: Sequence[ShapeSet] = ()) -> list[Profile]:
    """Profiles from the ranges recorded at export, or from ``--min/--opt/--max-shapes`` (one set per profile).

    Given shapes complete the recorded ones per input (an input not named keeps its recorded range);
    several ``--min-shapes`` make several profiles, each needing its own ``--max-shapes`` (and
    ``--opt-shapes``, defaulting to the recorded opt clamped into the range).
    """
    recorded = None
    if all(record.get(k) for k in ("min_shapes", "opt_shapes", "max_shapes")):
        recorded = Profile(*(parse_shape_set(record[k]) for k in ("min_shapes", "opt_shapes", "max_shapes")))
    count = max(len(mins), len(opts), len(maxs))
    if count == 0:
        if recorded is None:
            raise ShapeError("the ONNX records no dynamic ranges (it was not exported by xattn)",
                             hint="give --min-shapes, --opt-shapes and --max-shapes")
        return [recorded]
    # Each option is given once per profile, or (min/max only, with a record) not at all.
    for label, given, optional in (("--min-shapes", mins, recorded is not None),
                                   ("--max-shapes", maxs, recorded is not None), ("--opt-shapes", opts, True)):
        if len(given) != count and not (optional and not given):
            raise ShapeError(f"{count} profiles need {count} {label}, got {len(given)}")
    profiles = []
    for index in range(count):
        low = {**(recorded.min if recorded else {}), **(mins[index] if mins else {})}
        high = {**(recorded.max if recorded else {}), **(maxs[index] if maxs else {})}
        given_opt = opts[index] if opts else {}
        if set(low) != set(high):
            raise ShapeError(f"profile {index + 1}: min shapes name {sorted(low)}, max shapes {sorted(high)}")
        # A given opt is taken as it is (check_profile judges it); a recorded one is clamped into the range.
        opt = {name: tuple(given_opt[name]) if name in given_opt else
               tuple(min(max(o, a), b) for o, a, b in zip((recorded.opt if recorded else {}).get(name, low[name]),
                                                          low[name], high[name]))
               for name in low}
        check_profile(low, opt, high)
        if recorded:
            for name, shape in low.items():
                if name not in recorded.min:
                    raise ShapeError(f"profile {index + 1} names unknown input {name!r}; the ONNX has "
                                     f"{', '.join(recorded.min)}")
                fixed = [axis for axis, (a, b) in enumerate(zip(recorded.min[name], recorded.max[name])) if a == b]
                for axis in fixed:
                    if not low[name][axis] == high[name][axis] == recorded.min[name][axis]:
                        raise ShapeError(f"profile {index + 1}: input {name!r} axis {axis} is fixed at "
                                         f"{recorded.min[name][axis]} in the ONNX")
        profiles.append(Profile(low, opt, high))
    return profiles


def profiles_beyond_export(record: Mapping[str, Any], profiles: Sequence[Profile]) -> list[str]:
    """Warnings for profile sizes outside the ranges recorded at export: the ONNX was verified against
    PyTorch only inside them (shape guards, baked sizes and memory were checked for those ranges)."""
    if not (record.get("min_shapes") and record.get("max_shapes")):
        return []
    low, high = parse_shape_set(record["min_shapes"]), parse_shape_set(record["max_shapes"])
    labels = {0: "batch", 2: "height", 3: "width"}
    found = []
    for index, profile in enumerate(profiles):
        for name in profile.min:
            if name not in low:
                continue
            for axis, (a, b) in enumerate(zip(profile.min[name], profile.max[name])):
                lo, hi = low[name][axis], high[name][axis]
                if a < lo or b > hi:
                    found.append(f"profile {index + 1}: {name} {labels.get(axis, f'axis {axis}')} {a}..{b} goes beyond "
                                 f"the exported range {lo}..{hi}, where the ONNX was never verified against PyTorch "
                                 "(re-export with a wider --max-shapes/--min-shapes)")
    return found


def select_profile(profiles: Sequence[Profile], shapes: Mapping[str, Sequence[int]]) -> int:
    """The first profile whose ranges hold ``shapes``; a clear error naming the ranges otherwise."""
    for index, profile in enumerate(profiles):
        if profile.contains(shapes):
            return index
    ranges = "; ".join(f"[{p.as_dict()['min']} .. {p.as_dict()['max']}]" for p in profiles)
    raise ShapeError(f"no optimization profile holds shapes {format_shape_set(shapes)}; the engine supports {ranges}",
                     hint="rebuild with --min-shapes/--max-shapes that cover them")


# -- build options and the plan -------------------------------------------------------------------------

@dataclass
class BuildOptions:
    """What the user asked for. ``None`` means the default.

    Attributes:
        precision: ``fp32``/``fp16``/``int8``; default: the ONNX's own precision.
        profiles: optimization profiles (default: from the ranges recorded at export).
        workspace: workspace pool limit in bytes (default 4 GiB).
        opt_level: builder optimization level 0..5 (default: TensorRT's, 3).
        timing_cache: a timing cache file, loaded if present and saved after the build.
        calibration_cache: TensorRT calibration cache for implicit INT8 (10.x legacy path).
        calibration_data: data source to create that cache when it does not exist yet.
        dla_core: DLA core to build for (Jetson), with GPU fallback.
        version_compatible: build a version-compatible engine.
        hardware_compatibility: ``none``, ``ampere+`` or ``same-cc``.
        memory_budget: warn when unfused attention at the max shapes needs more bytes (default 4 GiB).
        tf32: let FP32 layers run as TF32 on Ampere+ (TensorRT's own default; off here, as Polygraphy does,
            so an "fp32" engine computes in FP32; the sidecar records the choice).
    """

    precision: str | None = None
    profiles: list[Profile] = field(default_factory=list)
    workspace: int = DEFAULT_WORKSPACE
    opt_level: int | None = None
    timing_cache: str | None = None
    calibration_cache: str | None = None
    calibration_data: str | None = None
    dla_core: int | None = None
    version_compatible: bool = False
    hardware_compatibility: str = "none"
    memory_budget: int = 4 << 30
    tf32: bool = False


@dataclass
class BuildPlan:
    """What the builder will do, decided before any work (and recorded in the sidecar)."""

    trt_version: str
    onnx_precision: str
    precision: str
    strongly_typed: bool
    builder_flags: list[str]
    calibrator: str | None = None            # "entropy" | "minmax" (implicit INT8 only)
    calibration_cache: str | None = None
    calibration_data: str | None = None
    profiles: list[Profile] = field(default_factory=list)
    workspace: int = DEFAULT_WORKSPACE
    opt_level: int | None = None
    timing_cache: str | None = None
    dla_core: int | None = None
    hardware_compatibility: str = "none"
    notes: list[str] = field(default_factory=list)
    tf32: bool = False

    @property
    def major(self) -> int:
        return Version(self.trt_version).major

    @property
    def legacy(self) -> bool:
        return not self.strongly_typed

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["profiles"] = [p.as_dict() for p in self.profiles]
        return data


def onnx_precision(record: Mapping[str, Any], op_types: Sequence[str] = ()) -> str:
    """The precision an ONNX carries: its recorded ``precision``, else Q/DQ nodes mean int8."""
    if record.get("precision") in PRECISIONS:
        return record["precision"]
    return "int8" if "QuantizeLinear" in op_types else "fp32"


def make_plan(trt_version: str, onnx_kind: str, options: BuildOptions) -> BuildPlan:
    """Decide how to build, or refuse (:class:`PlanError`) saying what would work."""
    version = parse_trt_version(trt_version)
    major = version.major
    precision = options.precision or onnx_kind
    if precision not in PRECISIONS:
        raise PlanError(f"unknown precision {precision!r}", hint=f"use one of {', '.join(PRECISIONS)}")
    if options.opt_level is not None and not 0 <= options.opt_level <= 5:
        raise PlanError(f"builder optimization level {options.opt_level} is out of range", hint="use 0..5")
    if options.hardware_compatibility not in HARDWARE_LEVELS:
        raise PlanError(f"unknown hardware compatibility {options.hardware_compatibility!r}",
                        hint=f"use one of {', '.join(HARDWARE_LEVELS)}")
    # HardwareCompatibilityLevel.SAME_COMPUTE_CAPABILITY is bound from 10.9 (pyCore.cpp v10.9.0; absent in 10.7/10.8)
    if options.hardware_compatibility == "same-cc" and version < Version("10.9"):
        raise PlanError(f"hardware compatibility 'same-cc' needs TensorRT 10.9 or later, not {version}",
                        hint="use ampere+ or none")
    notes: list[str] = []
    flags: list[str] = []
    calibrator = None
    strongly_typed = True
    if precision == "fp8" and onnx_kind != "fp8":
        raise PlanError("TensorRT builds FP8 only from an FP8 Q/DQ ONNX (it has no FP8 builder flag)",
                        hint="make one with 'xattn quantize MODEL.onnx --precision fp8'")
    if precision == "fp8":
        if options.dla_core is not None:
            raise PlanError("DLA has no FP8", hint="build FP8 for the GPU, or INT8/FP16 for DLA")
        notes.append("FP8 needs a GPU of compute capability 8.9 or newer (Ada, Hopper, Blackwell): Jetson AGX Orin "
                     "(8.7) and Ampere cannot build it")
    if onnx_kind != "fp32" and precision != onnx_kind:
        raise PlanError(f"this ONNX is {onnx_kind}: it builds as {onnx_kind}, not {precision}",
                        hint=f"build it with --precision {onnx_kind}, or build the fp32 ONNX")
    if options.calibration_cache and not (major == 10 and onnx_kind == "fp32" and precision == "int8"):
        if major == 11:
            raise PlanError("TensorRT 11 has no implicit INT8: calibration caches are not used",
                            hint="build the Q/DQ ONNX from 'xattn quantize' instead")
        raise PlanError("a calibration cache is only for implicit INT8 of the fp32 ONNX (--precision int8)",
                        hint="a Q/DQ ONNX carries its own scales; drop --calibration-cache")
    if precision != onnx_kind:   # an fp32 ONNX asked to build at lower precision
        if major >= 11:
            other = "model.fp16.onnx ('xattn convert --fp16')" if precision == "fp16" else \
                "model.int8.onnx ('xattn quantize')"
            raise PlanError(f"TensorRT {version} takes precision from the graph and has no {precision.upper()} "
                            f"builder flag", hint=f"build {other} instead")
        strongly_typed = False   # the legacy weakly typed path, deprecated since 10.12
        if precision == "fp16":
            flags.append("FP16")
            notes.append("legacy FP16: BuilderFlag.FP16 on a weakly typed network (deprecated since 10.12); "
                         "the FP16 ONNX builds strongly typed instead")
        else:
            flags += ["INT8", "FP16"]   # FP16 for the layers INT8 does not cover (attention)
            if not options.calibration_cache and not options.calibration_data:
                raise PlanError("implicit INT8 needs calibration: give --calibration-cache (xattn calibrate --cache) "
                                "or --calibration-data to create one", hint="or build the Q/DQ ONNX instead")
            calibrator = "entropy"
            notes.append("legacy implicit INT8 (calibrator + cache, deprecated since 10.1); the Q/DQ ONNX "
                         "builds the same on TensorRT 10 and 11")
    if major >= 11:
        notes.append("TensorRT 11: strongly typed network, precision from the graph")
    if options.dla_core is not None:
        if options.dla_core < 0:
            raise PlanError(f"DLA core {options.dla_core} is not a core number", hint="use 0 or 1 on Orin")
        if precision == "fp32":
            raise PlanError("DLA runs FP16 and INT8 only", hint="build with --precision fp16 or int8 for DLA")
        if options.hardware_compatibility != "none" or options.version_compatible:
            raise PlanError("DLA engines cannot be hardware- or version-compatible")
        if major == 11 and version < Version("11.4.1"):
            # DLA is absent in 11.0-11.3, Windows-on-ARM only in 11.4.0; back on Orin from 11.4.1 with JetPack 7.2.2+
            raise PlanError(f"TensorRT {version} has no DLA support on Jetson",
                            hint="use TensorRT 11.4.1+ with JetPack 7.2.2+, or 10.x (JetPack 6), or drop --dla-core")
        dynamic = [name for p in options.profiles for name in p.min if not p.min[name] == p.opt[name] == p.max[name]]
        if dynamic:
            raise PlanError(f"DLA has no dynamic shapes: {', '.join(sorted(set(dynamic)))} have min != opt != max",
                            hint="give one fixed shape: --min-shapes, --opt-shapes and --max-shapes all equal")
        if strongly_typed and major == 10:
            notes.append("strongly typed DLA build on 10.x: no NVIDIA source documents this combination before "
                         "11.4.1 (trtexec 10.3 turns --fp16/--int8 off under --stronglyTyped), nor explicit Q/DQ on "
                         "DLA before the 10.11 parser; verify on the device. The documented INT8 route on DLA with "
                         "JetPack 6 is implicit: model.onnx --precision int8 --calibration-cache FILE")
        flags.append("GPU_FALLBACK")
        notes.append(f"DLA core {options.dla_core}; layers DLA cannot run (Softmax over long sequences, "
                     "MatMul) fall back to the GPU")
    if options.version_compatible:
        flags.append("VERSION_COMPATIBLE")
    if options.tf32:
        notes.append("TF32 allowed: FP32 layers may run as TF32 on Ampere and newer GPUs (10-bit mantissa)")
    return BuildPlan(str(version), onnx_kind, precision, strongly_typed, flags, calibrator,
                     options.calibration_cache, options.calibration_data, list(options.profiles), options.workspace,
                     options.opt_level, options.timing_cache, options.dla_core, options.hardware_compatibility, notes,
                     options.tf32)


# -- trtexec -------------------------------------------------------------------------------------------

def trtexec_command(onnx_path: str, engine_path: str, plan: BuildPlan) -> str:
    """The equivalent ``trtexec`` line, for building on the device where TensorRT lives."""
    import shlex

    args = ["trtexec", f"--onnx={shlex.quote(str(onnx_path))}", f"--saveEngine={shlex.quote(str(engine_path))}"]
    # trtexec reads several profiles only through --profile=N, each directly followed by its min/opt/max
    # triple; shape options left over after a single-profile read are an error ("Multiple --minShapes/...
    # without --profile are not allowed": sampleOptions.cpp v10.3.0 l.1070-1105, v10.13.3 l.1100-1132, v11.1
    # l.1093-1120; shared/notes/tensorrt-review-2.md N1). Read from sources, never run here.
    several = len(plan.profiles) > 1
    for index, profile in enumerate(plan.profiles):
        shapes = profile.as_dict()
        args += ([f"--profile={index}"] if several else []) + [
            f"--minShapes={shapes['min']}", f"--optShapes={shapes['opt']}", f"--maxShapes={shapes['max']}"]
    if plan.strongly_typed and plan.major == 10:
        args.append("--stronglyTyped")        # 11.x networks are always strongly typed
    if "FP16" in plan.builder_flags:
        args.append("--fp16")
    if "INT8" in plan.builder_flags:
        args.append("--int8")
        if plan.calibration_cache:
            args.append(f"--calib={shlex.quote(str(plan.calibration_cache))}")
            if several:   # the profile whose OPT shapes the cache was made at: the last (as Polygraphy's builds)
                args.append(f"--calibProfile={len(plan.profiles) - 1}")
    if not plan.tf32:
        args.append("--noTF32")   # trtexec enables TF32 by default (sampleOptions.cpp: "--noTF32 Disable tf32")
    args.append(f"--memPoolSize=workspace:{plan.workspace >> 20}M")
    if plan.opt_level is not None:
        args.append(f"--builderOptimizationLevel={plan.opt_level}")
    if plan.timing_cache:
        args.append(f"--timingCacheFile={shlex.quote(str(plan.timing_cache))}")
    if plan.dla_core is not None:
        args += [f"--useDLACore={plan.dla_core}", "--allowGPUFallback"]
    if "VERSION_COMPATIBLE" in plan.builder_flags:
        args.append("--versionCompatible")
    if plan.hardware_compatibility != "none":
        # trtexec spells the levels none | ampere+ | sameComputeCapability (sampleOptions.cpp v10.13.3, v11.1)
        args.append(f"--hardwareCompatibilityLevel={TRTEXEC_HARDWARE_LEVELS[plan.hardware_compatibility]}")
    return " ".join(args)


# -- the sidecar and compatibility ------------------------------------------------------------------------

def sidecar_path(engine_path: str | os.PathLike) -> Path:
    return Path(str(engine_path) + ".json")


def write_sidecar(engine_path: str | os.PathLike, data: Mapping[str, Any]) -> Path:
    path = sidecar_path(engine_path)
    write_text_atomic(path, json.dumps({"format": SIDECAR_FORMAT, **data}, indent=2, sort_keys=True) + "\n")
    return path


def read_sidecar(engine_path: str | os.PathLike) -> dict[str, Any] | None:
    path = sidecar_path(engine_path)
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise EngineMismatchError(f"engine sidecar {path} is not valid JSON", hint="rebuild the engine") from exc
    if not isinstance(data, dict) or data.get("format") != SIDECAR_FORMAT:
        raise EngineMismatchError(f"{path} is not an xattn engine sidecar")
    _check_sidecar_fields(data, path)
    return data


#: key -> (accepted types, required) of the sidecar fields the toolkit reads
_SIDECAR_FIELDS = {"tensorrt_version": ((str,), True), "precision": ((str,), False), "gpu": ((dict,), False),
                   "version_compatible": ((bool,), False), "hardware_compatibility": ((str,), False),
                   "source": ((dict,), False), "build_command": ((str,), False), "profiles": ((list,), False)}


def _check_sidecar_fields(data: Mapping[str, Any], path) -> None:
    """A sidecar is read from disk: every field the toolkit uses must have its type (else one clear line)."""
    for key, (types, required) in _SIDECAR_FIELDS.items():
        if key not in data or data[key] is None:
            if required:
                raise EngineMismatchError(f"engine sidecar {path} has no {key}", hint="rebuild the engine")
            continue
        if not isinstance(data[key], types):
            raise EngineMismatchError(f"engine sidecar {path}: {key} is {type(data[key]).__name__}, not "
                                      f"{' or '.join(t.__name__ for t in types)}", hint="rebuild the engine")
    try:
        parse_trt_version(data["tensorrt_version"])
    except Exception as exc:
        raise EngineMismatchError(f"engine sidecar {path}: tensorrt_version {data['tensorrt_version']!r} is not a "
                                  "version", hint="rebuild the engine") from exc
    capability = (data.get("gpu") or {}).get("compute_capability")
    if capability is not None and not (isinstance(capability, list) and len(capability) == 2 and
                                       all(isinstance(c, int) and not isinstance(c, bool) for c in capability)):
        raise EngineMismatchError(f"engine sidecar {path}: gpu.compute_capability is not [major, minor]",
                                  hint="rebuild the engine")
    name = (data.get("gpu") or {}).get("name")
    if name is not None and not isinstance(name, str):
        raise EngineMismatchError(f"engine sidecar {path}: gpu.name is not text", hint="rebuild the engine")


@dataclass(frozen=True)
class Device:
    """The GPU an engine is built on or runs on."""

    name: str
    compute_capability: tuple[int, int]

    @property
    def sm(self) -> str:
        return f"sm_{self.compute_capability[0]}{self.compute_capability[1]}"


def check_compatibility(sidecar: Mapping[str, Any] | None, trt_version: str, device: Device | None) -> list[str]:
    """Whether an engine may be deserialized here. Returns warnings; raises :class:`EngineMismatchError`.

    A plan is tied to the TensorRT version and GPU that built it unless it was built
    version-compatible (later 10.x/11.x of the same major) or hardware-compatible (``ampere+``: any
    GPU of compute capability 8.0 or later; ``same-cc``: the same compute capability).
    """
    if sidecar is None:
        return ["the engine has no .json sidecar: cannot check where it was built; loading it anyway"]
    warnings: list[str] = []
    built = Version(sidecar["tensorrt_version"])
    running = Version(trt_version)
    build_line = sidecar.get("build_command", "xattn build <model.onnx> -o <engine>")
    if built != running:
        if not sidecar.get("version_compatible"):
            raise EngineMismatchError(
                f"engine was built with TensorRT {built} but this is TensorRT {running}",
                hint=f"rebuild it here ({build_line}), or build it --version-compatible")
        if running.major != built.major or running < built:
            raise EngineMismatchError(f"version-compatible engine from TensorRT {built} cannot run on {running}",
                                      hint=f"rebuild it here ({build_line})")
        warnings.append(f"version-compatible engine from TensorRT {built} running on {running}")
    gpu = sidecar.get("gpu") or {}
    if device is not None and gpu.get("compute_capability"):
        built_cc = tuple(gpu["compute_capability"])
        level = sidecar.get("hardware_compatibility", "none")
        same = built_cc == device.compute_capability and gpu.get("name") == device.name
        if level == "ampere+" and device.compute_capability >= (8, 0):
            if not same:
                warnings.append(f"hardware-compatible engine from {gpu.get('name')} running on {device.name}")
        elif level == "same-cc" and built_cc == device.compute_capability:
            pass
        elif built_cc != device.compute_capability:
            raise EngineMismatchError(
                f"engine was built on {gpu.get('name')} (sm_{built_cc[0]}{built_cc[1]}) but this GPU is "
                f"{device.name} ({device.sm})",
                hint=f"rebuild it here ({build_line}), or build it --hardware-compatibility ampere+")
        elif gpu.get("name") != device.name:
            warnings.append(f"engine built on {gpu.get('name')}, running on {device.name} (same {device.sm})")
    return warnings


def prepare_calibration(plan: BuildPlan, model, running_version: str) -> str | None:
    """For implicit INT8: the cache text TensorRT will read, re-headed for the running version.

    The scales in a cache do not depend on the TensorRT version, but TensorRT ignores a cache whose
    header names another version, so a cache written for 10.3 is served as the running 10.x's own.
    The calibrator class follows the cache's algorithm. Returns None when there is no cache yet (it
    will be created from ``plan.calibration_data``).
    """
    from xattn.onnxfile import require_tensors, tensor_names
    from xattn.trt_cache import ALGORITHMS, read_trt_cache, trt_version_number

    if not plan.calibration_cache or not Path(plan.calibration_cache).is_file():
        if not plan.calibration_data:
            raise PlanError(f"calibration cache {plan.calibration_cache} does not exist",
                            hint="create it with 'xattn calibrate --cache', or pass --calibration-data")
        plan.notes.append(f"no calibration cache yet: calibrating on {plan.calibration_data}, "
                          f"writing {plan.calibration_cache}")
        return None
    cache = read_trt_cache(plan.calibration_cache)
    known = tensor_names(model)
    unknown = [n for n in cache.amax if n not in known]
    if unknown and len(unknown) < len(cache.amax):
        # TensorRT's own caches also name its internal tensors ("(Unnamed Layer* 0) [Convolution]_output")
        plan.notes.append(f"calibration cache names {len(unknown)} tensors the ONNX does not have (TensorRT-internal, "
                          f"e.g. {unknown[0]!r}); served as it is")
    else:
        require_tensors(model, cache.amax, plan.calibration_cache)   # nothing in common: another model's cache
    plan.calibrator = "minmax" if cache.algorithm == ALGORITHMS["minmax"] else "entropy"
    number = trt_version_number(running_version)
    if cache.version_number != number:
        plan.notes.append(f"calibration cache written for TRT-{cache.version_number}, served as TRT-{number}")
        cache.version_number = number
    return cache.to_text()
