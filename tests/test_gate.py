"""The CI accuracy gate: catches a defect, writes every report, refuses malformed files, tracks a baseline."""

import json
import xml.etree.ElementTree as ET

import pytest
from click.testing import CliRunner

from tests.test_validate import artifacts  # noqa: F401  (module-scoped fixture)
from tools.cli import cli


def invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


def write_gate(folder, body):
    path = folder / "gate.toml"
    path.write_text(body)
    return path


GATE = """
[defaults]
shapes = ["x1:1x8x12x10,x2:1x6x7x15", "x1:2x8x9x9,x2:2x6x16x4"]
samples = 2

[reports]
json = "reports/accuracy.json"
junit = "reports/accuracy.xml"
markdown = "reports/accuracy.md"

[[artifacts]]
path = "{good}"

[[artifacts]]
name = "perturbed-int8-bounds"
path = "{perturbed}"
precision = "int8"
max_rel_l2 = 0.02
"""


def test_gate_fails_on_the_defect_and_writes_all_reports(artifacts, tmp_path):  # noqa: F811
    gate = write_gate(tmp_path, GATE.format(**artifacts))
    res = invoke("gate", gate)
    assert res.exit_code == 1
    assert "gate: 1 of 2 artifacts pass; failed: perturbed-int8-bounds" in res.output
    report = json.loads((tmp_path / "reports/accuracy.json").read_text())
    assert [a["passed"] for a in report["artifacts"]] == [True, False]
    assert report["artifacts"][1]["tolerances"]["max_rel_l2"] == 0.02
    suites = ET.parse(tmp_path / "reports/accuracy.xml").getroot().findall("testsuite")
    assert [(s.get("name"), s.get("tests"), s.get("failures")) for s in suites] == [
        ("good.onnx", "2", "0"), ("perturbed-int8-bounds", "2", "2")]
    assert "**FAIL**" in (tmp_path / "reports/accuracy.md").read_text()


def test_baseline_regression(artifacts, tmp_path):  # noqa: F811
    gate = write_gate(tmp_path, f'[baseline]\nmax_regression = 0.5\n[[artifacts]]\npath = "{artifacts["good"]}"\n'
                                '[defaults]\nshapes = ["x1:1x8x12x10,x2:1x6x7x15"]\n')
    first = tmp_path / "baseline" / "accuracy.json"
    first.parent.mkdir()
    # the README's first run: no baseline yet is refused, not skipped; --json-report creates it
    res = invoke("gate", gate, "--baseline", first)
    assert res.exit_code == 2 and "does not exist" in res.output
    assert invoke("gate", gate, "--json-report", first).exit_code == 0
    assert invoke("gate", gate, "--baseline", first).exit_code == 0       # same figures: no regression
    doctored = json.loads(first.read_text())
    case = doctored["artifacts"][0]["cases"][0]
    case["rel_l2"] = case["rel_l2"] / 100        # pretend it used to be 100x more accurate
    (tmp_path / "doctored.json").write_text(json.dumps(doctored))
    # fp32 errors are ~1e-7: a 100x growth is still under the default noise floor (min_delta 1e-6)...
    assert invoke("gate", gate, "--baseline", tmp_path / "doctored.json").exit_code == 0
    # ...and with the floor lowered, the regression fires.
    gate.write_text(gate.read_text().replace("max_regression = 0.5", "max_regression = 0.5\nmin_delta = 1e-9"))
    res = invoke("gate", gate, "--baseline", tmp_path / "doctored.json", "--junit", tmp_path / "r.xml")
    assert res.exit_code == 1 and "REGRESSION y @ x1:1x8x12x10,x2:1x6x7x15" in res.output
    failures = [f.get("type") for f in ET.parse(tmp_path / "r.xml").getroot().iter("failure")]
    assert failures == ["AccuracyRegression"]


