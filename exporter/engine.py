"""``xattn build``: from an ONNX file to a TensorRT engine plus its JSON sidecar.

The engine file stays a plain TensorRT plan (trtexec, Triton and DeepStream load it); everything
about where and how it was built goes into ``<engine>.json`` beside it.
"""

from __future__ import annotations

import os
import platform
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Sequence

from xattn.onnxfile import load_onnx
from xattn.trt_plan import (BuildOptions, BuildPlan, PlanError, derive_profiles, make_plan,
                            onnx_precision, prepare_calibration, profiles_beyond_export, trtexec_command, write_sidecar)
from xattn import __version__
from xattn.errors import BadInputError, CheckFailedError, MissingDependencyError
from xattn.fileio import check_writable, sha256_file, write_bytes_atomic
from xattn.provenance import get_onnx_metadata

#: The flavours printed when TensorRT is missing: the Jetson one and the newest.
TARGET_VERSIONS = (("10.3.0", "JetPack 6 / TensorRT 10.x"), ("11.4.0", "TensorRT 11.x"))


@dataclass
class EngineResult:
    path: Path
    sidecar: Path
    plan: BuildPlan
    seconds: float
    size: int
    notes: list[str] = field(default_factory=list)


@dataclass
class OnnxForBuild:
    """What a build needs to know of an ONNX file, read once."""

    model: object
    record: dict
    kind: str
    profiles: list


def read_for_build(onnx_path: str | os.PathLike, mins=(), opts=(), maxs=()) -> OnnxForBuild:
    """Load the ONNX once: its record, its precision and the profiles to build."""
    model = load_onnx(onnx_path)
    record = get_onnx_metadata(model)
    refuse_foreign_ops(model, record, onnx_path)
    return OnnxForBuild(model, record, onnx_precision(record, [n.op_type for n in model.graph.node]),
                        derive_profiles(record, mins, opts, maxs))


def refuse_foreign_ops(model, record, onnx_path) -> None:
    """TensorRT's ONNX parser has no ``com.microsoft`` ops ("Plugin not found"): refuse such files by name."""
    foreign = sorted({f"{n.domain}.{n.op_type}" for n in model.graph.node if n.domain == "com.microsoft"})
    if foreign:
        source = (record.get("source") or {}).get("path")
        instead = f"build {source} (or its 'xattn convert --fp16' / 'xattn quantize' forms) instead" if source else \
            "build the ONNX it was made from ('xattn convert --fp16' / 'xattn quantize --target tensorrt')"
        raise BadInputError(f"{onnx_path} is made for ONNX Runtime ({', '.join(foreign)}): TensorRT cannot parse "
                            "com.microsoft ops", hint=instead)


#: First TensorRT whose ONNX parser reads ONNX's opset-23 ``Attention`` (into its attention layer).
ONNX_ATTENTION_MIN_TRT = "10.14"
#: TensorRT 10.0-10.3 (JetPack 6): the parser's documented opset range ends at 20.
MAX_OPSET_10_3 = 20


def plan_for(source: OnnxForBuild, options: BuildOptions, trt_version: str) -> BuildPlan:
    """The plan for ``trt_version`` (the caller's options are not changed)."""
    from packaging.version import Version

    if any(n.op_type == "Attention" and n.domain in ("", "ai.onnx") for n in source.model.graph.node) \
            and Version(trt_version) < Version(ONNX_ATTENTION_MIN_TRT):
        raise PlanError(f"TensorRT {trt_version} cannot parse ONNX Attention (opset 23; TensorRT "
                        f"{ONNX_ATTENTION_MIN_TRT}+ and 11.x can)",
                        hint="for this version build the default form: 'xattn convert --fp16' or 'xattn quantize' "
                             "without --attention-op onnx (MatMul -> Softmax -> MatMul, which it fuses)")
    opset = next((o.version for o in source.model.opset_import if o.domain in ("", "ai.onnx")), None)
    if opset is not None and Version("10.0") <= Version(trt_version) < Version("10.4") and opset > MAX_OPSET_10_3:
        raise PlanError(f"TensorRT {trt_version}'s ONNX parser reads opsets 9..{MAX_OPSET_10_3}; this file is opset {opset}",
                        hint=f"re-export with --opset {MAX_OPSET_10_3} or lower (the default is 18)")
    plan = make_plan(trt_version, source.kind, replace(options, profiles=list(source.profiles)))
    plan.notes[:0] = [f"warning: {w}" for w in profiles_beyond_export(source.record, plan.profiles)]
    return plan


