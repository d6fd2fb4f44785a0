"""The main job end to end (small sample counts): every artifact made, validated, reported, benchmarked."""

import importlib.util
import json
import xml.etree.ElementTree as ET

import onnx
import pytest

from click.testing import CliRunner

from xattn.trt_cache import read_trt_cache
from xattn.tensorrt import installed_tensorrt_version
from exporter.trt_lint import check_for_tensorrt
from tools.cli import cli

HAS_OPENVINO = importlib.util.find_spec("openvino") is not None


@pytest.mark.rss_limit_mib(3072, "the README's main job at its defaults: 2.2 GiB")
def test_deploy_makes_and_validates_everything(tmp_path):
    out = tmp_path / "artifacts"
    # --int8-target-rel-l2 0: no sensitivity search (the fallback has its own tests); keeps this test short
    res = CliRunner().invoke(cli, ["deploy", "-o", str(out), "--samples", "4", "--int8-target-rel-l2", "0"],
                             catch_exceptions=False)
    assert res.exit_code == 0, res.output
    onnx_files = ("model.onnx", "model.fp16.onnx", "model.int8.onnx", "model.ort.onnx", "model.ort.int8.onnx",
                  *(("model.ov.onnx", "model.ov.int8.onnx") if HAS_OPENVINO else ()))
    for name in onnx_files + ("model.int8.cache", "model.ranges.json", "model.export.json",
                              "reports/accuracy.json", "reports/accuracy.xml", "reports/accuracy.md"):
        assert (out / name).is_file(), name
    for name in onnx_files:   # every file the main job writes passes the full checker
        onnx.checker.check_model(onnx.load(str(out / name)), full_check=True)
    for name in ("model.fp16.onnx", "model.int8.onnx"):   # and the TensorRT ones pass xattn check, every version
        for version in ("10.3.0", "10.13.3", "11.4.0"):
            report = check_for_tensorrt(out / name, version)
            assert report.passed and not report.warnings, report.format()
    report = json.loads((out / "reports/accuracy.json").read_text())
    assert [a["artifact"] for a in report["artifacts"]] == list(onnx_files)
    assert [a["precision"] for a in report["artifacts"]] == ["fp32", "fp16", "int8", "fp32", "int8"] + \
        (["fp32", "int8"] if HAS_OPENVINO else [])
    assert report["passed"] is True and all(not a["synthetic_data"] for a in report["artifacts"])
    suites = ET.parse(out / "reports/accuracy.xml").getroot().findall("testsuite")
    assert len(suites) == len(onnx_files) and all(s.get("failures") == "0" for s in suites)
    assert "target rel. L2" not in res.output and "kept in float" not in res.output
    assert "== which file where" in res.output and "model.ort.onnx (FP32, fused attention" in res.output
    count = len(onnx_files)
    assert res.output.strip().splitlines()[-1] == f"PASS: {count} of {count} artifacts pass; everything is in {out}"
    assert not list(out.glob(".xattn-staging-*"))           # the staging folder is gone
    assert str(out) + "/model.fp16.onnx" in res.output and ".xattn-staging" not in res.output
    export_report = json.loads((out / "model.export.json").read_text())
    assert export_report["path"] == str(out / "model.onnx")   # reports name the published files
    assert read_trt_cache(out / "model.int8.cache").version_number == 100300
    assert "== benchmark" in res.output and "torch eager" in res.output and "1.00x" in res.output
    # the fastest CPU form that passed, measured here, with the CPU's features; OpenVINO forms validated first
    assert "fastest CPU form measured here: model." in res.output and "x model.ort.onnx" in res.output or \
        "fastest CPU form measured here: model.ort.onnx (" in res.output
    if HAS_OPENVINO:   # OpenVINO's own form (query slices), written, validated on both runtimes, recommended
        assert "PASS model.ort.onnx [openvino] (fp32;" in res.output and "PASS model.ov.onnx [openvino] (fp32;" in res.output
        assert "OpenVINO (CPU): model.ov.onnx (FP32 file, queries in slices" in res.output
        assert "or model.ov.int8.onnx (the same with int8 attention scores: faster)" in res.output
        assert "PASS model.ov.int8.onnx [openvino] (int8;" in res.output
        assert "wrote " + str(out) + "/model.ov.int8.onnx: for OpenVINO, int8 Q and K^T in 1 attention block(s)" in res.output
    else:
        assert "OpenVINO is not installed: no model.ov.onnx" in res.output
    if installed_tensorrt_version() is None:
        assert "skipped TensorRT engines: tensorrt is not installed; build them on the device with:" in res.output
        assert res.output.count("trtexec --onnx=") == 4     # fp16 and int8, for 10.x and 11.x


def test_deploy_refuses_bad_data_before_writing_anything(tmp_path):
    out = tmp_path / "artifacts"
    out.mkdir()
    (out / "model.onnx").write_bytes(b"the previous set")
    res = CliRunner().invoke(cli, ["deploy", "-o", str(out), "--data", str(tmp_path / "nope")])
    assert res.exit_code == 2 and f"--data {tmp_path / 'nope'} does not exist" in res.output
    assert sorted(p.name for p in out.iterdir()) == ["model.onnx"]
    assert (out / "model.onnx").read_bytes() == b"the previous set"


