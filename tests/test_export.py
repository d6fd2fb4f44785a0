"""ONNX export: dynamic axes, verification at unseen shapes, provenance, failures that leave no bad file."""

import json
import re

import numpy as np
import onnx
import pytest

from exporter.onnx_export import ExportError, ExportSettings, export_onnx
from xattn.registry import load_model
from xattn.data import random_feed
from runtime.onnxrt import OnnxRuntimeRunner
from runtime.torch_runner import TorchRunner
from xattn.errors import BadInputError, ShapeError, VerificationError
from xattn.provenance import get_onnx_metadata
from xattn.shapes import parse_shape_set

# Shapes no export below ever traced or verified at: batch 5, odd sizes, x2 larger than x1.
UNSEEN = "x1:5x{c1}x7x19,x2:5x{c2}x29x11"


def _rel_l2(a, b):
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def _check_unseen(path, model, shapes):
    feed = random_feed(parse_shape_set(shapes), seed=123)
    with OnnxRuntimeRunner(path, ["cpu"]) as ort_runner, TorchRunner(model) as ref:
        got, expected = ort_runner.infer(feed), ref.infer(feed)
    assert got["y"].shape == expected["y"].shape
    assert _rel_l2(got["y"], expected["y"]) <= 1e-5


def test_default_model_export_has_named_dynamic_axes_and_matches_at_unseen_shapes(exported_net):
    model, result = exported_net
    proto = onnx.load(str(result.path))
    dims = {v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
            for v in (*proto.graph.input, *proto.graph.output)}
    assert dims == {"x1": ["batch", 3, "x1_height", "x1_width"], "x2": ["batch", 3, "x2_height", "x2_width"],
                    "y": ["batch", 256, "x1_height", "x1_width"]}
    assert proto.opset_import[0].version == 18
    assert len(result.checks) >= 3 and all(c.passed for c in result.checks)
    assert all(min(shape[0] for shape in parse_shape_set(c.shapes).values()) >= 1 for c in result.checks)
    assert any(parse_shape_set(c.shapes)["x1"][0] > 1 for c in result.checks)
    _check_unseen(result.path, model, UNSEEN.format(c1=3, c2=3))


def test_provenance_and_report(exported_net):
    model, result = exported_net
    meta = get_onnx_metadata(onnx.load(str(result.path)))
    assert meta["model"] == "cross-attention-net" and meta["init_seed"] == 0 and meta["opset"] == 18
    assert meta["toolkit_version"] and meta["created"] and meta["precision"] == "fp32"
    assert meta["dynamic_axes"]["x2"] == {"0": "batch", "2": "x2_height", "3": "x2_width"}
    assert meta["min_shapes"] == "x1:1x3x4x4,x2:1x3x4x4" and meta["max_shapes"] == "x1:8x3x128x128,x2:8x3x128x128"
    report = json.loads(result.report_path.read_text())
    assert report["path"] == str(result.path)
    # three varied sets, both corners; the max corner scaled into the suite's 768 MiB verification budget (PyTorch
    # needs about 33 GiB at batch 8 x 128x128): batch 1, every spatial size shrunk by one factor
    assert [c["purpose"].split(" (")[0] for c in report["checks"]] == ["varied sizes"] * 3 + [
        "min corner", "max corner scaled into the verification budget of 768.0 MiB"]
    size = int(re.match(r"x1:1x3x(\d+)x\1,x2:1x3x\1x\1$", report["checks"][-1]["shapes"]).group(1))
    assert 64 < size < 128
    assert all(c["rel_l2"] < 1e-5 for c in report["checks"]) and report["tolerance"] == 1e-5
    assert report["guards"] == [] and meta["weights"] == sum(p.numel() for p in model.module.parameters())


@pytest.mark.parametrize("name, args, c", [
    ("cross-attention", {"in_channels": 8, "out_channels": 16, "num_heads": 2, "kv_channels": 6}, (8, 6)),
    ("seed-cross-attention", {"in_channels": 8, "out_channels": 8}, (8, 8)),
])
def test_blocks_export_and_match_at_unseen_shapes(tmp_path, name, args, c):
    model = load_model(name, model_args=args)
    result = export_onnx(model, tmp_path / "m.onnx")
    assert all(check.passed for check in result.checks)
    unseen = UNSEEN.format(c1=c[0], c2=c[1])
    if model.equal_positions:  # the seed block needs H1*W1 == H2*W2: 7x19 and 19x7
        unseen = f"x1:5x{c[0]}x7x19,x2:5x{c[1]}x19x7"
    _check_unseen(result.path, model, unseen)


def test_legacy_exporter(tmp_path, small_attention_args):
    model = load_model("cross-attention", model_args=small_attention_args)
    result = export_onnx(model, tmp_path / "legacy.onnx", ExportSettings(exporter="legacy"))
    assert all(check.passed for check in result.checks)
    _check_unseen(result.path, model, UNSEEN.format(c1=8, c2=6))


