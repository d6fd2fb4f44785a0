"""The TensorRT calls that build an engine: few, thin, and only doing what a BuildPlan says.

Every function that touches TensorRT is marked with :func:`runs_on` naming the TensorRT majors that
reach it. ``tests/test_trt_api.py`` reads this file with ``ast`` and checks each TensorRT name such a
function uses against ../shared/trt-api/ for those versions (a 10.x-only function may use
``BuilderFlag.FP16``; one that runs on 11.x may not). Decisions live in :mod:`xattn.trt_plan`; finding TensorRT and the GPU in
:mod:`xattn.tensorrt`.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Callable, Iterable

import numpy as np

from xattn.errors import CheckFailedError
from xattn.tensorrt import import_tensorrt, runs_on
from xattn.trt_plan import BuildPlan


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
def _polygraphy_calibrator(trt, plan: BuildPlan, cache_text: str | None, feeds: list[dict[str, np.ndarray]]):
    """Implicit INT8 (TensorRT 10.x only): Polygraphy's calibrator over ``feeds``, or serving ``cache_text``.

    The cache lives in memory (a file-like object Polygraphy reads and writes): a served cache is the user's
    file and is never rewritten (TensorRT's rewrite would add its internal tensor names), and a new one is
    written atomically by the caller after the build."""
    import io

    from polygraphy.backend.trt import Calibrator

    base = trt.IInt8EntropyCalibrator2 if plan.calibrator == "entropy" else trt.IInt8MinMaxCalibrator
    cache = io.BytesIO(cache_text.encode("ascii") if cache_text else b"")
    return Calibrator(data_loader=feeds, cache=cache, BaseClass=base), cache


@runs_on("10.9+", "11.x")
def _set_same_compute_capability(trt, config) -> None:
    config.hardware_compatibility_level = trt.HardwareCompatibilityLevel.SAME_COMPUTE_CAPABILITY


@runs_on("10.x", "11.x")
def _finish_config(trt, config, plan: BuildPlan, say: Callable[[str], None]) -> None:
    """What Polygraphy's CreateConfig has no argument for: the DLA core it would hard-code to 0, the
    timing cache loaded with a fallback when it is another device's, the hardware level and the progress."""
    if plan.dla_core is not None:
        config.default_device_type = trt.DeviceType.DLA
        config.DLA_core = plan.dla_core
        config.set_flag(trt.BuilderFlag.GPU_FALLBACK)
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


@runs_on("10.x", "11.x")
def build_serialized_engine(onnx_path: str | os.PathLike, plan: BuildPlan, *, say: Callable[[str], None],
                            calibration_feeds: Iterable[dict[str, np.ndarray]] = (),
                            calibration_cache_text: str | None = None) -> tuple[bytes, float]:
    """Build the engine the plan describes through Polygraphy's loaders; returns (plan bytes, seconds).

    Polygraphy parses the ONNX from its path (external data is found), registers TensorRT's plugins, sets the
    network and builder flags each TensorRT version wants, clears TF32 unless the plan allows it, and runs the
    calibrator (at the last profile). The project keeps its decisions (the plan), the DLA core, the timing
    cache (loaded with a fallback, saved only after the engine exists) and the atomic writes."""
    trt = import_tensorrt()
    from polygraphy.backend.trt import CreateConfig, EngineBytesFromNetwork, NetworkFromOnnxPath, PostprocessConfig
    from polygraphy.exception import PolygraphyException

    network = NetworkFromOnnxPath(str(onnx_path), strongly_typed=True if plan.strongly_typed and plan.major == 10 else None)
    calibrator = cache = None
    legacy_int8 = plan.legacy and "INT8" in plan.builder_flags
    if legacy_int8:
        calibrator, cache = _polygraphy_calibrator(trt, plan, calibration_cache_text, list(calibration_feeds))
    used: dict = {}

    def finish(builder, network, config):
        _finish_config(trt, config, plan, say)
        used["config"] = config   # for the timing cache once the engine exists

    create = CreateConfig(
        profiles=polygraphy_profiles(plan), tf32=plan.tf32, fp16=plan.legacy and "FP16" in plan.builder_flags,
        int8=legacy_int8, calibrator=calibrator, version_compatible="VERSION_COMPATIBLE" in plan.builder_flags,
        memory_pool_limits={trt.MemoryPoolType.WORKSPACE: plan.workspace},
        builder_optimization_level=plan.opt_level)
    start = time.perf_counter()
    try:
        engine = bytes(EngineBytesFromNetwork(network, config=PostprocessConfig(create, finish))())
    except PolygraphyException as exc:
        raise CheckFailedError(f"TensorRT {plan.trt_version} failed to build {onnx_path}: {exc}") from exc
    finally:
        if calibrator is not None:
            calibrator.free()   # the device buffers, on every path
    seconds = time.perf_counter() - start
    if legacy_int8 and calibration_cache_text is None and plan.calibration_cache:
        from xattn.fileio import write_bytes_atomic

        write_bytes_atomic(plan.calibration_cache, cache.getvalue())   # calibrated from data: the new cache
    if plan.timing_cache:
        # After a successful build nothing may lose the engine: a timing cache that cannot be saved is a warning.
        try:
            from xattn.fileio import write_bytes_atomic

            timing = used["config"].get_timing_cache()
            if timing is None:
                say("TensorRT returned no timing cache; not saved")
            else:
                write_bytes_atomic(plan.timing_cache, bytes(timing.serialize()))
        except Exception as exc:   # noqa: BLE001 - the engine is what the user asked for
            say(f"timing cache not saved: {exc}")
    return engine, seconds


def polygraphy_profiles(plan: BuildPlan) -> list:
    """The plan's optimization profiles as Polygraphy ``Profile`` objects (plain Python: no TensorRT needed)."""
    from polygraphy.backend.trt import Profile as PolygraphyProfile

    converted = []
    for wanted in plan.profiles:
        shapes = PolygraphyProfile()
        for name in wanted.min:
            shapes.add(name, min=tuple(wanted.min[name]), opt=tuple(wanted.opt[name]), max=tuple(wanted.max[name]))
        converted.append(shapes)
    return converted
