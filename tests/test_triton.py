"""Triton: repositories checked by Triton's own schema and core, a real server, a real client, a load test.

Everything here runs for real: the tritonserver that nvidia-pytriton carries, tritonclient over HTTP and
gRPC on loopback, ONNX Runtime as the reference. The `serve` extra is part of `dev`, so CI runs these.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

pytest.importorskip("pytriton", reason="needs the serve extra (nvidia-pytriton)")
pytest.importorskip("tritonclient.grpc", reason="needs the serve extra (tritonclient[grpc])")

from exporter.triton_repo import TritonSettings, check_with_triton, parse_config, write_repository  # noqa: E402
from runtime.onnxrt import OnnxRuntimeRunner  # noqa: E402
from tools.cli import cli  # noqa: E402
from xattn.data import random_feed  # noqa: E402
from xattn.errors import ArtifactError, BadInputError, CheckFailedError  # noqa: E402
from xattn.shapes import parse_shape_set  # noqa: E402
from xattn.triton import free_port  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def _kind(config) -> str:
    from tritonclient.grpc import model_config_pb2

    return model_config_pb2.ModelInstanceGroup.Kind.Name(config.instance_group[0].kind)


def invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture(scope="module")
def artifacts(exported_small, tmp_path_factory):
    """The small block as FP32, FP16 (TensorRT form) and fused for ONNX Runtime."""
    from exporter.fp16 import convert_fp16
    from exporter.optimize import optimize_for_onnxruntime

    _, export = exported_small
    folder = tmp_path_factory.mktemp("artifacts")
    fp32 = folder / "model.onnx"
    shutil.copy(export.path, fp32)
    fp16 = folder / "model.fp16.onnx"
    convert_fp16(fp32, fp16)
    ort = folder / "model.ort.onnx"
    optimize_for_onnxruntime(fp32, ort)
    return {"fp32": fp32, "fp16": fp16, "ort": ort}


def test_repository_from_onnx_files_is_accepted_by_triton(artifacts, tmp_path):
    repo = tmp_path / "repo"
    res = invoke("triton", artifacts["fp32"], artifacts["fp16"], artifacts["ort"], "-o", repo, "--name", "xattn",
                 "--instances", "2", "--dynamic-batching-delay-us", "250", "--json")
    assert res.exit_code == 0, res.output
    models = {m["name"]: m for m in json.loads(res.output)}
    assert set(models) == {"xattn_model", "xattn_model_fp16", "xattn_model_ort"}
    for name, model in models.items():
        # Triton's own checks passed; only the missing onnxruntime backend (NVIDIA's containers have it) stopped it
        assert model["verdict"] == "accepted by Triton's checks; stopped at: backend not installed here", model
        assert "unable to find backend library for backend 'onnxruntime'" in model["triton_said"]
        config = parse_config((repo / name / "config.pbtxt").read_text())
        assert config.name == name and config.backend == "onnxruntime" and config.max_batch_size == 8
        assert [(i.name, list(i.dims)) for i in config.input] == [("x1", [8, -1, -1]), ("x2", [6, -1, -1])]
        assert [(o.name, list(o.dims)) for o in config.output] == [("y", [16, -1, -1])]
        assert config.dynamic_batching.max_queue_delay_microseconds == 250
        assert config.instance_group[0].count == 2 and _kind(config) == "KIND_CPU"
        assert config.parameters["xattn.source_sha256"].string_value
        assert (repo / name / "1" / "model.onnx").is_file()
    assert parse_config((repo / "xattn_model_fp16" / "config.pbtxt").read_text()).parameters[
        "xattn.precision"].string_value == "fp16"
    kept = json.loads((repo / "xattn-triton.json").read_text())
    assert {m["name"]: m["verdict"] for m in kept["models"]} == {n: m["verdict"] for n, m in models.items()}
    readme = (repo / "README.md").read_text()
    assert "tritonserver --model-repository=/models" in readme and "never batched together" in readme
    assert "--gpus" not in readme and "instances: 2 per host, kind cpu" in readme


def test_engine_repository_carries_its_tensorrt_version(artifacts, tmp_path):
    from xattn.trt_plan import write_sidecar
    from xattn.fileio import sha256_file

    folder = tmp_path / "engines"
    folder.mkdir()
    shutil.copy(artifacts["fp16"], folder / "model.fp16.onnx")
    engine = folder / "model.fp16.engine"
    engine.write_bytes(b"plan bytes: Triton's tensorrt backend is not installed here, so they are never parsed")
    write_sidecar(engine, {"tensorrt_version": "10.3.0", "precision": "fp16",
                           "source": {"model": "cross-attention", "max_shapes": "x1:8x8x128x128,x2:8x6x128x128",
                                      "min_shapes": "x1:1x8x4x4,x2:1x6x4x4"},
                           "source_onnx": {"path": "model.fp16.onnx", "sha256": sha256_file(folder / "model.fp16.onnx")}})
    res = invoke("triton", engine, "-o", tmp_path / "cpu")
    assert res.exit_code == 2 and "runs on a GPU only" in res.output and not (tmp_path / "cpu").exists()
    models = write_repository([engine], tmp_path / "repo", TritonSettings(kind="gpu", max_batch_size=4))
    (model,) = models
    assert model.backend == "tensorrt" and model.verdict.endswith("backend not installed here")
    config = parse_config((tmp_path / "repo" / model.name / "config.pbtxt").read_text())
    assert config.backend == "tensorrt" and config.max_batch_size == 4 and _kind(config) == "KIND_GPU"
    assert config.parameters["xattn.tensorrt_version"].string_value == "10.3.0"
    assert (tmp_path / "repo" / model.name / "1" / "model.plan").read_bytes() == engine.read_bytes()
    assert any("loads it only with that same TensorRT version" in n for n in model.notes)
    assert "docker run --rm --gpus all" in (tmp_path / "repo" / "README.md").read_text()


def test_engine_config_serves_every_profile_at_the_engines_batch(artifacts, tmp_path):
    """Triton's tensorrt backend makes contexts for listed profiles only (profile 0 unlisted), checks
    max_batch_size against the profiles' MAX batch, needs a flag for version-compatible plans, and runs a DLA
    engine on the core named as a secondary device (tensorrt_backend sources; shared/notes/tensorrt-review-2.md
    N2, N3, N7, N15). Read from sources: no tensorrt backend here loads it."""
    from xattn.trt_plan import write_sidecar
    from xattn.fileio import sha256_file

    folder = tmp_path / "engines"
    folder.mkdir()
    shutil.copy(artifacts["fp16"], folder / "model.fp16.onnx")
    engine = folder / "model.fp16.engine"
    engine.write_bytes(b"plan bytes, never parsed here")
    write_sidecar(engine, {"tensorrt_version": "10.3.0", "precision": "fp16", "version_compatible": True,
                           "plan": {"dla_core": 1},
                           "profiles": [{"min": "x1:1x8x4x4,x2:1x6x4x4", "opt": "x1:1x8x32x32,x2:1x6x32x32",
                                         "max": "x1:2x8x64x64,x2:2x6x64x64"},
                                        {"min": "x1:1x8x64x64,x2:1x6x64x64", "opt": "x1:1x8x96x96,x2:1x6x96x96",
                                         "max": "x1:4x8x128x128,x2:4x6x128x128"}],
                           "source": {"model": "cross-attention", "max_shapes": "x1:8x8x128x128,x2:8x6x128x128",
                                      "min_shapes": "x1:1x8x4x4,x2:1x6x4x4"},
                           "source_onnx": {"path": "model.fp16.onnx", "sha256": sha256_file(folder / "model.fp16.onnx")}})
    (model,) = write_repository([engine], tmp_path / "repo", TritonSettings(kind="gpu", check=False))
    config = parse_config((tmp_path / "repo" / model.name / "config.pbtxt").read_text())
    assert config.max_batch_size == 2                      # the smallest profile MAX batch, not the export's 8
    assert list(config.instance_group[0].profile) == ["0", "1"]
    (device,) = config.instance_group[0].secondary_devices
    assert device.device_id == 1 and device.kind == device.KIND_NVDLA
    readme = (tmp_path / "repo" / "README.md").read_text()
    assert "--model-repository=/models --backend-config=tensorrt,version-compatible=true" in readme
    with pytest.raises(BadInputError, match="above the batch 2"):
        write_repository([engine], tmp_path / "repo4", TritonSettings(kind="gpu", max_batch_size=4, check=False))
    write_sidecar(engine, {"tensorrt_version": "10.3.0", "profiles": [{"min": "nonsense", "max": 3}],
                           "source_onnx": {"path": "model.fp16.onnx", "sha256": sha256_file(folder / "model.fp16.onnx")}})
    with pytest.raises(ArtifactError, match="its profiles are not min/max shape sets"):
        write_repository([engine], tmp_path / "repo5", TritonSettings(kind="gpu", check=False))


def test_a_config_triton_rejects_is_an_error_naming_tritons_reason(artifacts, tmp_path):
    repo = tmp_path / "bad"
    (repo / "broken" / "1").mkdir(parents=True)
    shutil.copy(artifacts["fp32"], repo / "broken" / "1" / "model.onnx")
    # parses with the schema, but Triton refuses it: a preferred batch above the max batch
    text = ('name: "broken" backend: "onnxruntime" max_batch_size: 4 '
            'input { name: "x1" data_type: TYPE_FP32 dims: [8, -1, -1] } '
            'output { name: "y" data_type: TYPE_FP32 dims: [16, -1, -1] } '
            'dynamic_batching { preferred_batch_size: [8] }')
    parse_config(text)
    (repo / "broken" / "config.pbtxt").write_text(text)
    from exporter.triton_repo import TritonModel

    with pytest.raises(CheckFailedError, match="preferred size must be <= max batch size"):
        check_with_triton(repo, [TritonModel("broken", "model.onnx", "onnxruntime", 4, text)], lambda m: None)
    with pytest.raises(CheckFailedError, match="does not parse as a Triton ModelConfig"):
        parse_config('name: "x" max_batch_sise: 4')


def test_no_check_and_gpu_accelerator_options(artifacts, tmp_path):
    res = invoke("triton", artifacts["fp16"], "-o", tmp_path / "r", "--no-check", "--kind", "gpu", "--trt-accelerator",
                 "INT8", "--max-batch-size", "2", "--json")
    assert res.exit_code == 0, res.output
    (model,) = json.loads(res.output)
    assert model["verdict"] == "not checked" and model["max_batch_size"] == 2
    config = parse_config((tmp_path / "r" / "model_fp16" / "config.pbtxt").read_text())
    (accelerator,) = config.optimization.execution_accelerators.gpu_execution_accelerator
    assert accelerator.name == "tensorrt" and dict(accelerator.parameters) == {"precision_mode": "INT8"}
    assert any("without a calibration table" in n for n in model["notes"])


def test_repository_refusals_write_nothing(artifacts, tmp_path):
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "keep.txt").write_text("mine")
    with pytest.raises(BadInputError, match="exists and is not an empty folder"):
        write_repository([artifacts["fp32"]], taken)
    assert [p.name for p in taken.iterdir()] == ["keep.txt"]
    with pytest.raises(BadInputError, match="--max-batch-size 16 is above the batch 8"):
        write_repository([artifacts["fp32"]], tmp_path / "r", TritonSettings(max_batch_size=16))
    res = invoke("triton", artifacts["ort"], "-o", tmp_path / "r2", "--kind", "gpu", "--trt-accelerator", "FP16")
    assert res.exit_code == 2 and "com.microsoft ops that TensorRT cannot parse" in res.output
    assert not (tmp_path / "r").exists() and not (tmp_path / "r2").exists()
    assert not list(tmp_path.glob(".*staging*"))


# -- a real server ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def server(artifacts):
    """`xattn serve` in its own process on free loopback ports; stopped with SIGTERM by the last test. A workspace
    left by a killed run (a process id no process has) is there before it starts, for it to remove."""
    stale = Path.home() / ".cache" / "xattn" / "serve-999999"
    (stale / "sockets").mkdir(parents=True, exist_ok=True)
    process, http_port, grpc_port = _start_serving(artifacts["ort"], "--host", "127.0.0.1", "--max-batch-size", "4",
                                                   "--dynamic-batching-delay-us", "2000")
    assert not stale.exists(), "a killed run's workspace was not removed"
    yield {"process": process, "http": http_port, "grpc": grpc_port, "artifact": artifacts["ort"]}
    if process.poll() is None:
        process.kill()
        process.communicate()


def _start_serving(artifact, *options):
    """`xattn serve ARTIFACT` as model "xattn" with one thread on free ports, once its model is ready."""
    import tritonclient.http as http

    http_port, grpc_port = free_port(), free_port()
    process = subprocess.Popen([sys.executable, "-m", "tools.cli", "serve", str(artifact), "--http-port",
                                str(http_port), "--grpc-port", str(grpc_port), "--name", "xattn", "--threads", "1",
                                *options], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    client = http.InferenceServerClient(f"127.0.0.1:{http_port}")
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"xattn serve exited: {process.communicate()}")
        try:
            if client.is_model_ready("xattn"):
                return process, http_port, grpc_port
        except Exception:
            pass
        time.sleep(0.5)
    process.kill()
    pytest.fail("xattn serve did not become ready in 120 s")


def _infer(protocol, port, feed, model="xattn"):
    import tritonclient.grpc as grpc
    import tritonclient.http as http

    module = grpc if protocol == "grpc" else http
    client = module.InferenceServerClient(f"127.0.0.1:{port}")
    inputs = []
    for name, array in feed.items():
        tensor = module.InferInput(name, list(array.shape), {np.float32: "FP32", np.float64: "FP64"}[array.dtype.type])
        tensor.set_data_from_numpy(array)
        inputs.append(tensor)
    return client.infer(model, inputs).as_numpy("y")


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_served_outputs_equal_a_local_run(server, protocol):
    with OnnxRuntimeRunner(server["artifact"], ["cpu"], threads=1) as local:
        for text in ("x1:1x8x12x10,x2:1x6x7x15", "x1:3x8x20x16,x2:3x6x9x9", "x1:2x8x4x4,x2:2x6x33x13"):
            feed = random_feed(parse_shape_set(text), seed=5)
            np.testing.assert_allclose(_infer(protocol, server[protocol], feed), local.infer(feed)["y"],
                                       rtol=1e-5, atol=1e-6)


def test_bad_requests_get_a_v2_error_and_the_server_stays_up(server):
    from tritonclient.utils import InferenceServerException

    good = random_feed(parse_shape_set("x1:1x8x12x10,x2:1x6x7x15"), seed=1)
    # (feed, what the HTTP front says, what Triton's gRPC front end or the model says)
    cases = [
        ({**good, "x1": good["x1"].astype(np.float64)}, "input x1 is FP64, the model takes FP32", "FP64"),
        ({"x1": good["x1"]}, "missing input\\(s\\) x2", "expected 2 inputs"),
        ({**good, "x1": good["x1"][..., None]}, "input x1 has rank 5, the model takes 4", "unexpected shape"),
        ({**good, "x1": random_feed({"x1": (1, 8, 200, 10)})["x1"]}, "input x1: axis 2 is 200, outside the supported range 4..128",
         "outside the supported range 4..128"),
        ({**good, "x1": np.where(good["x1"] > 2, np.nan, good["x1"]).astype(np.float32)}, "input x1 holds NaN/Inf", "NaN/Inf"),
    ]
    for feed, http_says, _ in cases:
        with pytest.raises(InferenceServerException, match=f"\\[400\\] {http_says}"):
            _infer("http", server["http"], feed)
        with pytest.raises(InferenceServerException, match=f"\\[StatusCode.INVALID_ARGUMENT\\] {http_says}") as grpc_error:
            _infer("grpc", server["grpc"], feed)
        assert "Traceback" not in str(grpc_error.value) and "site-packages" not in str(grpc_error.value)
        assert _infer("http", server["http"], good).shape == (1, 16, 12, 10)   # still up, still right


def _post(port, path, body: bytes, headers=None):
    import http.client

    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        connection.request("POST", path, body=body, headers={"Content-Type": "application/json", **(headers or {})})
        answer = connection.getresponse()
        return answer.status, answer.read().decode(errors="replace")
    finally:
        connection.close()


def test_requests_that_killed_triton_are_refused_in_one_line_and_the_server_stays_up(server):
    """Issue #20: a 200-byte JSON request declaring [1,3,100000,100000] made Triton's HTTP front end allocate
    the declared size and abort. The toolkit's front refuses it (and its kin) with 400 and one line."""
    good = random_feed(parse_shape_set("x1:1x8x12x10,x2:1x6x7x15"), seed=1)
    huge = {"inputs": [{"name": "x1", "shape": [1, 8, 100000, 100000], "datatype": "FP32", "data": [1, 2, 3, 4]},
                       {"name": "x2", "shape": [1, 6, 8, 8], "datatype": "FP32", "data": [0] * 384}]}
    cases = [
        (json.dumps(huge).encode(), 400, "axis 2 is 100000, outside the supported range 4..128"),
        (b'{"inputs": [{"name": "x1", "shape": [1, 8, 4, 4], "datatype": "FP32", "data": [NaN]}]}', 400, "NaN"),
        (b"{not json", 400, "the inference header is not JSON"),
        (json.dumps({"inputs": [{"name": "x1", "shape": [9, 8, 4, 4], "datatype": "FP32", "data": [0]}]}).encode(),
         400, "axis 0 is 9, outside the supported range 1..4"),
    ]
    for body, status, message in cases:
        got, text = _post(server["http"], "/v2/models/xattn/infer", body)
        assert got == status and message in json.loads(text)["error"], (got, text)
        assert "Traceback" not in text and "/site-packages/" not in text
        assert _infer("http", server["http"], good).shape == (1, 16, 12, 10)   # still up, still right
    got, text = _post(server["http"], "/v2/repository/index", b"{}")
    assert got == 403 and "not served here" in text
    import tritonclient.grpc as grpc_client
    from tritonclient.utils import InferenceServerException

    with pytest.raises(InferenceServerException, match="PERMISSION_DENIED.*RepositoryIndex is not served here"):
        grpc_client.InferenceServerClient(f"127.0.0.1:{server['grpc']}").get_model_repository_index()
    huge = grpc_client.InferInput("x1", [1, 8, 100000, 100000], "FP32")   # declared, 4 values sent
    huge._raw_content = np.zeros(4, np.float32).tobytes()
    small = grpc_client.InferInput("x2", [1, 6, 8, 8], "FP32")
    small.set_data_from_numpy(np.zeros((1, 6, 8, 8), np.float32))
    with pytest.raises(InferenceServerException, match="INVALID_ARGUMENT.*axis 2 is 100000"):
        grpc_client.InferenceServerClient(f"127.0.0.1:{server['grpc']}").infer("xattn", [huge, small])
    # the shared memory that carries the tensors is this user's alone (Triton's python backend makes it 0644)
    regions = list(Path("/dev/shm").glob(f"pytrtion{server['process'].pid}-*"))
    assert regions and all(r.stat().st_mode & 0o077 == 0 for r in regions), [oct(r.stat().st_mode) for r in regions]
    # a 200 MB body is refused from its Content-Length alone, before a byte of it is read
    import socket

    with socket.create_connection(("127.0.0.1", server["http"]), timeout=30) as raw:
        raw.sendall(b"POST /v2/models/xattn/infer HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                    b"Content-Length: 209715200\r\n\r\n")
        answer = b"".join(iter(lambda: raw.recv(4096), b"")).decode()   # the front closes after refusing
    assert answer.startswith("HTTP/1.1 413") and "the largest request this model takes is" in answer
    assert _infer("http", server["http"], good).shape == (1, 16, 12, 10)


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_a_bad_request_never_fails_the_good_ones_batched_with_it(server, protocol):
    """48 clients, every third request with a NaN: each bad one is refused alone; no good one fails."""
    from tritonclient.utils import InferenceServerException

    good = random_feed(parse_shape_set("x1:1x8x24x24,x2:1x6x24x24"), seed=3)
    bad = {**good, "x1": np.where(good["x1"] > 1.5, np.nan, good["x1"]).astype(np.float32)}
    outcomes = []

    def send(index):
        try:
            _infer(protocol, server[protocol], bad if index % 3 == 0 else good)
            outcomes.append((index % 3 == 0, "ok"))
        except InferenceServerException as exc:
            outcomes.append((index % 3 == 0, str(exc)))

    threads = [threading.Thread(target=send, args=(i,)) for i in range(48)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert all(result == "ok" for was_bad, result in outcomes if not was_bad), outcomes
    assert all("NaN/Inf" in result for was_bad, result in outcomes if was_bad), outcomes


def test_port_problems_are_told_apart():
    from runtime.serve import port_problem

    port = free_port()
    assert port_problem("127.0.0.1", port) is None
    assert "is not an address of this machine" in port_problem("192.0.2.1", port)   # TEST-NET-1, never local
    with __import__("socket").socket() as taken:
        taken.bind(("127.0.0.1", port))
        taken.listen()
        assert port_problem("127.0.0.1", port) == f"port {port} on 127.0.0.1 is in use"
    if __import__("socket").has_ipv6:
        assert port_problem("::1", free_port()) in (None, "::1 is not an address of this machine")


def test_concurrent_same_shape_requests_are_batched_and_load_bench_checks_outputs(server, tmp_path):
    feed = random_feed(parse_shape_set("x1:1x8x24x24,x2:1x6x24x24"), seed=2)
    results = []

    def send():
        results.append(_infer("grpc", server["grpc"], feed))

    threads = [threading.Thread(target=send) for _ in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(results) == 16 and all(np.array_equal(r, results[0]) for r in results)
    res = invoke("bench", "--server", f"grpc://127.0.0.1:{server['grpc']}", server["artifact"], "--shapes",
                 "x1:1x8x24x24,x2:1x6x24x24", "--concurrency", "1,4", "--requests", "40", "--duration", "5",
                 "--json", tmp_path / "load.json", "--csv", tmp_path / "load.csv", "--plot", tmp_path / "load.png")
    assert res.exit_code == 0, res.output
    data = json.loads((tmp_path / "load.json").read_text())
    assert data["format"] == "xattn-load/1" and data["model"] == "xattn" and data["protocol"] == "grpc"
    assert [lv["concurrency"] for lv in data["levels"]] == [1, 4]
    assert all(lv["requests"] == 40 and lv["errors"] == 0 and lv["stats"]["p50"] > 0 for lv in data["levels"])
    assert data["comparison"]["passed"] and data["comparison"]["worst_rel_l2"] <= 1e-5
    # Triton's own counts: more requests than executions means requests were batched
    assert data["server"]["requests"] >= 80 and data["server"]["executions"] < data["server"]["requests"]
    assert (tmp_path / "load.csv").read_text().splitlines()[0].startswith("concurrency,requests,errors")
    assert (tmp_path / "load.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    res = invoke("bench", "--server", f"http://127.0.0.1:{server['http']}", "--shapes", "x1:1x8x999x16,x2:1x6x16x16",
                 "--concurrency", "1")
    assert res.exit_code == 1 and res.output.startswith("error: the server refused the request")
    assert "outside the supported range 4..128" in res.output and "Traceback" not in res.output


@pytest.mark.skipif(os.geteuid() != 0 or not (shutil.which("unshare") and shutil.which("setpriv")),
                    reason="needs root, unshare and setpriv to mount a private /proc and act as another user")
def test_hidepid_keeps_the_access_token_on_tritonservers_command_line_from_other_users(server):
    """Issue #20: PyTriton puts the token guarding Triton's administrative protocols on tritonserver's command
    line. The README's mitigation for shared machines is /proc mounted with hidepid=2; checked here in a private
    mount namespace (the machine's own /proc is untouched), as user nobody against the real server."""
    triton = [p for p in _descendants(server["process"].pid)
              if Path(f"/proc/{p}/comm").read_text().strip() == "tritonserver"]
    assert triton, "no tritonserver under xattn serve"
    token = b"triton-access-token="
    assert token in Path(f"/proc/{triton[0]}/cmdline").read_bytes()   # the exposure is real
    as_nobody = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "cat", f"/proc/{triton[0]}/cmdline"]
    exposed = subprocess.run(as_nobody, capture_output=True, timeout=30)
    assert exposed.returncode == 0 and token in exposed.stdout      # without the mitigation another user reads it
    private_proc = ["unshare", "--mount", "--propagation", "private", "sh", "-c",
                    'mount -t proc -o hidepid=2 proc /proc && exec "$@"', "sh"]
    if subprocess.run(private_proc + ["true"], capture_output=True, timeout=30).returncode != 0:
        pytest.skip("this machine does not let root mount a private /proc (no CAP_SYS_ADMIN in a mount namespace)")
    hidden = subprocess.run(private_proc + as_nobody, capture_output=True, timeout=30)
    assert hidden.returncode != 0 and token not in hidden.stdout, hidden
    assert b"No such file or directory" in hidden.stderr              # the process is invisible, not just unreadable


def test_sigterm_stops_the_server_cleanly_after_batching(server):
    process = server["process"]
    started = time.monotonic()
    process.send_signal(signal.SIGTERM)
    out, err = process.communicate(timeout=90)
    assert process.returncode == 0, err
    assert time.monotonic() - started < 8, "stopping took longer than Triton's 3 s exit timeout allows"
    assert "requests refused by the HTTP/gRPC fronts: " in out
    largest = int(out.split("largest batch run: ")[1].split(";")[0])
    assert largest >= 2 and largest <= 4, out    # same-shape requests ran as one batch, within --max-batch-size
    assert "stopping: waiting for requests in flight" in err


def test_load_bench_without_a_server_is_one_line(tmp_path):
    res = invoke("bench", "--server", f"http://127.0.0.1:{free_port()}", "--shapes", "x1:1x3x8x8,x2:1x3x8x8")
    assert res.exit_code == 1 and res.output.startswith("error: no KServe v2 server answers at")
    res = invoke("bench", "--server", "ftp://somewhere", "--shapes", "x1:1x3x8x8,x2:1x3x8x8")
    assert res.exit_code == 2 and "is not http://HOST:PORT or grpc://HOST:PORT" in res.output
    res = invoke("bench", "--server", "grpc://127.0.0.1:99999", "--shapes", "x1:1x3x8x8,x2:1x3x8x8")
    assert res.exit_code == 2 and "(port 1..65535)" in res.output and "Traceback" not in res.output
    res = invoke("bench", "--server", f"http://127.0.0.1:{free_port()}", "--shapes", "x1:1x3x8x8,x2:1x3x8x8",
                 "--concurrency", "100000")
    assert res.exit_code == 2 and "--concurrency 100000 is above 256 client threads" in res.output


def _descendants(pid: int) -> list[int]:
    children = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def test_when_triton_dies_xattn_serve_says_so_and_exits_non_zero(artifacts):
    """Issue #20: Triton killed under it left `xattn serve` running forever, serving nothing."""
    http_port, grpc_port = free_port(), free_port()
    process = subprocess.Popen([sys.executable, "-m", "tools.cli", "serve", str(artifacts["ort"]), "--http-port",
                                str(http_port), "--grpc-port", str(grpc_port), "--threads", "1"],
                               cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        server = []
        while time.monotonic() < deadline and not server:
            assert process.poll() is None, process.communicate()
            server = [p for p in _descendants(process.pid)
                      if Path(f"/proc/{p}/comm").exists() and Path(f"/proc/{p}/comm").read_text().strip() == "tritonserver"]
            time.sleep(0.5)
        assert server, "no tritonserver started"
        time.sleep(3)   # serving
        killed = time.monotonic()
        os.kill(server[0], signal.SIGKILL)
        out, err = process.communicate(timeout=60)
        assert process.returncode == 1, (out, err)
        assert time.monotonic() - killed < 15
        assert "error: Triton stopped serving" in err + out
        assert not [p for p in _descendants(process.pid)]   # nothing of it left
        assert not (Path.home() / ".cache" / "xattn" / f"serve-{process.pid}").exists()
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()


def test_no_tritonserver_outlives_a_killed_repository_check(tmp_path):
    """Issue #20: SIGKILL while Triton's core checked a repository left that tritonserver running (its own
    session, nothing tying it to the parent). The kernel now kills it with its parent (PR_SET_PDEATHSIG)."""
    (tmp_path / "repo").mkdir()
    code = ("import os, signal, sys\nsys.path.insert(0, sys.argv[2])\nfrom xattn.triton import TritonCore\n"
            "core = TritonCore(sys.argv[1]).__enter__()\nprint(core.process.pid, flush=True)\n"
            "os.kill(os.getpid(), signal.SIGKILL)\n")
    done = subprocess.run([sys.executable, "-c", code, str(tmp_path / "repo"), str(ROOT)], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == -signal.SIGKILL, done.stderr
    server = int(done.stdout.split()[0])
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and Path(f"/proc/{server}").exists() and \
            "Z" not in Path(f"/proc/{server}/stat").read_text().rsplit(")", 1)[1].split()[0]:
        time.sleep(0.2)
    alive = Path(f"/proc/{server}").exists() and "Z" not in Path(f"/proc/{server}/stat").read_text().rsplit(")", 1)[1].split()[0]
    assert not alive, "tritonserver outlived the process that started it"


def test_triton_repository_into_the_current_folder_and_a_killed_runs_staging_is_cleaned(artifacts, tmp_path,
                                                                                      monkeypatch):
    here = tmp_path / "repo"
    here.mkdir()
    stale = tmp_path / ".repo.staging-999999"   # a pid no process has (pid_max is at most 4194304 on Linux)
    (stale / "m").mkdir(parents=True)
    monkeypatch.chdir(here)
    res = invoke("triton", artifacts["fp32"], "-o", ".", "--no-check")
    assert res.exit_code == 0, res.output
    assert (here / "README.md").is_file() and not stale.exists()
    assert f"removed {stale}, left by a killed run (process 999999)" in res.output + (res.stderr or "")


def test_serving_on_openvino_is_checked_against_a_local_run_on_openvino(artifacts, tmp_path):
    """`xattn serve --providers openvino-bf16` (f32 where the CPU has no BF16) serves OpenVINO's own form; the load
    test runs the file locally on the same runtime and judges at that runtime's precision."""
    pytest.importorskip("openvino", reason="the openvino extra is not installed")
    from exporter.optimize import optimize_onnx
    from xattn.cpu import cpu_features, has_bf16

    sliced = optimize_onnx(artifacts["fp32"], tmp_path / "model.ov.onnx", target="openvino").path
    provider = "openvino-bf16" if has_bf16(cpu_features()) else "openvino"
    process, _, grpc_port = _start_serving(sliced, "--providers", provider, "--max-batch-size", "4")
    try:
        load = ["bench", "--server", f"grpc://127.0.0.1:{grpc_port}", sliced, "--shapes", "x1:1x8x12x10,x2:1x6x7x15",
                "--concurrency", "1,4", "--requests", "20", "--duration", "2", "--warmup", "1"]
        res = invoke(*load, "--providers", provider)
        assert res.exit_code == 0, res.output
        bound = "0.01" if provider == "openvino-bf16" else "1e-05"
        assert f"(bound {bound}): match" in res.output and "errors" in res.output
        if provider == "openvino-bf16":   # against ONNX Runtime's FP32 run, bf16 is a mismatch, and said so
            res = CliRunner().invoke(cli, [str(a) for a in load])
            assert res.exit_code == 1 and "MISMATCH" in res.output
            assert "give the same --providers here" in res.output
    finally:
        process.send_signal(signal.SIGTERM)
        out, err = process.communicate(timeout=60)
    assert process.returncode == 0, (out, err)
