"""A Triton model repository from the toolkit's artifacts, checked by Triton itself before it is written.

One model per artifact: ``backend: "onnxruntime"`` with ``1/model.onnx`` for an ONNX file, ``backend:
"tensorrt"`` with ``1/model.plan`` for an engine. Each ``config.pbtxt`` is built with Triton's own
protobuf schema (``tritonclient.grpc.model_config_pb2``: unknown fields and enum values cannot be
written), parsed back from its text, and the whole repository is loaded into the real Triton core of
the ``nvidia-pytriton`` wheel (:class:`xattn.triton.TritonCore`) with ``--model-control-mode explicit``.
That core has no ``onnxruntime``/``tensorrt`` backends (NVIDIA's containers have them), so a model is
accepted when Triton stops at exactly "backend not installed here" or "no GPU here", after its own
configuration checks passed; any other refusal is an error and nothing is written.

Dynamic batching: Triton batches requests only when every input has the same shape in each of them
(its ragged-batching guide), so maps of different sizes are never mixed in a batch; a short
``max_queue_delay_microseconds`` lets same-shape requests meet without delaying the rest much.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from xattn import __version__
from xattn.errors import ArtifactError, BadInputError, CheckFailedError, MissingDependencyError
from xattn.fileio import sha256_file
from xattn.shapes import parse_shape_set
from xattn.triton import SERVE_HINT

#: Triton's data types by ONNX element type name
TRITON_TYPES = {"float32": "TYPE_FP32", "float16": "TYPE_FP16", "bfloat16": "TYPE_BF16", "float64": "TYPE_FP64",
                "int64": "TYPE_INT64", "int32": "TYPE_INT32", "int8": "TYPE_INT8", "uint8": "TYPE_UINT8",
                "bool": "TYPE_BOOL"}
#: How Triton's answer reads when only this machine stopped the load (its own checks passed)
ACCEPTED_STOPS = {"backend not installed here": re.compile(r"unable to find backend library|unable to load backend",
                                                           re.I),
                  "no GPU here": re.compile(r"no GPUs? (are|is) available|unable to get number of CUDA devices|"
                                            r"GPU instances not supported|no CUDA-capable device", re.I)}


@dataclass
class TritonSettings:
    """How to serve the artifacts. ``None`` means the default.

    Attributes:
        name: model name (with several artifacts: the prefix of each model's name; default: from the file).
        max_batch_size: Triton's ``max_batch_size`` (default: the largest batch the artifact records);
            never above what the artifact was exported and verified for.
        instances: model instances per device (``instance_group.count``, default 1).
        kind: ``cpu`` or ``gpu`` (engines need ``gpu``).
        delay_us: the dynamic batcher's ``max_queue_delay_microseconds`` (default 100; 0 turns dynamic
            batching off).
        trt_accelerator: for ONNX files on GPU, ONNX Runtime's TensorRT execution provider with this
            ``precision_mode`` (``FP16`` or ``INT8``; never a calibration table: Q/DQ files carry scales).
        check: load the repository into Triton's core before writing it (default True).
    """

    name: str | None = None
    max_batch_size: int | None = None
    instances: int = 1
    kind: str = "cpu"
    delay_us: int = 100
    trt_accelerator: str | None = None
    check: bool = True


@dataclass
class TritonModel:
    name: str
    artifact: str
    backend: str
    max_batch_size: int
    config: str
    verdict: str = "not checked"
    triton_said: str = ""
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "artifact": self.artifact, "backend": self.backend,
                "max_batch_size": self.max_batch_size, "verdict": self.verdict, "triton_said": self.triton_said,
                "notes": self.notes}


def model_config_pb2():
    try:
        from tritonclient.grpc import model_config_pb2
    except ImportError as exc:
        raise MissingDependencyError("checking Triton configurations needs tritonclient", hint=SERVE_HINT) from exc
    return model_config_pb2


def parse_config(text: str, where: str = "config.pbtxt"):
    """Parse ``config.pbtxt`` text with Triton's own schema (syntax, field names, enum values)."""
    from google.protobuf import text_format

    config = model_config_pb2().ModelConfig()
    try:
        text_format.Parse(text, config)
    except text_format.ParseError as exc:
        raise CheckFailedError(f"{where} does not parse as a Triton ModelConfig: {exc}") from exc
    return config


