"""The main job (``xattn deploy``): every step the toolkit offers, on one model, into one folder.

export (verified) -> inspect -> two families of artifacts:

* for TensorRT: ``model.fp16.onnx`` (attention FP16, scale on Q: the fused form) and ``model.int8.onnx``
  (Q/DQ on convolution inputs and weights, the rest FP16) + TensorRT's calibration cache;
* for ONNX Runtime: ``model.ort.onnx`` (FP32, attention fused into MultiHeadAttention) and
  ``model.ort.int8.onnx`` (QLinearConv-friendly Q/DQ, attention fused);

-> validate all of them against PyTorch on held-out photos (different crops than calibration) ->
reports -> a short benchmark -> which file to use where.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from exporter.registry import LoadedModel

#: Calibration uses crops drawn with seed 0; validation draws its own with this seed.
VALIDATION_SEED = 1000


def run_pipeline(model: LoadedModel, output_dir: Path, *, echo: Callable[[str], None],
                 progress: Callable[[str], None], data: str = "shipped", samples: int = 64,
                 int8_target_rel_l2: float | None = 0.011) -> dict:
    """Make every artifact and validate it. Returns the paths of what it made and whether all passed."""
    from calibration.data import DataSettings
    from calibration.ranges import CalibrationSettings
    from exporter.inspect_onnx import format_inspection, inspect_onnx
    from exporter.onnx_export import ExportSettings, export_onnx
    from runtime.validate import ValidateOptions, validate_artifact
    from tools.render import export_summary, validation_table, write_reports
    from tools.steps import fp16_step, optimize_step, quantize_step

    output_dir.mkdir(parents=True, exist_ok=True)
    paths = {"onnx": output_dir / "model.onnx", "fp16": output_dir / "model.fp16.onnx",
             "int8": output_dir / "model.int8.onnx", "ranges": output_dir / "model.ranges.json",
             "cache": output_dir / "model.int8.cache", "ort": output_dir / "model.ort.onnx",
             "ort_int8": output_dir / "model.ort.int8.onnx"}
    echo("== export")
    result = export_onnx(model, paths["onnx"], ExportSettings(), progress=progress)
    echo(export_summary(model, result))
    echo("\n== inspect")
    echo(format_inspection(inspect_onnx(paths["onnx"])))

    echo("\n== for TensorRT: fp16")
    fp16_step(paths["onnx"], paths["fp16"], check_spec=data, echo=echo)
    echo("\n== for TensorRT: calibrate + int8")
    quantize_step(paths["onnx"], paths["int8"], data_spec=data, data_settings=DataSettings(samples=samples),
                  settings=CalibrationSettings(), cache=paths["cache"], ranges_output=paths["ranges"],
                  target_rel_l2=int8_target_rel_l2, echo=echo, progress=progress)
    echo(f"ranges: {paths['ranges']}")
    echo("\n== for ONNX Runtime: attention fused (fp32)")
    optimize_step(paths["onnx"], paths["ort"], reference=model.name,
                  checkpoint=model.checkpoint, echo=echo)
    echo("\n== for ONNX Runtime: int8 (same ranges)")
    quantize_step(paths["onnx"], paths["ort_int8"], data_spec=data, data_settings=DataSettings(samples=samples),
                  settings=CalibrationSettings(), ranges=paths["ranges"], target="onnxruntime", echo=echo,
                  progress=progress)

    echo("\n== TensorRT engines")
    validated = ["onnx", "fp16", "int8", "ort", "ort_int8"] + engine_step(paths, echo=echo, progress=progress)

    echo("\n== validate against PyTorch")
    runners: dict = {}
    cache: dict = {}   # the PyTorch reference runs once per held-out input for all artifacts
    held_out = DataSettings(samples=min(16, samples), seed=VALIDATION_SEED)
    results = []
    for key in validated:
        progress(f"validating {paths[key].name}")
        options = ValidateOptions(checkpoint=model.checkpoint, data=data, data_settings=held_out)
        results.append(validate_artifact(paths[key], options, reference_runners=runners, reference_cache=cache))
    echo(validation_table(results))
    reports = output_dir / "reports"
    write_reports(results, reports / "accuracy.json", reports / "accuracy.xml", reports / "accuracy.md")
    echo(f"reports: {reports}/accuracy.{{json,xml,md}}")

    echo("\n== benchmark (short; see 'xattn bench' and benchmarks/latency.py for real figures)")
    from runtime.bench import BenchSettings, benchmark, format_table
    from runtime.bench_setup import make_runners, work_counter

    specs = [str(paths[key]) for key in validated]
    bench_runners, base = make_runners(specs, threads=None, providers=None, checkpoint=model.checkpoint,
                                       torch_baseline=True)
    shapes = {name: (1, channels, 64, 64) for name, channels in model.io.inputs.items()}
    timing = benchmark(bench_runners, [shapes], BenchSettings(warmup=2, duration=1.0, min_iterations=5),
                       work=work_counter(specs), baseline=base, progress=progress)
    echo(format_table(timing))
    echo("\n== which file where")
    echo(f"TensorRT (Jetson, servers): {paths['fp16'].name} (FP16, attention fusible) or {paths['int8'].name} "
         f"(INT8 convolutions, FP16 attention); build on the device (lines above). Legacy implicit INT8 on 10.x: "
         f"{paths['cache'].name}.")
    echo(f"ONNX Runtime (CPU): {paths['ort'].name} (FP32, fused attention: flat memory at any size) or "
         f"{paths['ort_int8'].name} (INT8 convolutions). {paths['onnx'].name} is the portable reference.")
    return {**{k: str(v) for k, v in paths.items()}, "passed": all(r.passed for r in results), "results": results}


def engine_step(paths: dict, *, echo, progress) -> list[str]:
    """Build fp16 and int8 engines where TensorRT and a GPU are present; else say so and print trtexec lines."""
    from exporter.engine import build_engine, trtexec_lines
    from exporter.trt_build import current_device, installed_tensorrt_version
    from exporter.trt_plan import BuildOptions

    version = installed_tensorrt_version()
    reason = "tensorrt is not installed" if version is None else (
        "no CUDA GPU is visible" if current_device() is None else None)
    if reason:
        echo(f"skipped TensorRT engines: {reason}; build them on the device with:")
        for key in ("fp16", "int8"):
            for line in trtexec_lines(paths[key], paths[key].with_suffix(".engine"), BuildOptions()):
                echo(line)
        return []
    built = []
    for key in ("fp16", "int8"):
        engine = paths[key].with_suffix(".engine")
        result = build_engine(paths[key], engine, BuildOptions(), say=progress)
        echo(f"built {engine} with TensorRT {version} ({result.seconds:.1f} s, {result.size / 2**20:.1f} MiB)")
        paths[f"{key}_engine"] = engine
        built.append(f"{key}_engine")
    return built
