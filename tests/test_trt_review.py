"""The plain-Python side of the TensorRT review's findings (shared/notes/tensorrt-review.md): each test
fails on the code before the fix. The TensorRT calls themselves are checked by name in test_trt_api.py
and run in test_tensorrt_gpu.py where TensorRT and a GPU exist."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

from xattn.trt_cache import read_trt_cache, write_trt_cache
from exporter.engine import check_trtexec_calibration, opt_shaped_feeds, plan_for, read_for_build
from xattn.trt_plan import BuildOptions, PlanError, make_plan, prepare_calibration
from tools.cli import cli
from xattn.errors import BadInputError, CalibrationError
from xattn.shapes import parse_shape_set

OPT = {"x1": (1, 3, 64, 64), "x2": (1, 3, 32, 48)}


def legacy_int8_plan(cache):
    return make_plan("10.3.0", "fp32", BuildOptions(precision="int8", calibration_cache=str(cache) if cache else None,
                                                    calibration_data="shipped" if cache is None else None))


def test_trtexec_legacy_int8_line_needs_an_entropy2_cache(tmp_path):
    """L1: trtexec's calibrator is always EntropyCalibration2: it skips a MinMax cache and binds null inputs."""
    minmax, entropy = tmp_path / "minmax.cache", tmp_path / "entropy.cache"
    write_trt_cache(minmax, {"x1": 2.0}, "minmax", "10.3.0")
    write_trt_cache(entropy, {"x1": 2.0}, "entropy", "10.3.0")
    with pytest.raises(PlanError, match="trtexec's calibrator is EntropyCalibration2 and skips a MinMaxCalibration"):
        check_trtexec_calibration(legacy_int8_plan(minmax))
    with pytest.raises(PlanError, match="trtexec would calibrate implicit INT8 on random data"):
        check_trtexec_calibration(legacy_int8_plan(None))
    check_trtexec_calibration(legacy_int8_plan(entropy))   # the one line that works


def test_build_prints_no_impossible_legacy_line(exported_net, tmp_path):
    _, export = exported_net
    cache = tmp_path / "m.cache"
    assert CliRunner().invoke(cli, ["calibrate", str(export.path), "--samples", "2", "-o", str(tmp_path / "r.json"),
                                    "--cache", str(cache)]).exit_code == 0
    res = CliRunner().invoke(cli, ["build", str(export.path), "-o", str(tmp_path / "m.engine"), "--precision", "int8",
                                   "--calibration-cache", str(cache), "--target-trt", "10.3.0"])
    assert res.exit_code == 2 and "--calib=" not in res.output
    assert "not possible: trtexec's calibrator is EntropyCalibration2 and skips a MinMaxCalibration cache" in res.output


def test_calibration_feeds_must_have_the_opt_shape():
    """L2: TensorRT calibrates at OPT and reads OPT-sized buffers; a partial batch would be misread."""
    rng = np.random.default_rng(0)
    good = {n: rng.standard_normal(s).astype(np.float32) for n, s in OPT.items()}
    partial = {n: rng.standard_normal((1, *s[1:3], s[3] - 1)).astype(np.float32) for n, s in OPT.items()}
    plan = legacy_int8_plan(None)
    assert opt_shaped_feeds([good, partial, good], OPT, plan) == [good, good]
    assert any("dropped 1 feeds whose shape is not the OPT shape" in n for n in plan.notes)
    with pytest.raises(BadInputError, match=r"no calibration feed has the calibration profile's OPT shape"):
        opt_shaped_feeds([partial], OPT)


def test_a_tensorrt_written_cache_is_served_with_a_note_and_a_foreign_one_refused(exported_net, tmp_path):
    """L3: TensorRT's own caches also name its internal tensors; a cache sharing nothing is another model's."""
    _, export = exported_net
    model = onnx.load(str(export.path))
    own = tmp_path / "trt.cache"
    own.write_text("TRT-100300-EntropyCalibration2\nx1: 3c23d70a\n(Unnamed Layer* 0) [Convolution]_output: 3c23d70a\n")
    plan = make_plan("10.3.0", "fp32", BuildOptions(precision="int8", calibration_cache=str(own)))
    before = own.read_bytes()
    text = prepare_calibration(plan, model, "10.3.0")
    assert "(Unnamed Layer* 0) [Convolution]_output" in text and own.read_bytes() == before
    assert any("TensorRT-internal" in n for n in plan.notes)
    foreign = tmp_path / "foreign.cache"
    foreign.write_text("TRT-100300-EntropyCalibration2\nimage: 3c23d70a\n")
    with pytest.raises(CalibrationError, match="was made for another model"):
        prepare_calibration(make_plan("10.3.0", "fp32", BuildOptions(precision="int8", calibration_cache=str(foreign))),
                            model, "10.3.0")