@dataclass
class _Io:
    name: str
    dtype: str
    dims: list[int]   # -1 for dynamic axes, the batch axis included


def _artifact_io(path: Path) -> tuple[str, list[_Io], list[_Io], dict[str, Any], list]:
    """(backend, inputs, outputs, record, ONNX nodes) of an ONNX file or an engine with its sidecar."""
    from xattn.onnxfile import load_onnx
    from xattn.provenance import get_onnx_metadata

    suffix = path.suffix.lower()
    if suffix == ".onnx":
        model = load_onnx(path)
        return ("onnxruntime", *_onnx_io(model), get_onnx_metadata(model), list(model.graph.node))
    if suffix in (".engine", ".plan", ".trt"):
        from xattn.trt_plan import read_sidecar

        sidecar = read_sidecar(path)
        if sidecar is None:
            raise ArtifactError(f"{path} has no sidecar ({path.name}.json): its inputs and TensorRT version are unknown",
                                hint="serve engines built by xattn build, with their sidecar beside them")
        source = (sidecar.get("source_onnx") or {}).get("path")
        onnx_path = path.parent / source if source else None
        if onnx_path is None or not onnx_path.is_file():
            raise ArtifactError(f"{path}: the ONNX it was built from ({source or 'unknown'}) is not beside it; its "
                                "output shapes come from that file", hint="copy the source ONNX next to the engine")
        if sha256_file(onnx_path) != (sidecar.get("source_onnx") or {}).get("sha256"):
            raise ArtifactError(f"{onnx_path} is not the ONNX {path.name} was built from (sha256 differs)")
        inputs, outputs = _onnx_io(load_onnx(onnx_path))
        record = {**(sidecar.get("source") or {}), "precision": sidecar.get("precision"),
                  "tensorrt_version": sidecar.get("tensorrt_version"),
                  "engine_profiles": _engine_profiles(sidecar, path),
                  "version_compatible": sidecar.get("version_compatible") is True,
                  "dla_core": (sidecar.get("plan") or {}).get("dla_core") if isinstance(sidecar.get("plan"), dict) else None}
        return "tensorrt", inputs, outputs, record, []
    raise ArtifactError(f"{path}: Triton serves .onnx files and engines (.engine/.plan), not {suffix or 'this'}")


def _engine_profiles(sidecar: dict, path: Path) -> list[tuple[dict, dict]]:
    """(min, max) shape sets of every optimization profile an engine's sidecar records, in profile order."""
    profiles = sidecar.get("profiles")
    if profiles is None:
        return []
    try:
        return [(parse_shape_set(p["min"]), parse_shape_set(p["max"])) for p in profiles]
    except Exception as exc:   # the sidecar is data: a malformed one is one clear line
        raise ArtifactError(f"{path}.json: its profiles are not min/max shape sets ({exc})",
                            hint="rebuild the engine with xattn build") from None


def _onnx_io(model) -> tuple[list[_Io], list[_Io]]:
    from onnx import helper

    initializers = {i.name for i in model.graph.initializer}

    def io(value) -> _Io:
        tensor = value.type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") else -1 for d in tensor.shape.dim]
        return _Io(value.name, helper.tensor_dtype_to_np_dtype(tensor.elem_type).name, dims)

    return ([io(v) for v in model.graph.input if v.name not in initializers], [io(v) for v in model.graph.output])


def model_name_for(path: Path, settings: TritonSettings, several: bool) -> str:
    stem = re.sub(r"[^A-Za-z0-9_-]+", "_", path.name.rsplit(".", 1)[0] if path.suffix else path.name).strip("_")
    if settings.name:
        name = f"{settings.name}_{stem}" if several else settings.name
    else:
        name = stem or "model"
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
        raise BadInputError(f"model name {name!r} has characters Triton's repository cannot hold",
                            hint="use letters, digits, '_', '-' and '.'")
    return name


