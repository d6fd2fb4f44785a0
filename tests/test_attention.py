"""The attention finder on every style real models export to, and the rewrites against PyTorch.

Graphs come from two places: real exports of small torch modules (this toolkit's block,
``F.scaled_dot_product_attention``, ``nn.MultiheadAttention``) and graphs written with
``onnx.helper`` for styles torch does not emit here (Einsum as in kornia's LoFTR, an additive mask,
no attention at all). Every rewritten model is compared with PyTorch (or numpy) at shapes unlike the
export's, and passes ``onnx.checker``.
"""

from __future__ import annotations

import json
import math

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from exporter.attention import (chunk_queries, find_attention, fuse_for_onnxruntime, heads_from_channels_last,
                                move_scale_to_query, naive_memory_at, normalise_attention)
from runtime.torch_runner import TorchRunner
from tools.cli import cli
from xattn.onnxfile import check_onnx, refresh_value_info, topological_sort

ASYMMETRIC = {"x1": (2, 8, 9, 31), "x2": (2, 6, 30, 10)}    # fits exported_small (8 and 6 channels)


def run_ort(model, feed):
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(None, feed)


def rel_l2(got, want):
    return float(np.linalg.norm(got.astype(np.float64) - want) / np.linalg.norm(want.astype(np.float64)))


def feed_for(shapes, seed=0):
    rng = np.random.default_rng(seed)
    return {name: rng.standard_normal(shape).astype(np.float32) for name, shape in shapes.items()}


def export_static(module, example: dict, path):
    torch.onnx.export(module.eval(), tuple(torch.from_numpy(v) for v in example.values()), str(path),
                      input_names=list(example), output_names=["y"], dynamo=True, opset_version=18)
    return onnx.load(str(path))


class Sdpa(nn.Module):
    """Multi-head cross attention through F.scaled_dot_product_attention (B, N, C) -> 4 heads of 8."""

    def __init__(self):
        super().__init__()
        self.q, self.k, self.v = nn.Linear(32, 32), nn.Linear(16, 32), nn.Linear(16, 32)

    def forward(self, x1, x2):
        b, n1, _ = x1.shape
        n2 = x2.shape[1]
        q = self.q(x1).reshape(b, n1, 4, 8).transpose(1, 2).contiguous()
        k = self.k(x2).reshape(b, n2, 4, 8).transpose(1, 2).contiguous()
        v = self.v(x2).reshape(b, n2, 4, 8).transpose(1, 2).contiguous()
        return F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n1, 32)