@pytest.mark.parametrize("algorithm", ["EntropyCalibration", "LegacyCalibration"])
def test_only_the_two_servable_cache_algorithms_are_read(tmp_path, algorithm):
    """R7: an Entropy (v1) or Legacy cache would be served to an EntropyCalibration2 calibrator, which skips it."""
    path = tmp_path / "old.cache"
    path.write_text(f"TRT-100300-{algorithm}\nx1: 3c23d70a\n")
    with pytest.raises(CalibrationError, match="is not a TensorRT calibration cache"):
        read_trt_cache(path)


def test_plans_for_10_3_refuse_opsets_above_20(exported_net, tmp_path):
    """R8: TensorRT 10.0-10.3's parser documents opsets 9..20."""
    _, export = exported_net
    model = onnx.load(str(export.path))
    model.opset_import[0].version = 21
    path = tmp_path / "opset21.onnx"
    onnx.save(model, str(path))
    source = read_for_build(path)
    with pytest.raises(PlanError, match=r"TensorRT 10.3.0's ONNX parser reads opsets 9..20; this file is opset 21"):
        plan_for(source, BuildOptions(), "10.3.0")
    assert plan_for(source, BuildOptions(), "10.13.3").trt_version == "10.13.3"


def test_engine_io_without_a_numpy_type_is_refused():
    """R5: BF16/FP8 engine I/O read as float32 would be wrong data, not an error."""
    from runtime.tensorrt_runner import numpy_dtype
    from xattn.errors import ArtifactError

    assert numpy_dtype("HALF", "y") == np.float16
    with pytest.raises(ArtifactError, match="engine tensor 'y' is BF16, which has no numpy type"):
        numpy_dtype("BF16", "y")


def test_int8_attention_is_never_reported_fusible_under_the_fp16_rule():
    """Review 2, N4: INT8 fused MHA needs Q/DQ after Softmax and after the second MatMul, which no block this
    finder recognises has; the FP16 rule (head 16..256) must not say it fuses."""
    from exporter.attention import AttentionBlock

    block = AttentionBlock("sm", "mm1", "mm2", "matmul", "q", "kt", "v", "y", scale=0.125, scale_position="query",
                           rank=4, heads=2, head_dim=64, kv_heads=2, precision="int8")
    ok, why = block.fusible("tensorrt")
    assert not ok and "needs Q/DQ after Softmax and after the second MatMul" in why
    block.precision = "fp16"
    assert block.fusible("tensorrt")[0] is True


@pytest.mark.parametrize("op, axis, ok", [("ConvTranspose", 1, True), ("ConvTranspose", 0, False),
                                          ("Conv", 0, True), ("Conv", 1, False)])
def test_weight_axis_is_checked_per_op(op, axis, ok):
    """Review 2, N5: ConvTranspose weights (C_in, C_out, kH, kW) are per-channel on axis 1, Conv's on axis 0."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    from calibration.quantize import check_qdq_for_tensorrt
    from xattn.errors import CheckFailedError

    weight = np.ones((4, 6, 3, 3), np.int8)
    scale = np.full((weight.shape[axis],), 0.1, np.float32)
    inits = [numpy_helper.from_array(weight, "w"), numpy_helper.from_array(scale, "s"),
             numpy_helper.from_array(np.zeros(weight.shape[axis], np.int8), "z")]
    nodes = [helper.make_node("DequantizeLinear", ["w", "s", "z"], ["wf"], axis=axis, name="dq"),
             helper.make_node(op, ["x", "wf"], ["y"], name="op")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)])
    if ok:
        check_qdq_for_tensorrt(model)
    else:
        with pytest.raises(CheckFailedError, match="is not quantized per output channel"):
            check_qdq_for_tensorrt(model)


def test_the_opset_23_attention_file_is_not_warned_about_on_10_14():
    """Review 2, N6: 10.14 added the importer of opset 23's Attention; the lint must not call opset 23 out of range."""
    from exporter.trt_lint import opset_range

    assert opset_range("10.14.1")[1] >= 23 and opset_range("10.13.3")[1] == 20 and opset_range("10.3.0") == (9, 20, True)


