"""TensorRT backend (filled in by the TensorRT work; here: its place in the interface)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping

import numpy as np

from runtime.base import Runner, TensorMeta
from xattn.errors import MissingDependencyError


def import_tensorrt():
    try:
        import tensorrt
    except ImportError as exc:
        raise MissingDependencyError("running a TensorRT engine needs the tensorrt package and an NVIDIA GPU",
                                     hint="pip install 'xattn-deploy[tensorrt]' on the device; the engine "
                                          "must be built there too") from exc
    return tensorrt


class TensorRTRunner(Runner):
    """Runs a serialized TensorRT engine (``.engine``/``.plan``)."""

    backend = "tensorrt"

    def __init__(self, path: str | os.PathLike, *, name: str | None = None, allow_nonfinite: bool = False):
        super().__init__(name or Path(path).name, allow_nonfinite=allow_nonfinite)
        self.path = Path(path)

    def activate_impl(self) -> None:
        import_tensorrt()
        raise MissingDependencyError("TensorRT engines cannot be run by this version of xattn-deploy yet")

    def input_metadata_impl(self) -> dict[str, TensorMeta]:
        raise NotImplementedError

    def output_names_impl(self) -> list[str]:
        raise NotImplementedError

    def infer_impl(self, feed: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        raise NotImplementedError