class Mha(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = nn.MultiheadAttention(32, 2, kdim=16, vdim=16, batch_first=True)

    def forward(self, x1, x2):
        return self.attn(x1, x2, x2, need_weights=False)[0]


def test_finds_this_toolkits_block_with_heads_and_scale(exported_small):
    _, result = exported_small
    (block,) = find_attention(onnx.load(str(result.path)))
    assert (block.style, block.rank, block.heads, block.head_dim) == ("matmul", 4, 2, 8)
    assert block.scale == pytest.approx(1 / math.sqrt(8)) and block.scale_position == "scores"
    assert block.precision == "fp32" and not block.issues and block.mask is None
    ok, why = block.fusible("tensorrt")
    assert not ok and "fp32" in why and "scale sits on the scores" in why
    # head size 8 is outside TensorRT's fused range even in FP16
    assert "head size 8 is outside TensorRT's fused range" in why
    assert block.fusible("onnxruntime")[0]


def test_scale_moved_onto_q_is_exact_against_pytorch(exported_small):
    model, result = exported_small
    original = onnx.load(str(result.path))
    moved, changed = move_scale_to_query(original)
    refresh_value_info(moved)
    check_onnx(moved)
    (block,) = find_attention(moved)
    assert changed == [block.softmax] and block.scale_position == "query"
    assert not any(n.op_type in ("Mul", "Div") for n in moved.graph.node
                   if n.output[0] in {next(x for x in original.graph.node if x.name == block.softmax).input[0]})
    feed = feed_for(ASYMMETRIC)
    with TorchRunner(model) as reference:
        want = reference.infer(feed)["y"]
    assert rel_l2(run_ort(moved, feed)[0], want) <= 1e-5


def test_fused_multihead_attention_matches_pytorch_at_asymmetric_shapes(exported_small):
    model, result = exported_small
    fused, names, left = fuse_for_onnxruntime(onnx.load(str(result.path)))
    refresh_value_info(fused)
    check_onnx(fused)
    assert names and not left
    ops = [n.op_type for n in fused.graph.node]
    assert "MultiHeadAttention" in ops and "Softmax" not in ops and "MatMul" not in ops
    mha = next(n for n in fused.graph.node if n.op_type == "MultiHeadAttention")
    attrs = {a.name: helper.get_attribute_value(a) for a in mha.attribute}
    assert attrs["num_heads"] == 2 and attrs["scale"] == pytest.approx(1 / math.sqrt(8))
    with TorchRunner(model) as reference:
        for seed, shapes in enumerate([ASYMMETRIC, {"x1": (1, 8, 16, 5), "x2": (1, 6, 3, 7)}]):
            feed = feed_for(shapes, seed)
            assert rel_l2(run_ort(fused, feed)[0], reference.infer(feed)["y"]) <= 1e-5


def _export_and_fuse(module, x1_shape, x2_shape, path):
    """Export ``module`` (fixed shapes), find its attention, fuse it; return (block, fused rel. L2 vs torch)."""
    example = {"x1": np.random.default_rng(0).standard_normal(x1_shape).astype(np.float32),
               "x2": np.random.default_rng(1).standard_normal(x2_shape).astype(np.float32)}
    model = export_static(module, example, path)
    (block,) = find_attention(model)
    fused, names, _ = fuse_for_onnxruntime(model)
    assert names == [block.softmax]
    refresh_value_info(fused)
    check_onnx(fused)
    with torch.no_grad():
        want = module(*(torch.from_numpy(v) for v in example.values())).numpy()
    return block, rel_l2(run_ort(fused, example)[0], want)


def test_sdpa_export_is_found_and_fused(tmp_path):
    torch.manual_seed(0)
    block, error = _export_and_fuse(Sdpa(), (2, 24, 32), (2, 40, 16), tmp_path / "sdpa.onnx")
    assert block.heads == 4 and block.head_dim == 8 and block.rank == 4
    assert block.scale == pytest.approx(1 / math.sqrt(8), rel=1e-6)
    assert block.scale_position != "scores"            # SDPA scales Q and K (sqrt each) before the matmul
    assert error <= 1e-5


def test_multihead_attention_module_is_found_and_fused(tmp_path):
    torch.manual_seed(0)
    block, error = _export_and_fuse(Mha(), (3, 20, 32), (3, 12, 16), tmp_path / "mha.onnx")
    assert block.head_dim == 16 and block.heads == 2
    assert block.scale == pytest.approx(1 / 4, rel=1e-6)
    assert error <= 1e-5


def _einsum_graph():
    """LoFTR's full attention: einsum('nlhd,nshd->nlsh'), softmax over s (axis 2), einsum back."""
    q = helper.make_tensor_value_info("q", TensorProto.FLOAT, [1, 6, 2, 8])
    k = helper.make_tensor_value_info("k", TensorProto.FLOAT, [1, 5, 2, 8])
    v = helper.make_tensor_value_info("v", TensorProto.FLOAT, [1, 5, 2, 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 6, 2, 8])
    nodes = [helper.make_node("Einsum", ["q", "k"], ["qk"], equation="nlhd,nshd->nlsh", name="qk"),
             helper.make_node("Mul", ["qk", "s"], ["scaled"], name="scale"),
             helper.make_node("Softmax", ["scaled"], ["a"], axis=2, name="softmax"),
             helper.make_node("Einsum", ["a", "v"], ["y"], equation="nlsh,nshd->nlhd", name="av")]
    graph = helper.make_graph(nodes, "loftr", [q, k, v], [y],
                              [numpy_helper.from_array(np.array(1 / math.sqrt(8), np.float32), "s")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def _softmax(x, axis):
    e = np.exp(x - x.max(axis, keepdims=True))
    return e / e.sum(axis, keepdims=True)


def test_einsum_attention_is_written_as_matmul_and_rewritten_exactly():
    """LoFTR's layout: the einsums become Transpose/MatMul, the softmax over axis 2 of 'nlsh' becomes the last
    axis of the untransposed scores; the ONNX Runtime rewrite then applies and matches numpy."""
    model = _einsum_graph()
    normal, converted = normalise_attention(model)
    assert converted == {"qk", "av"} and not any(n.op_type == "Einsum" for n in normal.graph.node)
    softmax = next(n for n in normal.graph.node if n.op_type == "Softmax")
    assert softmax.attribute[0].i == 3                      # the last axis of (n, h, l, s)
    check_onnx(normal)
    (block,) = find_attention(model)
    assert block.written_as == "einsum" and block.style == "matmul" and not block.issues
    assert block.scale == pytest.approx(1 / math.sqrt(8)) and (block.heads, block.head_dim) == (2, 8)
    assert block.fusible("onnxruntime") == (True, "rewritable to com.microsoft.MultiHeadAttention")
    feed = feed_for({"q": (1, 6, 2, 8), "k": (1, 5, 2, 8), "v": (1, 5, 2, 8)})
    weights = _softmax(np.einsum("nlhd,nshd->nlsh", feed["q"], feed["k"]) / math.sqrt(8), axis=2)
    want = np.einsum("nlsh,nshd->nlhd", weights, feed["v"])
    assert rel_l2(run_ort(normal, feed)[0], want) <= 1e-6
    fused, names, left = fuse_for_onnxruntime(model)
    assert names == ["softmax"] and left == []
    assert [n.op_type for n in fused.graph.node].count("MultiHeadAttention") == 1
    assert rel_l2(run_ort(fused, feed)[0], want) <= 1e-6


@pytest.mark.parametrize("equation, why", [
    ("...hd,...sd->...hs", "not one contracted and one free index per side"),     # ellipsis
    ("nlhd,nshd->nls", "not one contracted and one free index per side"),         # h summed away too
])
def test_einsum_that_is_not_a_matrix_product_is_named_not_rewritten(equation, why):
    q = helper.make_tensor_value_info("q", TensorProto.FLOAT, [1, 6, 2, 8])
    k = helper.make_tensor_value_info("k", TensorProto.FLOAT, [1, 5, 2, 8])
    v = helper.make_tensor_value_info("v", TensorProto.FLOAT, [1, 5, 2, 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    nodes = [helper.make_node("Einsum", ["q", "k"], ["qk"], equation=equation, name="qk"),
             helper.make_node("Softmax", ["qk"], ["a"], axis=-1, name="softmax"),
             helper.make_node("Einsum", ["a", "v"], ["y"], equation="nls,nshd->nlhd" if "nls" in equation
                              else "...hs,...sd->...hd", name="av")]
    model = helper.make_model(helper.make_graph(nodes, "odd", [q, k, v], [y]),
                              opset_imports=[helper.make_opsetid("", 18)])
    (block,) = find_attention(model)
    assert block.style == "einsum" and any(why in issue for issue in block.issues)
    assert block.fusible("onnxruntime")[0] is False and fuse_for_onnxruntime(model)[1] == []
    assert normalise_attention(model)[1] == set()


def _masked_graph(scale_after_mask: bool):
    q = helper.make_tensor_value_info("q", TensorProto.FLOAT, [1, 6, 8])
    kt = helper.make_tensor_value_info("kt", TensorProto.FLOAT, [1, 8, 5])
    v = helper.make_tensor_value_info("v", TensorProto.FLOAT, [1, 5, 8])
    mask = helper.make_tensor_value_info("mask", TensorProto.FLOAT, [1, 6, 5])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 6, 8])
    if scale_after_mask:     # softmax((Q K^T + M) / d)
        nodes = [helper.make_node("MatMul", ["q", "kt"], ["s"], name="mm1"),
                 helper.make_node("Add", ["s", "mask"], ["masked"], name="add"),
                 helper.make_node("Div", ["masked", "d"], ["scaled"], name="div"),
                 helper.make_node("Softmax", ["scaled"], ["a"], axis=-1, name="softmax")]
    else:                    # softmax(Q K^T / d + M)
        nodes = [helper.make_node("MatMul", ["q", "kt"], ["s"], name="mm1"),
                 helper.make_node("Div", ["s", "d"], ["scaled"], name="div"),
                 helper.make_node("Add", ["scaled", "mask"], ["masked"], name="add"),
                 helper.make_node("Softmax", ["masked"], ["a"], axis=-1, name="softmax")]
    nodes.append(helper.make_node("MatMul", ["a", "v"], ["y"], name="mm2"))
    return helper.make_model(helper.make_graph(nodes, "masked", [q, kt, v, mask], [y],
                                               [numpy_helper.from_array(np.array(math.sqrt(8), np.float32), "d")]),
                             opset_imports=[helper.make_opsetid("", 18)])


@pytest.mark.parametrize("scale_after_mask", [False, True])
def test_masked_attention_is_found_kept_plain_for_onnx_runtime_and_scaled_only_where_exact(scale_after_mask):
    from exporter.attention import MASK_KEPT_PLAIN, to_onnx_attention

    model = _masked_graph(scale_after_mask)
    (block,) = find_attention(model)
    assert block.mask == "mask" and block.scale == pytest.approx(1 / math.sqrt(8)) and block.rank == 3
    assert block.mask_scaled is scale_after_mask
    assert block.fusible("onnxruntime") == (False, MASK_KEPT_PLAIN)
    assert "an additive mask on the scores" in block.fusible("tensorrt")[1]
    assert fuse_for_onnxruntime(model)[1] == []
    assert to_onnx_attention(model)[1] == []
    feed = feed_for({"q": (1, 6, 8), "kt": (1, 8, 5), "v": (1, 5, 8), "mask": (1, 6, 5)})
    scores = feed["q"] @ feed["kt"]
    scores = (scores + feed["mask"]) / math.sqrt(8) if scale_after_mask else scores / math.sqrt(8) + feed["mask"]
    want = _softmax(scores, -1) @ feed["v"]
    moved, changed = move_scale_to_query(model)
    # moving the scale onto Q is exact only when the mask is added after it
    assert changed == ([] if scale_after_mask else ["softmax"])
    assert rel_l2(run_ort(moved, feed)[0], want) <= 1e-6


def test_a_graph_without_attention_finds_nothing_and_changes_nothing(tmp_path):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])
    model = helper.make_model(helper.make_graph([helper.make_node("Softmax", ["x"], ["y"], name="sm")], "plain",
                                                [x], [y]), opset_imports=[helper.make_opsetid("", 18)])
    assert find_attention(model) == []
    assert move_scale_to_query(model)[0] == model
    assert fuse_for_onnxruntime(model)[0] == model


def test_topological_sort_repairs_the_order_the_checker_requires():
    model = _einsum_graph()
    nodes = list(model.graph.node)
    del model.graph.node[:]
    model.graph.node.extend(reversed(nodes))
    with pytest.raises(onnx.checker.ValidationError, match="topologically sorted"):
        onnx.checker.check_model(model, full_check=True)
    topological_sort(model.graph)
    assert [n.name for n in model.graph.node] == ["qk", "scale", "softmax", "av"]
    onnx.checker.check_model(model, full_check=True)


def test_naive_memory_counts_every_score_tensor(exported_small):
    _, result = exported_small
    model = onnx.load(str(result.path))
    blocks = find_attention(model)
    got = naive_memory_at(model, blocks, {"x1": (3, 8, 10, 12), "x2": (3, 6, 7, 9)})
    assert got == 3 * 2 * (10 * 12) * (7 * 9) * 4            # B x heads x N1 x N2 x float32


def test_inspect_lists_blocks_per_target_and_memory(exported_net):
    _, result = exported_net
    res = CliRunner().invoke(cli, ["inspect", str(result.path), "--json"])
    assert res.exit_code == 0, res.output
    attention = json.loads(res.output)["attention"]
    (block,) = attention["blocks"]
    assert block["heads"] == 1 and block["head_dim"] == 128 and block["precision"] == "fp32"
    assert block["targets"]["tensorrt"]["fusible"] is False
    assert block["targets"]["onnxruntime"]["fusible"] is True
    assert attention["naive_scores_bytes_at_max"] == 8 * (128 * 128) ** 2 * 4     # default max: batch 8, 128x128
    text = CliRunner().invoke(cli, ["inspect", str(result.path)]).output
    assert "naive score tensors at max shapes x1:8x3x128x128,x2:8x3x128x128: 8.0 GiB" in text
    assert "tensorrt     not fusible: attention runs in fp32" in text


def test_onnx_attention_for_single_head_3d_blocks_is_4d_and_exact():
    """onnx-tensorrt takes ONNX Attention with 4-D Q/K/V only: 3-D blocks get a head axis and lose it after."""
    from exporter.attention import to_onnx_attention

    q = helper.make_tensor_value_info("q", TensorProto.FLOAT, ["b", 6, 8])
    kt = helper.make_tensor_value_info("kt", TensorProto.FLOAT, ["b", 8, 5])
    v = helper.make_tensor_value_info("v", TensorProto.FLOAT, ["b", 5, 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", 6, 8])
    nodes = [helper.make_node("MatMul", ["q", "kt"], ["s"], name="mm1"),
             helper.make_node("Mul", ["s", "c"], ["scaled"], name="mul"),
             helper.make_node("Softmax", ["scaled"], ["a"], axis=-1, name="softmax"),
             helper.make_node("MatMul", ["a", "v"], ["y"], name="mm2")]
    model = helper.make_model(helper.make_graph(nodes, "three", [q, kt, v], [y],
                                                [numpy_helper.from_array(np.array(0.3, np.float32), "c")]),
                              opset_imports=[helper.make_opsetid("", 18)])
    converted, replaced, _ = to_onnx_attention(model)
    refresh_value_info(converted)
    check_onnx(converted)
    assert replaced == ["softmax"]
    attention = next(n for n in converted.graph.node if n.op_type == "Attention")
    feed = feed_for({"q": (2, 6, 8), "kt": (2, 8, 5), "v": (2, 5, 8)})
    shapes = {vi.name: len(vi.type.tensor_type.shape.dim) for vi in converted.graph.value_info}
    assert all(shapes[name] == 4 for name in attention.input)
    scores = np.einsum("bqd,bdk->bqk", feed["q"], feed["kt"]) * 0.3
    weights = np.exp(scores - scores.max(-1, keepdims=True))
    want = (weights / weights.sum(-1, keepdims=True)) @ feed["v"]
    assert rel_l2(run_ort(converted, feed)[0], want) <= 1e-6


def _graph_with_mask(mask_dims, scores_out=False):
    """softmax(Q K^T * 0.25 + mask) V by hand: Q (1, n1, 8), K^T (1, 8, n2), V (1, n2, 8), the mask as an input."""
    nodes = [helper.make_node("MatMul", ["q", "kt"], ["s"], name="score"),
             helper.make_node("Mul", ["s", "quarter"], ["ss"], name="scale"),
             helper.make_node("Add", ["ss", "mask"], ["sm"], name="add_mask"),
             helper.make_node("Softmax", ["sm"], ["p"], name="softmax", axis=-1),
             helper.make_node("MatMul", ["p", "v"], ["y"], name="out")]
    inputs = [helper.make_tensor_value_info("q", TensorProto.FLOAT, [1, "n1", 8]),
              helper.make_tensor_value_info("kt", TensorProto.FLOAT, [1, 8, "n2"]),
              helper.make_tensor_value_info("v", TensorProto.FLOAT, [1, "n2", 8]),
              helper.make_tensor_value_info("mask", TensorProto.FLOAT, mask_dims)]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, "n1", 8])]
    if scores_out:
        outputs.append(helper.make_tensor_value_info("p", TensorProto.FLOAT, [1, "n1", "n2"]))
    graph = helper.make_graph(nodes, "masked", inputs, outputs,
                              [numpy_helper.from_array(np.array(0.25, dtype=np.float32), "quarter")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


@pytest.mark.parametrize("mask_dims, sliced", [(["n1", "n2"], True), ([1, "n2"], False), (["n2"], False)])
def test_query_slices_are_exact_and_carry_the_mask_along(mask_dims, sliced):
    model = _graph_with_mask(mask_dims)
    out, done, left = chunk_queries(model, chunks=3, min_rows=2)
    assert done == ["softmax"] and left == []
    check_onnx(out)
    assert sum(n.op_type == "Softmax" for n in out.graph.node) == 3
    assert sum(n.op_type == "Slice" and n.input[0] == "mask" for n in out.graph.node) == (3 if sliced else 0)
    rng = np.random.default_rng(0)
    for n1, n2 in [(7, 5), (1, 4), (2, 9), (12, 3)]:   # uneven slices, and empty ones where n1 < 3 * min_rows
        mask_shape = [n1 if d == "n1" else n2 if d == "n2" else d for d in mask_dims]
        feed = {"q": rng.standard_normal((1, n1, 8)).astype(np.float32),
                "kt": rng.standard_normal((1, 8, n2)).astype(np.float32),
                "v": rng.standard_normal((1, n2, 8)).astype(np.float32),
                "mask": rng.standard_normal(mask_shape).astype(np.float32)}
        scores = feed["q"].astype(np.float64) @ feed["kt"] * 0.25 + feed["mask"]
        weights = np.exp(scores - scores.max(-1, keepdims=True))
        want = (weights / weights.sum(-1, keepdims=True)) @ feed["v"]
        (got,) = run_ort(out, feed)
        assert got.shape == want.shape and rel_l2(got, want) <= 1e-6


def test_query_slices_leave_a_block_they_cannot_slice_and_say_why():
    _, done, left = chunk_queries(_graph_with_mask(["m", "n2"]))   # a mask whose query axis may be anything
    assert done == [] and left == [("softmax", "the mask's query axis is not known to be 1 or the queries' length, "
                                               "so it cannot be sliced with them")]
    _, done, left = chunk_queries(_graph_with_mask([1, "n2"], scores_out=True))   # the weights are an output too
    assert done == [] and left == [("softmax", "a tensor inside the block is read outside it")]


def test_slice_count_follows_the_queries_at_the_largest_shapes():
    """Enough slices of MIN_CHUNK_ROWS rows for the queries at the max shapes, never fewer than QUERY_CHUNKS nor more
    than MAX_QUERY_CHUNKS; QUERY_CHUNKS where the max shapes are missing, do not fit the inputs, or do not parse."""
    from exporter.attention import MAX_QUERY_CHUNKS, MIN_CHUNK_ROWS, QUERY_CHUNKS, plan_query_chunks
    from xattn.shapes import recorded_max_shapes

    assert (MIN_CHUNK_ROWS, QUERY_CHUNKS, MAX_QUERY_CHUNKS) == (512, 32, 256)
    model = _graph_with_mask(["n1", "n2"])
    at = lambda n1: {"q": (1, n1, 8), "kt": (1, 8, 7), "v": (1, 7, 8), "mask": (n1, 7)}   # noqa: E731
    assert plan_query_chunks(model, at(40000)) == {"softmax": 79}          # ceil(40000 / 512)
    assert plan_query_chunks(model, at(32 * 512 + 1)) == {"softmax": 33}
    assert plan_query_chunks(model, at(1000)) == {"softmax": 32}           # the fewest
    assert plan_query_chunks(model, at(10**6)) == {"softmax": 256}         # the most: the slices grow instead
    assert plan_query_chunks(model, None) == {"softmax": 32}
    assert plan_query_chunks(model, {"x1": (1, 3, 64, 64)}) == {"softmax": 32}                 # not this graph's inputs
    assert plan_query_chunks(model, {**at(40000), "q": (40000, 8)}) == {"softmax": 32}      # wrong rank
    assert recorded_max_shapes({"max_shapes": "x1:1x3x192x192,x2:1x3x64x64"}) == {"x1": (1, 3, 192, 192),
                                                                                  "x2": (1, 3, 64, 64)}
    for record in ({}, {"max_shapes": "x1:1x3xbig"}, {"max_shapes": 7}, {"max_shapes": " "}):
        assert recorded_max_shapes(record) is None
    # the plan is what the rewrite does: 79 slices, exact at a shape that leaves most of them empty
    out, done, _ = chunk_queries(model, plan_query_chunks(model, at(40000)), min_rows=2)
    assert done == ["softmax"] and sum(n.op_type == "Softmax" for n in out.graph.node) == 79
    check_onnx(out)
    rng = np.random.default_rng(3)
    feed = {name: rng.standard_normal(shape).astype(np.float32)
            for name, shape in {"q": (1, 9, 8), "kt": (1, 8, 7), "v": (1, 7, 8), "mask": (9, 7)}.items()}
    scores = feed["q"].astype(np.float64) @ feed["kt"] * 0.25 + feed["mask"]
    weights = np.exp(scores - scores.max(-1, keepdims=True))
    (got,) = run_ort(out, feed)
    assert rel_l2(got, (weights / weights.sum(-1, keepdims=True)) @ feed["v"]) <= 1e-6
    # a block the plan does not name gets the default count
    out, _, _ = chunk_queries(model, {"another": 5}, min_rows=2)
    assert sum(n.op_type == "Softmax" for n in out.graph.node) == QUERY_CHUNKS


def test_the_default_models_slices_come_from_its_query_length_at_the_max_shapes(exported_net):
    """The default model attends from every x1 pixel: 192 x 192 queries make 72 slices of 512, whatever x2 is."""
    from exporter.attention import plan_query_chunks

    model = onnx.load(str(exported_net[1].path))
    assert plan_query_chunks(model, {"x1": (1, 3, 192, 192), "x2": (1, 3, 64, 64)}) == {"node_softmax": 72}
    assert plan_query_chunks(model, {"x1": (8, 3, 128, 128), "x2": (8, 3, 128, 128)}) == {"node_softmax": 32}
    assert plan_query_chunks(model, {"x1": (1, 3, 256, 200), "x2": (1, 3, 8, 8)}) == {"node_softmax": 100}


def _producer(model, tensor):
    return next(n for n in model.graph.node if tensor in n.output)


@pytest.mark.parametrize("heads", [1, 2])
def test_heads_split_from_the_channels_last_view_are_exact_against_pytorch(tmp_path, heads):
    from exporter.onnx_export import export_onnx
    from xattn.registry import load_model

    model = load_model("cross-attention-net", model_args={"stem_channels": 8, "attn_channels": 16,
                                                          "out_channels": 8, "num_heads": heads})
    original = onnx.load(str(export_onnx(model, tmp_path / "net.onnx").path))
    relaid, changed = heads_from_channels_last(original)
    check_onnx(relaid)
    (block,) = find_attention(relaid)
    score = next(n for n in relaid.graph.node if n.name == block.score_node)
    # Q: Transpose(0,2,1,3) <- Reshape <- Transpose(0,2,3,1) <- the query convolution
    q_heads = _producer(relaid, score.input[0])
    tokens = _producer(relaid, q_heads.input[0])
    nhwc = _producer(relaid, tokens.input[0])
    assert [n.op_type for n in (q_heads, tokens, nhwc, _producer(relaid, nhwc.input[0]))] == \
        ["Transpose", "Reshape", "Transpose", "Conv"]
    assert list(helper.get_attribute_value(q_heads.attribute[0])) == [0, 2, 1, 3]
    assert list(helper.get_attribute_value(nhwc.attribute[0])) == [0, 2, 3, 1]
    # output: the head convolution reads Transpose(0,3,1,2) of the channels-last image
    head = _producer(relaid, _producer(relaid, "y").input[0])   # y = relu(head conv)
    assert head.op_type == "Conv"
    nchw = _producer(relaid, head.input[0])
    assert nchw.op_type == "Transpose" and list(helper.get_attribute_value(nchw.attribute[0])) == [0, 3, 1, 2]
    assert changed == [score.input[0], head.input[0]]
    with TorchRunner(model) as reference:
        for seed, shapes in enumerate([{"x1": (2, 3, 9, 31), "x2": (2, 3, 30, 10)},
                                       {"x1": (1, 3, 16, 5), "x2": (1, 3, 3, 7)}, {"x1": (3, 3, 1, 1), "x2": (3, 3, 2, 1)}]):
            feed = feed_for(shapes, seed)
            want = reference.infer(feed)["y"]
            got, before = run_ort(relaid, feed)[0], run_ort(original, feed)[0]
            assert got.shape == want.shape and rel_l2(got, want) <= 1e-5
            assert np.array_equal(got, before)   # the same products on the same values: bit for bit


def _conv_block_graph(image_shape):
    """conv -> heads (2 of 4) by a constant Reshape -> attention on K^T, V inputs -> Reshape(``image_shape``,
    a constant with 0 / -1 as ONNX allows) -> conv: the shapes a hand-written exporter may leave."""
    nodes = [helper.make_node("Conv", ["x", "wq"], ["q_image"], name="conv_q"),
             helper.make_node("Reshape", ["q_image", "by_head"], ["q_split"], name="split"),
             helper.make_node("Transpose", ["q_split"], ["q"], name="q_flip", perm=[0, 1, 3, 2]),
             helper.make_node("MatMul", ["q", "kt"], ["s"], name="score"),
             helper.make_node("Mul", ["s", "half"], ["ss"], name="scale"),
             helper.make_node("Softmax", ["ss"], ["p"], name="softmax", axis=-1),
             helper.make_node("MatMul", ["p", "v"], ["o"], name="out"),
             helper.make_node("Transpose", ["o"], ["o_flip"], name="o_flip", perm=[0, 1, 3, 2]),
             helper.make_node("Reshape", ["o_flip", "image"], ["o_image"], name="join"),
             helper.make_node("Conv", ["o_image", "wo"], ["y"], name="conv_out")]
    rng = np.random.default_rng(3)
    inits = [numpy_helper.from_array(rng.standard_normal((8, 8, 1, 1)).astype(np.float32), "wq"),
             numpy_helper.from_array(rng.standard_normal((5, 8, 1, 1)).astype(np.float32), "wo"),
             numpy_helper.from_array(np.array([0, 2, 4, -1], np.int64), "by_head"),
             numpy_helper.from_array(np.array(image_shape, np.int64), "image"),
             numpy_helper.from_array(np.array(0.5, np.float32), "half")]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 8, 3, 5]),
              helper.make_tensor_value_info("kt", TensorProto.FLOAT, [2, 2, 4, 7]),
              helper.make_tensor_value_info("v", TensorProto.FLOAT, [2, 2, 7, 4])]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 5, 3, 5])]
    return helper.make_model(helper.make_graph(nodes, "conv_block", inputs, outputs, inits),
                             opset_imports=[helper.make_opsetid("", 18)])


