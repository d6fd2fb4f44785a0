"""TensorRT backend: runs a serialized engine behind the same Runner interface.

The engine is loaded by Polygraphy (``EngineFromBytes``: plugins registered, host code allowed for
version-compatible plans) into a runtime set to the DLA core the sidecar records, after the sidecar's
compatibility check. By default inference goes through Polygraphy's ``TrtRunner``, which has run on every
TensorRT release: it checks each ``set_input_shape``, allocates outputs whose shapes depend on the data, and
handles shape tensors and vectorized formats; the toolkit picks the optimization profile from the input shapes
and calls ``set_profile``. Timings are then host-side (copies included).

With ``cuda_graph=True`` (``xattn bench --cuda-graph``) the hand-written path below runs instead: device memory
through Polygraphy's ctypes wrapper of the CUDA runtime (``polygraphy.cuda``), each fixed input shape captured once
as a CUDA graph and replayed, and device-side time from CUDA events. Polygraphy has no CUDA-graph support.

Every function calling TensorRT is marked with :func:`xattn.tensorrt.runs_on` for the API test.
"""

from __future__ import annotations

import ctypes
import logging
import os
from pathlib import Path
from typing import Mapping

import numpy as np

from xattn.tensorrt import import_tensorrt, runs_on
from xattn.trt_plan import Profile, check_compatibility, read_sidecar, select_profile
from runtime.base import Runner, TensorMeta
from xattn.errors import ArtifactError, MissingDependencyError

_log = logging.getLogger("xattn")

# TensorRT DataType member name -> numpy dtype
TRT_DTYPES = {"FLOAT": np.float32, "HALF": np.float16, "INT8": np.int8, "INT32": np.int32, "INT64": np.int64,
              "BOOL": np.bool_, "UINT8": np.uint8}


def numpy_dtype(trt_name: str, tensor: str):
    """The numpy dtype of a TensorRT DataType name; BF16/FP8/INT4 have none, and treating them as float32
    would read wrong data, so they are refused."""
    try:
        return TRT_DTYPES[trt_name]
    except KeyError:
        raise ArtifactError(f"engine tensor {tensor!r} is {trt_name}, which has no numpy type",
                            hint="build the engine with FP32/FP16/INT8 inputs and outputs (the ONNX I/O types)") from None


def profile_ranges(profiles: list[Profile], name: str) -> dict[int, tuple[int, int]]:
    """Per axis, the (min, max) over all profiles: what the engine accepts for input ``name``."""
    ranges: dict[int, tuple[int, int]] = {}
    for each in profiles:
        for axis, (low, high) in enumerate(zip(each.min[name], each.max[name])):
            if low != high or axis in ranges:
                old = ranges.get(axis, (low, high))
                ranges[axis] = (min(old[0], low), max(old[1], high))
    return ranges


