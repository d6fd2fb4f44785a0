"""Validation and the gate catch real defects; reports round-trip through real parsers."""

import json
import re
import shutil
import xml.etree.ElementTree as ET

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner
from onnx import numpy_helper

from xattn.models import SeedCrossAttention
from exporter.onnx_export import ExportSettings, export_onnx
from xattn.registry import load_model
from runtime.validate import ValidateOptions, validate_artifact
from tools.cli import cli
from xattn.errors import CheckpointError, VerificationError


def invoke(*args, env=None):
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False, env=env)


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory, exported_small):
    """A correct export, one with a single weight perturbed, and one with a size baked into a Reshape."""
    folder = tmp_path_factory.mktemp("artifacts")
    _, result = exported_small
    good = folder / "good.onnx"
    shutil.copy(result.path, good)
    proto = onnx.load(str(good))
    weight = next(i for i in proto.graph.initializer if len(i.dims) == 4)
    array = numpy_helper.to_array(weight).copy()
    array.flat[0] += 0.5
    weight.CopyFrom(numpy_helper.from_array(array, weight.name))
    perturbed = folder / "perturbed.onnx"
    onnx.save(proto, str(perturbed))
    with pytest.raises(VerificationError):
        export_onnx(load_model("tests.user_models:baked"), folder / "baked.onnx", ExportSettings(exporter="legacy"))
    return {"good": good, "perturbed": perturbed, "baked": folder / "baked.unverified.onnx"}


def test_correct_export_passes_with_all_reports(artifacts, tmp_path):
    res = invoke("validate", artifacts["good"], "--samples", "2", "--shapes", "x1:2x8x9x31,x2:2x6x30x10",
                 "--shapes", "x1:1x8x16x16,x2:1x6x5x7", "--json-report", tmp_path / "r.json",
                 "--junit", tmp_path / "r.xml", "--markdown", tmp_path / "r.md")
    assert res.exit_code == 0, res.output
    assert res.output.startswith("PASS good.onnx (fp32")
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["passed"] is True and report["versions"]["onnxruntime"]
    artifact = report["artifacts"][0]
    assert artifact["sha256"] and artifact["seed"] == 0 and artifact["synthetic_data"] is True
    assert [c["shapes"] for c in artifact["cases"]] == ["x1:2x8x9x31,x2:2x6x30x10", "x1:1x8x16x16,x2:1x6x5x7"]
    assert all(c["rel_l2"] < 1e-5 and c["samples"] == 2 for c in artifact["cases"])
    assert artifact["reference"]["model"] == "cross-attention" and artifact["reference"]["init_seed"] == 0
    suite = ET.parse(tmp_path / "r.xml").getroot().find("testsuite")
    assert suite.get("tests") == "2" and suite.get("failures") == "0"
    assert "| good.onnx | fp32 | `x1:2x8x9x31,x2:2x6x30x10` | y |" in (tmp_path / "r.md").read_text()


def test_perturbed_weight_fails_and_junit_says_why(artifacts, tmp_path):
    res = invoke("validate", artifacts["perturbed"], "--junit", tmp_path / "r.xml")
    assert res.exit_code == 1 and res.output.startswith("FAIL perturbed.onnx")
    suite = ET.parse(tmp_path / "r.xml").getroot().find("testsuite")
    cases = suite.findall("testcase")
    assert suite.get("tests") == str(len(cases)) == "4" and suite.get("failures") == "4"
    failure = cases[0].find("failure")
    assert failure.get("message").startswith("relative L2") and "rel_l2=" in failure.text


def test_perturbed_weight_fails_even_int8_bounds(artifacts):
    result = validate_artifact(artifacts["perturbed"], ValidateOptions(precision="int8"))
    assert not result.passed and result.worst().metrics.rel_l2 > 0.02


def test_baked_shape_fails_at_other_sizes(artifacts):
    # a user's factory: the reference is named by the user, never taken from the file alone
    result = validate_artifact(artifacts["baked"], ValidateOptions(reference="tests.user_models:baked"))
    assert not result
    assert any("candidate failed to run" in r or "relative L2" in r for c in result.cases for r in c.reasons)
    res = invoke("validate", artifacts["baked"], "--reference", "tests.user_models:baked")
    assert res.exit_code == 1


