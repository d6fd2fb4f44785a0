"""``xattn inspect`` for every file the toolkit writes, not only ONNX.

The kind is read from the content, never from the name alone: a TensorRT calibration cache starts with
its ``TRT-<version>-<algorithm>`` header, range tables and engine sidecars are JSON with their own
``format`` field, an export report has the export's keys. Nothing read is executed or imported.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from xattn.errors import ArtifactError

#: JSON files larger than this are not one of ours (a range table of a large model is ~100 KiB)
MAX_JSON_BYTES = 64 * 1024 * 1024
ENGINE_SUFFIXES = (".engine", ".plan", ".trt")


def describe_artifact(path: str | os.PathLike) -> dict[str, Any]:
    """A JSON-able description of any toolkit file at ``path``; ``kind`` says which it is."""
    path = Path(path)
    if path.is_dir():
        raise ArtifactError(f"{path} is a folder, not an ONNX file or another artifact")
    if not path.is_file():
        raise ArtifactError(f"{path} does not exist")
    with open(path, "rb") as handle:
        head = handle.read(64)
    if head.startswith(b"TRT-"):
        return _describe_cache(path)
    if head.lstrip()[:1] == b"{":
        return _describe_json(path)
    if path.suffix.lower() in ENGINE_SUFFIXES:
        return _describe_engine(path)
    from exporter.inspect_onnx import inspect_onnx

    return {"kind": "onnx", **inspect_onnx(path)}


def _describe_cache(path: Path) -> dict[str, Any]:
    from xattn.trt_cache import read_trt_cache

    cache = read_trt_cache(path)
    values = sorted(cache.amax.values())
    major, rest = divmod(cache.version_number, 10000)
    return {"kind": "tensorrt-calibration-cache", "path": str(path), "file_size": path.stat().st_size,
            "tensorrt_version": f"{major}.{rest // 100}.{rest % 100}", "algorithm": cache.algorithm,
            "tensors": len(cache.amax), "amax_min": values[0] if values else None,
            "amax_max": values[-1] if values else None,
            "read_by": ("trtexec --calib and xattn build" if cache.algorithm == "EntropyCalibration2"
                        else "xattn build (trtexec's calibrator is always Entropy2 and skips this cache)")}


def _describe_json(path: Path) -> dict[str, Any]:
    from calibration.ranges import RANGE_TABLE_FORMAT, RangeTable
    from xattn.trt_plan import SIDECAR_FORMAT

    if path.stat().st_size > MAX_JSON_BYTES:
        raise ArtifactError(f"{path} is a {path.stat().st_size / 2**20:.0f} MiB JSON file, not an xattn artifact")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ArtifactError(f"{path} is not valid JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise ArtifactError(f"{path} is a JSON {type(data).__name__}, not an xattn artifact")
    base = {"path": str(path), "file_size": path.stat().st_size}
    if data.get("format") == RANGE_TABLE_FORMAT:
        table = RangeTable.load(path)
        values = sorted(table.amax.values())
        return {"kind": "range-table", **base, "method": table.method, "percentile": table.percentile,
                "samples": table.samples, "data": table.data_label, "synthetic_data": table.synthetic,
                "data_sha256": table.data_sha256, "model_sha256": table.model_sha256,
                "op_types": list(table.op_types), "tensors": len(table.amax),
                "amax_min": values[0] if values else None, "amax_max": values[-1] if values else None,
                "toolkit_version": table.toolkit_version}
    if data.get("format") == SIDECAR_FORMAT:
        from xattn.trt_plan import read_sidecar

        engine = path.with_name(path.name[: -len(".json")]) if path.name.endswith(".json") else path
        sidecar = read_sidecar(engine)   # checks every field the toolkit reads
        return {"kind": "engine-sidecar", **base, "engine": str(engine), "engine_exists": engine.is_file(),
                **_sidecar_summary(sidecar)}
    if {"opset", "exporter", "checks", "min_shapes"} <= set(data):
        return {"kind": "export-report", **base, "model": (data.get("model") or {}).get("model"),
                "opset": data["opset"], "exporter": data["exporter"], "min_shapes": data["min_shapes"],
                "max_shapes": data.get("max_shapes"),
                "checks": [f"{c.get('shapes')}: rel L2 {c.get('rel_l2'):.3g} {'pass' if c.get('passed') else 'FAIL'}"
                           for c in data["checks"] if isinstance(c, dict)],
                "guards": data.get("guards", []), "exporter_warnings": len(data.get("exporter_warnings", []))}
    if "cases" in data and "passed" in data:
        return {"kind": "validation-report", **base, "artifact": data.get("artifact"), "passed": data["passed"],
                "cases": len(data["cases"]) if isinstance(data["cases"], list) else None}
    raise ArtifactError(f"{path} is JSON but not an xattn artifact (no known 'format' or report keys)")


def _sidecar_summary(sidecar: dict[str, Any]) -> dict[str, Any]:
    source = sidecar.get("source") or {}
    return {"tensorrt_version": sidecar.get("tensorrt_version"), "precision": sidecar.get("precision"),
            "gpu": sidecar.get("gpu"), "version_compatible": sidecar.get("version_compatible", False),
            "hardware_compatibility": sidecar.get("hardware_compatibility"),
            "profiles": sidecar.get("profiles"), "source_model": source.get("model"),
            "source_onnx": (sidecar.get("source_onnx") or {}).get("path"), "build_command": sidecar.get("build_command")}


def _describe_engine(path: Path) -> dict[str, Any]:
    """An engine is opaque without TensorRT; its sidecar says what it is."""
    from xattn.trt_plan import read_sidecar

    sidecar = read_sidecar(path)
    info = {"kind": "tensorrt-engine", "path": str(path), "file_size": path.stat().st_size,
            "sidecar": sidecar is not None}
    if sidecar is None:
        info["note"] = "no sidecar: what built this engine is unknown; it loads only with the TensorRT that built it"
        return info
    return {**info, **_sidecar_summary(sidecar)}


def format_description(info: dict[str, Any]) -> str:
    """Text for :func:`describe_artifact`'s result (ONNX files keep their own longer format)."""
    if info["kind"] == "onnx":
        from exporter.inspect_onnx import format_inspection

        return format_inspection(info)
    titles = {"tensorrt-calibration-cache": "TensorRT calibration cache", "range-table": "xattn range table",
              "engine-sidecar": "TensorRT engine sidecar", "tensorrt-engine": "TensorRT engine",
              "export-report": "xattn export report", "validation-report": "xattn validation report"}
    lines = [f"{info['path']}: {titles[info['kind']]} ({info['file_size']:,} bytes)"]
    for key, value in info.items():
        if key in ("kind", "path", "file_size") or value is None or value == []:
            continue
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            lines.append(f"  {key}:")
            lines.extend(f"    {v}" for v in value)
        else:
            lines.append(f"  {key}: {value if isinstance(value, str) else json.dumps(value)}")
    return "\n".join(lines)