class TensorRTRunner(Runner):
    """Runs a serialized TensorRT engine (``.engine``/``.plan``).

    Args:
        path: the engine file (a plain TensorRT plan; its ``.json`` sidecar is read when present).
        cuda_graph: capture each fixed input shape as a CUDA graph and replay it (default False).
        name, allow_nonfinite: see :class:`runtime.base.Runner`.
    """

    backend = "tensorrt"

    def __init__(self, path: str | os.PathLike, *, cuda_graph: bool = False, name: str | None = None,
                 allow_nonfinite: bool = False):
        super().__init__(name or Path(path).name, allow_nonfinite=allow_nonfinite)
        self.path = Path(path)
        self.cuda_graph = cuda_graph
        self.sidecar: dict | None = None
        self.warnings: list[str] = []

    @runs_on("10.x", "11.x")
    def activate_impl(self) -> None:
        from xattn.tensorrt import current_device, installed_tensorrt_version

        trt = import_tensorrt()
        if not self.path.is_file():
            raise ArtifactError(f"engine {self.path} does not exist")
        try:
            from polygraphy import cuda
        except ImportError as exc:
            raise MissingDependencyError("running engines needs polygraphy", hint="pip install polygraphy") from exc
        self.sidecar = read_sidecar(self.path)
        self.warnings = check_compatibility(self.sidecar, installed_tensorrt_version(), current_device())
        for warning in self.warnings:
            _log.warning(warning)
        from polygraphy.backend.trt import EngineFromBytes, TrtRunner
        from polygraphy.exception import PolygraphyException

        self.trt = trt
        self.logger = trt.Logger(trt.Logger.WARNING)
        self.runtime = trt.Runtime(self.logger)
        dla_core = ((self.sidecar or {}).get("plan") or {}).get("dla_core")
        if isinstance(dla_core, int) and not isinstance(dla_core, bool):
            self.runtime.DLA_core = dla_core   # the core it was built for (trtexec's setDLACore; review 2 N15)
        try:
            # EngineFromBytes allows host code on every load (a version-compatible plan without its sidecar
            # loads too) and registers TensorRT's plugins before deserializing
            self.engine = EngineFromBytes(self.path.read_bytes(), runtime=self.runtime)()
        except PolygraphyException as exc:
            raise ArtifactError(f"TensorRT cannot deserialize {self.path}: {str(exc).strip().splitlines()[-1]}",
                                hint="was it built by another TensorRT version or GPU? rebuild it here") from exc
        self.polygraphy = None
        if not self.cuda_graph:
            self.polygraphy = TrtRunner(self.engine, name=self.name)
            self.polygraphy.activate()
            self.context = self.polygraphy.context
        else:
            self.context = self.engine.create_execution_context()
        self.stream = cuda.Stream()
        self.buffers: dict[str, tuple] = {}   # name -> (DeviceArray, numpy dtype)
        self.names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.inputs = [n for n in self.names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.outputs = [n for n in self.names if n not in self.inputs]
        self.profiles = self._read_profiles()
        self.active_profile = 0
        self.graph_shapes = None
        self.graph_exec = None

    @runs_on("10.x", "11.x")
    def _read_profiles(self) -> list[Profile]:
        profiles = []
        for index in range(self.engine.num_optimization_profiles):
            shapes = {n: [tuple(s) for s in self.engine.get_tensor_profile_shape(n, index)] for n in self.inputs}
            profiles.append(Profile({n: s[0] for n, s in shapes.items()}, {n: s[1] for n, s in shapes.items()},
                                    {n: s[2] for n, s in shapes.items()}))
        return profiles

    def deactivate_impl(self) -> None:
        if self.polygraphy is not None:
            self.polygraphy.deactivate()
            self.polygraphy = None
        self._drop_graph()
        for buffer, _ in self.buffers.values():
            buffer.free()
        self.buffers = {}
        self.stream.free()
        self.context = self.engine = self.runtime = None

    @runs_on("10.x", "11.x")
    def input_metadata_impl(self) -> dict[str, TensorMeta]:
        axes = ((self.sidecar or {}).get("source") or {}).get("dynamic_axes") or {}
        result = {}
        for name in self.inputs:
            dims = tuple(self.engine.get_tensor_shape(name))
            named = axes.get(name, {})
            shape = tuple(d if d >= 0 else named.get(str(axis)) for axis, d in enumerate(dims))
            dtype = numpy_dtype(self.engine.get_tensor_dtype(name).name, name)
            result[name] = TensorMeta(name, np.dtype(dtype), shape, profile_ranges(self.profiles, name))
        return result

    def output_names_impl(self) -> list[str]:
        return list(self.outputs)

    def _buffer(self, name: str, shape, dtype):
        """The device buffer for tensor ``name``: reused (grown only when it needs more bytes) while the dtype holds.

        The dtype is tracked here: reading DeviceArray.dtype warns on every call in Polygraphy 0.53 and
        returns Polygraphy's own DataType from 0.55, which would never equal a numpy dtype.
        """
        from polygraphy import cuda

        dtype = np.dtype(dtype)
        held = self.buffers.get(name)
        if held is None or held[1] != dtype:
            if held is not None:
                held[0].free()
            held = self.buffers[name] = (cuda.DeviceArray(tuple(shape), dtype), dtype)
        return held[0].resize(tuple(shape))

    @runs_on("10.x", "11.x")
    def infer_impl(self, feed: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        shapes = {n: tuple(feed[n].shape) for n in self.inputs}
        profile = select_profile(self.profiles, shapes)
        if self.polygraphy is not None:
            from polygraphy.exception import PolygraphyException

            try:
                if profile != self.active_profile:
                    self.polygraphy.set_profile(profile)
                    self.active_profile = profile
                outputs = self.polygraphy.infer({n: np.ascontiguousarray(feed[n]) for n in self.inputs})
            except PolygraphyException as exc:
                raise ArtifactError(f"TensorRT failed to run {self.path.name}: "
                                    f"{str(exc).strip().splitlines()[-1]}") from exc
            self.last_device_time = None   # host-side figure only (see the module docstring)
            return {name: np.asarray(outputs[name]) for name in self.outputs}
        if profile != self.active_profile:
            self.context.set_optimization_profile_async(profile, self.stream.ptr)
            self.active_profile = profile
            self._drop_graph()
        for name in self.inputs:
            array = np.ascontiguousarray(feed[name])
            if not self.context.set_input_shape(name, array.shape):   # review 2 N18: a refused shape is an error
                raise ArtifactError(f"TensorRT refused input shape {array.shape} for {name} in {self.path.name}")
            buffer = self._buffer(name, array.shape, array.dtype)
            buffer.copy_from(array, self.stream)
            self.context.set_tensor_address(name, buffer.ptr)
        results = {}
        for name in self.outputs:
            shape = tuple(self.context.get_tensor_shape(name))
            if any(d < 0 for d in shape):   # review 2 N12: data-dependent; Polygraphy's runner allocates these
                raise ArtifactError(f"output {name} of {self.path.name} has a data-dependent shape {shape}: the "
                                    "CUDA-graph path cannot size it", hint="run without --cuda-graph")
            dtype = numpy_dtype(self.engine.get_tensor_dtype(name).name, name)
            buffer = self._buffer(name, shape, dtype)
            self.context.set_tensor_address(name, buffer.ptr)
            results[name] = np.empty(shape, dtype)
        with _DeviceTimer(self.stream.ptr) as timer:
            if self.cuda_graph:
                self._launch_graph(shapes)
            elif not self.context.execute_async_v3(self.stream.ptr):
                raise ArtifactError(f"TensorRT failed to run {self.path.name}")
        try:
            for name in self.outputs:
                self.buffers[name][0].copy_to(results[name], self.stream)
            self.stream.synchronize()
        except BaseException:
            timer.free()   # review 2, R10: seconds() will not run, so the events are freed here
            raise
        self.last_device_time = timer.seconds()
        return results

    @runs_on("10.x", "11.x")
    def _launch_graph(self, shapes) -> None:
        """Replay the CUDA graph for these shapes; capture it first (after one plain run) if needed."""
        from polygraphy import cuda

        cudart = cuda.wrapper().handle
        if self.graph_exec is None or self.graph_shapes != shapes:
            self._drop_graph()
            if not self.context.execute_async_v3(self.stream.ptr):   # TensorRT must run once before capture
                raise ArtifactError(f"TensorRT failed to run {self.path.name}")
            graph = ctypes.c_void_p()
            executable = ctypes.c_void_p()
            stream = ctypes.c_void_p(self.stream.ptr)
            _check(cudart.cudaStreamBeginCapture(stream, 1))   # cudaStreamCaptureModeThreadLocal
            captured = self.context.execute_async_v3(self.stream.ptr)
            ended = cudart.cudaStreamEndCapture(stream, ctypes.byref(graph))   # always end a begun capture
            if not captured or ended:
                if graph:
                    cudart.cudaGraphDestroy(graph)
                _log.warning("CUDA graph capture failed for %s; running without a graph", self.path.name)
                self.cuda_graph = False
                if not self.context.execute_async_v3(self.stream.ptr):
                    raise ArtifactError(f"TensorRT failed to run {self.path.name}")
                return
            # ...WithFlags has the same 3-argument form on CUDA 11.4+ and 12 (cudaGraphInstantiate differs)
            status = cudart.cudaGraphInstantiateWithFlags(ctypes.byref(executable), graph, ctypes.c_ulonglong(0))
            cudart.cudaGraphDestroy(graph)
            _check(status)
            self.graph_exec, self.graph_shapes = executable, shapes
        _check(cudart.cudaGraphLaunch(self.graph_exec, ctypes.c_void_p(self.stream.ptr)))

    def _drop_graph(self) -> None:
        if self.graph_exec is not None:
            from polygraphy import cuda

            cuda.wrapper().handle.cudaGraphExecDestroy(self.graph_exec)
        self.graph_exec = self.graph_shapes = None

    def describe(self) -> dict:
        sidecar = self.sidecar or {}
        return {**super().describe(), "artifact": str(self.path), "precision": sidecar.get("precision"),
                "tensorrt_version": sidecar.get("tensorrt_version"), "cuda_graph": self.cuda_graph,
                "warnings": self.warnings}


def _check(status: int) -> None:
    if status:
        raise ArtifactError(f"CUDA graph call failed with cudaError {status}")


class _DeviceTimer:
    """CUDA events around the enqueued work (device-side time, host copies excluded), via libcudart."""

    def __init__(self, stream_ptr: int):
        from polygraphy import cuda

        self.cudart = cuda.wrapper().handle
        self.stream = ctypes.c_void_p(stream_ptr)
        self.start, self.end = ctypes.c_void_p(), ctypes.c_void_p()
        _check(self.cudart.cudaEventCreate(ctypes.byref(self.start)))
        _check(self.cudart.cudaEventCreate(ctypes.byref(self.end)))

    def __enter__(self):
        _check(self.cudart.cudaEventRecord(self.start, self.stream))
        return self

    def __exit__(self, exc_type, *exc):
        self.cudart.cudaEventRecord(self.end, self.stream)
        if exc_type is not None:   # seconds() will never be called: free the events now
            self.free()

    def seconds(self) -> float:
        milliseconds = ctypes.c_float()
        try:
            _check(self.cudart.cudaEventSynchronize(self.end))
            _check(self.cudart.cudaEventElapsedTime(ctypes.byref(milliseconds), self.start, self.end))
        finally:
            self.free()
        return milliseconds.value / 1000.0

    def free(self) -> None:
        for event in (self.start, self.end):
            if event:
                self.cudart.cudaEventDestroy(event)
        self.start, self.end = ctypes.c_void_p(), ctypes.c_void_p()
