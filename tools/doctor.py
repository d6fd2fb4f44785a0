"""What is installed here and which features can run (``xattn doctor``)."""

from __future__ import annotations

import importlib
import platform
from typing import Any

from xattn.environment import LIBRARIES, dist_version


def _importable(module: str) -> bool:
    try:
        importlib.import_module(module)
        return True
    except Exception:  # a broken install counts as absent; doctor reports, it does not crash
        return False


def collect() -> dict[str, Any]:
    """Versions, ONNX Runtime providers, GPU presence, and which features can run here."""
    from xattn import __version__

    info: dict[str, Any] = {"xattn_deploy": __version__, "python": platform.python_version(),
                            "platform": platform.platform()}
    for dist in LIBRARIES:
        info[dist] = dist_version(dist) or "not installed"
    providers: list[str] = []
    if _importable("onnxruntime"):
        import onnxruntime

        providers = list(onnxruntime.get_available_providers())
    info["onnxruntime_providers"] = providers
    gpu = None
    try:
        import torch

        if torch.cuda.is_available():
            gpu = torch.cuda.get_device_name(0)
    except Exception:
        gpu = None
    info["gpu"] = gpu or "none"
    has_ort = bool(providers)
    has_trt = _importable("tensorrt")
    info["features"] = {
        "export": info["torch"] != "not installed" and info["onnxscript"] != "not installed",
        "fp16": has_ort,
        "int8": has_ort,
        "validate": has_ort,
        "engine_build": bool(has_trt and gpu),
        "engine_run": bool(has_trt and gpu),
    }
    return info


def format_report(info: dict[str, Any]) -> str:
    rows = [(k, v) for k, v in info.items() if k not in ("features", "onnxruntime_providers")]
    rows.append(("onnxruntime providers", ", ".join(info["onnxruntime_providers"]) or "none"))
    width = max(len(k) for k, _ in rows)
    lines = [f"{k:<{width}}  {v}" for k, v in rows]
    lines.append("")
    for feature, ok in info["features"].items():
        lines.append(f"{'yes' if ok else 'no ':<4} {feature}")
    if not info["features"]["engine_build"]:
        lines.append("(engine builds need the tensorrt package and an NVIDIA GPU: pip install 'xattn-deploy[tensorrt]')")
    return "\n".join(lines)
