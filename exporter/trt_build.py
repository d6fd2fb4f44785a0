"""The TensorRT calls that build an engine: few, thin, and only doing what a BuildPlan says.

Every function that touches TensorRT is marked with :func:`runs_on` naming the TensorRT majors that
reach it. ``tests/test_trt_api.py`` reads this file with ``ast`` and checks each TensorRT name such a
function uses against ../shared/trt-api/ for those versions (a 10.x-only function may use
``BuilderFlag.FP16``; one that runs on 11.x may not). Decisions live in :mod:`exporter.trt_plan`.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Callable, Iterable

import numpy as np

from exporter.trt_plan import BuildPlan, Device
from xattn.errors import CheckFailedError, MissingDependencyError


def runs_on(*majors: str):
    """Mark which TensorRT versions reach a function ("10.x", "11.x"); read by the API-surface test."""
    def mark(func):
        func.trt_versions = majors
        return func
    return mark


def import_tensorrt():
    try:
        import tensorrt as trt
    except ImportError as exc:
        raise MissingDependencyError("TensorRT is not installed here",
                                     hint="pip install 'xattn-deploy[tensorrt]' on a machine with an NVIDIA GPU, "
                                          "or run the printed trtexec line on the device") from exc
    return trt


@runs_on("10.x", "11.x")
def installed_tensorrt_version() -> str | None:
    """The installed TensorRT version, or None. Never raises."""
    try:
        import tensorrt as trt
    except Exception:   # not installed, or a broken install (missing CUDA libraries)
        return None
    return str(trt.__version__)


def current_device() -> Device | None:
    """Name and compute capability of GPU 0 through the CUDA runtime (Polygraphy's ctypes wrapper)."""
    import ctypes

    try:
        from polygraphy import cuda

        handle = cuda.wrapper().handle
        major, minor = ctypes.c_int(), ctypes.c_int()
        # cudaDevAttrComputeCapabilityMajor = 75, Minor = 76
        if handle.cudaDeviceGetAttribute(ctypes.byref(major), 75, 0) or \
                handle.cudaDeviceGetAttribute(ctypes.byref(minor), 76, 0):
            return None
        props = ctypes.create_string_buffer(4096)   # cudaDeviceProp starts with char name[256]
        name = "unknown GPU"
        if handle.cudaGetDeviceProperties(props, 0) == 0:
            name = props.raw[:256].split(b"\0", 1)[0].decode(errors="replace")
        return Device(name, (major.value, minor.value))
    except Exception:   # no GPU or no CUDA runtime: the caller reports what is missing
        return None


@runs_on("10.x", "11.x")
def _make_progress_monitor(trt, say: Callable[[str], None]):
    class Monitor(trt.IProgressMonitor):
        def __init__(self):
            trt.IProgressMonitor.__init__(self)   # a trampoline class must init its parent or it crashes
            self.steps: dict[str, int] = {}

        def phase_start(self, phase_name, parent_phase, num_steps):
            self.steps[phase_name] = num_steps
            if parent_phase is None:
                say(f"{phase_name} ({num_steps} steps)")

        def step_complete(self, phase_name, step):
            return True   # False would cancel the build

        def phase_finish(self, phase_name):
            self.steps.pop(phase_name, None)

    return Monitor()


@runs_on("10.x")
def _make_calibrator(trt, plan: BuildPlan, cache_text: str | None, feeds: list[dict[str, np.ndarray]],
                     cache_out: Path | None):
    """Implicit INT8 calibrator (TensorRT 10.x only): serves an existing cache, or calibrates on feeds."""
    from polygraphy import cuda

    base = trt.IInt8EntropyCalibrator2 if plan.calibrator == "entropy" else trt.IInt8MinMaxCalibrator

    class Calibrator(base):
        def __init__(self):
            base.__init__(self)   # a trampoline class must init its parent or it crashes
            self.feeds = iter(feeds)
            self.buffers: dict[str, cuda.DeviceArray] = {}

        def get_batch_size(self):
            return 1   # explicit-batch networks: the batch is in the shapes

        def get_batch(self, names):
            feed = next(self.feeds, None)
            if feed is None:
                return None
            pointers = []
            for name in names:
                array = np.ascontiguousarray(feed[name])
                buffer = self.buffers.get(name) or cuda.DeviceArray(array.shape, array.dtype)
                self.buffers[name] = buffer.resize(array.shape)
                buffer.copy_from(array)
                pointers.append(buffer.ptr)
            return pointers

        def free(self):
            for buffer in self.buffers.values():
                buffer.free()
            self.buffers = {}

        def read_calibration_cache(self):
            return cache_text.encode("ascii") if cache_text else None

        def write_calibration_cache(self, cache):
            if cache_out is not None:
                from xattn.fileio import write_bytes_atomic

                write_bytes_atomic(cache_out, bytes(cache))

    return Calibrator()


@runs_on("10.x")
def _apply_legacy_precision(trt, config, plan: BuildPlan, calibrator, calibration_profile) -> None:
    if "FP16" in plan.builder_flags:
        config.set_flag(trt.BuilderFlag.FP16)
    if "INT8" in plan.builder_flags:
        config.set_flag(trt.BuilderFlag.INT8)
        config.int8_calibrator = calibrator
        config.set_calibration_profile(calibration_profile)


@runs_on("10.9+", "11.x")
def _set_same_compute_capability(trt, config) -> None:
    config.hardware_compatibility_level = trt.HardwareCompatibilityLevel.SAME_COMPUTE_CAPABILITY


@runs_on("10.x", "11.x")
def build_serialized_engine(onnx_path: str | os.PathLike, plan: BuildPlan, *, say: Callable[[str], None],
                            calibration_feeds: Iterable[dict[str, np.ndarray]] = (),
                            calibration_cache_text: str | None = None) -> tuple[bytes, float]:
    """Build the engine the plan describes; returns (plan bytes, seconds). Saves the timing cache."""
    trt = import_tensorrt()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = 0
    if plan.strongly_typed and plan.major == 10:
        flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)   # 11.x: always strongly typed
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(Path(onnx_path).read_bytes()):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise CheckFailedError(f"TensorRT {plan.trt_version} cannot parse {onnx_path}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, plan.workspace)
    if plan.opt_level is not None:
        config.builder_optimization_level = plan.opt_level
    profiles = []
    for wanted in plan.profiles:
        profile = builder.create_optimization_profile()
        for name in wanted.min:
            profile.set_shape(name, wanted.min[name], wanted.opt[name], wanted.max[name])
        config.add_optimization_profile(profile)
        profiles.append(profile)
    calibrator = None
    if plan.legacy:
        # TensorRT writes the cache only when it calibrated from data: a served cache is the user's file
        # and is never overwritten (TensorRT's rewrite would add its internal tensor names to it).
        calibrating = calibration_cache_text is None
        cache_out = Path(plan.calibration_cache) if plan.calibration_cache and calibrating else None
        if "INT8" in plan.builder_flags:
            calibrator = _make_calibrator(trt, plan, calibration_cache_text, list(calibration_feeds), cache_out)
        _apply_legacy_precision(trt, config, plan, calibrator, profiles[0])
    if plan.dla_core is not None:
        config.default_device_type = trt.DeviceType.DLA
        config.DLA_core = plan.dla_core
        config.set_flag(trt.BuilderFlag.GPU_FALLBACK)
    if "VERSION_COMPATIBLE" in plan.builder_flags:
        config.set_flag(trt.BuilderFlag.VERSION_COMPATIBLE)
    if plan.hardware_compatibility == "ampere+":
        config.hardware_compatibility_level = trt.HardwareCompatibilityLevel.AMPERE_PLUS
    elif plan.hardware_compatibility == "same-cc":
        _set_same_compute_capability(trt, config)   # the plan refuses it before 10.9
    timing_path = Path(plan.timing_cache) if plan.timing_cache else None
    cache = config.create_timing_cache(timing_path.read_bytes() if timing_path and timing_path.is_file() else b"")
    if not config.set_timing_cache(cache, False):
        # the cache was made on another device: start a fresh one rather than fail the build
        say(f"timing cache {timing_path} does not fit this device; using a fresh one")
        config.set_timing_cache(config.create_timing_cache(b""), False)
    config.progress_monitor = _make_progress_monitor(trt, say)
    start = time.perf_counter()
    try:
        serialized = builder.build_serialized_network(network, config)
    finally:
        if calibrator is not None:
            calibrator.free()   # Polygraphy's DeviceArray has no __del__: free the device buffers on every path
    seconds = time.perf_counter() - start
    if serialized is None:
        raise CheckFailedError(f"TensorRT {plan.trt_version} failed to build {onnx_path} (see its log above)")
    engine = bytes(serialized)
    if timing_path is not None:
        # After a successful build nothing may lose the engine: a timing cache that cannot be saved is a warning.
        try:
            from xattn.fileio import write_bytes_atomic

            timing = config.get_timing_cache()
            if timing is None:
                say("TensorRT returned no timing cache; not saved")
            else:
                write_bytes_atomic(timing_path, bytes(timing.serialize()))
        except Exception as exc:   # noqa: BLE001 - the engine is what the user asked for
            say(f"timing cache not saved: {exc}")
    return engine, seconds