def build_config(path: Path, name: str, settings: TritonSettings):
    """The ModelConfig (Triton's protobuf) for one artifact, and notes on choices made."""
    pb = model_config_pb2()
    backend, inputs, outputs, record, nodes = _artifact_io(path)
    notes: list[str] = []
    if backend == "tensorrt" and settings.kind != "gpu":
        raise BadInputError(f"{path.name} is a TensorRT engine: it runs on a GPU only", hint="use --kind gpu")
    recorded_max = parse_shape_set(record["max_shapes"]) if record.get("max_shapes") else {}
    recorded_min = parse_shape_set(record["min_shapes"]) if record.get("min_shapes") else {}
    batch_dynamic = all(i.dims and i.dims[0] == -1 for i in inputs)
    top = max((shape[0] for shape in recorded_max.values()), default=None)
    profiles = record.get("engine_profiles") or []
    if backend == "tensorrt" and profiles:
        # Triton's tensorrt backend checks max_batch_size against each served profile's MAX batch, not the
        # ONNX export's (tensorrt_backend src/model_state.cc, GetProfileMaxBatchSize): the engine decides
        top = min(min(shape[0] for shape in high.values()) for _, high in profiles)
        low_batch = max(max(shape[0] for shape in low.values()) for low, _ in profiles)
        if low_batch > 1:
            notes.append(f"a profile's MIN batch is {low_batch}: requests with fewer samples do not fit it")
    if batch_dynamic:
        if top is None:
            raise ArtifactError(f"{path.name} records no batch range", hint="export it with xattn export, or give "
                                "--max-batch-size")
        max_batch = settings.max_batch_size or top
        if max_batch > top:
            raise BadInputError(f"--max-batch-size {max_batch} is above the batch {top} that {path.name} was exported "
                                "and verified for", hint=f"use at most {top}, or re-export with a larger --max-shapes")
    else:
        max_batch = 0   # batch axis fixed: Triton sees the full shape, no batching
        notes.append("batch axis fixed in the file: max_batch_size 0, no dynamic batching")
    config = pb.ModelConfig(name=name, backend=backend, max_batch_size=max_batch)
    for source, target in ((inputs, config.input), (outputs, config.output)):
        for tensor in source:
            if tensor.dtype not in TRITON_TYPES:
                raise ArtifactError(f"{path.name}: {tensor.name} has dtype {tensor.dtype}, which Triton has no type for")
            entry = target.add(name=tensor.name, dims=tensor.dims[1:] if max_batch else tensor.dims)
            entry.data_type = pb.DataType.Value(TRITON_TYPES[tensor.dtype])
    kind = pb.ModelInstanceGroup.Kind.Value("KIND_GPU" if settings.kind == "gpu" else "KIND_CPU")
    group = config.instance_group.add(kind=kind, count=settings.instances)
    if backend == "tensorrt" and len(profiles) > 1:
        # unlisted, Triton's tensorrt backend makes a context for profile 0 only (instance_state.cc)
        group.profile.extend(str(i) for i in range(len(profiles)))
        notes.append(f"every instance serves all {len(profiles)} optimization profiles")
    if backend == "tensorrt" and record.get("dla_core") is not None:
        # DLA engines run on the core they were built for: Triton's secondary device (tensorrt_model_instance.cc)
        group.secondary_devices.add(kind=pb.ModelInstanceGroup.SecondaryDevice.SecondaryDeviceKind.Value("KIND_NVDLA"),
                                    device_id=int(record["dla_core"]))
        notes.append(f"DLA core {record['dla_core']} (secondary_devices KIND_NVDLA)")
    if backend == "tensorrt" and record.get("version_compatible"):
        notes.append("version-compatible plan: start tritonserver with --backend-config=tensorrt,version-compatible=true "
                     "(else Triton does not allow its host code and the plan does not load)")
    if max_batch and settings.delay_us > 0:
        config.dynamic_batching.max_queue_delay_microseconds = settings.delay_us
        notes.append(f"dynamic batching up to {max_batch}, waiting at most {settings.delay_us} us; Triton batches only "
                     "requests whose inputs have the same shape, so maps of different sizes are never mixed")
    if settings.trt_accelerator:
        if backend != "onnxruntime" or settings.kind != "gpu":
            raise BadInputError("--trt-accelerator is for ONNX files served on GPU (ONNX Runtime's TensorRT provider)")
        accelerator = config.optimization.execution_accelerators.gpu_execution_accelerator.add(name="tensorrt")
        accelerator.parameters["precision_mode"] = settings.trt_accelerator
        if settings.trt_accelerator == "INT8":
            notes.append("INT8 through ONNX Runtime's TensorRT provider without a calibration table: the Q/DQ file "
                         "carries its scales (a table makes session creation fail for Q/DQ models)")
    if backend == "onnxruntime":
        from xattn.ort_session import LEVEL_KEY, LEVEL_VERSION_KEY, OPTIMIZATION_LEVELS, TRITON_GRAPH_LEVEL

        level = record.get(LEVEL_KEY)
        if level in OPTIMIZATION_LEVELS and TRITON_GRAPH_LEVEL[level] is not None:
            # the file crashed ONNX Runtime at the levels above this one when it was written: Triton's
            # onnxruntime backend defaults to ALL, so set the level that worked
            config.optimization.graph.level = TRITON_GRAPH_LEVEL[level]
            notes.append(f"{path.name} loads in ONNX Runtime at {level} only (probed with "
                         f"{record.get(LEVEL_VERSION_KEY)}; it crashed above): optimization.graph.level "
                         f"{TRITON_GRAPH_LEVEL[level]}")
    if any(n.domain == "com.microsoft" for n in nodes) and settings.trt_accelerator:
        raise BadInputError(f"{path.name} holds com.microsoft ops that TensorRT cannot parse",
                            hint="serve it without --trt-accelerator, or serve the TensorRT-targeted file")
    provenance = {"xattn.toolkit_version": __version__, "xattn.model": record.get("model"),
                  "xattn.precision": record.get("precision") or "fp32", "xattn.target": record.get("target"),
                  "xattn.source": path.name, "xattn.source_sha256": sha256_file(path),
                  "xattn.min_shapes": record.get("min_shapes"), "xattn.max_shapes": record.get("max_shapes")}
    if backend == "tensorrt":
        provenance["xattn.tensorrt_version"] = record.get("tensorrt_version")
        notes.append(f"TensorRT plan built with TensorRT {record.get('tensorrt_version')}: Triton's tensorrt backend "
                     "loads it only with that same TensorRT version (choose the container release that ships it)")
    for key, value in provenance.items():
        if value is not None:
            config.parameters[key].string_value = str(value)
    return config, backend, notes