@pytest.mark.parametrize("exporter, error, message", [
    # torch.export sees int(size) specialise a dynamic axis and says so
    ("dynamo", ExportError, r"Constraints violated .* x1_height.*--.*int\(\) or \.item\(\) on a shape"),
    # the TorchScript exporter bakes it silently (with TracerWarnings); verification at other shapes notices
    ("legacy", VerificationError, r"does not match PyTorch at x1:.*baked into a Reshape"),
])
def test_baked_shape_fails_and_keeps_the_good_file(tmp_path, exporter, error, message):
    out = tmp_path / "model.onnx"
    out.write_bytes(b"previous good artifact")
    model = load_model("tests.user_models:baked")
    with pytest.raises(error, match=message):
        export_onnx(model, out, ExportSettings(exporter=exporter))
    assert out.read_bytes() == b"previous good artifact"
    assert (tmp_path / "model.unverified.onnx").exists() == (exporter == "legacy")
    assert not (tmp_path / "model.export.json").exists()
    assert not list(tmp_path.glob(".*.tmp"))


def test_exporter_failure_is_an_export_error(tmp_path):
    model = load_model("tests.user_models:unexportable")
    with pytest.raises(ExportError, match="dynamo exporter failed on model 'tests.user_models:unexportable'"):
        export_onnx(model, tmp_path / "m.onnx")
    assert list(tmp_path.iterdir()) == []


def test_simplify_keeps_results_and_metadata(tmp_path, small_attention_args):
    pytest.importorskip("onnxslim")
    model = load_model("cross-attention", model_args=small_attention_args)
    result = export_onnx(model, tmp_path / "slim.onnx", ExportSettings(simplify=True))
    assert all(c.passed for c in result.checks)
    assert get_onnx_metadata(onnx.load(str(result.path)))["model"] == "cross-attention"


@pytest.mark.parametrize("settings, error, message", [
    (ExportSettings(opset=12), BadInputError, "opset 12 is out of range"),
    (ExportSettings(min_shapes=parse_shape_set("x1:1x3x200x200")), ShapeError, r"need min <= opt <= max"),
    (ExportSettings(max_shapes=parse_shape_set("x1:8x4x128x128")), ShapeError, "has 4 channels; model .* takes 3"),
    (ExportSettings(max_shapes=parse_shape_set("x1:8x3x128")), ShapeError, "has rank 3, expected 4"),
    (ExportSettings(max_shapes=parse_shape_set("x3:8x3x128x128")), ShapeError, "unknown input 'x3'"),
])
def test_bad_settings_write_nothing(tmp_path, settings, error, message):
    with pytest.raises(error, match=message):
        export_onnx(load_model(), tmp_path / "m.onnx", settings)
    assert list(tmp_path.iterdir()) == []


def test_a_branch_on_a_size_is_reported_and_verified_on_both_sides(tmp_path):
    """kornia LoFTR's pattern: the exporter traces one side of `x2_height*x2_width > 256` and the assert never
    reaches the ONNX; the export names it and fails at a shape on its false side (the ONNX doubles there,
    PyTorch does not)."""
    model = load_model("tests.user_models:guarded")
    out = tmp_path / "m.onnx"
    said = []
    with pytest.raises(VerificationError, match=r"traced one side of 'x2_height\*x2_width > 256'") as caught:
        export_onnx(model, out, progress=said.append)
    assert any(line.startswith("  x2_height*x2_width > 256  (FALSE at x1:") for line in said)
    assert "narrow --min-shapes/--max-shapes to one side" in caught.value.hint
    assert not out.exists()
    # inside one side of the guard the same model exports
    settings = ExportSettings(min_shapes=parse_shape_set("x1:1x4x4x4,x2:1x4x17x17"),
                              max_shapes=parse_shape_set("x1:2x4x32x32,x2:2x4x32x32"))
    result = export_onnx(model, out, settings)
    # torch proves the branch from the narrowed range (17*17 > 256): nothing left restricts it
    assert all(c.passed for c in result.checks) and all(g.holds_in_range for g in result.guards)
    assert "x2_height*x2_width > 256" not in [g.expression for g in result.guards]
    report = json.loads(result.report_path.read_text())
    assert all(g["holds_in_range"] for g in report["guards"])


def test_guard_sides_are_found_near_the_boundary():
    import sympy

    from exporter.guards import analyse_guards

    h, w = sympy.symbols("s1 s58", integer=True, positive=True)
    low, high = parse_shape_set("x1:1x4x4x4,x2:1x4x4x4"), parse_shape_set("x1:8x4x128x128,x2:8x4x128x128")
    base = parse_shape_set("x1:2x4x24x20,x2:2x4x16x30")
    axes = {"x1": {0: "batch", 2: "x1_height", 3: "x1_width"}, "x2": {0: "batch", 2: "x2_height", 3: "x2_width"}}
    [guard] = analyse_guards([h * w > 256], {"s1": [("x2", 2)], "s58": [("x2", 3)]}, axes, low, high, base)
    assert guard.expression == "x2_height*x2_width > 256" and guard.holds_in_range is False
    true_hw, false_hw = guard.true_shapes["x2"][2:], guard.false_shapes["x2"][2:]
    assert true_hw[0] * true_hw[1] > 256 >= false_hw[0] * false_hw[1]
    assert true_hw[0] * true_hw[1] - false_hw[0] * false_hw[1] <= 32   # near the boundary, not at the range ends
    assert guard.true_shapes["x1"] == base["x1"]


