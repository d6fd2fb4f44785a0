"""Users' attention styles (tests/attention_styles.py) through the toolkit at its default settings: export at
the default ranges, inspect, and the whole main job (deploy: FP16, INT8 for both targets, the ONNX Runtime
rewrite, TensorRT lint and lines, validation against PyTorch) at small ranges for speed."""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import onnx
import onnxruntime
import pytest
from click.testing import CliRunner

from exporter.attention import chunk_queries, find_attention, find_linear_attention, plan_query_chunks
from exporter.triton_repo import parse_config
from runtime.open import open_runner
from tests.attention_styles import STYLES
from tools.cli import cli
from xattn import ort_session
from xattn.provenance import get_onnx_metadata

HAS_OPENVINO = importlib.util.find_spec("openvino") is not None
SMALL = ["--max-shapes", "x1:2x3x32x32,x2:2x3x32x32", "--opt-shapes", "x1:1x3x16x16,x2:1x3x16x16"]
MASKED = {"mha_seq_first_padding", "sdpa_bool_mask", "sdpa_causal", "sdpa_additive_bias"}
#: what the finder must say per style: softmax blocks found, and whether ONNX Runtime's rewrite applies
EXPECTED = {
    "mha_batch_first": (1, True), "mha_seq_first_padding": (1, False), "sdpa_plain": (1, True),
    "sdpa_bool_mask": (1, False), "sdpa_additive_bias": (1, False), "sdpa_causal": (1, False), "sdpa_gqa": (1, True), "sam_style": (1, True),
    "multi_query": (1, True), "one_query_token": (1, True), "einsum_last": (1, True), "einsum_loftr": (1, True),
    "linear_attention": (0, False), "torch_decoder": (2, True),
}


def run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


