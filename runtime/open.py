"""Pick the backend from what the user names: an ONNX file, an engine, or a model."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping, Sequence

from runtime.base import Runner
from xattn.errors import ArtifactError, BadInputError

ENGINE_SUFFIXES = (".engine", ".plan", ".trt")


def artifact_kind(spec: str | os.PathLike) -> str:
    """``"onnx"``, ``"engine"`` or ``"model"`` (a built-in name or ``pkg.mod:factory``)."""
    suffix = Path(str(spec)).suffix.lower()
    if suffix == ".onnx":
        return "onnx"
    if suffix in ENGINE_SUFFIXES:
        return "engine"
    if os.path.sep in str(spec) or Path(str(spec)).exists():
        raise ArtifactError(f"{spec}: unknown artifact type {suffix or '(no suffix)'}",
                            hint="give an .onnx file, an .engine/.plan file, or a model name")
    return "model"


def open_runner(spec: str | os.PathLike, *, providers: Sequence[str] | None = None, threads: int | None = None,
                checkpoint: str | None = None, model_args: Mapping[str, Any] | None = None,
                device: str = "cpu", allow_nonfinite: bool = False, name: str | None = None,
                cuda_graph: bool = False, memory_arena: bool = True) -> Runner:
    """A runner for ``spec``: ``.onnx`` -> ONNX Runtime, ``.engine``/``.plan`` -> TensorRT, else PyTorch.

    The runner is not activated; use it as a context manager. ``memory_arena`` is ONNX Runtime's
    (:class:`runtime.onnxrt.OnnxRuntimeRunner`; accuracy runs turn it off); other backends ignore it.
    """
    kind = artifact_kind(spec)
    from runtime.openvino_runner import PROVIDERS as OPENVINO

    chosen = [p.lower() for p in providers or ()]
    if any(p in OPENVINO for p in chosen):
        if kind != "onnx" or len(chosen) != 1:
            raise BadInputError(f"--providers {','.join(chosen)}: OpenVINO runs ONNX files, alone",
                                hint="give one of openvino, openvino-bf16, openvino-f16 with an .onnx file")
        from runtime.openvino_runner import OpenVinoRunner

        return OpenVinoRunner(spec, precision=OPENVINO[chosen[0]], threads=threads, name=name,
                              allow_nonfinite=allow_nonfinite)
    if kind == "onnx":
        from runtime.onnxrt import OnnxRuntimeRunner

        return OnnxRuntimeRunner(spec, providers, threads=threads, name=name, allow_nonfinite=allow_nonfinite,
                                 memory_arena=memory_arena)
    if kind == "engine":
        from runtime.tensorrt_runner import TensorRTRunner

        return TensorRTRunner(spec, name=name, allow_nonfinite=allow_nonfinite, cuda_graph=cuda_graph)
    from runtime.torch_runner import TorchRunner

    return TorchRunner(str(spec), checkpoint, model_args, device=device, name=name, allow_nonfinite=allow_nonfinite)
