"""The command line end to end: export, inspect, doctor, and one-line errors with exit 2 for bad input."""

import json
import re
import os
import subprocess
import sys

import onnx
import pytest
from click.testing import CliRunner

from tools.cli import cli
from xattn.memory import format_size, verify_memory_budget

SMALL = ["--model", "cross-attention", "--model-arg", "in_channels=4", "--model-arg", "out_channels=8"]


def run(*args):
    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


def one_line_error(result, pattern):
    import re

    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1, result.output
    assert lines[0].startswith("error: ") and re.search(pattern, lines[0]), lines[0]
    assert "Traceback" not in result.output


def test_export_then_inspect(tmp_path):
    out = tmp_path / "m.onnx"
    result = run("export", *SMALL, "-o", str(out), "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["opset"] == 18 and all(check["passed"] for check in report["checks"])
    result = run("inspect", str(out), "--json")
    assert result.exit_code == 0
    info = json.loads(result.output)
    assert [i["shape"] for i in info["inputs"]] == [["batch", 4, "x1_height", "x1_width"],
                                                   ["batch", 4, "x2_height", "x2_width"]]
    assert info["metadata"]["model"] == "cross-attention" and info["parameters"] == 3 * (4 * 8 + 8)
    assert info["op_counts"]["MatMul"] == 2 and info["op_counts"]["Softmax"] == 1
    text = run("inspect", str(out)).output
    assert "x1_height" in text and "provenance:" in text


def test_export_with_ranges_and_verify_shapes(tmp_path):
    out = tmp_path / "m.onnx"
    result = run("export", *SMALL, "-o", str(out), "--min-shapes", "x1:1x4x8x8,x2:1x4x8x8",
                 "--max-shapes", "x1:4x4x32x32,x2:4x4x32x32", "--verify-shapes", "x1:3x4x9x31,x2:3x4x30x10")
    assert result.exit_code == 0, result.output
    assert "x1:3x4x9x31,x2:3x4x30x10" in result.output and "ok" in result.output
    meta = json.loads(run("inspect", str(out), "--json").output)["metadata"]
    assert meta["max_shapes"] == "x1:4x4x32x32,x2:4x4x32x32"


@pytest.mark.parametrize("args, pattern", [
    (["--model", "resnet"], "unknown model 'resnet'"),
    (["--model", "nowhere.mod:make"], "cannot import module 'nowhere.mod'"),
    (["--model", "tests.user_models:not_a_module"], "returned int, not a torch.nn.Module"),
    (["--checkpoint", "missing.pt"], "checkpoint missing.pt does not exist"),
    (["--opset", "99"], "opset 99 is out of range"),
    (["--max-shapes", "x1:1x3"], r"has rank 2, expected 4"),
    (["--max-shapes", "x1:1x3xQx4"], r"dimension 'Q' of 'x1'"),
    (["--min-shapes", "x1:1x3x300x300"], r"need min <= opt <= max"),
    (["--max-shapes", "x1:1x5x64x64"], "has 5 channels; model 'cross-attention-net' takes 3"),
    (["--model-arg", "bogus=1"], "has no argument bogus"),
])
def test_bad_input_is_one_line_exit_2(tmp_path, args, pattern):
    out = tmp_path / "m.onnx"
    result = run("export", "-o", str(out), *args)
    assert result.exit_code == 2
    one_line_error(result, pattern)
    assert not out.exists()


def test_bad_checkpoints_exit_2(tmp_path):
    import torch

    from tests.test_checkpoint import _Payload

    evil = tmp_path / "evil.pt"
    torch.save({"x": _Payload()}, evil)
    result = run("export", "-o", str(tmp_path / "m.onnx"), "--checkpoint", str(evil))
    assert result.exit_code == 2
    one_line_error(result, "holds pickled Python objects")
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"PK\x03\x04 truncated zip")
    result = run("export", "-o", str(tmp_path / "m.onnx"), "--checkpoint", str(corrupt))
    assert result.exit_code == 2
    one_line_error(result, "corrupt or not a PyTorch file")


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write into read-only folders")
def test_unwritable_output_dir(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    result = run("export", "-o", str(locked / "m.onnx"))
    assert result.exit_code == 2
    one_line_error(result, "is not writable")


def test_output_path_that_is_a_folder(tmp_path):
    result = run("export", "-o", str(tmp_path))
    assert result.exit_code == 2
    one_line_error(result, "is a folder")


def test_output_under_a_file_is_refused(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    result = run("export", "-o", str(blocker / "m.onnx"))
    assert result.exit_code == 2
    one_line_error(result, "cannot create output folder")


def test_inspect_bad_files(tmp_path):
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(os.urandom(256))
    result = run("inspect", str(junk))
    assert result.exit_code == 2
    one_line_error(result, "not (a readable ONNX file|an ONNX model)")
    result = run("inspect", str(tmp_path / "none.onnx"))
    assert result.exit_code == 2
    one_line_error(result, "does not exist")


def test_doctor_json_and_help_without_heavy_imports():
    info = json.loads(run("doctor", "--json").output)
    assert info["tensorrt"] in ("not installed",) or info["tensorrt"][0].isdigit()
    assert "CPUExecutionProvider" in info["onnxruntime_providers"]
    assert info["features"]["export"] is True
    # --help must not import torch/onnx/tensorrt: it has to be instant and work anywhere.
    code = ("import sys; from click.testing import CliRunner; from tools.cli import cli; "
            "r = CliRunner().invoke(cli, ['--help']); assert r.exit_code == 0, r.output; "
            "heavy = [m for m in ('torch', 'onnx', 'onnxruntime', 'tensorrt') if m in sys.modules]; "
            "assert not heavy, heavy")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_console_script_runs():
    result = subprocess.run([sys.executable, "-m", "tools.cli", "models"], capture_output=True, text=True, check=True)
    assert "seed-cross-attention" in result.stdout


def test_inspect_tells_weights_from_buffers(tmp_path):
    out = tmp_path / "m.onnx"
    assert run("export", "--model", "tests.user_models:with_buffer", "-o", str(out),
               "--max-shapes", "x1:2x4x16x16,x2:2x4x16x16").exit_code == 0
    meta = json.loads(run("inspect", str(out), "--json").output)["metadata"]
    assert (meta["weights"], meta["buffers"], meta["buffer_names"]) == (3 * (4 * 8 + 8), 8, ["gain"])
    assert "120 weights + 8 buffer values (gain)" in run("inspect", str(out)).output


def test_inspect_describes_every_file_the_toolkit_writes(tmp_path, exported_small):
    import numpy as np

    from calibration.ranges import CalibrationSettings, calibrate
    from xattn.trt_cache import write_trt_cache
    from xattn.trt_plan import write_sidecar
    from xattn.data import load_for_model

    _, export = exported_small
    model = onnx.load(str(export.path))
    data = load_for_model("synthetic", model)
    table, _ = calibrate(model, data, CalibrationSettings(method="minmax"), output=tmp_path / "ranges.json")
    info = json.loads(run("inspect", str(tmp_path / "ranges.json"), "--json").output)
    assert info["kind"] == "range-table" and info["tensors"] == len(table.amax) and info["synthetic_data"] is True
    assert info["amax_max"] == max(table.amax.values()) and info["method"] == "minmax"
    write_trt_cache(tmp_path / "m.cache", {"x1": 2.54, "y": 12.7}, "entropy", "10.3.0")
    text = run("inspect", str(tmp_path / "m.cache")).output
    assert "TensorRT calibration cache" in text and '"10.3.0"' not in text and "tensorrt_version: 10.3.0" in text
    info = json.loads(run("inspect", str(tmp_path / "m.cache"), "--json").output)
    assert info["algorithm"] == "EntropyCalibration2" and info["tensors"] == 2
    np.testing.assert_allclose([info["amax_min"], info["amax_max"]], [2.54, 12.7], rtol=1e-6)
    engine = tmp_path / "m.engine"
    engine.write_bytes(b"\x00opaque plan bytes")
    write_sidecar(engine, {"tensorrt_version": "10.3.0", "precision": "fp16", "source": {"model": "cross-attention"},
                           "build_command": "trtexec --onnx=m.onnx"})
    for path, kind in ((engine, "tensorrt-engine"), (tmp_path / "m.engine.json", "engine-sidecar")):
        info = json.loads(run("inspect", str(path), "--json").output)
        assert info["kind"] == kind and info["tensorrt_version"] == "10.3.0" and info["source_model"] == "cross-attention"
    report = json.loads(run("inspect", str(export.report_path), "--json").output)
    assert report["kind"] == "export-report" and len(report["checks"]) == len(export.checks)
    (tmp_path / "other.json").write_text('{"hello": 1}')
    result = run("inspect", str(tmp_path / "other.json"))
    assert result.exit_code == 2 and "is JSON but not an xattn artifact" in result.output


def test_export_warns_when_max_shapes_exceed_memory_and_simplify_says_what_changed(tmp_path):
    pytest.importorskip("onnxslim")
    out = tmp_path / "m.onnx"
    # batch 64 at 512x512 (x1) against 512x512 (x2): 64 x 262144^2 x 4 bytes = 16 TiB of scores
    result = run("export", *SMALL, "-o", str(out), "--max-shapes", "x1:64x4x512x512,x2:64x4x512x512", "--simplify")
    assert result.exit_code == 0, result.output
    assert re.search(r"warning: at the max shapes x1:64x4x512x512,x2:64x4x512x512 a plain run needs about "
                     r"[\d.]+ TiB|[\d.]+ GiB, more than this machine's [\d.]+ GiB", result.output)
    # the max corner is verified at the largest shapes within the verification budget instead
    budget = format_size(verify_memory_budget()[0])   # the suite's $XATTN_VERIFY_MEMORY (conftest)
    assert re.search(r"ok +x1:1x4x\d+x\d+,x2:1x4x\d+x\d+ .*\(max corner scaled into the verification budget of "
                     + re.escape(budget), result.output)
    assert re.search(r"simplified with onnxslim: \d+ -> \d+ nodes \(verified below like the export\)", result.output)


def test_debug_shows_the_exporter_warnings(tmp_path):
    import subprocess

    out = tmp_path / "m.onnx"
    done = subprocess.run([sys.executable, "-m", "tools.cli", "--debug", "export", "--model",
                           "tests.user_models:traced_constant", "--exporter", "legacy", "-o", str(out),
                           "--max-shapes", "x1:2x4x16x16,x2:2x4x16x16"], capture_output=True, text=True,
                          env={**os.environ, "XATTN_QUIET": "1"})
    assert done.returncode == 0, done.stderr
    assert "debug: exporter warning: TracerWarning: Converting a tensor to a Python float" in done.stderr
    report = json.loads((tmp_path / "m.export.json").read_text())
    assert any(w.startswith("TracerWarning") for w in report["exporter_warnings"])
    assert "exporter warnings: 1 (1 TracerWarning), in the report" in done.stdout