def test_deploy_a_users_model_with_export_options_and_no_benchmark(tmp_path):
    """A user's factory named on the command line is the reference throughout (never taken from the files);
    --opset, --max-shapes and --skip-bench are honoured."""
    out = tmp_path / "artifacts"
    res = CliRunner().invoke(cli, ["deploy", "--model", "tests.user_models:declared", "--data", "synthetic",
                                   "-o", str(out), "--samples", "3", "--int8-target-rel-l2", "0", "--opset", "17",
                                   "--max-shapes", "x1:2x4x48x48,x2:2x4x48x48", "--skip-bench"],
                             catch_exceptions=False)
    assert res.exit_code == 0, res.output
    assert "== benchmark" not in res.output
    model = onnx.load(str(out / "model.onnx"))
    meta = {p.key: p.value for p in model.metadata_props}
    assert model.opset_import[0].version == 17 and meta["xattn.max_shapes"] == "x1:2x4x48x48,x2:2x4x48x48"
    count = 7 if HAS_OPENVINO else 5   # model.ov.onnx and model.ov.int8.onnx where OpenVINO is installed
    assert res.output.strip().splitlines()[-1] == f"PASS: {count} of {count} artifacts pass; everything is in {out}"


def test_which_file_where_names_only_files_that_passed(tmp_path):
    """A form not made and a form that failed validation are named as such and never recommended."""
    from tools.pipeline import ARTIFACTS, which_file_where

    paths = {key: tmp_path / name for key, name in ARTIFACTS.items()}
    passed = {"onnx", "fp16", "ort_int8"}   # int8 failed validation, ort was not made
    lines = which_file_where(paths, passed, {"ort": "nothing to fuse"})
    trt, ort, *openvino = lines
    assert len(openvino) == (1 if HAS_OPENVINO else 0)   # OpenVINO's line only where it is installed
    if HAS_OPENVINO:
        assert openvino[0] == ("OpenVINO (CPU): no file passed (model.ov.onnx FAILED validation; model.ov.int8.onnx "
                               "FAILED validation).")
    assert trt.startswith("TensorRT (Jetson, servers): model.fp16.onnx (FP16) or model.onnx")
    assert "model.int8.onnx FAILED validation" in trt and "model.int8.onnx (" not in trt
    assert "legacy implicit INT8" not in trt   # the cache belongs to the INT8 file that failed
    assert ort.startswith("ONNX Runtime (CPU): model.ort.int8.onnx (INT8 convolutions) or model.onnx (FP32")
    assert "model.ort.onnx not made" in ort and "model.ort.onnx (" not in ort
    nothing = which_file_where(paths, set(), {})
    assert all("no file passed" in line for line in nothing)


def test_the_fastest_form_is_recommended_only_if_its_scores_fit_the_budget():
    """A form that holds the N1 x N2 scores is fast at 64x64 but not recommended when its scores at the max shapes
    exceed the budget; the flat forms (fused, slices) stay candidates, and the line says what was left out."""
    from runtime.bench import BenchRow, LatencyStats
    from tools.pipeline import fastest_cpu_form

    def row(label, ms):
        return BenchRow(label, "x1:1x3x64x64,x2:1x3x64x64", 1, LatencyStats.from_seconds([ms / 1000] * 5), "fp32",
                        1000 / ms)

    rows = [row("model.ort.onnx", 60.0), row("model.onnx", 50.0), row("model.onnx [openvino-bf16]", 30.0),
            row("model.ort.onnx [openvino-bf16]", 31.0), row("model.ov.int8.onnx [openvino-bf16]", 34.0),
            row("torch eager", 10.0)]
    forms = {"model.ort.onnx": ("ort", "onnxruntime"), "model.onnx": ("onnx", "onnxruntime"),
             "model.onnx [openvino-bf16]": ("onnx", "openvino"), "model.ort.onnx [openvino-bf16]": ("ort", "openvino"),
             "model.ov.int8.onnx [openvino-bf16]": ("ov_int8", "openvino")}
    small = fastest_cpu_form(rows, forms, "model.ort.onnx", scores_at_max=1 << 30)   # 1 GiB: everything fits
    assert small.startswith("fastest CPU form measured here: model.onnx [openvino-bf16] (30.0 ms at 64x64, 2.00x")
    assert "Not recommended" not in small and "torch" not in small
    big = fastest_cpu_form(rows, forms, "model.ort.onnx", scores_at_max=8 << 30)     # the default model's 8 GiB
    assert big.startswith("fastest CPU form measured here: model.ov.int8.onnx [openvino-bf16] (34.0 ms at 64x64, 1.76x")
    assert big.endswith("Not recommended: 3 form(s) that hold the N1 x N2 scores (8.0 GiB at the max shapes, over the "
                        "4.0 GiB budget).")
    assert fastest_cpu_form(rows, forms, "model.ort.onnx", scores_at_max=8 << 30, budget=16 << 30).startswith(
        "fastest CPU form measured here: model.onnx [openvino-bf16]")