def trtexec_lines(onnx_path, engine_path, options: BuildOptions, mins=(), opts=(), maxs=(),
                  targets: Sequence[str] | None = None) -> list[str]:
    """For each target version, its trtexec line or why it cannot build this."""
    source = read_for_build(onnx_path, mins, opts, maxs)
    lines = []
    labels = dict(TARGET_VERSIONS)
    from exporter.trt_lint import check_for_tensorrt

    for version in targets or [v for v, _ in TARGET_VERSIONS]:
        label = labels.get(version, f"TensorRT {version}")
        try:
            plan = plan_for(source, options, version)
            check_trtexec_calibration(plan)
            lint = check_for_tensorrt(onnx_path, version, dla=options.dla_core is not None,
                                      memory_budget=options.memory_budget, weak_fp16="FP16" in plan.builder_flags,
                                      profile_maxima=[p.max for p in plan.profiles])
            if not lint.passed:
                raise PlanError("; ".join(f"[{i.rule}] {i.message}" for i in lint.findings),
                                hint=f"'xattn check {onnx_path} --target-trt {version}' lists everything")
            warnings = "".join(f"\n# warning: [{i.rule}] {i.message}" for i in lint.warnings)
            warnings += "".join(f"\n# {n}" for n in plan.notes if n.startswith("warning: ") or n.startswith("FP8 "))
            note = f" ({len(plan.profiles)} profiles)" if len(plan.profiles) > 1 else ""
            lines.append(f"# {label}{note}{warnings}\n{trtexec_command(str(onnx_path), str(engine_path), plan)}")
        except PlanError as exc:
            lines.append(f"# {label}: not possible: {exc}")
    return lines


def check_trtexec_calibration(plan: BuildPlan) -> None:
    """Refuse a legacy INT8 trtexec line that cannot work: trtexec's calibrator is always an
    EntropyCalibration2 (sampleEngines.cpp v10.3.0), which skips a cache of another algorithm and then
    binds null inputs; without a cache it calibrates on random data."""
    if "INT8" not in plan.builder_flags:
        return
    if not plan.calibration_cache or not Path(plan.calibration_cache).is_file():
        raise PlanError("trtexec would calibrate implicit INT8 on random data (it has no data loader)",
                        hint="make a cache first: 'xattn calibrate MODEL.onnx --method entropy --cache FILE'")
    from xattn.trt_cache import read_trt_cache, trt_version_number

    cache = read_trt_cache(plan.calibration_cache)
    algorithm = cache.algorithm
    wanted = trt_version_number(plan.trt_version)
    if cache.version_number != wanted:
        # TensorRT ignores a cache whose header names another version (the rule prepare_calibration re-heads
        # for): trtexec would then calibrate with null inputs (review 2, N8)
        raise PlanError(f"{plan.calibration_cache} is headed TRT-{cache.version_number}; trtexec {plan.trt_version} "
                        f"reads only TRT-{wanted} caches and would calibrate with null inputs",
                        hint=f"write one for it: 'xattn calibrate MODEL.onnx --method entropy --cache FILE "
                             f"--trt-version {plan.trt_version}', or build with 'xattn build' (it re-heads the cache)")
    if algorithm != "EntropyCalibration2":
        raise PlanError(f"trtexec's calibrator is EntropyCalibration2 and skips a {algorithm} cache "
                        f"({plan.calibration_cache}), then runs with null inputs",
                        hint="write one with 'xattn calibrate MODEL.onnx --method entropy --cache FILE', or build "
                             "with 'xattn build' (it serves any cache), or build the Q/DQ ONNX")


