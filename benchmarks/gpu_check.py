"""The device check: what this toolkit says about TensorRT, run on a machine that has it (review 2, section 6).

    python benchmarks/gpu_check.py --out gpu-check        # an NVIDIA GPU, TensorRT 10.x or 11.x, polygraphy

On the default model, in about 10 minutes on one GPU:

1. exports ``model.onnx`` and makes ``model.fp16.onnx``, ``model.int8.onnx`` (Q/DQ, shipped photos) and, on 11.x
   or 10.14+, the ``--attention-op onnx`` FP16 file;
2. builds each with two optimization profiles through ``xattn build`` (Polygraphy underneath), FP32 twice (TF32
   off, the default, and ``--tf32``);
3. runs the trtexec line ``xattn build`` prints for each (when ``trtexec`` is on PATH) and
   ``polygraphy inspect capability`` on each ONNX (when the polygraphy CLI is there);
4. reads each engine's layer list (TensorRT's engine inspector) and reports per engine whether attention fused
   (a fused MHA / attention kernel among the layers) or ran as separate MatMul/Softmax layers;
5. compares the TensorRT runner (Polygraphy's TrtRunner) and the CUDA-graph path against ONNX Runtime on the CPU
   at the OPT shape of both profiles (relative L2), and TF32 on vs off;
6. writes ``report.json`` and ``report.md`` into ``--out``.

Without TensorRT or a GPU it says what is missing in one line and exits 2: nothing here is faked. The parts that
need no GPU (the plan of builds, reading a layer list, the report) are tested in tests/test_gpu_check.py.

Report format (``report.json``): ``{"format": "xattn-gpu-check/1", "environment": {...}, "builds": [{"name",
"onnx", "options", "engine", "seconds", "error"}], "trtexec": [{"name", "command", "returncode", "tail"}],
"capability": [{"onnx", "returncode", "tail"}], "fusion": [{"name", "attention_layers", "fused", "layers"}],
"accuracy": [{"name", "shapes", "runner", "rel_l2"}], "tf32": {"rel_l2_between": ...}}``; ``report.md`` is the
same as tables.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

REPORT_FORMAT = "xattn-gpu-check/1"
#: two profiles: small maps around 32x32, large around 96x96 (the default model's ranges hold both)
PROFILES = {"min": ["x1:1x3x16x16,x2:1x3x16x16", "x1:1x3x64x64,x2:1x3x64x64"],
            "opt": ["x1:1x3x32x32,x2:1x3x32x32", "x1:1x3x96x96,x2:1x3x96x96"],
            "max": ["x1:2x3x64x64,x2:2x3x64x64", "x1:2x3x128x128,x2:2x3x128x128"]}
#: a layer whose name or type says a fused attention kernel runs it (TensorRT names: _gemm_mha_v2, fmha,
#: "mha", "Attention"/"IAttention" in 11.x's layer list; a Myelin region that swallowed the block is named
#: after the ops it holds)
FUSED = re.compile(r"mha|fmha|attention", re.IGNORECASE)


def build_plan(trt_version: str | None) -> list[dict]:
    """The builds to run: (name, ONNX file, xattn build options). The ONNX Attention form only where TensorRT
    parses it (10.14+ and 11.x)."""
    from packaging.version import Version

    builds = [{"name": "fp16", "onnx": "model.fp16.onnx", "options": []},
              {"name": "int8", "onnx": "model.int8.onnx", "options": []},
              {"name": "fp32", "onnx": "model.onnx", "options": ["--precision", "fp32"]},
              {"name": "fp32-tf32", "onnx": "model.onnx", "options": ["--precision", "fp32", "--tf32"]}]
    if trt_version and Version(trt_version) >= Version("10.14"):
        builds.append({"name": "fp16-onnx-attention", "onnx": "model.fp16.attention.onnx", "options": []})
    for build in builds:
        for key in ("min", "opt", "max"):
            for shapes in PROFILES[key]:
                build["options"] += [f"--{key}-shapes", shapes]
    return builds


def attention_layers(layer_info: dict) -> dict:
    """From TensorRT's engine inspector JSON (``LayerInformationFormat.JSON``): the layers that compute
    attention, and whether one of them is a fused kernel. Layers are strings (names only, at the default
    profiling verbosity) or objects with ``Name`` and ``LayerType``/``TacticName``."""
    layers = layer_info.get("Layers") or []
    texts = []
    for layer in layers:
        if isinstance(layer, str):
            texts.append(layer)
        elif isinstance(layer, dict):
            texts.append(" ".join(str(layer.get(k, "")) for k in ("Name", "LayerType", "TacticName", "Metadata")))
    fused = [t for t in texts if FUSED.search(t)]
    separate = [t for t in texts if re.search(r"softmax", t, re.IGNORECASE) and not FUSED.search(t)]
    return {"layers": len(texts), "attention_layers": fused or separate, "fused": bool(fused) and not separate}


def markdown(report: dict) -> str:
    env = report["environment"]
    lines = [f"# xattn GPU check ({env.get('date')})", "",
             f"TensorRT {env.get('tensorrt')}, GPU {env.get('gpu')} (compute capability {env.get('compute_capability')}), "
             f"polygraphy {env.get('polygraphy')}, onnxruntime {env.get('onnxruntime')}", "",
             "| build | engine | seconds | error |", "| --- | --- | ---: | --- |"]
    for build in report["builds"]:
        lines.append(f"| {build['name']} | {build.get('engine') or '-'} | {build.get('seconds') or '-'} | "
                     f"{build.get('error') or ''} |")
    lines += ["", "| engine | attention fused | attention layers |", "| --- | --- | --- |"]
    for row in report["fusion"]:
        lines.append(f"| {row['name']} | {'yes' if row['fused'] else 'no'} | {'; '.join(row['attention_layers'])[:200]} |")
    lines += ["", "| engine | runner | shapes | rel. L2 vs ONNX Runtime CPU |", "| --- | --- | --- | ---: |"]
    for row in report["accuracy"]:
        value = f"{row['rel_l2']:.3g}" if isinstance(row.get("rel_l2"), float) else row.get("error", "-")
        lines.append(f"| {row['name']} | {row['runner']} | {row['shapes']} | {value} |")
    for key in ("trtexec", "capability"):
        lines += ["", f"## {key}", ""]
        for row in report[key]:
            lines.append(f"- {row.get('name') or row.get('onnx')}: exit {row['returncode']}")
    if report.get("tf32"):
        lines += ["", f"TF32 on vs off (FP32 engines): rel. L2 {report['tf32'].get('rel_l2_between')}"]
    return "\n".join(lines) + "\n"


def _tail(text: str, lines: int = 15) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="gpu-check", help="folder for the files and the report")
    args = parser.parse_args()
    out = Path(args.out).resolve()

    from xattn.tensorrt import current_device, installed_tensorrt_version

    version, device = installed_tensorrt_version(), current_device()
    if version is None or device is None:
        print(f"error: the device check needs TensorRT and an NVIDIA GPU (TensorRT: {version or 'not installed'}, "
              f"GPU: {device.name if device else 'none visible'})", file=sys.stderr)
        return 2
    import numpy as np
    import onnxruntime
    import polygraphy

    out.mkdir(parents=True, exist_ok=True)
    xattn = [sys.executable, "-m", "tools.cli"]
    root = Path(__file__).resolve().parent.parent

    def run(command: list[str], timeout: int = 900) -> subprocess.CompletedProcess:
        return subprocess.run(command, cwd=root, capture_output=True, text=True, timeout=timeout)

    report: dict = {"format": REPORT_FORMAT, "environment": {
        "date": time.strftime("%Y-%m-%d %H:%M"), "tensorrt": version, "gpu": device.name,
        "compute_capability": list(device.compute_capability), "polygraphy": polygraphy.__version__,
        "onnxruntime": onnxruntime.__version__}, "builds": [], "trtexec": [], "capability": [], "fusion": [],
        "accuracy": [], "tf32": {}}
    steps = [["export", "-o", str(out / "model.onnx")],
             ["convert", str(out / "model.onnx"), "--fp16", "-o", str(out / "model.fp16.onnx")],
             ["quantize", str(out / "model.onnx"), "-o", str(out / "model.int8.onnx"), "--samples", "32"]]
    plan = build_plan(version)
    if any(b["name"] == "fp16-onnx-attention" for b in plan):
        steps.append(["convert", str(out / "model.onnx"), "--fp16", "--attention-op", "onnx",
                      "-o", str(out / "model.fp16.attention.onnx")])
    for step in steps:
        done = run(xattn + step)
        if done.returncode:
            print(f"error: xattn {step[0]} failed:\n{_tail(done.stdout + done.stderr)}", file=sys.stderr)
            return 1
    import tensorrt as trt

    from runtime.onnxrt import OnnxRuntimeRunner
    from runtime.tensorrt_runner import TensorRTRunner
    from xattn.data import random_feed
    from xattn.shapes import parse_shape_set

    outputs: dict = {}
    for build in plan:
        engine = out / f"{build['name']}.engine"
        started = time.perf_counter()
        done = run(xattn + ["build", str(out / build["onnx"]), "-o", str(engine)] + build["options"])
        row = {"name": build["name"], "onnx": build["onnx"], "options": build["options"],
               "engine": engine.name if done.returncode == 0 else None,
               "seconds": round(time.perf_counter() - started, 1),
               "error": None if done.returncode == 0 else _tail(done.stdout + done.stderr, 3)}
        report["builds"].append(row)
        if done.returncode:
            continue
        sidecar = json.loads(Path(f"{engine}.json").read_text())
        if shutil.which("trtexec"):
            line = sidecar["build_command"].replace(str(engine), str(out / f"{build['name']}.trtexec.engine"))
            ran = subprocess.run(line, shell=True, capture_output=True, text=True, timeout=900)
            report["trtexec"].append({"name": build["name"], "command": line, "returncode": ran.returncode,
                                      "tail": _tail(ran.stdout + ran.stderr)})
        runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        runtime.engine_host_code_allowed = True
        loaded = runtime.deserialize_cuda_engine(engine.read_bytes())
        inspector = loaded.create_engine_inspector()
        info = json.loads(inspector.get_engine_information(trt.LayerInformationFormat.JSON))
        report["fusion"].append({"name": build["name"], **attention_layers(info)})
        with OnnxRuntimeRunner(out / build["onnx"], ["cpu"]) as reference:
            for opt in PROFILES["opt"]:
                feed = random_feed(parse_shape_set(opt), seed=0)
                want = reference.infer(feed)["y"]
                for label, graph in (("polygraphy TrtRunner", False), ("CUDA graph", True)):
                    try:
                        with TensorRTRunner(engine, cuda_graph=graph) as runner:
                            got = runner.infer(feed)["y"]
                        rel = float(np.linalg.norm(got.astype(np.float64) - want) / np.linalg.norm(want))
                        report["accuracy"].append({"name": build["name"], "shapes": opt, "runner": label, "rel_l2": rel})
                        outputs[(build["name"], opt, label)] = got
                    except Exception as exc:   # noqa: BLE001 - a failing runner is a finding, not the end
                        report["accuracy"].append({"name": build["name"], "shapes": opt, "runner": label,
                                                   "error": str(exc).splitlines()[0]})
    pairs = [(outputs.get(("fp32", o, "polygraphy TrtRunner")), outputs.get(("fp32-tf32", o, "polygraphy TrtRunner")))
             for o in PROFILES["opt"]]
    pairs = [(a, b) for a, b in pairs if a is not None and b is not None]
    if pairs:
        report["tf32"]["rel_l2_between"] = max(float(np.linalg.norm(a - b) / np.linalg.norm(a)) for a, b in pairs)
    if shutil.which("polygraphy"):
        for name in sorted({b["onnx"] for b in plan}):
            ran = subprocess.run(["polygraphy", "inspect", "capability", str(out / name)], capture_output=True,
                                 text=True, timeout=600, cwd=out)
            report["capability"].append({"onnx": name, "returncode": ran.returncode, "tail": _tail(ran.stdout + ran.stderr)})
    (out / "report.json").write_text(json.dumps(report, indent=1) + "\n")
    (out / "report.md").write_text(markdown(report))
    print(markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
