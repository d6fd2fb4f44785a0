"""The main job (``xattn deploy``): every step the toolkit offers, on one model, into one folder."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from exporter.registry import LoadedModel


def run_pipeline(model: LoadedModel, output_dir: Path, *, echo: Callable[[str], None],
                 progress: Callable[[str], None]) -> dict:
    """Export + verify + inspect + validate. Returns the paths of what it made and whether all passed."""
    from exporter.inspect_onnx import format_inspection, inspect_onnx
    from exporter.onnx_export import ExportSettings, export_onnx
    from runtime.torch_runner import TorchRunner
    from runtime.validate import ValidateOptions, validate_artifact
    from tools.render import export_summary, validation_table, write_reports

    output_dir.mkdir(parents=True, exist_ok=True)
    onnx_path = output_dir / "model.onnx"
    echo("== export")
    result = export_onnx(model, onnx_path, ExportSettings(), progress=progress)
    echo(export_summary(model, result))
    echo("\n== inspect")
    echo(format_inspection(inspect_onnx(onnx_path)))

    echo("\n== validate against PyTorch")
    runners = {}
    results = [validate_artifact(onnx_path, ValidateOptions(checkpoint=model.checkpoint, samples=2),
                                 reference_runners=runners)]
    echo(validation_table(results))
    reports = output_dir / "reports"
    write_reports(results, reports / "accuracy.json", reports / "accuracy.xml", reports / "accuracy.md")
    echo(f"reports: {reports}/accuracy.{{json,xml,md}}")
    for runner in runners.values():
        if isinstance(runner, TorchRunner):
            runner.deactivate()
    return {"onnx": str(onnx_path), "passed": all(r.passed for r in results)}