def test_a_fixed_size_parameter_names_torchs_reason(tmp_path):
    model = load_model("tests.user_models:learned_positions")
    with pytest.raises(ExportError, match=r"Eq\(s\d+\*s\d+, 1024\) is inconsistent") as caught:
        export_onnx(model, tmp_path / "m.onnx")
    assert "learned positional embedding" in caught.value.hint and "equal --min-shapes and --max-shapes" in caught.value.hint
    fixed = ExportSettings(min_shapes=parse_shape_set("x1:1x4x32x32,x2:1x4x4x4"),
                           max_shapes=parse_shape_set("x1:2x4x32x32,x2:2x4x48x48"))
    assert all(c.passed for c in export_onnx(model, tmp_path / "m.onnx", fixed).checks)


def test_legacy_output_axes_come_from_the_graph_and_tracer_warnings_are_kept(tmp_path):
    model = load_model("tests.user_models:on_x2_grid")
    result = export_onnx(model, tmp_path / "m.onnx", ExportSettings(exporter="legacy"))
    dims = [[d.dim_param or d.dim_value for d in o.type.tensor_type.shape.dim]
            for o in onnx.load(str(result.path)).graph.output]
    assert dims == [["batch", 4, "x1_height", "x1_width"], ["batch", 4, "x2_height", "x2_width"]]
    baked = load_model("tests.user_models:baked")
    with pytest.raises(VerificationError):
        export_onnx(baked, tmp_path / "b.onnx", ExportSettings(exporter="legacy"))


def test_tracer_warnings_reach_the_report_and_debug_log(tmp_path, caplog):
    import logging

    model = load_model("tests.user_models:traced_constant")
    said = []
    with caplog.at_level(logging.DEBUG, logger="xattn"):
        result = export_onnx(model, tmp_path / "m.onnx", ExportSettings(exporter="legacy"), progress=said.append)
    assert any(w.startswith("TracerWarning") for w in result.exporter_warnings)
    assert any("TracerWarning" in line and "shown with --debug" in line for line in said)
    assert any("exporter warning: TracerWarning" in r.message for r in caplog.records)
    report = json.loads(result.report_path.read_text())
    assert any(w.startswith("TracerWarning") for w in report["exporter_warnings"])


def test_legacy_exporter_on_multihead_attention_points_to_the_default_exporter(tmp_path):
    model = load_model("tests.user_models:maps_mha")
    settings = dict(max_shapes=parse_shape_set("x1:2x16x24x24,x2:2x16x24x24"))
    with pytest.raises(VerificationError) as caught:
        export_onnx(model, tmp_path / "m.onnx", ExportSettings(exporter="legacy", **settings))
    assert "nn.MultiheadAttention bakes sizes under the legacy" in caught.value.hint
    assert "drop --exporter legacy" in caught.value.hint
    assert all(c.passed for c in export_onnx(model, tmp_path / "m.onnx", ExportSettings(**settings)).checks)


def test_a_range_torch_must_narrow_is_narrowed_by_default_and_offered_when_given(tmp_path):
    """An 8x8 patch stem cannot run below 8x8: torch.export suggests 8.. for every spatial axis. The default
    ranges (the toolkit's guess) are narrowed and said; ranges the user gave are refused with the narrowed flags."""
    model = load_model("tests.user_models:big_kernel")
    result = export_onnx(model, tmp_path / "m.onnx")
    assert result.min_shapes == {"x1": (1, 3, 8, 8), "x2": (1, 3, 8, 8)}
    assert any(n.startswith("the default ranges were narrowed: torch.export needs x1_height 8..128") for n in result.notes)
    assert all(c.passed for c in result.checks) and any(c.shapes == "x1:1x3x8x8,x2:1x3x8x8" for c in result.checks)
    given = ExportSettings(min_shapes={"x1": (1, 3, 4, 4), "x2": (1, 3, 4, 4)})
    with pytest.raises(ExportError, match=r"cannot run on the whole of the declared ranges: torch.export needs "
                                          r"x1_height 8\.\.128.*export with --min-shapes x1:1x3x8x8,x2:1x3x8x8"):
        export_onnx(model, tmp_path / "given.onnx", given)
    assert not (tmp_path / "given.onnx").exists()


def test_output_axes_are_named_from_the_input_axes(tmp_path):
    """A stride-4 patch stem puts the output on x1's grid at 1/4: the axis reads (x1_height//4), not torch's s71."""
    model = load_model("tests.attention_styles:sdpa_plain")
    result = export_onnx(model, tmp_path / "m.onnx", ExportSettings(max_shapes={"x1": (2, 3, 32, 32),
                                                                               "x2": (2, 3, 32, 32)}))
    (output,) = onnx.load(str(result.path)).graph.output
    assert [d.dim_param or d.dim_value for d in output.type.tensor_type.shape.dim] == [
        "batch", 16, "(x1_height//4)", "(x1_width//4)"]