def test_reference_checkpoint_must_match_the_recorded_hash(tmp_path):
    torch.manual_seed(5)
    torch.save(SeedCrossAttention(4, 4).state_dict(), tmp_path / "a.pt")
    torch.save(SeedCrossAttention(4, 4).state_dict(), tmp_path / "b.pt")
    model = load_model("seed-cross-attention", tmp_path / "a.pt")
    onnx_path = export_onnx(model, tmp_path / "seed.onnx").path
    assert validate_artifact(onnx_path, ValidateOptions(checkpoint=str(tmp_path / "a.pt"))).passed
    with pytest.raises(CheckpointError, match=r"is not the one .*seed.onnx was exported from"):
        validate_artifact(onnx_path, ValidateOptions(checkpoint=str(tmp_path / "b.pt")))
    res = invoke("validate", onnx_path)
    assert res.exit_code == 2 and "pass the same file with --checkpoint" in res.output


def test_real_inputs_from_npz(artifacts, tmp_path):
    rng = np.random.default_rng(1)
    data = tmp_path / "inputs.npz"
    np.savez(data, x1=rng.random((3, 1, 8, 12, 10), dtype=np.float32), x2=rng.random((3, 1, 6, 9, 11), dtype=np.float32))
    result = validate_artifact(artifacts["good"], ValidateOptions(data=str(data)))
    assert result.passed and not result.synthetic and result.cases[0].samples == 3
    np.savez(tmp_path / "wrong.npz", x1=np.zeros((1, 8, 4, 4), np.float32))
    res = invoke("validate", artifacts["good"], "--data", tmp_path / "wrong.npz")
    assert res.exit_code == 2 and "has no array named 'x2'" in res.output
    np.savez(tmp_path / "shapes.npz", x1=np.zeros((1, 3, 4, 4), np.float32), x2=np.zeros((1, 6, 4, 4), np.float32))
    res = invoke("validate", artifacts["good"], "--data", tmp_path / "shapes.npz")
    assert res.exit_code == 2 and "input 'x1' has shape (1, 3, 4, 4), expected (N, 8, H, W)" in res.output


@pytest.mark.parametrize("content", [b"", b"\x08\x07garbage-not-onnx" * 20])
def test_validate_bad_files_exit_2(tmp_path, content):
    path = tmp_path / "bad.onnx"
    path.write_bytes(content)
    res = invoke("validate", path)
    assert res.exit_code == 2 and res.output.startswith("error: ") and len(res.output.strip().splitlines()) == 1


