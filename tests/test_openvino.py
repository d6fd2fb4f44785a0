"""OpenVINO as a backend (``--providers openvino`` / ``openvino-bf16``): the toolkit's files on OpenVINO's CPU
plugin, compared with PyTorch and ONNX Runtime, precision read back from the compiled model, bf16 judged at
bf16's bounds or refused on a CPU without BF16."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

from runtime.onnxrt import OnnxRuntimeRunner
from runtime.open import open_runner
from tools.cli import cli
from xattn.cpu import cpu_features, has_bf16
from xattn.data import random_feed
from xattn.errors import BadInputError, MissingDependencyError
from xattn.shapes import parse_shape_set

pytest.importorskip("openvino", reason="the openvino extra is not installed")


def run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


@pytest.fixture(scope="module")
def files(exported_small, tmp_path_factory):
    from exporter.optimize import optimize_for_onnxruntime, optimize_onnx

    _, export = exported_small
    folder = tmp_path_factory.mktemp("ov")
    optimize_for_onnxruntime(export.path, folder / "model.ort.onnx")
    optimize_onnx(export.path, folder / "model.ov.onnx", target="openvino")
    return {"plain": export.path, "fused": folder / "model.ort.onnx", "sliced": folder / "model.ov.onnx"}


@pytest.mark.parametrize("form", ["plain", "fused", "sliced"])
def test_openvino_f32_computes_what_onnx_runtime_computes(files, form):
    """OpenVINO reads the plain graph, the com.microsoft.MultiHeadAttention form and the query slices alike."""
    feed = random_feed(parse_shape_set("x1:2x8x20x12,x2:2x6x9x15"), seed=3)
    with OnnxRuntimeRunner(files[form], ["cpu"]) as ort, open_runner(files[form], providers=["openvino"]) as ov:
        want, got = ort.infer(feed)["y"], ov.infer(feed)["y"]
        assert ov.describe()["precision_compiled"] == "f32" and ov.backend == "openvino"
        ranges = ov.input_metadata["x1"].ranges
    assert np.linalg.norm(got - want) / np.linalg.norm(want) < 1e-5
    assert ranges == {0: (1, 8), 2: (4, 128), 3: (4, 128)}   # the recorded ranges: checked like any runner


def test_validate_on_openvino_against_pytorch(files):
    res = run("validate", files["fused"], "--providers", "openvino", "--reference", "cross-attention",
              "--model-arg", "in_channels=8", "--model-arg", "out_channels=16", "--model-arg", "num_heads=2",
              "--model-arg", "kv_channels=6")
    assert res.exit_code == 0 and "PASS model.ort.onnx (fp32; rel_l2 <= 1e-05" in res.output, res.output


def test_bf16_is_judged_at_bf16_bounds_or_refused_where_the_cpu_has_none(files):
    res = run("validate", files["plain"], "--providers", "openvino-bf16", "--samples", "1")
    if has_bf16(cpu_features()):
        assert res.exit_code == 0, res.output
        assert "(bf16; rel_l2 <= 0.01" in res.output and "judged at bf16 bounds" in res.output
        errors = [float(x) for x in __import__("re").findall(r"rel_l2 ([0-9.e-]+)", res.output.split("\n", 1)[1])]
        assert all(1e-5 < e < 1e-2 for e in errors)   # bf16 really ran (not f32), within its bound
        with open_runner(files["plain"], providers=["openvino-bf16"]) as ov:
            assert ov.describe()["precision"] == "bf16"   # what benchmarks record: what it computes in
    else:
        assert res.exit_code == 2 and "has no BF16 in OpenVINO" in res.output


def test_openvino_runs_onnx_files_alone(files, exported_small):
    with pytest.raises(BadInputError, match="OpenVINO runs ONNX files, alone"):
        open_runner(files["plain"], providers=["openvino", "cpu"])
    with pytest.raises(BadInputError, match="OpenVINO runs ONNX files, alone"):
        open_runner("cross-attention", providers=["openvino"])
    with pytest.raises(MissingDependencyError, match="OpenVINO has no NPU device here"):
        from runtime.openvino_runner import OpenVinoRunner

        with OpenVinoRunner(files["plain"], device="NPU"):
            pass


def test_bench_compares_backends_on_the_same_file_side_by_side(files, tmp_path):
    res = run("bench", files["plain"], "--backends", "onnxruntime,openvino", "--shapes", "x1:1x8x16x16,x2:1x6x16x16",
              "--no-torch", "--duration", "0.3", "--warmup", "1", "--json", tmp_path / "b.json")
    assert res.exit_code == 0, res.output
    rows = {r["backend"]: r for r in __import__("json").loads((tmp_path / "b.json").read_text())["rows"]}
    assert set(rows) == {"small.onnx [onnxruntime]", "small.onnx [openvino]"}
    assert all(r["stats"]["p50"] > 0 and r["rss_mb"] for r in rows.values())   # timed, and measured alone
    assert "features" in res.output   # the machine's CPU features stand beside the figures
    res = run("bench", files["plain"], "--backends", "onnxruntime,tvm", "--no-torch")
    assert res.exit_code == 2 and "--backends tvm: unknown" in res.output


def test_optimize_for_openvino_writes_query_slices_verified_against_pytorch(exported_small, tmp_path):
    from xattn.provenance import get_onnx_metadata

    _, export = exported_small
    res = run("optimize", export.path, "--target", "openvino", "-o", tmp_path / "m.ov.onnx")
    assert res.exit_code == 0, res.output
    from exporter.attention import MIN_CHUNK_ROWS, QUERY_CHUNKS

    # the small export's largest queries (its max shapes) fit 32 slices of 512 rows: the fewest slices, 32
    assert f"queries in slices of at least {MIN_CHUNK_ROWS} rows, for OpenVINO (node_softmax: 32 slices)" in res.output
    assert "verified against PyTorch at" in res.output
    proto = __import__("onnx").load(str(tmp_path / "m.ov.onnx"))
    __import__("onnx").checker.check_model(proto, full_check=True)
    record = get_onnx_metadata(proto)
    assert record["target"] == "openvino"
    assert json.loads(record["attention"])["chunks"] == {"node_softmax": QUERY_CHUNKS}
    assert sum(n.op_type == "Softmax" for n in proto.graph.node) == QUERY_CHUNKS
    again = run("optimize", tmp_path / "m.ov.onnx", "--target", "onnxruntime", "-o", tmp_path / "again.onnx")
    assert again.exit_code == 2 and "already optimized for OpenVINO" in again.output
    assert not (tmp_path / "again.onnx").exists()


def test_openvino_compiles_once_per_input_shape_and_matches_a_dynamic_compilation(files):
    """Static compilation per shape (OpenVINO plans buffers only for static shapes) computes what the one dynamic
    compilation computes; the last few shapes are kept, the oldest dropped."""
    from runtime.openvino_runner import OpenVinoRunner

    shapes = ["x1:1x8x12x12,x2:1x6x9x9", "x1:2x8x20x12,x2:2x6x9x15", "x1:1x8x4x4,x2:1x6x30x7",
              "x1:1x8x5x6,x2:1x6x6x5", "x1:1x8x7x7,x2:1x6x7x7"]
    with OpenVinoRunner(files["sliced"], shapes_kept=3) as static, \
            OpenVinoRunner(files["sliced"], static_shapes=False) as dynamic:
        for seed, spec in enumerate(shapes):
            feed = random_feed(parse_shape_set(spec), seed=seed)
            want, got = dynamic.infer(feed)["y"], static.infer(feed)["y"]
            assert np.linalg.norm(got - want) <= 1e-5 * np.linalg.norm(want), spec
        assert len(static._per_shape) == 3 and not dynamic._per_shape
        kept = [dict(key)["x1"] for key in static._per_shape]
        assert kept == [(1, 8, 4, 4), (1, 8, 5, 6), (1, 8, 7, 7)]   # the last three, the oldest dropped
        assert static.describe()["static_shapes"] is True


def test_inspect_says_what_the_slices_are_in_one_line(files):
    from exporter.attention import QUERY_CHUNKS

    res = run("inspect", files["sliced"])
    assert res.exit_code == 0
    assert f"attention: {QUERY_CHUNKS} block(s) as MatMul/Softmax/MatMul, the query slices of the plain file's blocks" in res.output
    assert "fusible" not in res.output   # verdicts per slice would be copies of the plain block's


def test_quantize_for_openvino_puts_int8_on_the_score_product_only(exported_small, tmp_path):
    """int8 Q/DQ on Q and K^T of each block (queries in slices), nothing else; OpenVINO's integer product computes
    what ONNX Runtime's float reading of the same Q/DQ computes, and both stay near the FP32 file."""
    import onnx

    from xattn.provenance import get_onnx_metadata

    _, export = exported_small
    out = tmp_path / "m.ov.int8.onnx"
    res = run("quantize", export.path, "--target", "openvino", "--data", "synthetic", "--samples", "8", "-o", out)
    assert res.exit_code == 0, res.output
    assert "for OpenVINO, int8 Q and K^T in 1 attention block(s), queries in slices (node_softmax: 32)" in res.output
    proto = onnx.load(str(out))
    onnx.checker.check_model(proto, full_check=True)
    record = get_onnx_metadata(proto)
    assert record["precision"] == "int8" and record["target"] == "openvino"
    assert json.loads(record["attention"])["chunks"] == {"node_softmax": 32}   # the small export's queries fit 32
    assert sum(n.op_type == "Softmax" for n in proto.graph.node) == 32
    quantized = [n.input[0] for n in proto.graph.node if n.op_type == "QuantizeLinear"]
    readers = {n.op_type for n in proto.graph.node for i in n.input if i.endswith("_int8_dq")}
    assert len(quantized) == 2 and readers <= {"Slice", "Shape", "MatMul"}   # Q (read through its slices) and K^T
    feed = random_feed(parse_shape_set("x1:1x8x20x12,x2:1x6x9x15"), seed=4)
    with OnnxRuntimeRunner(out, ["cpu"]) as ort, open_runner(out, providers=["openvino"]) as ov, \
            OnnxRuntimeRunner(export.path, ["cpu"]) as fp32:
        simulated, integer, want = ort.infer(feed)["y"], ov.infer(feed)["y"], fp32.infer(feed)["y"]
    assert np.linalg.norm(integer - simulated) <= 1e-4 * np.linalg.norm(simulated)
    assert 0 < np.linalg.norm(simulated - want) <= 2e-2 * np.linalg.norm(want)   # quantized, within the INT8 bound
    res = run("quantize", export.path, "--target", "openvino", "--data", "synthetic", "--cache", tmp_path / "c",
              "--exclude-nodes", "x", "-o", tmp_path / "no.onnx")
    assert res.exit_code == 2 and "--target openvino does not take --cache, --exclude-nodes" in res.output
    assert not (tmp_path / "no.onnx").exists()


