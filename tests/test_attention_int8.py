"""``calibration.attention_int8`` (``quantize --target openvino``) on a hand-written block, against numpy: the
file ONNX Runtime runs computes exactly the quantized arithmetic the module docstring describes, and nothing
else; OpenVINO's integer reading of the same file is checked in tests/test_openvino.py."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime
import pytest
from onnx import TensorProto, helper, numpy_helper

from calibration.attention_int8 import quantize_attention_scores
from xattn.data import CalibrationData
from xattn.errors import BadInputError

N2, D = 40, 8


def _guarded_block():
    """SDPA's form with a boolean mask: ``Where(IsNaN(p), 0, p)`` after ``softmax(Q K^T * 0.25 + mask)``, then
    ``@ V``. Q ``(1, n1, 8)``, K^T ``(1, 8, 40)``, V ``(1, 40, 8)`` and the mask ``(1, n1, 40)`` are inputs."""
    nodes = [helper.make_node("MatMul", ["q", "kt"], ["s"], name="score"),
             helper.make_node("Mul", ["s", "quarter"], ["ss"], name="scale"),
             helper.make_node("Add", ["ss", "mask"], ["sm"], name="add_mask"),
             helper.make_node("Softmax", ["sm"], ["p"], name="softmax", axis=-1),
             helper.make_node("IsNaN", ["p"], ["nan"], name="isnan"),
             helper.make_node("Where", ["nan", "zero", "p"], ["pg"], name="guard"),
             helper.make_node("MatMul", ["pg", "v"], ["y"], name="out")]
    inputs = [helper.make_tensor_value_info("q", TensorProto.FLOAT, [1, "n1", D]),
              helper.make_tensor_value_info("kt", TensorProto.FLOAT, [1, D, N2]),
              helper.make_tensor_value_info("v", TensorProto.FLOAT, [1, N2, D]),
              helper.make_tensor_value_info("mask", TensorProto.FLOAT, [1, "n1", N2])]
    graph = helper.make_graph(nodes, "guarded", inputs,
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, "n1", D])],
                              [numpy_helper.from_array(np.array(0.25, np.float32), "quarter"),
                               numpy_helper.from_array(np.array(0.0, np.float32), "zero")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def _feed(rng, n1):
    # V's channels at very different scales, so one scale per tensor would lose the small ones
    mask = np.where(rng.random((1, n1, N2)) < 0.3, -np.inf, 0.0).astype(np.float32)
    mask[0, 1] = -np.inf   # a fully masked row: the NaN guard makes it zeros
    return {"q": rng.standard_normal((1, n1, D)).astype(np.float32) * 3,
            "kt": rng.standard_normal((1, D, N2)).astype(np.float32),
            "v": (rng.standard_normal((1, N2, D)) * np.geomspace(0.01, 2, D)).astype(np.float32),
            "mask": mask}


def _qdq(x, scale, low=-128, high=127):
    return np.clip(np.rint(x / scale), low, high) * scale


def _softmax_guarded(scores):
    with np.errstate(invalid="ignore"):
        e = np.exp(scores - scores.max(-1, keepdims=True))
        p = e / e.sum(-1, keepdims=True)
    return np.where(np.isnan(p), 0, p)


@pytest.fixture(scope="module")
def block_file(tmp_path_factory):
    folder = tmp_path_factory.mktemp("int8")
    onnx.save(_guarded_block(), folder / "block.onnx")
    rng = np.random.default_rng(0)
    data = CalibrationData([_feed(rng, n1) for n1 in (6, 9, 12)], "hand-made feeds")
    result = quantize_attention_scores(folder / "block.onnx", data, folder / "both.onnx", bf16_weights=False,
                                       products="both")
    return folder, result


def test_both_products_compute_the_quantized_arithmetic_numpy_computes(block_file):
    folder, result = block_file
    assert result.output_int8 == ["softmax"] and not result.output_left
    proto = onnx.load(str(folder / "both.onnx"))
    onnx.checker.check_model(proto, full_check=True)
    q_scale, k_scale, per_channel = result.scales["q"], result.scales["kt"], np.array(result.scales["v"])
    assert per_channel.shape == (D,)
    feed = _feed(np.random.default_rng(7), 11)
    session = onnxruntime.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    got = session.run(None, feed)[0]

    # independent: the module docstring's arithmetic, written out in numpy (float32, as the runtime computes)
    p = _softmax_guarded((_qdq(feed["q"], np.float32(q_scale)) @ _qdq(feed["kt"], np.float32(k_scale)))
                         * np.float32(0.25) + feed["mask"]).astype(np.float32)
    r = np.maximum(p.max(-1, keepdims=True), np.float32(1e-30))
    unit = _qdq(p / r, np.float32(1 / 255), 0, 255)
    c = (per_channel * 127).astype(np.float32)
    v = _qdq(feed["v"] / c, np.float32(1 / 127)) * c
    want = (unit @ v) * r
    exact = _softmax_guarded(feed["q"] @ feed["kt"] * 0.25 + feed["mask"]) @ feed["v"]

    assert np.all(np.isfinite(got)) and np.all(got[0, 1] == 0)   # the fully masked row stays zeros
    assert np.linalg.norm(got - want) <= 1e-5 * np.linalg.norm(want)
    # it is quantized (the float block differs by far more), and close to it all the same
    assert 1e-3 * np.linalg.norm(exact) < np.linalg.norm(got - exact) <= 2e-2 * np.linalg.norm(exact)
    # V per channel: the smallest channel keeps its resolution (one scale per tensor would round it to ~0)
    assert np.linalg.norm(got[..., 0] - exact[..., 0]) <= 2e-2 * np.linalg.norm(exact[..., 0])


def test_scores_only_leaves_the_second_product_float(block_file):
    folder, _ = block_file
    data = CalibrationData([_feed(np.random.default_rng(0), 6)], "hand-made feeds")
    result = quantize_attention_scores(folder / "block.onnx", data, folder / "scores.onnx", bf16_weights=False)
    assert result.output_int8 == [] and set(result.scales) == {"q", "kt"}
    proto = onnx.load(str(folder / "scores.onnx"))
    assert not any(n.op_type == "ReduceMax" for n in proto.graph.node)
    assert sum(n.op_type == "QuantizeLinear" for n in proto.graph.node) == 2
    with pytest.raises(BadInputError, match="products must be one of scores, both, not 'all'"):
        quantize_attention_scores(folder / "block.onnx", data, folder / "no.onnx", bf16_weights=False, products="all")
    assert not (folder / "no.onnx").exists()


def test_a_tensor_read_as_both_q_and_v_gets_both_quantizations(tmp_path):
    """Attention without projections (``softmax(x x^T) x``): x is Q and V at once; its score Q/DQ and its
    per-channel V Q/DQ are separate nodes, and the file is valid and close to the float block."""
    nodes = [helper.make_node("MatMul", ["x", "kt"], ["s"], name="score"),
             helper.make_node("Softmax", ["s"], ["p"], name="softmax", axis=-1),
             helper.make_node("MatMul", ["p", "x"], ["y"], name="out")]
    graph = helper.make_graph(nodes, "shared", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, N2, D]),
                                                helper.make_tensor_value_info("kt", TensorProto.FLOAT, [1, D, N2])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, N2, D])])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), tmp_path / "shared.onnx")
    rng = np.random.default_rng(2)
    feeds = [{"x": rng.standard_normal((1, N2, D)).astype(np.float32),
              "kt": rng.standard_normal((1, D, N2)).astype(np.float32)} for _ in range(3)]
    result = quantize_attention_scores(tmp_path / "shared.onnx", CalibrationData(feeds, "hand-made feeds"),
                                       tmp_path / "both.onnx", bf16_weights=False, products="both")
    assert result.output_int8 == ["softmax"] and isinstance(result.scales["x"], list)
    proto = onnx.load(str(tmp_path / "both.onnx"))
    onnx.checker.check_model(proto, full_check=True)   # opset 17: ReduceMax takes its axes as an attribute
    got = onnxruntime.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"]).run(
        None, feeds[0])[0]
    s = feeds[0]["x"] @ feeds[0]["kt"]
    e = np.exp(s - s.max(-1, keepdims=True))
    exact = e / e.sum(-1, keepdims=True) @ feeds[0]["x"]
    assert 0 < np.linalg.norm(got - exact) <= 2e-2 * np.linalg.norm(exact)
