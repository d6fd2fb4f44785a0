"""Versions of the libraries that matter, for reports and ``xattn doctor``."""

from __future__ import annotations

import importlib.metadata as md
import platform

LIBRARIES = ("torch", "onnx", "onnxscript", "onnxruntime", "onnxruntime-gpu", "polygraphy", "tensorrt", "numpy",
             "onnxslim", "scikit-image", "matplotlib")


def dist_version(dist: str) -> str | None:
    try:
        return md.version(dist)
    except md.PackageNotFoundError:
        return None


def library_versions() -> dict[str, str]:
    """``{"python": ..., "torch": ..., ...}`` for the libraries that are installed."""
    from xattn import __version__

    versions = {"xattn-deploy": __version__, "python": platform.python_version()}
    for dist in LIBRARIES:
        version = dist_version(dist)
        if version:
            versions[dist] = version
    return versions