def build_engine(onnx_path: str | os.PathLike, output: str | os.PathLike, options: BuildOptions, *,
                 mins=(), opts=(), maxs=(), say: Callable[[str], None] = lambda m: None) -> EngineResult:
    """Build ``onnx_path`` into ``output`` with the installed TensorRT; write the sidecar."""
    from exporter.trt_build import build_serialized_engine
    from xattn.tensorrt import current_device, installed_tensorrt_version

    output = check_writable(output)
    version = installed_tensorrt_version()
    if version is None:
        raise MissingDependencyError("TensorRT is not installed here",
                                     hint="build on the device with the trtexec line ('xattn build' prints it)")
    device = current_device()
    if device is None:
        raise MissingDependencyError("TensorRT is installed but no CUDA GPU is visible",
                                     hint="build on the machine with the GPU the engine will run on")
    source = read_for_build(onnx_path, mins, opts, maxs)
    plan, record = plan_for(source, options, version), source.record
    from xattn.trt_plan import FP8_MIN_COMPUTE

    if plan.precision == "fp8" and tuple(device.compute_capability) < FP8_MIN_COMPUTE:
        raise PlanError(f"{device.name} (compute capability {'.'.join(map(str, device.compute_capability))}) has no "
                        "FP8: it needs 8.9 or newer (Ada, Hopper, Blackwell)", hint="build model.fp16.onnx or model.int8.onnx")
    from exporter.trt_lint import check_for_tensorrt

    lint = check_for_tensorrt(onnx_path, version, dla=options.dla_core is not None,
                              memory_budget=options.memory_budget, weak_fp16="FP16" in plan.builder_flags,
                                      profile_maxima=[p.max for p in plan.profiles])
    if not lint.passed:
        raise CheckFailedError(f"{onnx_path} would not build on TensorRT {version}: "
                               + "; ".join(f"[{i.rule}] {i.message}" for i in lint.findings))
    for warning in lint.warnings:
        say(f"warning: [{warning.rule}] {warning.message}")
    cache_text, feeds = None, []
    if "INT8" in plan.builder_flags:
        cache_text = prepare_calibration(plan, source.model, version)
        if cache_text is None:
            feeds = _calibration_feeds(plan, record)
    for note in plan.notes:
        say(note)
    engine_bytes, seconds = build_serialized_engine(onnx_path, plan, say=say, calibration_feeds=feeds,
                                                    calibration_cache_text=cache_text)
    write_bytes_atomic(output, engine_bytes)
    source = {key: record.get(key) for key in ("model", "model_args", "checkpoint_sha256", "init_seed", "inputs",
                                               "outputs", "dynamic_axes", "min_shapes", "opt_shapes", "max_shapes",
                                               "precision", "equal_positions")}
    sidecar = write_sidecar(output, {
        "toolkit_version": __version__, "tensorrt_version": version, "precision": plan.precision,
        "gpu": {"name": device.name, "compute_capability": list(device.compute_capability)},
        "host": platform.node(), "profiles": [p.as_dict() for p in plan.profiles], "plan": plan.as_dict(),
        "version_compatible": "VERSION_COMPATIBLE" in plan.builder_flags,
        "hardware_compatibility": plan.hardware_compatibility,
        "source": source, "source_onnx": {"path": Path(onnx_path).name, "sha256": sha256_file(onnx_path)},
        "engine_sha256": sha256_file(output), "engine_bytes": len(engine_bytes), "build_seconds": round(seconds, 2),
        "build_command": trtexec_command(str(onnx_path), str(output), plan),
    })
    return EngineResult(output, sidecar, plan, seconds, len(engine_bytes), list(plan.notes))


def _calibration_feeds(plan: BuildPlan, record: dict) -> list:
    """Implicit INT8 without a cache: calibration data rendered at the calibration profile's opt shapes."""
    from xattn.data import DataSettings, load_calibration_data

    opt = plan.profiles[-1].opt   # Polygraphy (and so the build) calibrates at the last profile
    names = list(opt)
    sizes = [{name: tuple(opt[name][2:4]) for name in names}]
    channels = record.get("inputs") or {name: opt[name][1] for name in names}
    data = load_calibration_data(plan.calibration_data, names, channels,
                                 DataSettings(samples=64, batch_size=opt[names[0]][0], sizes=sizes))
    if data.synthetic:
        plan.notes.append("implicit INT8 calibrated on SYNTHETIC data")
    return opt_shaped_feeds(data.feeds, opt, plan)


def opt_shaped_feeds(feeds: list, opt: dict, plan: BuildPlan | None = None) -> list:
    """Only feeds whose every input has exactly the calibration profile's OPT shape: TensorRT calibrates at
    OPT (set_calibration_profile overwrites MIN and MAX with it) and reads OPT-sized buffers, so any other
    shape (a partial last batch, an .npz of other sizes) would be read out of bounds or misread."""
    kept = [f for f in feeds if all(tuple(f[name].shape) == tuple(opt[name]) for name in opt)]
    if not kept:
        shapes = ", ".join(sorted({f"{n}:{'x'.join(map(str, f[n].shape))}" for f in feeds[:3] for n in opt}))
        raise BadInputError(f"no calibration feed has the calibration profile's OPT shape "
                            f"({', '.join(f'{n}:' + 'x'.join(map(str, s)) for n, s in opt.items())}); got {shapes}",
                            hint="give data at the OPT shape, or set --opt-shapes to the data's shape")
    if plan is not None and len(kept) < len(feeds):
        plan.notes.append(f"calibration: dropped {len(feeds) - len(kept)} feeds whose shape is not the OPT shape")
    return kept

