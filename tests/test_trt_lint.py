"""xattn check: one small graph per finding, and every file the main job writes for TensorRT passes."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

from exporter.trt_lint import check_for_tensorrt, opset_range
from tools.cli import cli


def save(tmp_path, nodes, inits=(), opset=18, name="g.onnx", extra_opsets=()):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])
    model = helper.make_model(helper.make_graph(nodes, "g", [x], [y], list(inits)),
                              opset_imports=[helper.make_opsetid("", opset), *extra_opsets])
    path = tmp_path / name
    onnx.save(model, str(path))
    return path


def rules(report):
    return [i.rule for i in report.findings], [i.rule for i in report.warnings]


def test_clean_graph_passes(tmp_path):
    report = check_for_tensorrt(save(tmp_path, [helper.make_node("Relu", ["x"], ["y"], name="r")]), "10.3.0")
    assert report.passed and rules(report) == ([], [])


def test_opset_outside_the_parser_range(tmp_path):
    path = save(tmp_path, [helper.make_node("Relu", ["x"], ["y"])], opset=21)
    report = check_for_tensorrt(path, "10.3.0")
    assert rules(report)[0] == ["opset"] and "outside the parser's range 9..20" in report.findings[0].message
    assert check_for_tensorrt(path, "11.4.0").passed
    assert opset_range("10.13.3") == (9, 20, False)
    undocumented = check_for_tensorrt(path, "10.13.3")     # no source states 10.13's bound: a warning
    assert undocumented.passed and "no source states" in undocumented.warnings[0].message


def test_contrib_op_and_onnx_attention_before_10_14(tmp_path):
    path = save(tmp_path, [helper.make_node("Gelu", ["x"], ["y"], domain="com.microsoft", name="g")],
                extra_opsets=[helper.make_opsetid("com.microsoft", 1)])
    report = check_for_tensorrt(path, "11.4.0")
    assert rules(report)[0] == ["op"] and "Plugin not found" in report.findings[0].message
    q = helper.make_tensor_value_info("q", TensorProto.FLOAT, [1, 1, 4, 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 1, 4, 8])
    model = helper.make_model(helper.make_graph([helper.make_node("Attention", ["q", "q", "q"], ["y"], name="a")],
                                                "a", [q], [y]), opset_imports=[helper.make_opsetid("", 23)])
    onnx.save(model, str(tmp_path / "a.onnx"))
    old = check_for_tensorrt(tmp_path / "a.onnx", "10.13.3")
    assert rules(old)[0] == ["op"] and "ONNX Attention needs TensorRT 10.14+" in old.findings[0].message
    assert check_for_tensorrt(tmp_path / "a.onnx", "10.15.0").passed


def test_nonzero_zero_point_and_int32_bias_dequantize(tmp_path):
    inits = [numpy_helper.from_array(np.array(0.1, np.float32), "s"), numpy_helper.from_array(np.array(3, np.int8), "z"),
             numpy_helper.from_array(np.array([1, 2, 3, 4], np.int32), "b32"),
             numpy_helper.from_array(np.array(0, np.int32), "z32")]
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"], name="q"),
             helper.make_node("DequantizeLinear", ["q", "s", "z"], ["dq"], name="dq"),
             helper.make_node("DequantizeLinear", ["b32", "s", "z32"], ["bias"], name="bias_dq"),
             helper.make_node("Add", ["dq", "bias"], ["y"], name="add")]
    report = check_for_tensorrt(save(tmp_path, nodes, inits), "10.3.0")
    messages = [i.message for i in report.findings]
    assert sum("non-zero zero point" in m for m in messages) == 2
    assert any("INT32 (bias) DequantizeLinear" in m for m in messages)


def test_unsorted_graph(tmp_path):
    nodes = [helper.make_node("Relu", ["t"], ["y"], name="second"), helper.make_node("Relu", ["x"], ["t"], name="first")]
    report = check_for_tensorrt(save(tmp_path, nodes), "10.3.0")
    assert rules(report)[0] == ["order"] and "not topologically sorted" in report.findings[0].message


def test_dla_needs_fixed_shapes_and_a_version_with_dla(exported_net):
    _, export = exported_net
    report = check_for_tensorrt(export.path, "11.2.0", dla=True)
    assert "dla" in rules(report)[0] and "dla" in rules(report)[1]
    assert any("dynamic dimensions" in w.message for w in report.warnings)


def test_cli_check_on_what_deploy_writes_and_memory_budget(exported_net, tmp_path):
    _, export = exported_net
    fp16 = tmp_path / "m.fp16.onnx"
    assert CliRunner().invoke(cli, ["convert", str(export.path), "--fp16", "-o", str(fp16)]).exit_code == 0
    res = CliRunner().invoke(cli, ["check", str(fp16), "--json"])
    assert res.exit_code == 0, res.output
    reports = json.loads(res.output)
    assert [r["trt_version"] for r in reports] == ["10.3.0", "10.13.3", "11.4.0"]
    assert all(r["passed"] and r["warnings"] == [] for r in reports)   # attention fuses: no memory warning
    res = CliRunner().invoke(cli, ["check", str(export.path), "--target-trt", "10.3.0", "--memory-budget", "1GiB"])
    assert res.exit_code == 0
    assert "will not fuse: attention runs in fp32" in res.output
    assert "holds 8.0 GiB of scores (budget 1.0 GiB)" in res.output
    ort = tmp_path / "m.ort.onnx"
    assert CliRunner().invoke(cli, ["optimize", str(export.path), "-o", str(ort)]).exit_code == 0
    res = CliRunner().invoke(cli, ["check", str(ort), "--dla"])
    assert res.exit_code == 1 and "com.microsoft.MultiHeadAttention is not an ONNX op" in res.output


def test_build_prints_lint_warnings_with_its_memory_budget(exported_net, tmp_path):
    _, export = exported_net
    res = CliRunner().invoke(cli, ["build", str(export.path), "-o", str(tmp_path / "m.engine"), "--target-trt", "10.3.0",
                                   "--memory-budget", "1GiB"])
    assert res.exit_code == 2   # no TensorRT here: the lines are printed, nothing is built
    assert "# warning: [memory] unfused attention at the max shapes" in res.output and "(budget 1.0 GiB)" in res.output
    quiet = CliRunner().invoke(cli, ["build", str(export.path), "-o", str(tmp_path / "m.engine"), "--target-trt",
                                     "10.3.0", "--memory-budget", "16GiB"])
    assert "[memory]" not in quiet.output


def test_build_memory_warning_follows_the_profiles_given(exported_net, tmp_path):
    """With explicit profiles the memory check uses their max shapes, not the export record's 8x3x128x128."""
    _, export = exported_net
    res = CliRunner().invoke(cli, ["build", str(export.path), "-o", str(tmp_path / "m.engine"), "--target-trt", "10.3.0",
                                   "--memory-budget", "1MiB", "--min-shapes", "x1:1x3x8x8,x2:1x3x8x8",
                                   "--opt-shapes", "x1:1x3x16x16,x2:1x3x16x16",
                                   "--max-shapes", "x1:2x3x32x32,x2:2x3x24x24"])
    assert res.exit_code == 2, res.output
    # 2 x (32*32) x (24*24) float scores = 4.5 MiB
    assert "unfused attention at the max shapes x1:2x3x32x32,x2:2x3x24x24 holds 4.5 MiB of scores (budget 1.0 MiB)" in res.output
    assert "8x3x128x128" not in res.output.split("[memory]")[1].splitlines()[0]
