"""Finding TensorRT and the GPU: what every layer asks before it touches either (the runner, the build, doctor).

Kept apart from the build (:mod:`exporter.trt_build`) so the runtime can ask without importing the exporter.
Functions that touch TensorRT are marked with :func:`runs_on`; ``tests/test_trt_api.py`` checks the TensorRT names
they use against ../shared/trt-api/ for those versions.
"""

from __future__ import annotations

from xattn.errors import MissingDependencyError
from xattn.trt_plan import Device


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