def config_text(config) -> str:
    from google.protobuf import text_format

    return text_format.MessageToString(config)


def write_repository(artifacts: list[str | os.PathLike], output: str | os.PathLike,
                     settings: TritonSettings | None = None,
                     progress: Callable[[str], None] | None = None) -> list[TritonModel]:
    """Write a Triton model repository for ``artifacts`` to ``output`` (a new or empty folder).

    The repository is built in a staging folder beside ``output``, checked (schema, then Triton's core),
    and moved into place only when every model passes: a refused repository leaves nothing behind.
    """
    settings = settings or TritonSettings()
    say = progress or (lambda message: None)
    if settings.kind not in ("cpu", "gpu"):
        raise BadInputError(f"--kind {settings.kind!r} is not cpu or gpu")
    if settings.instances < 1:
        raise BadInputError("--instances must be at least 1")
    output = Path(output).resolve()   # "." has no name to put a staging folder beside
    from xattn.fileio import remove_abandoned

    remove_abandoned(output.parent, f".{output.name}.staging-*")
    if output.exists() and (not output.is_dir() or any(output.iterdir())):
        raise BadInputError(f"{output} exists and is not an empty folder: a repository is never written over files",
                            hint="name a new folder")
    paths = [Path(a) for a in artifacts]
    if not paths:
        raise BadInputError("no artifacts to serve")
    for path in paths:
        if not path.is_file():
            raise ArtifactError(f"{path} does not exist")
    names = [model_name_for(p, settings, len(paths) > 1) for p in paths]
    if len(set(names)) != len(names):
        raise BadInputError(f"two artifacts would get the same model name: {', '.join(names)}",
                            hint="rename one, or give --name")
    models: list[TritonModel] = []
    configs = []
    for path, name in zip(paths, names):   # every config first: a bad artifact costs no copying
        config, backend, notes = build_config(path, name, settings)
        text = config_text(config)
        parse_config(text, f"{name}/config.pbtxt")   # the written text, read back with Triton's schema
        configs.append((path, name, backend, text))
        models.append(TritonModel(name, str(path), backend, config.max_batch_size, text, notes=notes))
    staging = output.with_name(f".{output.name}.staging-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    try:
        staging.mkdir(parents=True)
        for path, name, backend, text in configs:
            folder = staging / name / "1"
            folder.mkdir(parents=True)
            shutil.copyfile(path, folder / ("model.plan" if backend == "tensorrt" else "model.onnx"))
            (staging / name / "config.pbtxt").write_text(text)
            if backend == "tensorrt":
                shutil.copyfile(f"{path}.json", staging / name / "1" / "model.plan.json")
        (staging / "README.md").write_text(repository_readme(models, settings))
        if settings.check:
            check_with_triton(staging, models, say)
        # what Triton said, kept with the repository (top-level files are not models to Triton)
        (staging / "xattn-triton.json").write_text(json.dumps({"toolkit_version": __version__, "kind": settings.kind,
                                                               "models": [m.as_dict() for m in models]}, indent=2) + "\n")
        if output.exists():
            output.rmdir()   # empty, checked above
        os.replace(staging, output)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return models


def check_with_triton(repository: Path, models: list[TritonModel], say: Callable[[str], None]) -> None:
    """Load every model into Triton's core; only "backend not installed here" or "no GPU here" may stop it."""
    from xattn.triton import TritonCore

    say(f"loading {len(models)} model(s) into Triton's core (nvidia-pytriton's tritonserver)")
    with TritonCore(repository) as core:
        for model in models:
            loaded, message = core.load(model.name)
            model.triton_said = message
            if loaded:
                model.verdict = "loaded by Triton"
                continue
            stop = next((label for label, pattern in ACCEPTED_STOPS.items() if pattern.search(message)), None)
            if stop is None:
                raise CheckFailedError(f"Triton refused model {model.name!r} ({model.artifact}): {message}; nothing "
                                       "was written")
            model.verdict = f"accepted by Triton's checks; stopped at: {stop}"


def repository_readme(models: list[TritonModel], settings: TritonSettings) -> str:
    gpus = "--gpus all " if settings.kind == "gpu" else ""
    compatible = " --backend-config=tensorrt,version-compatible=true" if any(
        "version-compatible plan" in note for m in models for note in m.notes) else ""
    lines = ["# Triton model repository (written by xattn-deploy)", "",
             "Start it with NVIDIA's Triton container, which carries the onnxruntime and tensorrt backends:", "",
             "```bash",
             f"docker run --rm {gpus}-p 8000:8000 -p 8001:8001 -v \"$PWD\":/models \\",
             f"    nvcr.io/nvidia/tritonserver:<release>-py3 tritonserver --model-repository=/models{compatible}",
             "```", "",
             f"(instances: {settings.instances} per {'GPU' if settings.kind == 'gpu' else 'host'}, kind "
             f"{settings.kind}). Then any KServe v2 client (tritonclient, perf_analyzer) talks to port 8000 (HTTP) "
             "or 8001 (gRPC).", "", "| model | backend | max batch | note |", "| --- | --- | ---: | --- |"]
    for model in models:
        lines.append(f"| {model.name} | {model.backend} | {model.max_batch_size} | {'; '.join(model.notes)} |")
    engines = [m for m in models if m.backend == "tensorrt"]
    if engines:
        lines += ["", "TensorRT plans load only with the TensorRT version that built them (in each model's "
                      "`config.pbtxt` parameters and `1/model.plan.json`): pick the container release whose TensorRT is "
                      "that version (NVIDIA's Frameworks Support Matrix lists it per release)."]
    lines += ["", "Inputs of different heights and widths are never batched together: Triton's dynamic batcher "
                  "groups only requests whose inputs have equal shapes.", ""]
    return "\n".join(lines)