def test_fp32_onnx_attention_for_tensorrt_is_refused_with_the_reason(exported_small, tmp_path):
    """Review 2, N11: ONNX Attention imports as a non-decomposable IAttention; FP32 attention may have no
    fused kernel, so the build would fail on the device. Refused before any work, exit 2."""
    _, export = exported_small
    res = CliRunner().invoke(cli, ["quantize", str(export.path), "--attention-op", "onnx", "--high-precision", "fp32",
                                   "-o", str(tmp_path / "m.int8.onnx"), "--samples", "2"])
    assert res.exit_code == 2 and not (tmp_path / "m.int8.onnx").exists()
    assert "non-decomposable" in res.output and "use --high-precision fp16" in res.output


def test_fp32_means_fp32_unless_tf32_is_asked_for(exported_small):
    """Review 2, N9: TensorRT runs FP32 layers as TF32 on Ampere+ by default; builds clear it (as Polygraphy
    does), trtexec lines say --noTF32, and --tf32 turns it back on, recorded in the plan."""
    _, export = exported_small
    plain = CliRunner().invoke(cli, ["build", str(export.path), "-o", "m.engine", "--target-trt", "10.3.0"])
    allowed = CliRunner().invoke(cli, ["build", str(export.path), "-o", "m.engine", "--target-trt", "10.3.0", "--tf32"])
    assert plain.exit_code == allowed.exit_code == 2
    assert "--noTF32" in plain.output and "--noTF32" not in allowed.output
    assert make_plan("10.3.0", "fp32", BuildOptions(tf32=True)).as_dict()["tf32"] is True
    assert make_plan("10.3.0", "fp32", BuildOptions()).tf32 is False


def test_a_trtexec_line_never_points_at_a_cache_headed_for_another_version(tmp_path):
    """Review 2, N8: TensorRT ignores a cache headed with another version, and trtexec then calibrates with
    null inputs: the line for 10.13 refuses a TRT-100300 cache and names the command that writes a 10.13 one."""
    cache = tmp_path / "entropy.cache"
    write_trt_cache(cache, {"x1": 2.0}, "entropy", "10.3.0")
    plan = make_plan("10.13.3", "fp32", BuildOptions(precision="int8", calibration_cache=str(cache)))
    with pytest.raises(PlanError, match="headed TRT-100300; trtexec 10.13.3 reads only TRT-101303 caches"):
        check_trtexec_calibration(plan)
    write_trt_cache(cache, {"x1": 2.0}, "entropy", "10.13.3")
    check_trtexec_calibration(plan)


def test_tiny_activation_ranges_keep_a_positive_fp16_scale(exported_small, tmp_path):
    """Review 2, N16: an activation scale below FP16's smallest normal would round to 0 in the FP16 file, which
    TensorRT's parser refuses ("Scale coefficients must all be positive")."""
    from onnx import numpy_helper

    from calibration.quantize import quantize_onnx
    from calibration.ranges import RangeTable, calibration_tensors, model_sha256

    _, export = exported_small
    model = onnx.load(str(export.path))
    tiny = RangeTable({name: 1e-9 for name in calibration_tensors(model, ("Conv",))}, "minmax", None, 1, "0" * 64,
                      "test ranges", True, model_sha256(model))
    out = quantize_onnx(export.path, tiny, tmp_path / "tiny.int8.onnx")
    model = onnx.load(str(out.path))
    scales = [numpy_helper.to_array(i) for i in model.graph.initializer if i.name.endswith("_qdq_scale")]
    assert scales and all(np.all(s.astype(np.float16) > 0) for s in scales)
