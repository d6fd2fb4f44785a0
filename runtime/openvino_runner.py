"""OpenVINO backend: any ONNX file the toolkit writes, on OpenVINO's CPU plugin (its GPU/NPU plugins where present).

Chosen explicitly: ``--providers openvino`` (f32), ``openvino-bf16`` or ``openvino-f16`` wherever a command takes
providers (run, validate, bench, gate, serve). Precision is a runtime choice here: OpenVINO compiles the same
ONNX for the precision asked (``INFERENCE_PRECISION_HINT``); the precision it actually compiled is read back from
the compiled model and recorded in every report, and bf16 is refused with the reason on a device that has no BF16
(OPTIMIZATION_CAPABILITIES). Uses the ``openvino`` package (the ``openvino`` extra), not ONNX Runtime's OpenVINO
execution provider, which installs under the ``onnxruntime`` name and cannot sit beside the ``cpu`` extra.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from pathlib import Path
from typing import Mapping

import numpy as np

from runtime.base import Runner, TensorMeta
from xattn.errors import ArtifactError, BadInputError, MissingDependencyError

#: provider names that select this runner -> the precision asked of OpenVINO
PROVIDERS = {"openvino": "f32", "openvino-f32": "f32", "openvino-bf16": "bf16", "openvino-f16": "f16"}
#: what OpenVINO's device capability names a precision
_CAPABILITY = {"bf16": "BF16", "f16": "FP16", "f32": "FP32"}
#: OpenVINO's name of the precision it compiled -> the toolkit's
_COMPUTED = {"bf16": "bf16", "f16": "fp16", "f32": "fp32"}
#: Input shapes whose static compilation is kept (least recently used dropped). OpenVINO's CPU plugin plans and
#: reuses intermediate buffers only in a static-shape model: measured at 192x192 bf16, model.onnx peaked at 5.4 GiB
#: compiled dynamic and 2.8 GiB static, the 8-slice form at 3.4 GiB and 553 MiB (each slice's scores got their own
#: buffer when dynamic); static was also 3-9% faster. A compilation took 37-95 ms here, once per new shape.
#: Eight: the batch sizes 1-8 that ``xattn serve``'s batcher forms by default, at one resolution.
STATIC_SHAPES_KEPT = 8


def import_openvino():
    try:
        import openvino
    except ImportError as exc:
        raise MissingDependencyError("OpenVINO is not installed", hint="pip install 'xattn-deploy[openvino]'") from exc
    return openvino


class OpenVinoRunner(Runner):
    """Runs an ONNX file with OpenVINO.

    Args:
        path: the ``.onnx`` file (plain, fused ``com.microsoft.MultiHeadAttention``, FP16 or Q/DQ: OpenVINO reads
            them all).
        precision: ``f32`` (default), ``bf16`` or ``f16``: the inference precision asked of the device.
        device: OpenVINO device (default ``CPU``).
        threads: inference threads (``None`` or 0: OpenVINO's default).
        hint: ``latency`` (default; one request at a time) or ``throughput``.
        cache_dir: OpenVINO's model cache folder (compiled blobs reused across runs), or ``None``.
        static_shapes: compile the model once per input shape seen (default; the last
            ``shapes_kept`` kept, :data:`STATIC_SHAPES_KEPT` by default), so OpenVINO plans its buffers for that
            shape; ``False`` runs one dynamic-shape compilation for every shape (no compile on a new shape, more
            memory). Each kept compilation holds its own buffers.
    """

    backend = "openvino"

    def __init__(self, path: str | os.PathLike, *, precision: str = "f32", device: str = "CPU",
                 threads: int | None = None, hint: str = "latency", cache_dir: str | None = None,
                 name: str | None = None, allow_nonfinite: bool = False, static_shapes: bool = True,
                 shapes_kept: int = STATIC_SHAPES_KEPT):
        super().__init__(name or f"{Path(path).name} (openvino {precision})", allow_nonfinite=allow_nonfinite)
        if precision not in _CAPABILITY:
            raise BadInputError(f"OpenVINO precision {precision!r} is not f32, bf16 or f16")
        if hint not in ("latency", "throughput"):
            raise BadInputError(f"OpenVINO hint {hint!r} is not latency or throughput")
        self.path, self.precision, self.device, self.threads = Path(path), precision, device, threads
        self.hint, self.cache_dir, self.static_shapes = hint, cache_dir, static_shapes
        self.shapes_kept = max(1, shapes_kept)
        self._per_shape: OrderedDict = OrderedDict()   # input shapes -> infer request of that static compilation
        self.compiled_precision: str | None = None
        self.metadata: dict = {}

    def activate_impl(self) -> None:
        ov = import_openvino()
        if not self.path.is_file():
            raise ArtifactError(f"ONNX file {self.path} does not exist")
        core = ov.Core()
        if self.device not in core.available_devices:
            raise MissingDependencyError(f"OpenVINO has no {self.device} device here",
                                         hint=f"available: {', '.join(core.available_devices)}")
        capabilities = set(core.get_property(self.device, "OPTIMIZATION_CAPABILITIES"))
        if _CAPABILITY[self.precision] not in capabilities:
            raise MissingDependencyError(f"{self.device} has no {self.precision.upper()} in OpenVINO "
                                         f"(capabilities: {', '.join(sorted(capabilities))})",
                                         hint="use openvino (f32) on this machine")
        config = {"INFERENCE_PRECISION_HINT": self.precision, "PERFORMANCE_HINT": self.hint.upper()}
        if self.threads:
            config["INFERENCE_NUM_THREADS"] = int(self.threads)
        if self.cache_dir:
            config["CACHE_DIR"] = str(self.cache_dir)
        self._core, self._config = core, config
        try:
            self._model = core.read_model(str(self.path))
            self.compiled = core.compile_model(self._model, self.device, config)   # checks it compiles; ports
        except Exception as exc:   # OpenVINO raises RuntimeError with its whole log
            raise ArtifactError(f"OpenVINO cannot compile {self.path.name}: {_first_line(exc)}") from exc
        self.compiled_precision = self.compiled.get_property("INFERENCE_PRECISION_HINT").get_type_name()   # read back
        self.request = self.compiled.create_infer_request()
        from runtime.onnxrt import record_of_bytes, warn_if_made_for_another_cpu

        self.metadata = record_of_bytes(self.path.read_bytes())
        warn_if_made_for_another_cpu(self.metadata, self.path)   # INT8 files run as INT8 kernels here too
        self._inputs = {i.get_any_name(): i for i in self.compiled.inputs}
        self._outputs = [o.get_any_name() for o in self.compiled.outputs]

    def deactivate_impl(self) -> None:
        self.request = self.compiled = self._model = None
        self._per_shape.clear()

    def _request_for(self, feed: Mapping[str, np.ndarray]):
        """The infer request of the static compilation for these input shapes (compiled on first sight)."""
        if not self.static_shapes:
            return self.request
        key = tuple(sorted((name, tuple(np.shape(value))) for name, value in feed.items()))
        if key in self._per_shape:
            self._per_shape.move_to_end(key)
            return self._per_shape[key]
        model = self._model.clone()
        try:
            model.reshape({name: list(shape) for name, shape in key})
            request = self._core.compile_model(model, self.device, self._config).create_infer_request()
        except Exception as exc:
            raise ArtifactError(f"OpenVINO cannot compile {self.path.name} for shapes "
                                f"{', '.join(f'{n}={list(s)}' for n, s in key)}: {_first_line(exc)}") from exc
        self._per_shape[key] = request
        while len(self._per_shape) > self.shapes_kept:
            self._per_shape.popitem(last=False)
        return request

    def input_metadata_impl(self) -> dict[str, TensorMeta]:
        from runtime.onnxrt import declared_ranges

        limits = declared_ranges(self.metadata)
        result = {}
        for name, port in self._inputs.items():
            shape = tuple(d.get_length() if d.is_static else None for d in port.get_partial_shape())
            dtype = np.dtype(port.get_element_type().to_dtype())
            ranges = {axis: r for axis, r in limits.get(name, {}).items() if axis < len(shape) and shape[axis] is None}
            result[name] = TensorMeta(name, dtype, shape, ranges)
        return result

    def output_names_impl(self) -> list[str]:
        return list(self._outputs)

    def infer_impl(self, feed: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        request = self._request_for(feed)
        try:
            results = request.infer({name: np.ascontiguousarray(value) for name, value in feed.items()})
        except Exception as exc:
            raise ArtifactError(f"OpenVINO failed running {self.path.name}: {str(exc).strip()[:300]}") from exc
        by_name = {port.get_any_name(): value for port, value in results.items()}
        return {name: np.array(by_name[name], copy=True) for name in self._outputs}

    def describe(self) -> dict:
        return {**super().describe(), "artifact": str(self.path), "device": self.device,
                "precision_asked": self.precision, "precision_compiled": self.compiled_precision,
                "hint": self.hint, "threads": self.threads, "static_shapes": self.static_shapes,
                "openvino": getattr(import_openvino(), "__version__", None),
                # what it computes in: an FP32 file compiled for bf16 runs bf16 (benchmarks must not call it fp32)
                "precision": _COMPUTED.get(self.compiled_precision, "fp32")
                if self.metadata.get("precision", "fp32") == "fp32" else self.metadata["precision"]}


def _first_line(exc: Exception) -> str:
    """OpenVINO's errors carry its whole log: the first line, shortened."""
    text = str(exc).strip()
    return (text.splitlines()[0] if text else type(exc).__name__)[:300]
