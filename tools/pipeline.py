"""The main job (``xattn deploy``): every step the toolkit offers, on one model, into one folder.

export (verified) -> inspect -> two families of artifacts:

* for TensorRT: ``model.fp16.onnx`` (attention FP16, scale on Q: the fused form) and ``model.int8.onnx``
  (Q/DQ on convolution inputs and weights, the rest FP16) + TensorRT's calibration cache;
* for ONNX Runtime: ``model.ort.onnx`` (FP32, attention fused into MultiHeadAttention) and
  ``model.ort.int8.onnx`` (QLinearConv-friendly Q/DQ, attention fused);
* for OpenVINO, where it is installed: ``model.ov.onnx`` (FP32, each attention block's queries in slices: run at
  bf16 where the CPU has it) and ``model.ov.int8.onnx`` (the same with int8 Q and K^T in the score product);

-> validate all of them against PyTorch on held-out photos (different crops than calibration) ->
reports -> a short benchmark -> which file to use where.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from xattn.registry import LoadedModel
from xattn.errors import XattnError

from runtime.validate import HELD_OUT_SEED as VALIDATION_SEED   # other crops than calibration's seed 0


#: Every file the main job writes, relative to its folder (published together, see run_pipeline).
ARTIFACTS = {"onnx": "model.onnx", "fp16": "model.fp16.onnx", "int8": "model.int8.onnx",
             "ranges": "model.ranges.json", "cache": "model.int8.cache", "ort": "model.ort.onnx",
             "ort_int8": "model.ort.int8.onnx", "ov": "model.ov.onnx", "ov_int8": "model.ov.int8.onnx"}


def check_data_source(spec: str) -> None:
    """Before any file is written: the data source exists (a keyword, pkg.mod:function or a path)."""
    from xattn.data import DataError

    if spec in ("shipped", "synthetic"):
        if spec == "shipped":
            from xattn.data import shipped_photo_folder

            shipped_photo_folder()
        return
    if ":" in spec and not Path(spec).exists():
        return   # a pkg.mod:function the user named; imported when used
    if not Path(spec).exists():
        raise DataError(f"--data {spec} does not exist", hint="give a folder, .csv, .npz, 'shipped' or pkg.mod:function")


def run_pipeline(model: LoadedModel, output_dir: Path, *, echo: Callable[[str], None],
                 progress: Callable[[str], None], data: str = "shipped", samples: int = 64,
                 int8_target_rel_l2: float | None = 0.011, export_settings=None, benchmark: bool = True) -> dict:
    """Make every artifact and validate it. Returns the paths of what it made and whether all passed.

    The set is made in a private staging folder inside ``output_dir`` and published only when every
    step ran: an interrupted or failed run leaves the previous set as it was, never a mix of two runs.
    Artifacts that fail validation are published as ``*.failed.*`` (their report says why), never under
    the name of a good one.
    """
    import shutil
    import tempfile

    from xattn.fileio import check_writable

    check_data_source(data)
    check_writable(output_dir / "model.onnx")
    stage = Path(tempfile.mkdtemp(prefix=".xattn-staging-", dir=output_dir))
    shown = lambda text: text.replace(str(stage), str(output_dir))   # noqa: E731 - messages name final paths
    try:
        if (output_dir / ARTIFACTS["ranges"]).is_file():   # reused when still current for model and data
            shutil.copy2(output_dir / ARTIFACTS["ranges"], stage / ARTIFACTS["ranges"])
        summary = _make_set(model, stage, echo=lambda m: echo(shown(m)), progress=lambda m: progress(shown(m)),
                            data=data, samples=samples, int8_target_rel_l2=int8_target_rel_l2,
                            export_settings=export_settings, benchmark=benchmark)
        failed = {Path(r.artifact).name for r in summary["results"] if not r.passed}
        published = _publish(stage, output_dir, failed)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    for name in sorted(failed):
        echo(f"FAILED artifacts are kept as {published[name]} (see {output_dir / 'reports'})")
    not_made = summary.get("not_made", {})
    echo(f"\n{'PASS' if summary['passed'] else 'FAIL'}: {len(summary['results']) - len(failed)} of "
         f"{len(summary['results'])} artifacts pass"
         + (f" ({len(not_made)} form(s) could not be made: {', '.join(ARTIFACTS[k] for k in not_made)})" if not_made else "")
         + f"; everything is in {output_dir}")
    return {**{k: str(output_dir / Path(v).name) for k, v in summary.items() if k in ARTIFACTS},
            "passed": summary["passed"], "results": summary["results"], "not_made": not_made}


def _publish(stage: Path, output_dir: Path, failed: set[str]) -> dict[str, Path]:
    """Move every staged file into ``output_dir`` (each an atomic rename); stage paths in text reports
    become final ones; failed artifacts get a ``.failed`` infix and their good-looking name is removed."""
    import os

    published = {}
    for source in sorted(p for p in stage.rglob("*") if p.is_file()):
        relative = source.relative_to(stage)
        target = output_dir / relative
        if source.name in failed:
            target.unlink(missing_ok=True)   # never leave an older good-looking file of that name beside it
            target = target.with_name(f"{source.stem}.failed{source.suffix}")
        target.parent.mkdir(parents=True, exist_ok=True)
        if source.suffix in (".json", ".md", ".xml"):
            source.write_text(source.read_text(encoding="utf-8").replace(str(stage), str(output_dir)),
                              encoding="utf-8")
        os.replace(source, target)
        published[source.name] = target
    return published


def _make_set(model: LoadedModel, output_dir: Path, *, echo: Callable[[str], None],
              progress: Callable[[str], None], data: str, samples: int, int8_target_rel_l2: float | None,
              export_settings=None, benchmark: bool = True) -> dict:
    """Every step of the main job into ``output_dir`` (the staging folder)."""
    from xattn.data import DataSettings
    from calibration.ranges import CalibrationSettings
    from exporter.inspect_onnx import format_inspection, inspect_onnx
    from exporter.onnx_export import ExportSettings, export_onnx
    from runtime.validate import ValidateOptions, validate_artifact
    from tools.render import export_summary, validation_table, write_reports
    from tools.steps import fp16_step, openvino_int8_step, optimize_step, quantize_step

    paths = {key: output_dir / name for key, name in ARTIFACTS.items()}
    echo("== export")
    result = export_onnx(model, paths["onnx"], export_settings or ExportSettings(), progress=progress)
    echo(export_summary(model, result))
    echo("\n== inspect")
    inspection = inspect_onnx(paths["onnx"])
    echo(format_inspection(inspection))
    scores_at_max = (inspection.get("attention") or {}).get("naive_scores_bytes_at_max")

    # Each backend form is made if it can be: one that cannot (attention no rewrite applies to, a native
    # failure) becomes one line with the reason, and the files that were made still validate and publish.
    not_made: dict[str, str] = {}

    def form(key: str, title: str, make: Callable[[], object]) -> None:
        echo(f"\n== {title}")
        try:
            make()
        except XattnError as exc:
            not_made[key] = str(exc)
            echo(f"not made: {paths[key].name}: {exc}")
            for leftover in (paths[key], paths["cache"] if key == "int8" else None):
                if leftover is not None:
                    leftover.unlink(missing_ok=True)

    form("fp16", "for TensorRT: fp16", lambda: fp16_step(paths["onnx"], paths["fp16"], check_spec=data, echo=echo))
    form("int8", "for TensorRT: calibrate + int8", lambda: quantize_step(
        paths["onnx"], paths["int8"], data_spec=data, data_settings=DataSettings(samples=samples),
        settings=CalibrationSettings(), cache=paths["cache"], ranges_output=paths["ranges"],
        target_rel_l2=int8_target_rel_l2, echo=echo, progress=progress))
    if paths["ranges"].is_file():
        echo(f"ranges: {paths['ranges']}")
    form("ort", "for ONNX Runtime: attention fused (fp32)", lambda: optimize_step(
        paths["onnx"], paths["ort"], reference=model.name, checkpoint=model.checkpoint, echo=echo))
    form("ort_int8", "for ONNX Runtime: int8 (same ranges)", lambda: quantize_step(
        paths["onnx"], paths["ort_int8"], data_spec=data, data_settings=DataSettings(samples=samples),
        settings=CalibrationSettings(), ranges=paths["ranges"] if paths["ranges"].is_file() else None,
        target="onnxruntime", target_rel_l2=int8_target_rel_l2, echo=echo, progress=progress))
    tried = ["onnx", "fp16", "int8", "ort", "ort_int8"]
    if openvino_installed():
        tried += ["ov", "ov_int8"]
        form("ov", "for OpenVINO: attention in query slices (fp32)", lambda: optimize_step(
            paths["onnx"], paths["ov"], target="openvino", reference=model.name, checkpoint=model.checkpoint,
            echo=echo))
        form("ov_int8", "for OpenVINO: int8 attention scores", lambda: openvino_int8_step(
            paths["onnx"], paths["ov_int8"], data_spec=data, data_settings=DataSettings(samples=samples), echo=echo,
            progress=progress))
    else:
        echo("\n(OpenVINO is not installed: no model.ov.onnx or model.ov.int8.onnx; pip install "
             "'xattn-deploy[openvino]' for them)")

    echo("\n== TensorRT engines")
    made = [key for key in tried if key not in not_made]
    validated = made + engine_step({k: v for k, v in paths.items() if k not in not_made}, echo=echo,
                                   progress=progress)

    echo("\n== validate against PyTorch")
    runners: dict = {}
    cache: dict = {}   # the PyTorch reference runs once per held-out input for all artifacts
    held_out = DataSettings(samples=min(16, samples), seed=VALIDATION_SEED)
    results = []
    for key in validated:
        progress(f"validating {paths[key].name}")
        options = ValidateOptions(reference=model.name, checkpoint=model.checkpoint, data=data,
                                  data_settings=held_out)   # the model the user named, built-in or not
        results.append(validate_artifact(paths[key], options, reference_runners=runners, reference_cache=cache))
    echo(validation_table(results))
    reports = output_dir / "reports"
    write_reports(results, reports / "accuracy.json", reports / "accuracy.xml", reports / "accuracy.md")
    echo(f"reports: {reports}/accuracy.{{json,xml,md}}")

    passed = {key for key, result in zip(validated, results) if result.passed}
    fastest = None
    if benchmark:
        echo("\n== benchmark (short; see 'xattn bench' and benchmarks/latency.py for real figures)")
        from runtime.bench import BenchSettings, benchmark as run_benchmark, format_table
        from runtime.bench_setup import make_runners, work_counter

        specs = [str(paths[key]) for key in validated]
        bench_runners, base = make_runners(specs, threads=None, providers=None, checkpoint=model.checkpoint,
                                           torch_baseline=True, reference=model.name)   # the user named it
        cpu_forms = {paths[key].name: (key, "onnxruntime") for key in ("ort", "ort_int8", "onnx", "ov", "ov_int8")
                     if key in passed}
        key_of = {path.name: key for key, path in paths.items()}
        for label, path, provider in openvino_candidates(paths, passed, model, runners, cache, echo, progress):
            from runtime.open import open_runner

            bench_runners[label] = open_runner(path, providers=[provider], name=label)
            cpu_forms[label] = (key_of[path.name], "openvino")
        shapes = {name: (1, channels, 64, 64) for name, channels in model.io.inputs.items()}
        timing = run_benchmark(bench_runners, [shapes], BenchSettings(warmup=2, duration=1.0, min_iterations=10),
                           work=work_counter(specs), baseline=base, progress=progress)
        echo(format_table(timing))
        fastest = fastest_cpu_form(timing.rows, cpu_forms, paths["ort"].name, scores_at_max=scores_at_max)
    echo("\n== which file where")
    for line in which_file_where(paths, passed, not_made):
        echo(line)
    if fastest:
        echo(fastest)
    return {**{k: str(v) for k, v in paths.items() if k not in not_made}, "passed": all(r.passed for r in results),
            "results": results, "not_made": not_made}


#: Per backend, the forms in order of preference and how each is described.
_CHOICES = {
    "TensorRT (Jetson, servers)": [("fp16", "FP16"), ("int8", "INT8 convolutions, FP16 elsewhere"),
                                   ("onnx", "FP32: TensorRT builds it as it is")],
    "ONNX Runtime (CPU)": [("ort", "FP32, fused attention: flat memory at any size"),
                           ("ort_int8", "INT8 convolutions"), ("onnx", "FP32, the plain graph")],
    "OpenVINO (CPU)": [("ov", "FP32 file, queries in slices: flat memory; --providers openvino-bf16 where the CPU "
                              "has BF16"), ("ov_int8", "the same with int8 attention scores: faster")],
}


def openvino_installed() -> bool:
    import importlib.util

    return importlib.util.find_spec("openvino") is not None


def openvino_candidates(paths: dict, passed: set[str], model, runners, cache, echo, progress) -> list[tuple]:
    """OpenVINO forms of the files that passed (FP32 and INT8), where OpenVINO is installed: f32, and bf16 where
    the CPU has it, each validated against PyTorch on the same held-out data first (only those that pass are
    candidates)."""
    if not openvino_installed():
        return []
    from runtime.validate import ValidateOptions, validate_artifact
    from xattn.cpu import cpu_features, has_bf16
    from xattn.data import DataSettings

    providers = ["openvino"] + (["openvino-bf16"] if has_bf16(cpu_features()) else [])
    found = []
    # INT8 files too: OpenVINO runs their Q/DQ as INT8 kernels (VNNI where present), the rest at the precision
    # asked (measured here: bf16 on model.int8.onnx 1.56x ORT's fused file at 128x128)
    for key in ("ov", "ov_int8", "ort", "onnx", "ort_int8", "int8"):
        if key not in passed:
            continue
        for provider in providers:
            label = f"{paths[key].name} [{provider}]"
            progress(f"validating {label}")
            options = ValidateOptions(reference=model.name, checkpoint=model.checkpoint, data="shipped",
                                      data_settings=DataSettings(samples=4, seed=VALIDATION_SEED), providers=[provider])
            result = validate_artifact(paths[key], options, reference_runners=runners, reference_cache=cache)
            worst = max(c.metrics.rel_l2 for c in result.cases)
            echo(f"{'PASS' if result.passed else 'FAIL'} {label} ({result.precision}; worst rel. L2 {worst:.2g})")
            if result.passed:
                found.append((label, paths[key], provider))
    return found


#: Forms whose memory stays flat, by runtime: ONNX Runtime's fused MultiHeadAttention and the query slices (it
#: tiles neither the plain graph nor anything else); on OpenVINO only the slices (compiled per shape, it turns
#: MultiHeadAttention into plain matmuls too: 2.8 GiB at 192x192, benchmarks/cpu_backends.py).
FLAT_FORMS = {"onnxruntime": ("ort", "ort_int8", "ov", "ov_int8"), "openvino": ("ov", "ov_int8")}


def fastest_cpu_form(rows, forms: dict[str, tuple[str, str]], baseline: str, *, scores_at_max: int | None = None,
                     budget: int | None = None) -> str | None:
    """The line naming the fastest CPU form that passed, measured here, as a ratio to the ONNX Runtime fused file.

    ``forms`` maps each benchmark label to ``(form key, runtime)``, e.g. ``("ov_int8", "openvino")``. A form that
    holds the ``N1 x N2`` scores (not in :data:`FLAT_FORMS`) is not recommended when ``scores_at_max`` (float32
    bytes at the max shapes) exceeds ``budget`` (default: ``xattn check``'s 4 GiB): fast at 64x64, it would not fit.
    """
    from exporter.trt_lint import DEFAULT_MEMORY_BUDGET
    from xattn.cpu import describe_cpu
    from xattn.memory import format_size

    budget = DEFAULT_MEMORY_BUDGET if budget is None else budget

    over = {label for label, (key, runtime) in forms.items() if key not in FLAT_FORMS[runtime]} \
        if (scores_at_max or 0) > budget else set()
    timed = {row.backend: row.stats.p50 for row in rows
             if row.backend in forms and row.backend not in over and row.stats.p50 > 0}
    if not timed:
        return None
    best = min(timed, key=timed.get)
    ratio = f", {timed[baseline] / timed[best]:.2f}x {baseline}" if baseline in timed and best != baseline else ""
    cpu = describe_cpu()
    left_out = (f" Not recommended: {len(over)} form(s) that hold the N1 x N2 scores ({format_size(scores_at_max)} at "
                f"the max shapes, over the {format_size(budget)} budget)." if over else "")
    return (f"fastest CPU form measured here: {best} ({timed[best]:.1f} ms at 64x64{ratio}; "
            f"{cpu['cpu_model'] or 'this CPU'}: {', '.join(cpu['cpu_features']) or 'features unknown'}).{left_out}")


def which_file_where(paths: dict, passed: set[str], not_made: dict[str, str]) -> list[str]:
    """The last lines of the main job: per backend, only files that exist and passed validation, best first;
    a form that was not made (its reason is on the line where it was tried) or failed validation is named
    as such, never recommended."""
    lines = []
    for backend, choices in _CHOICES.items():
        if backend.startswith("OpenVINO") and not openvino_installed():
            continue   # nothing was made for it
        good = [f"{paths[key].name} ({what})" for key, what in choices if key in passed]
        missing = [f"{paths[key].name} {'not made' if key in not_made else 'FAILED validation'}"
                   for key, _ in choices if key not in passed and key != "onnx"]
        text = f"{backend}: " + (" or ".join(good) if good else "no file passed")
        if backend.startswith("TensorRT") and any(k in passed for k in ("fp16", "int8")):
            text += "; build on the device (lines above)"
            if "int8" in passed and paths["cache"].is_file():
                text += f"; legacy implicit INT8 on 10.x: {paths['cache'].name}"
        lines.append(text + (f" ({'; '.join(missing)})" if missing else "") + ".")
    return lines


def engine_step(paths: dict, *, echo, progress) -> list[str]:
    """Build fp16 and int8 engines where TensorRT and a GPU are present; else say so and print trtexec lines."""
    from exporter.engine import build_engine, trtexec_lines
    from xattn.tensorrt import current_device, installed_tensorrt_version
    from xattn.trt_plan import BuildOptions

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
