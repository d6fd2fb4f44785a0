"""ONNX Runtime backend."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from runtime.base import Runner, TensorMeta
from xattn.errors import ArtifactError, MissingDependencyError
from xattn.ort_session import create_session, import_onnxruntime  # noqa: F401  (import_onnxruntime: runtime's API)
from xattn.provenance import from_metadata_props
from xattn.shapes import parse_shape_set

# Preference order when the caller does not choose. onnxruntime-gpu lists TensorrtExecutionProvider whether or not
# TensorRT is installed (onnxruntime#13501), and with no options it builds FP32 engines inside the first run of every
# session and fails Q/DQ files (onnxruntime#13381): it is opt-in (--providers tensorrt), with the options below.
_PREFERRED_PROVIDERS = ("CUDAExecutionProvider", "CPUExecutionProvider")
#: the CUDA provider's defaults for a toolkit that runs many shapes: EXHAUSTIVE (ORT's default) re-runs cuDNN's
#: algorithm search for every new height and width, which dominates a shape sweep's first calls
CUDA_PROVIDER_OPTIONS = {"cudnn_conv_algo_search": "HEURISTIC"}

_ORT_DTYPES = {
    "tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64,
    "tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(int8)": np.int8, "tensor(uint8)": np.uint8,
    "tensor(bool)": np.bool_,
}


def available_providers() -> list[str]:
    return list(import_onnxruntime().get_available_providers())


def resolve_providers(providers: Sequence[str] | None) -> list[str]:
    """The providers to use: the caller's (checked against what is installed) or the best available.

    Short names are accepted: ``cpu``, ``cuda``, ``tensorrt``/``trt``.
    """
    available = available_providers()
    if not providers:
        return [p for p in _PREFERRED_PROVIDERS if p in available] or available
    aliases = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider",
               "tensorrt": "TensorrtExecutionProvider", "trt": "TensorrtExecutionProvider"}
    chosen = [aliases.get(p.lower(), p) for p in providers]
    for provider in chosen:
        if provider not in available:
            raise MissingDependencyError(f"ONNX Runtime provider {provider} is not available here",
                                         hint=f"available: {', '.join(available)}")
    return chosen


def provider_options(providers: Sequence[str], path: Path, record: Mapping) -> list[dict[str, str]]:
    """Options per provider, in order (plain data; ONNX Runtime takes them as ``(name, options)`` pairs).

    TensorRT's provider gets what the file needs (onnxruntime.ai, TensorRT-ExecutionProvider): FP16 for FP16
    files, INT8 for Q/DQ files, engine and timing caches in a folder beside the artifact (reused across
    sessions), and explicit profiles from the ranges recorded at export (without them it builds for the first
    shapes it sees and rebuilds whenever a shape leaves them). Read from documentation; never run here."""
    options = []
    for provider in providers:
        if provider == "TensorrtExecutionProvider":
            precision = record.get("precision") or "fp32"
            cache = path.parent / ".xattn-ort-trt-cache"
            trt = {"trt_fp16_enable": "True" if precision in ("fp16", "int8") else "False",
                   "trt_int8_enable": "True" if precision == "int8" else "False",
                   "trt_engine_cache_enable": "True", "trt_engine_cache_path": str(cache),
                   "trt_timing_cache_enable": "True", "trt_timing_cache_path": str(cache)}
            if all(record.get(k) for k in ("min_shapes", "opt_shapes", "max_shapes")):
                for key in ("min", "opt", "max"):
                    trt[f"trt_profile_{key}_shapes"] = str(record[f"{key}_shapes"])
            options.append(trt)
        elif provider == "CUDAExecutionProvider":
            options.append(dict(CUDA_PROVIDER_OPTIONS))
        else:
            options.append({})
    return options


class OnnxRuntimeRunner(Runner):
    """Runs an ONNX file with ONNX Runtime.

    Args:
        path: the ``.onnx`` file.
        providers: execution providers in priority order (``None``: best available, see
            :func:`resolve_providers`).
        threads: intra-op threads (``None``: ONNX Runtime's default, one per core).
        memory_arena: keep ONNX Runtime's CPU memory arena (its default, for latency: no allocation per call).
            The arena keeps the largest call's memory until the session closes and, measured here, grew over
            repeated calls at one shape; accuracy runs (verification, validation, quantization's checks) turn it
            off, so a run beside PyTorch's reference holds one model's memory at a time: validating the FP8
            file on the shipped photos peaked 0.57 GiB above the process's memory before the call without it,
            1.29 GiB with it (a few percent slower without it: ONNX Runtime's buffers are faulted in each call).
        name, allow_nonfinite: see :class:`runtime.base.Runner`.
    """

    backend = "onnxruntime"

    def __init__(self, path: str | os.PathLike, providers: Sequence[str] | None = None, *,
                 threads: int | None = None, name: str | None = None, allow_nonfinite: bool = False,
                 memory_arena: bool = True):
        super().__init__(name or Path(path).name, allow_nonfinite=allow_nonfinite)
        self.path = Path(path)
        self.requested_providers = list(providers) if providers else None
        self.threads = threads
        self.memory_arena = memory_arena
        self.session = None
        self.metadata: dict = {}

    def activate_impl(self) -> None:
        ort = import_onnxruntime()
        if not self.path.is_file():
            raise ArtifactError(f"ONNX file {self.path} does not exist")
        options = ort.SessionOptions()
        options.log_severity_level = 3  # errors only: ORT's warnings are not the user's business here
        options.enable_cpu_mem_arena = self.memory_arena
        if self.threads:
            options.intra_op_num_threads = int(self.threads)
            options.inter_op_num_threads = 1
        providers = resolve_providers(self.requested_providers)
        try:
            # bytes, not the path: ONNX Runtime's path argument must be valid UTF-8, file names need not be
            # (models with external data are not supported by this toolkit's writers anyway)
            data = self.path.read_bytes()
            record = record_of_bytes(data)
            self.session = create_session(data, options, providers, str(self.path), record,
                                          provider_options=provider_options(providers, self.path, record))
        except ArtifactError:
            raise
        except Exception as exc:  # ORT raises its own Fail/InvalidGraph/InvalidProtobuf classes
            raise ArtifactError(f"ONNX Runtime cannot load {self.path}: {_first_line(exc)}",
                                hint="is it a complete, valid ONNX file? try 'xattn inspect' on it") from exc
        self.metadata = from_metadata_props(self.session.get_modelmeta().custom_metadata_map)
        warn_if_made_for_another_cpu(self.metadata, self.path)

    def deactivate_impl(self) -> None:
        self.session = None

    def input_metadata_impl(self) -> dict[str, TensorMeta]:
        limits = declared_ranges(self.metadata)
        result = {}
        for arg in self.session.get_inputs():
            shape = tuple(d if isinstance(d, int) else (d or None) for d in arg.shape)
            ranges = {axis: r for axis, r in limits.get(arg.name, {}).items()
                      if axis < len(shape) and not isinstance(shape[axis], int)}
            if arg.type not in _ORT_DTYPES:   # bfloat16 and others have no numpy type: never read them as float32
                raise ArtifactError(f"input {arg.name} of {self.path.name} is {arg.type}, which has no numpy type here",
                                    hint="export the model with float32/float16 inputs")
            result[arg.name] = TensorMeta(arg.name, np.dtype(_ORT_DTYPES[arg.type]), shape, ranges)
        return result

    def output_names_impl(self) -> list[str]:
        return [o.name for o in self.session.get_outputs()]

    def infer_impl(self, feed: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        names = self.output_names_impl()
        try:
            values = self.session.run(names, dict(feed))
        except Exception as exc:
            raise ArtifactError(f"ONNX Runtime failed running {self.path.name}: {_first_line(exc)}") from exc
        return dict(zip(names, values))

    @property
    def providers(self) -> list[str]:
        return list(self.session.get_providers()) if self.session is not None else []

    def describe(self) -> dict:
        level = str(self.session.get_session_options().graph_optimization_level).split(".")[-1] \
            if self.session is not None else None
        return {**super().describe(), "artifact": str(self.path), "providers": self.providers,
                "ort_optimization_level": level,
                "precision": self.metadata.get("precision", "fp32")}


def warn_if_made_for_another_cpu(record: Mapping, path: Path) -> None:
    """An INT8 file with full 8-bit weights (made for VNNI/AMX) on a CPU without VNNI: u8 x s8 products can
    saturate there, and the outputs lose accuracy silently. Said once per session."""
    cpu = (record.get("quantization") or {}).get("cpu") if isinstance(record.get("quantization"), dict) else None
    if not isinstance(cpu, dict) or cpu.get("needs_vnni") is not True:
        return
    from xattn.cpu import cpu_features, has_vnni

    features = cpu_features()
    if features and not has_vnni(features):
        import logging

        logging.getLogger("xattn").warning(
            "%s has full 8-bit weights, made for a CPU with VNNI; this CPU has none (%s): its u8 x s8 products can "
            "saturate and lose accuracy; quantize for it with --cpu-target no-vnni", path.name, ", ".join(features))


def record_of_bytes(data: bytes) -> dict:
    """The export record of a serialized model (data only; an unreadable file has none, and ONNX Runtime's
    own refusal then names the problem)."""
    try:
        import onnx

        return from_metadata_props({p.key: p.value for p in onnx.load_model_from_string(data).metadata_props})
    except Exception:
        return {}


def session_with_outputs(model, names, *, threads: int | None = None, optimize: bool = True):
    """A CPU session of ``model`` (an ``onnx.ModelProto``) that also returns the intermediate tensors ``names``.

    ``optimize=False`` runs the graph as written (no fusions): for counting work node by node. With
    optimisations on, ONNX Runtime still never fuses away a tensor that is a graph output.
    """
    import onnx
    from onnx import helper

    ort = import_onnxruntime()
    augmented = onnx.ModelProto()
    augmented.CopyFrom(model)
    existing = {o.name for o in augmented.graph.output}
    for name in names:
        if name not in existing:
            augmented.graph.output.append(helper.make_empty_tensor_value_info(name))
    options = ort.SessionOptions()
    options.log_severity_level = 3
    if not optimize:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    if threads:
        options.intra_op_num_threads = threads
    return create_session(augmented.SerializeToString(), options, ["CPUExecutionProvider"],
                          f"{model.graph.name or 'a model'} with its intermediate tensors")


def declared_ranges(metadata: Mapping) -> dict[str, dict[int, tuple[int, int]]]:
    """Per input and axis, the (min, max) recorded at export; empty when the file has no record."""
    try:
        low = parse_shape_set(metadata["min_shapes"])
        high = parse_shape_set(metadata["max_shapes"])
    except Exception:
        return {}
    return {name: {axis: (a, b) for axis, (a, b) in enumerate(zip(low[name], high.get(name, low[name])))}
            for name in low}


def _first_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text[:300] if text else type(exc).__name__
