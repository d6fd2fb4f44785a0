"""The main job (``xattn deploy``): every step the toolkit offers, on one model, into one folder."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from exporter.registry import LoadedModel


def run_pipeline(model: LoadedModel, output_dir: Path, *, echo: Callable[[str], None],
                 progress: Callable[[str], None]) -> dict:
    """Export + verify + inspect. Returns a summary dict of the artifacts made."""
    from exporter.inspect_onnx import format_inspection, inspect_onnx
    from exporter.onnx_export import ExportSettings, export_onnx
    from tools.render import export_summary

    output_dir.mkdir(parents=True, exist_ok=True)
    onnx_path = output_dir / "model.onnx"
    echo("== export")
    result = export_onnx(model, onnx_path, ExportSettings(), progress=progress)
    echo(export_summary(model, result))
    echo("== inspect")
    echo(format_inspection(inspect_onnx(onnx_path)))
    return {"onnx": str(onnx_path)}
