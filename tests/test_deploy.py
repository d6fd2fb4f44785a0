"""The main job end to end (small sample counts): every artifact made, validated, reported, benchmarked."""

import json
import xml.etree.ElementTree as ET

from click.testing import CliRunner

from calibration.trt_cache import read_trt_cache
from exporter.trt_build import installed_tensorrt_version
from tools.cli import cli


def test_deploy_makes_and_validates_everything(tmp_path):
    out = tmp_path / "artifacts"
    res = CliRunner().invoke(cli, ["deploy", "-o", str(out), "--samples", "4"], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    for name in ("model.onnx", "model.fp16.onnx", "model.int8.onnx", "model.int8.cache", "model.ranges.json",
                 "model.export.json", "reports/accuracy.json", "reports/accuracy.xml", "reports/accuracy.md"):
        assert (out / name).is_file(), name
    report = json.loads((out / "reports/accuracy.json").read_text())
    assert [a["precision"] for a in report["artifacts"]] == ["fp32", "fp16", "int8"]
    assert report["passed"] is True and all(not a["synthetic_data"] for a in report["artifacts"])
    suites = ET.parse(out / "reports/accuracy.xml").getroot().findall("testsuite")
    assert len(suites) == 3 and all(s.get("failures") == "0" for s in suites)
    assert read_trt_cache(out / "model.int8.cache").version_number == 100300
    assert "== benchmark" in res.output and "torch eager" in res.output and "1.00x" in res.output
    if installed_tensorrt_version() is None:
        assert "skipped TensorRT engines: tensorrt is not installed; build them on the device with:" in res.output
        assert res.output.count("trtexec --onnx=") == 4     # fp16 and int8, for 10.x and 11.x