@pytest.mark.parametrize("style", sorted(STYLES))
def test_style_exports_at_the_default_ranges_and_deploys(style, tmp_path):
    model = f"tests.attention_styles:{style}"
    exported = run("export", "--model", model, "-o", tmp_path / "default.onnx")
    assert exported.exit_code == 0, exported.output
    assert "x1:1x3x4x4,x2:1x3x4x4 / 1x3x64x64" in exported.output or "x1: 1x3x4x4 / 1x3x64x64 / 8x3x128x128" in exported.output
    proto = onnx.load(str(tmp_path / "default.onnx"))
    blocks, linear = find_attention(proto), find_linear_attention(proto)
    want_blocks, fusible = EXPECTED[style]
    assert len(blocks) == want_blocks and (len(linear) == 1) == (style == "linear_attention")
    if blocks:
        assert any(b.fusible("onnxruntime")[0] for b in blocks) == fusible, [b.fusible("onnxruntime") for b in blocks]
    # how many slices OpenVINO's form gets comes from each block's query length at the max shapes, read by shape
    # inference through the user's graph: these styles embed 4x4 patches, so x1 at 1024 x 1024 makes 65536 queries,
    # 128 slices of 512. One query token: the floor of 32. Grouped-query SDPA: the floor too, since neither
    # inference reads its length (ONNX Runtime's fails on the exporter's scalar Unsqueeze axes, ONNX's stops at a
    # Reshape whose shape is computed): a limitation this pins, so that reading it later shows here
    plan = plan_query_chunks(proto, {"x1": (1, 3, 1024, 1024), "x2": (1, 3, 64, 64)})
    assert plan == {b.softmax: 32 if style in ("one_query_token", "sdpa_gqa") else 128 for b in blocks}
    # OpenVINO's form: every softmax block's queries in slices (4 of >= 8 rows here, so shapes below make several
    # slices, uneven ones and empty ones), masks sliced with them or shared; exact against the plain file
    sliced, done, left = chunk_queries(proto, chunks=4, min_rows=8)
    assert len(done) == want_blocks and not left, left
    if done:
        onnx.checker.check_model(sliced, full_check=True)
        plain = onnxruntime.InferenceSession(str(tmp_path / "default.onnx"), providers=["CPUExecutionProvider"])
        rewritten = onnxruntime.InferenceSession(sliced.SerializeToString(), providers=["CPUExecutionProvider"])
        for seed, (q, kv) in enumerate([((4, 5), (6, 6)), ((9, 7), (5, 4)), ((16, 16), (9, 5))]):
            rng = np.random.default_rng(seed)
            feed = {"x1": rng.standard_normal((2, 3, *q)).astype(np.float32),
                    "x2": rng.standard_normal((2, 3, *kv)).astype(np.float32)}
            want, got = plain.run(None, feed)[0], rewritten.run(None, feed)[0]
            assert np.linalg.norm(got - want) <= 1e-6 * np.linalg.norm(want), (q, kv)

    if HAS_OPENVINO and want_blocks:   # both attention products in 8 bits (not the default): every softmax style
        both = run("quantize", tmp_path / "default.onnx", "--target", "openvino", "--int8-products", "both",
                   "--data", "synthetic", "--samples", "8", "-o", tmp_path / "both.onnx")
        assert both.exit_code == 0, both.output   # the command itself holds the file to the INT8 bound, held out
        assert "uint8 probabilities and int8 V in" in both.output and "kept float" not in both.output, both.output
        onnx.checker.check_model(onnx.load(str(tmp_path / "both.onnx")), full_check=True)
        rng = np.random.default_rng(3)
        feed = {"x1": rng.standard_normal((1, 3, 16, 12)).astype(np.float32),
                "x2": rng.standard_normal((1, 3, 20, 8)).astype(np.float32)}
        want = onnxruntime.InferenceSession(str(tmp_path / "default.onnx"),
                                            providers=["CPUExecutionProvider"]).run(None, feed)[0]
        with open_runner(tmp_path / "both.onnx", providers=["openvino"]) as ov:
            got = ov.infer(feed)["y"]
        assert np.all(np.isfinite(got)) and np.linalg.norm(got - want) <= 2e-2 * np.linalg.norm(want)

    inspected = run("inspect", tmp_path / "default.onnx")
    assert inspected.exit_code == 0
    assert ("linear attention at" in inspected.output) == (style == "linear_attention")
    assert ("(written as einsum)" in inspected.output) == style.startswith("einsum")
    assert (", masked" in inspected.output) == (style in MASKED)
    assert ("1 K/V head(s)" in inspected.output) == (style == "multi_query")

    # the other attention op for TensorRT (ONNX Attention, 10.14+/11.x): written and verified, or refused in a line
    converted = run("convert", tmp_path / "default.onnx", "--fp16", "--attention-op", "onnx", "-o", tmp_path / "a.onnx")
    assert converted.exit_code in (0, 2) and "Traceback" not in converted.output, converted.output
    if converted.exit_code == 0:
        onnx.checker.check_model(onnx.load(str(tmp_path / "a.onnx")), full_check=True)
        assert any(n.op_type == "Attention" for n in onnx.load(str(tmp_path / "a.onnx")).graph.node)
    else:
        assert "can be written as ONNX Attention" in converted.output and not (tmp_path / "a.onnx").exists()
    assert (converted.exit_code == 0) == (fusible and style not in MASKED), converted.output

    out = tmp_path / "artifacts"
    deployed = run("deploy", "--model", model, "-o", out, *SMALL, "--samples", "4", "--skip-bench")
    assert deployed.exit_code == 0, deployed.output
    assert "Traceback" not in deployed.output
    where = deployed.output.split("== which file where")[1]
    for name in ("model.onnx", "model.fp16.onnx", "model.int8.onnx", "model.ort.onnx", "model.ort.int8.onnx",
                 *(["model.ov.onnx", "model.ov.int8.onnx"] if HAS_OPENVINO else [])):
        if (out / name).exists():
            onnx.checker.check_model(onnx.load(str(out / name)), full_check=True)
        else:   # a form that was not made is said, and never recommended
            assert f"{name} not made" in where and f"{name} (" not in where, where
    assert (out / "model.ort.onnx").exists() == fusible
    assert (out / "model.ov.onnx").exists() == (HAS_OPENVINO and want_blocks > 0)
    assert (out / "model.ov.int8.onnx").exists() == (HAS_OPENVINO and want_blocks > 0)
    if HAS_OPENVINO and not want_blocks:   # no softmax attention: both OpenVINO forms refused, in a line each
        assert "not made: model.ov.onnx: nothing to rewrite for openvino in model.onnx (no attention block" in \
            deployed.output
        assert "not made: model.ov.int8.onnx: no attention block in model.onnx can be quantized for OpenVINO" in \
            deployed.output
    report = json.loads((out / "reports" / "accuracy.json").read_text())
    assert all(a["passed"] for a in report["artifacts"])