def test_quantize_for_openvino_with_both_products_in_8_bits(exported_small, tmp_path):
    """--int8-products both: the probabilities over their row maximum in uint8 and V in int8 per channel in each
    slice's second product too; OpenVINO's integer products compute what ONNX Runtime's float reading computes,
    and the file stays inside the INT8 bound. The flag belongs to the OpenVINO target and is refused elsewhere."""
    import onnx

    from xattn.provenance import get_onnx_metadata

    _, export = exported_small
    out = tmp_path / "m.ov.int8.onnx"
    res = run("quantize", export.path, "--target", "openvino", "--int8-products", "both", "--data", "synthetic",
              "--samples", "8", "-o", out)
    assert res.exit_code == 0, res.output
    assert ("for OpenVINO, int8 Q and K^T, uint8 probabilities and int8 V in 1 attention block(s), queries in "
            "slices (node_softmax: 32)") in res.output
    proto = onnx.load(str(out))
    onnx.checker.check_model(proto, full_check=True)
    quantization = get_onnx_metadata(proto)["quantization"]
    assert quantization["products"] == "both" and quantization["output_int8"] == ["node_softmax"]
    nodes = {n.output[0]: n for n in proto.graph.node}
    products = [n for n in proto.graph.node if n.op_type == "MatMul" and nodes[n.input[0]].op_type == "DequantizeLinear"
                and nodes[n.input[1]].op_type == "DequantizeLinear"]
    assert len(products) == 32   # each slice's second product reads Q/DQ on both sides (the first reads a Slice)
    uint8 = [n for n in proto.graph.node if n.op_type == "QuantizeLinear" and n.input[2] ==
             "xattn_attention_uint8_zero_point"]
    assert len(uint8) == 32
    feed = random_feed(parse_shape_set("x1:1x8x20x12,x2:1x6x9x15"), seed=4)
    with OnnxRuntimeRunner(out, ["cpu"]) as ort, open_runner(out, providers=["openvino"]) as ov, \
            OnnxRuntimeRunner(export.path, ["cpu"]) as fp32:
        simulated, integer, want = ort.infer(feed)["y"], ov.infer(feed)["y"], fp32.infer(feed)["y"]
    assert np.linalg.norm(integer - simulated) <= 1e-4 * np.linalg.norm(simulated)
    assert 0 < np.linalg.norm(simulated - want) <= 2e-2 * np.linalg.norm(want)
    res = run("quantize", export.path, "--target", "onnxruntime", "--int8-products", "both", "--data", "synthetic",
              "-o", tmp_path / "no.onnx")
    assert res.exit_code == 2 and "error: --int8-products is for --target openvino" in res.output
    assert not (tmp_path / "no.onnx").exists()


def test_an_int8_attention_file_that_misses_the_bound_never_takes_the_name(exported_small, tmp_path, monkeypatch):
    """Measured on held-out feeds before it is moved into place: over the INT8 bound, exit 1, the file the user
    had under that name untouched (the bound is lowered here to make the quantization miss it)."""
    import dataclasses

    from runtime import tolerances

    strict = dataclasses.replace(tolerances.DEFAULT_TOLERANCES["int8"], max_rel_l2=1e-12)
    monkeypatch.setitem(tolerances.DEFAULT_TOLERANCES, "int8", strict)
    _, export = exported_small
    out = tmp_path / "m.ov.int8.onnx"
    out.write_bytes(b"the previous file")
    res = run("quantize", export.path, "--target", "openvino", "--data", "synthetic", "--samples", "8", "-o", out)
    assert res.exit_code == 1 and "int8 attention misses the INT8 bound on 4 held-out feeds: rel. L2" in res.output
    assert f"{out} was not written" in res.output
    assert out.read_bytes() == b"the previous file" and sorted(p.name for p in tmp_path.iterdir()) == [out.name]
