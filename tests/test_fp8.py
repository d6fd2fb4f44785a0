"""FP8 (float8e4m3fn) Q/DQ for TensorRT: placement, accuracy measured on ONNX Runtime's CPU against the FP32
file and against PyTorch, the ONNX Runtime level that computes it right, and the plan's refusals."""

from __future__ import annotations

import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto

from xattn.trt_plan import BuildOptions, PlanError, make_plan
from tools.cli import cli
from xattn.provenance import get_onnx_metadata


def run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


@pytest.fixture(scope="module")
def fp8(exported_net, tmp_path_factory):
    _, export = exported_net
    out = tmp_path_factory.mktemp("fp8") / "model.fp8.onnx"
    res = run("quantize", export.path, "--precision", "fp8", "--samples", "24", "-o", out)
    assert res.exit_code == 0, res.output
    return export.path, out, res.output


def test_fp8_places_qdq_around_attention_as_tensorrts_fp8_mha_wants(fp8):
    _, path, output = fp8
    model = onnx.load(str(path))
    onnx.checker.check_model(model, full_check=True)
    zero_types = {i.data_type for i in model.graph.initializer if i.name.endswith("zero_point")}
    assert zero_types == {TensorProto.FLOAT8E4M3FN}
    producer = {o: n for n in model.graph.node for o in n.output}
    softmax = next(n for n in model.graph.node if n.op_type == "Softmax")
    matmuls = [n for n in model.graph.node if n.op_type == "MatMul"]
    bmm2 = next(m for m in matmuls if any(producer.get(i) is not None and producer[i].op_type == "DequantizeLinear"
                                          and producer[producer[i].input[0]].input[0] == softmax.output[0]
                                          for i in m.input))
    bmm1 = producer[softmax.input[0]] if producer[softmax.input[0]].op_type == "MatMul" else None
    # both BMM inputs come through Q/DQ; the Softmax output's scale is the fixed 1/448
    for node in (bmm1, bmm2):
        assert node is not None and all(producer[i].op_type == "DequantizeLinear" for i in node.input), node
    scale = next(i for i in model.graph.initializer if i.name == f"{softmax.output[0]}_fp8_scale")
    assert float(onnx.numpy_helper.to_array(scale)) == pytest.approx(1 / 448, rel=1e-3)
    record = get_onnx_metadata(model)
    assert record["precision"] == "fp8" and record["quantization"]["type"] == "float8e4m3fn"
    assert record["quantization"]["attention_fp8"] == [softmax.name]
    assert "attention in FP8 in 1 block(s)" in output


def test_fp8_accuracy_against_pytorch_and_the_level_onnx_runtime_computes_it_at(fp8):
    _, path, output = fp8
    record = get_onnx_metadata(onnx.load(str(path)))
    if record["ort_crashed_at"] != "none":   # ORT 1.32 rewrites float8 Q/DQ wrongly when it optimises
        assert record["ort_optimization_level"] == "ORT_DISABLE_ALL" and "rel. L2" in record["ort_crashed_at"]
    res = run("validate", path, "--data", "shipped", "--samples", "4")
    assert res.exit_code == 0, res.output
    assert "PASS model.fp8.onnx (fp8; rel_l2 <= 0.1" in res.output
    worst = max(float(v) for v in __import__("re").findall(r"rel_l2 ([0-9.e-]+)", res.output))
    assert 5e-3 < worst < 0.1        # FP8 really rounds (not a float file), within its stated bound


def test_fp8_takes_no_int8_options_and_builds_only_where_the_gpu_has_fp8(exported_small, tmp_path):
    _, export = exported_small
    res = run("quantize", export.path, "--precision", "fp8", "--ranges", "r.json", "-o", tmp_path / "m.onnx")
    assert res.exit_code == 2 and "--precision fp8 does not take --ranges" in res.output
    with pytest.raises(PlanError, match="TensorRT builds FP8 only from an FP8 Q/DQ ONNX"):
        make_plan("10.3.0", "fp32", BuildOptions(precision="fp8"))
    with pytest.raises(PlanError, match="DLA has no FP8"):
        make_plan("10.3.0", "fp8", BuildOptions(dla_core=0))
    plan = make_plan("11.4.0", "fp8", BuildOptions())
    assert plan.precision == "fp8" and any("compute capability 8.9" in n for n in plan.notes)


def test_fp8_trtexec_lines_say_which_gpus_build_it(fp8):
    _, path, _ = fp8
    res = run("build", path, "-o", path.with_suffix(".engine"))
    assert res.exit_code == 2 and "# FP8 needs a GPU of compute capability 8.9 or newer" in res.output
    assert "--stronglyTyped" in res.output and "--fp16" not in res.output