def test_unwritable_report_path_writes_nothing(artifacts, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    res = invoke("validate", artifacts["good"], "--json-report", blocker / "r.json", "--junit", tmp_path / "ok.xml")
    assert res.exit_code == 2 and "cannot create output folder" in res.output
    assert not (tmp_path / "ok.xml").exists()


def test_step_summary_is_appended(artifacts, tmp_path):
    summary = tmp_path / "summary.md"
    summary.write_text("earlier\n")
    res = invoke("validate", artifacts["good"], "--shapes", "x1:1x8x5x5,x2:1x6x6x6",
                 env={"GITHUB_STEP_SUMMARY": str(summary)})
    assert res.exit_code == 0
    text = summary.read_text()
    assert text.startswith("earlier\n## xattn accuracy") and "`x1:1x8x5x5,x2:1x6x6x6`" in text


def test_run_command_round_trips_npz(artifacts, tmp_path, exported_small):
    model, _ = exported_small
    rng = np.random.default_rng(2)
    feed = {"x1": rng.standard_normal((1, 8, 6, 7), dtype=np.float32),
            "x2": rng.standard_normal((1, 6, 9, 5), dtype=np.float32)}
    np.savez(tmp_path / "in.npz", **feed)
    res = invoke("run", artifacts["good"], "--inputs", tmp_path / "in.npz", "-o", tmp_path / "out.npz")
    assert res.exit_code == 0, res.output
    with torch.no_grad():
        expected = model.module(torch.from_numpy(feed["x1"]), torch.from_numpy(feed["x2"])).numpy()
    with np.load(tmp_path / "out.npz") as out:
        np.testing.assert_allclose(out["y"], expected, rtol=1e-4, atol=1e-5)
    res = invoke("run", artifacts["good"])
    assert res.exit_code == 2 and "give exactly one of --inputs" in res.output
    res = invoke("run", "cross-attention", "--shapes", "x1:1x128x4x4,x2:1x128x3x3", "--model-arg", "num_heads=2")
    assert res.exit_code == 0 and "y: float32 1x128x4x4" in res.output


def test_validate_on_data_defaults_to_held_out_crops_and_can_emulate_the_fused_kernel(exported_net, tmp_path):
    """--data draws other crops than calibration by default (seed 1000); --emulate-fused-fp16 compares with
    PyTorch emulating FP16 layers around FP32 attention, which the FP16 file tracks more closely than FP32."""
    from exporter.fp16 import convert_fp16

    _, export = exported_net
    fp16 = convert_fp16(export.path, tmp_path / "m.fp16.onnx").path
    small = ("--shapes", "x1:1x3x48x48,x2:1x3x32x40")   # keeps the test under the suite's memory limit
    plain = invoke("validate", fp16, "--data", "shipped", *small, "--json-report", tmp_path / "a.json")
    emulated = invoke("validate", fp16, "--data", "shipped", "--emulate-fused-fp16", *small,
                      "--json-report", tmp_path / "b.json")
    assert plain.exit_code == 0 and emulated.exit_code == 0, plain.output + emulated.output
    assert "shipped photos (scikit-image), seed 1000" in plain.output
    assert "run on ONNX Runtime's CPU, which computes FP16 MatMul and Softmax in FP32" in plain.output
    a, b = (json.loads((tmp_path / f).read_text())["artifacts"][0] for f in ("a.json", "b.json"))
    assert b["reference"]["dtype"] == "fp16-fused" and a["reference"]["dtype"] == "fp32"
    for case_a, case_b in zip(a["cases"], b["cases"]):
        assert case_b["rel_l2"] < case_a["rel_l2"] / 1.5


def test_reference_may_be_another_artifact(exported_small, tmp_path):
    """ONNX vs ONNX (FP16 against FP32), as Polygraphy's run --onnxrt --trt compares backends: no PyTorch in
    the loop, every output compared, tolerances by the candidate's precision."""
    from exporter.fp16 import convert_fp16

    _, export = exported_small
    fp16 = tmp_path / "m.fp16.onnx"
    convert_fp16(export.path, fp16)
    res = CliRunner().invoke(cli, ["validate", str(fp16), "--reference", str(export.path), "--json-report",
                                   str(tmp_path / "r.json")])
    assert res.exit_code == 0, res.output
    report = json.loads((tmp_path / "r.json").read_text())["artifacts"][0]
    assert report["precision"] == "fp16" and report["reference"]["backend"] == "onnxruntime"
    assert all(1e-6 < case["rel_l2"] < 1e-3 for case in report["cases"])       # FP16 rounding, no more
    assert any("reference: the artifact" in note and "not PyTorch" in note for note in report["notes"])
    # against itself, refused; against an unrelated ONNX whose outputs differ, a failure (exit 1)
    res = CliRunner().invoke(cli, ["validate", str(export.path), "--reference", str(export.path)])
    assert res.exit_code == 2 and "is the artifact itself" in res.output
    other = tmp_path / "other.onnx"
    from exporter.onnx_export import export_onnx
    from xattn.registry import load_model

    model = load_model("cross-attention", model_args={"in_channels": 8, "out_channels": 16, "num_heads": 2,
                                                      "kv_channels": 6}, seed=7)
    export_onnx(model, other)
    res = CliRunner().invoke(cli, ["validate", str(other), "--reference", str(export.path)])
    assert res.exit_code == 1 and "FAIL" in res.output


def test_debug_compares_two_onnx_files_layer_by_layer(exported_small, tmp_path):
    from exporter.fp16 import convert_fp16

    _, export = exported_small
    fp16 = tmp_path / "m.fp16.onnx"
    convert_fp16(export.path, fp16)
    res = CliRunner().invoke(cli, ["debug", str(fp16), "--reference", str(export.path), "--data", "synthetic",
                                   "--samples", "2", "--order", "graph", "--resize", "x1:24x24,x2:16x20", "--json"])
    assert res.exit_code == 0, res.output
    tensors = json.loads(res.output)["tensors"]
    assert [t["order"] for t in tensors] == sorted(t["order"] for t in tensors) and len(tensors) > 5
    # FP16 rounding everywhere, except the scores: the FP16 file scales Q instead (same softmax input, other tensor)
    assert all(t["rel_l2"] < 1e-3 for t in tensors if t["tensor"] != "matmul")
    unrelated = tmp_path / "u.onnx"
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("Identity", ["x1"], ["z"])], "g",
                              [helper.make_tensor_value_info("x1", TensorProto.FLOAT, [1, 8, 4, 4]),
                               helper.make_tensor_value_info("x2", TensorProto.FLOAT, [1, 6, 4, 4])],
                              [helper.make_tensor_value_info("z", TensorProto.FLOAT, [1, 8, 4, 4])])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), unrelated)
    res = CliRunner().invoke(cli, ["debug", str(unrelated), "--reference", str(export.path), "--data", "synthetic",
                                   "--samples", "1"])
    assert res.exit_code == 2 and "share no tensor names" in res.output


