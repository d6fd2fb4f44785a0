"""The main job (``xattn deploy``): every step the toolkit offers, on one model, into one folder.

export (verified) -> inspect -> FP16 -> calibrate on real photos -> INT8 Q/DQ + TensorRT cache ->
validate all of them against PyTorch on held-out photos (different crops than calibration) -> reports.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from exporter.registry import LoadedModel

#: Calibration uses crops drawn with seed 0; validation draws its own with this seed.
VALIDATION_SEED = 1000


def run_pipeline(model: LoadedModel, output_dir: Path, *, echo: Callable[[str], None],
                 progress: Callable[[str], None], data: str = "shipped", samples: int = 64) -> dict:
    """Make every artifact and validate it. Returns the paths of what it made and whether all passed."""
    from calibration.data import DataSettings
    from exporter.inspect_onnx import format_inspection, inspect_onnx
    from exporter.onnx_export import ExportSettings, export_onnx
    from runtime.torch_runner import TorchRunner
    from runtime.validate import ValidateOptions, validate_artifact
    from tools.render import export_summary, validation_table, write_reports
    from tools.steps import fp16_step, quantize_step

    output_dir.mkdir(parents=True, exist_ok=True)
    paths = {"onnx": output_dir / "model.onnx", "fp16": output_dir / "model.fp16.onnx",
             "int8": output_dir / "model.int8.onnx", "ranges": output_dir / "model.ranges.json",
             "cache": output_dir / "model.int8.cache"}
    echo("== export")
    result = export_onnx(model, paths["onnx"], ExportSettings(), progress=progress)
    echo(export_summary(model, result))
    echo("\n== inspect")
    echo(format_inspection(inspect_onnx(paths["onnx"])))

    echo("\n== fp16")
    fp16_step(paths["onnx"], paths["fp16"], echo=echo)
    echo("\n== calibrate + int8")
    quantize_step(paths["onnx"], paths["int8"], data_spec=data, data_args=(samples, 0, 1, (), None, None),
                  cache=paths["cache"], ranges_output=paths["ranges"], echo=echo, progress=progress)
    echo(f"ranges: {paths['ranges']}")

    echo("\n== validate against PyTorch")
    runners: dict = {}
    held_out = DataSettings(samples=16, seed=VALIDATION_SEED)
    results = []
    for key in ("onnx", "fp16", "int8"):
        progress(f"validating {paths[key].name}")
        options = ValidateOptions(checkpoint=model.checkpoint, data=data, data_settings=held_out)
        results.append(validate_artifact(paths[key], options, reference_runners=runners))
    echo(validation_table(results))
    reports = output_dir / "reports"
    write_reports(results, reports / "accuracy.json", reports / "accuracy.xml", reports / "accuracy.md")
    echo(f"reports: {reports}/accuracy.{{json,xml,md}}")
    for runner in runners.values():
        if isinstance(runner, TorchRunner):
            runner.deactivate()
    return {**{k: str(v) for k, v in paths.items()}, "passed": all(r.passed for r in results), "results": results}