def test_what_dynamo_cannot_export_goes_through_torchs_other_exporter(tmp_path):
    """torch 2.13's dynamo exporter fails SDPA with a float mask on dynamic shapes ("Cannot view a tensor ...");
    its TorchScript exporter takes it, and the file is verified as always."""
    res = run("export", "--model", "tests.attention_styles:sdpa_additive_bias", "-o", tmp_path / "m.onnx", *SMALL)
    assert res.exit_code == 0, res.output
    assert "note: the dynamo exporter failed (" in res.output and "exported with the legacy (TorchScript)" in res.output
    assert "Torch IR graph" not in res.output and "\x1b[" not in res.output
    assert get_onnx_metadata(onnx.load(str(tmp_path / "m.onnx")))["exporter"] == "legacy"
    assert "max corner" in res.output


def test_a_model_neither_exporter_takes_is_one_line(tmp_path, capfd):
    res = run("export", "--model", "tests.user_models:no_onnx_translation", "-o", tmp_path / "m.onnx", *SMALL)
    assert res.exit_code == 1 and res.output.startswith("error: the dynamo exporter failed on model")
    assert "aten.linalg_eig" in res.output and "TorchScript exporter failed too (UnsupportedOperatorError" in res.output
    assert len(res.output.strip().splitlines()) == 1 and "Traceback" not in res.output
    assert "Torch IR graph" not in capfd.readouterr().err      # torch's native print is kept off the terminal
    assert not (tmp_path / "m.onnx").exists()


def test_a_native_crash_in_onnx_runtime_is_survived(tmp_path):
    """ONNX Runtime 1.32 segfaults creating a session for the FP16 form of nn.TransformerDecoder at
    ORT_ENABLE_ALL: the probe in a child process finds the level that works and the command goes on."""
    model = "tests.attention_styles:torch_decoder"
    assert run("export", "--model", model, "-o", tmp_path / "m.onnx", *SMALL).exit_code == 0
    res = run("convert", tmp_path / "m.onnx", "--fp16", "-o", tmp_path / "m.fp16.onnx")
    assert res.exit_code == 0, res.output
    ort_session._SAFE_LEVELS.clear()     # as a new process: what it knows comes from the file's record
    validated = run("validate", tmp_path / "m.fp16.onnx", "--reference", model, "--shapes", "x1:1x3x16x16,x2:1x3x12x20")
    assert validated.exit_code == 0, validated.output
    if onnxruntime.__version__ == "1.32.0":   # the version seen crashing; others may not
        assert "fails on the FP16 candidate at ORT_ENABLE_ALL (SIGSEGV); it runs at ORT_ENABLE_EXTENDED instead" in res.output
        # the level is kept in the file: later sessions start there, and Triton's config sets it
        record = get_onnx_metadata(onnx.load(str(tmp_path / "m.fp16.onnx")))
        assert record["ort_optimization_level"] == "ORT_ENABLE_EXTENDED"
        assert record["ort_probed_with"] == "onnxruntime 1.32.0" and "SIGSEGV" in record["ort_crashed_at"]
        assert "ORT_ENABLE_ALL (its record says it fails there); it runs at ORT_ENABLE_EXTENDED" in validated.output
        repo = run("triton", tmp_path / "m.fp16.onnx", "-o", tmp_path / "repo")
        assert repo.exit_code == 0, repo.output
        config = parse_config((tmp_path / "repo" / "m_fp16" / "config.pbtxt").read_text())
        assert config.optimization.graph.level == 1        # Triton's onnxruntime backend: 1 = EXTENDED


def test_a_recorded_level_counts_only_for_the_same_onnx_runtime():
    from xattn.ort_session import recorded_level

    here = f"onnxruntime {onnxruntime.__version__}"
    assert recorded_level({"ort_optimization_level": "ORT_ENABLE_BASIC", "ort_probed_with": here}) == "ORT_ENABLE_BASIC"
    assert recorded_level({"ort_optimization_level": "ORT_ENABLE_BASIC", "ort_probed_with": "onnxruntime 0.1"}) is None
    assert recorded_level({"ort_optimization_level": "__import__('os')", "ort_probed_with": here}) is None
    assert recorded_level({}) is None


def test_every_written_file_records_the_level_it_loads_at(tmp_path):
    assert run("export", "--model", "tests.attention_styles:sdpa_plain", "-o", tmp_path / "m.onnx", *SMALL).exit_code == 0
    optimized = run("optimize", tmp_path / "m.onnx", "-o", tmp_path / "m.ort.onnx", "--reference",
                    "tests.attention_styles:sdpa_plain")
    assert optimized.exit_code == 0, optimized.output
    for name in ("m.onnx", "m.ort.onnx"):
        record = get_onnx_metadata(onnx.load(str(tmp_path / name)))
        assert record["ort_optimization_level"] == "ORT_ENABLE_ALL" and record["ort_crashed_at"] == "none"