def test_data_honours_samples_and_shapes(exported_net, tmp_path):
    """--data with --samples and --shapes: that many held-out pairs, rendered at those resolutions."""
    _, export = exported_net
    res = CliRunner().invoke(cli, ["validate", str(export.path), "--data", "shipped", "--samples", "3",
                                   "--shapes", "x1:1x3x40x40,x2:1x3x24x56", "--shapes", "x1:1x3x20x36,x2:1x3x28x28",
                                   "--json-report", str(tmp_path / "r.json")])
    assert res.exit_code == 0, res.output
    cases = json.loads((tmp_path / "r.json").read_text())["artifacts"][0]["cases"]
    assert [(c["shapes"], c["samples"]) for c in cases] == [("x1:1x3x40x40,x2:1x3x24x56", 3),
                                                           ("x1:1x3x20x36,x2:1x3x28x28", 3)]
    res = CliRunner().invoke(cli, ["validate", str(export.path), "--data", "shipped", "--shapes",
                                   "x1:1x3x40x40,x2:1x3x24x56", "--shapes", "x1:2x3x20x36,x2:2x3x28x28"])
    assert res.exit_code == 2 and "every --shapes set needs the same batch, got [1, 2]" in res.output


def test_reports_say_whether_validation_data_overlaps_calibration():
    from runtime.validate import calibration_overlap

    shipped = "shipped photos (scikit-image), seed 0"
    assert calibration_overlap(shipped, shipped).startswith("validation data OVERLAPS calibration")
    assert "held out from calibration by crops: same source (shipped photos (scikit-image)), seed 1000 vs 0" in \
        calibration_overlap(shipped, "shipped photos (scikit-image), seed 1000")
    assert calibration_overlap("pairs/", "pairs/").startswith("validation data OVERLAPS")   # fixed x1/+x2/ pairs
    assert "is not the calibration data" in calibration_overlap(shipped, "other/")


def test_two_onnx_files_not_written_by_the_toolkit_compare_without_pytorch(tmp_path):
    """Neither file records its inputs: the names come from the reference itself (this crashed with 'not
    active' before), and a changed file fails against the original."""
    from onnx import TensorProto, helper

    def write(path, scale):
        graph = helper.make_graph(
            [helper.make_node("MatMul", ["a", "b"], ["outer"]), helper.make_node("Mul", ["outer", "s"], ["y"])], "g",
            [helper.make_tensor_value_info("a", TensorProto.FLOAT, ["n", 1]),
             helper.make_tensor_value_info("b", TensorProto.FLOAT, [1, "m"])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", "m"])],
            [helper.make_tensor("s", TensorProto.FLOAT, [], [scale])])
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
        onnx.checker.check_model(model, full_check=True)
        onnx.save(model, str(path))

    write(tmp_path / "a.onnx", 1.0)
    write(tmp_path / "b.onnx", 1.0)
    write(tmp_path / "c.onnx", 1.01)
    res = invoke("validate", tmp_path / "a.onnx", "--reference", tmp_path / "b.onnx", "--shapes", "a:16x1,b:1x8")
    assert res.exit_code == 0 and re.search(r"ok +y @ a:16x1,b:1x8 +rel_l2 0\.00e\+00", res.output), res.output
    res = invoke("validate", tmp_path / "c.onnx", "--reference", tmp_path / "b.onnx", "--shapes", "a:16x1,b:1x8")
    assert res.exit_code == 1 and re.search(r"rel_l2 1\.00e-02", res.output), res.output