@pytest.mark.parametrize("body, message", [
    ('[[artifacts]]\npath = "{good}"\ntolerance = 1\n', r"unknown key 'tolerance' in artifacts\[0\]"),
    ('[[artifacts]]\npath = "{good}"\nmax_rel_l2 = "small"\n', r"artifacts\[0\].max_rel_l2 must be float or int"),
    ('[[artifacts]]\npath = "missing.onnx"\n', r"names .*missing.onnx, which does not exist"),
    ('[defaults]\nshapes = "x1:1x3x4x4"\n[[artifacts]]\npath = "{good}"\n', r"\[defaults\].shapes must be list"),
    ('[extras]\n[[artifacts]]\npath = "{good}"\n', "unknown section 'extras'"),
    ('[[artifacts]]\npath = "{good}"\nprecision = "int4"\n', "precision 'int4' is not one of"),
    ("[defaults]\nseed = 1\n", r"no \[\[artifacts\]\] entries"),
    ("[[artifacts]\n", "is not valid TOML"),
])
def test_malformed_gate_files_exit_2(artifacts, tmp_path, body, message):  # noqa: F811
    import re

    res = invoke("gate", write_gate(tmp_path, body.format(**artifacts)))
    assert res.exit_code == 2
    assert res.output.startswith("error: ") and len(res.output.strip().splitlines()) == 1
    assert re.search(message, res.output), res.output


def test_shipped_example_gate_file_is_valid(tmp_path):
    """The example's schema is valid: copied beside stand-in artifacts, it loads without complaint."""
    from pathlib import Path

    from runtime.gate import load_gate

    example = Path(__file__).resolve().parent.parent / "examples" / "gate.toml"
    (tmp_path / "examples").mkdir()
    (tmp_path / "artifacts").mkdir()
    names = ["model.onnx", "model.fp16.onnx", "model.int8.onnx"]
    for name in names:
        (tmp_path / "artifacts" / name).write_bytes(b"stand-in")
    copy = tmp_path / "examples" / "gate.toml"
    copy.write_text(example.read_text())
    config = load_gate(copy)
    assert [a.name for a in config.artifacts] == names
    assert config.artifacts[2].settings["data"] == "shipped" and config.artifacts[2].settings["seed"] == 1000
    assert config.max_regression == 0.25 and config.reports["junit"].name == "accuracy.xml"


def test_shared_reference_cache_never_mixes_inputs(artifacts, tmp_path):  # noqa: F811
    """Two artifacts share one reference runner and its cache; the same shape set at different positions
    in their shape lists must still be compared on the inputs each candidate actually ran."""
    body = (f'[[artifacts]]\nname = "first"\npath = "{artifacts["good"]}"\n'
            'shapes = ["x1:1x8x12x10,x2:1x6x7x15", "x1:2x8x9x9,x2:2x6x16x4"]\n'
            f'[[artifacts]]\nname = "second"\npath = "{artifacts["good"]}"\n'
            'shapes = ["x1:2x8x9x9,x2:2x6x16x4"]\n')
    res = invoke("gate", write_gate(tmp_path, body), "--json-report", tmp_path / "r.json")
    assert res.exit_code == 0, res.output
    cases = [a["cases"] for a in json.loads((tmp_path / "r.json").read_text())["artifacts"]]
    assert cases[1][0]["rel_l2"] == cases[0][1]["rel_l2"] < 1e-5      # same shape set, same inputs, same figures


def test_gate_entry_may_compare_with_another_artifact(artifacts, tmp_path):  # noqa: F811
    """A reference ending in .onnx is an artifact (data), not code: no --allow-import, path relative to the file."""
    import shutil

    copy = tmp_path / "copy.onnx"
    shutil.copy(artifacts["good"], copy)
    gate = write_gate(tmp_path, f'[[artifacts]]\npath = "{artifacts["good"]}"\nreference = "copy.onnx"\n'
                                '[defaults]\nshapes = ["x1:1x8x12x10,x2:1x6x7x15"]\n')
    res = invoke("gate", gate, "--json-report", tmp_path / "r.json")
    assert res.exit_code == 0, res.output
    report = json.loads((tmp_path / "r.json").read_text())["artifacts"][0]
    assert report["reference"]["backend"] == "onnxruntime" and report["cases"][0]["rel_l2"] == 0.0
    gate.write_text(gate.read_text().replace("copy.onnx", "missing.onnx"))
    res = invoke("gate", gate)
    assert res.exit_code == 2 and "reference names" in res.output and "missing.onnx, which does not exist" in res.output