@pytest.mark.parametrize("image_shape", [[2, 8, 3, 5], [0, 8, 3, -1], [-1, 8, 3, 5], [2, -1, 3, 5]])
def test_heads_joined_through_channels_last_read_the_reshape_as_onnx_does(image_shape):
    original = _conv_block_graph(image_shape)
    relaid, changed = heads_from_channels_last(original)
    check_onnx(relaid)
    assert changed == ["q", "o_image"]
    assert not any(n.name in ("q_flip", "o_flip", "join") for n in relaid.graph.node)
    feed = feed_for({"x": (2, 8, 3, 5), "kt": (2, 2, 4, 7), "v": (2, 2, 7, 4)})
    q = np.einsum("oc,bchw->bohw", numpy_helper.to_array(original.graph.initializer[0])[:, :, 0, 0], feed["x"])
    q = q.reshape(2, 2, 4, 15).transpose(0, 1, 3, 2).astype(np.float64)
    scores = q @ feed["kt"] * 0.5
    weights = np.exp(scores - scores.max(-1, keepdims=True))
    o = (weights / weights.sum(-1, keepdims=True)) @ feed["v"]
    image = o.transpose(0, 1, 3, 2).reshape(2, 8, 3, 5)
    want = np.einsum("oc,bchw->bohw", numpy_helper.to_array(original.graph.initializer[1])[:, :, 0, 0], image)
    assert rel_l2(run_ort(relaid, feed)[0], want) <= 1e-6


def test_heads_stay_as_they_are_where_no_convolution_lays_them_out(tmp_path):
    model = export_static(Sdpa(), feed_for({"x1": (1, 6, 32), "x2": (1, 5, 16)}), tmp_path / "sdpa.onnx")
    relaid, changed = heads_from_channels_last(model)
    assert changed == []
    assert [n.op_type for n in relaid.graph.node] == [n.op_type for n in normalise_attention(model)[0].graph.node]
