"""One model, a form per backend: every writer's file passes onnx.checker, placement rules per target,
the measured FP16 decision, and the refusals (build of an ONNX Runtime file)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner
from onnx import numpy_helper

from exporter.attention import find_attention
from exporter.fp16 import Fp16Settings, convert_fp16
from exporter.onnx_export import export_onnx
from xattn.registry import load_model
from tools.cli import cli

FLOAT, FLOAT16, INT8, UINT8 = 1, 10, 3, 2


def invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


def checked(path):
    """The file passes the full checker (which also runs strict shape inference) and is sorted."""
    model = onnx.load(str(path))
    onnx.checker.check_model(model, full_check=True)
    return model


@pytest.fixture(scope="module")
def ranges(exported_net, tmp_path_factory):
    _, export = exported_net
    path = tmp_path_factory.mktemp("ranges") / "ranges.json"
    res = invoke("calibrate", export.path, "--samples", "6", "-o", path)
    assert res.exit_code == 0, res.output
    return path


def test_quantize_for_tensorrt_places_qdq_on_inputs_and_weights_only(exported_net, ranges, tmp_path):
    _, export = exported_net
    out = tmp_path / "m.int8.onnx"
    res = invoke("quantize", export.path, "--ranges", ranges, "--target", "tensorrt", "-o", out)
    assert res.exit_code == 0, res.output
    assert "Q/DQ on inputs and weights" in res.output and "the rest FP16" in res.output
    model = checked(out)
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    producer = {o: n for n in model.graph.node for o in n.output}
    qs = [n for n in model.graph.node if n.op_type == "QuantizeLinear"]
    assert qs and all(np.all(inits[n.input[2]] == 0) for n in qs)                   # zero points 0
    for q in qs:   # never on a convolution's output or a Softmax
        source = producer.get(q.input[0])
        assert source is None or source.op_type not in ("Conv", "Softmax"), q.name
    convs = [n for n in model.graph.node if n.op_type == "Conv"]
    assert len(convs) == 8
    for conv in convs:   # each conv reads dequantized activations and dequantized int8 weights
        assert producer[conv.input[0]].op_type == "DequantizeLinear"
        weight_dq = producer[conv.input[1]]
        assert weight_dq.op_type == "DequantizeLinear" and inits[weight_dq.input[0]].dtype == np.int8
        assert {a.name: a.i for a in weight_dq.attribute}["axis"] == 0
    # everything not quantized is FP16 (graph I/O stays FP32); attention FP16, scale on Q: fusible
    assert {i.data_type for i in model.graph.initializer} <= {FLOAT16, INT8, 7}
    assert [i.type.tensor_type.elem_type for i in (*model.graph.input, *model.graph.output)] == [FLOAT] * 3
    (block,) = find_attention(model)
    assert block.precision == "fp16" and block.fusible("tensorrt")[0]
    assert model.opset_import[0].version == 19        # FP16 Q/DQ scales need opset 19


def test_quantize_high_precision_fp32_keeps_the_rest_fp32(exported_net, ranges, tmp_path):
    _, export = exported_net
    out = tmp_path / "m.int8.fp32.onnx"
    res = invoke("quantize", export.path, "--ranges", ranges, "--high-precision", "fp32", "-o", out)
    assert res.exit_code == 0, res.output
    model = checked(out)
    assert FLOAT16 not in {i.data_type for i in model.graph.initializer}
    (block,) = find_attention(model)
    assert block.precision == "fp32" and not block.fusible("tensorrt")[0]


def test_quantize_for_onnxruntime_fuses_attention_and_uses_uint8(exported_net, ranges, tmp_path):
    _, export = exported_net
    out = tmp_path / "m.ort.int8.onnx"
    res = invoke("quantize", export.path, "--ranges", ranges, "--target", "onnxruntime", "-o", out)
    assert res.exit_code == 0, res.output
    assert "attention fused (com.microsoft.MultiHeadAttention)" in res.output
    model = checked(out)
    ops = [n.op_type for n in model.graph.node]
    assert "MultiHeadAttention" in ops and "Softmax" not in ops
    inits = {i.name: i for i in model.graph.initializer}
    activation_qs = [n for n in model.graph.node if n.op_type == "QuantizeLinear" and n.input[0] not in inits]
    assert activation_qs and all(inits[n.input[2]].data_type == UINT8 for n in activation_qs)
    weights = [numpy_helper.to_array(i) for i in model.graph.initializer if i.data_type == INT8 and len(i.dims) == 4]
    # 7-bit weights (reduce_range) only where this CPU has no VNNI; full 8-bit where it has (xattn/cpu.py)
    from xattn.cpu import cpu_features, has_vnni

    seven_bit = all(np.abs(w.astype(np.int32)).max() <= 64 for w in weights)
    assert len(weights) == 8 and seven_bit == (not has_vnni(cpu_features()))
    # and it still computes the model (judged like INT8, on photos, in test_deploy); a quick sanity here:
    assert find_attention(model) == []


def test_build_refuses_onnxruntime_files(exported_net, ranges, tmp_path):
    _, export = exported_net
    out = tmp_path / "m.ort.int8.onnx"
    assert invoke("quantize", export.path, "--ranges", ranges, "--target", "onnxruntime", "-o", out).exit_code == 0
    res = invoke("build", out, "-o", tmp_path / "m.engine")
    assert res.exit_code == 2
    assert "is made for ONNX Runtime (com.microsoft.MultiHeadAttention)" in res.output
    assert "TensorRT cannot parse com.microsoft ops" in res.output and "build model.onnx" in res.output
    assert not (tmp_path / "m.engine").exists()


def test_optimize_writes_a_verified_fused_file(exported_net, tmp_path):
    _, export = exported_net
    out = tmp_path / "m.ort.onnx"
    res = invoke("optimize", export.path, "--target", "onnxruntime", "-o", out)
    assert res.exit_code == 0, res.output
    assert "verified against PyTorch at 4 shape sets" in res.output
    model = checked(out)
    assert [n.op_type for n in model.graph.node].count("MultiHeadAttention") == 1
    meta = {p.key: p.value for p in model.metadata_props}
    assert meta["xattn.target"] == "onnxruntime" and meta["xattn.precision"] == "fp32"
    again = invoke("optimize", out, "-o", tmp_path / "again.onnx")
    assert again.exit_code == 2 and "already optimized for ONNX Runtime" in again.output
    validated = invoke("validate", out, "--shapes", "x1:2x3x20x12,x2:2x3x7x30")
    assert validated.exit_code == 0 and validated.output.startswith("PASS m.ort.onnx"), validated.output


@pytest.mark.rss_limit_mib(3072, "--check-data at its default sizes (96x96) on the default model: 2.2 GiB")
def test_convert_options_keep_attention_and_check_data(exported_net, tmp_path):
    _, export = exported_net
    res = invoke("convert", export.path, "--fp16", "--keep-attention-fp32", "-o", tmp_path / "k.onnx")
    assert res.exit_code == 0 and "attention score path FP32" in res.output, res.output
    (block,) = find_attention(checked(tmp_path / "k.onnx"))
    assert block.precision == "fp32"
    res = invoke("convert", export.path, "--fp16", "--check-data", "shipped", "--target", "onnxruntime",
                 "-o", tmp_path / "c.onnx")
    assert res.exit_code == 0, res.output
    assert "vs FP32 on shipped photos (scikit-image), seed 1000" in res.output
    meta = {p.key: p.value for p in checked(tmp_path / "c.onnx").metadata_props}
    assert meta["xattn.target"] == "onnxruntime"


def test_fp16_missing_the_bound_measures_an_fp32_score_path_and_keeps_the_better(exported_small, tmp_path):
    """A bound no FP16 model meets (0): both forms are measured on the same data and the better one is
    written, with the note naming the block and both figures. (ONNX Runtime's CPU computes FP16 MatMul and
    Softmax in FP32 internally, so FP16 *overflow* of scores cannot be shown on this machine: see README.)"""
    _, export = exported_small
    notes = []
    result = convert_fp16(export.path, tmp_path / "b.fp16.onnx", Fp16Settings(bound=0.0), say=notes.append)
    assert result.rel_l2_all_fp16 > 0 and len(notes) == 1 and "node_softmax" in notes[0]
    assert f"{result.rel_l2_all_fp16:.3g}" in notes[0]
    assert result.rel_l2 <= result.rel_l2_all_fp16
    (block,) = find_attention(checked(result.path))
    assert block.precision == ("fp16" if result.attention_fp16 else "fp32")
    assert result.attention_fp16 == (result.rel_l2 == result.rel_l2_all_fp16)
    forced = convert_fp16(export.path, tmp_path / "forced.onnx", Fp16Settings(bound=0.0, keep_attention_fp32=False))
    assert forced.attention_fp16 and forced.rel_l2 is None


def test_fp16_error_from_elsewhere_keeps_attention_fp16_and_says_so(tmp_path):
    """Projections scaled up 60x: FP16 rounding of Q and K (not the scores) is what costs accuracy, so an
    FP32 score path does not help; attention stays FP16 (fusible) and the note says why."""
    model = load_model("cross-attention", model_args={"in_channels": 4, "out_channels": 16})
    with torch.no_grad():
        model.module.conv_query.weight.mul_(60.0)
        model.module.conv_key.weight.mul_(60.0)
    export = export_onnx(model, tmp_path / "sharp.onnx")
    notes = []
    result = convert_fp16(export.path, tmp_path / "sharp.fp16.onnx", Fp16Settings(), say=notes.append)
    assert result.rel_l2 > 1e-3 and result.attention_fp16
    assert "keeping the score path of node_softmax in FP32 does not help" in notes[0]


def test_attention_op_onnx_writes_opset23_attention_and_plans_refuse_it_before_10_14(exported_net, ranges, tmp_path):
    _, export = exported_net
    out = tmp_path / "m.attn.fp16.onnx"
    res = invoke("convert", export.path, "--fp16", "--attention-op", "onnx", "-o", out)
    assert res.exit_code == 0 and "as ONNX Attention (opset 23" in res.output, res.output
    model = checked(out)
    attention = [n for n in model.graph.node if n.op_type == "Attention"]
    assert len(attention) == 1 and model.opset_import[0].version == 23
    assert "Softmax" not in [n.op_type for n in model.graph.node]
    # ONNX Runtime runs ONNX Attention: judged against PyTorch like any FP16 file
    validated = invoke("validate", out, "--shapes", "x1:2x3x20x12,x2:2x3x7x30")
    assert validated.exit_code == 0 and validated.output.startswith("PASS"), validated.output
    refused = invoke("build", out, "-o", tmp_path / "m.engine", "--target-trt", "10.3.0")
    assert refused.exit_code == 2
    assert "not possible: TensorRT 10.3.0 cannot parse ONNX Attention" in refused.output
    for version in ("10.13.3", "10.14.1", "11.4.0"):
        lines = invoke("build", out, "-o", tmp_path / "m.engine", "--target-trt", version).output
        assert ("cannot parse ONNX Attention" in lines) == (version == "10.13.3"), (version, lines)
    int8 = tmp_path / "m.attn.int8.onnx"
    res = invoke("quantize", export.path, "--ranges", ranges, "--attention-op", "onnx", "-o", int8)
    assert res.exit_code == 0, res.output
    assert [n.op_type for n in checked(int8).graph.node].count("Attention") == 1
    res = invoke("quantize", export.path, "--ranges", ranges, "--attention-op", "onnx", "--target", "onnxruntime",
                 "-o", tmp_path / "x.onnx")
    assert res.exit_code == 2 and "--attention-op onnx is for the TensorRT target" in res.output
