"""Files are data: nothing read from an artifact, sidecar or gate file may import or run code.

Each hostile file below would run code (create a marker file) if the toolkit imported what the file
names; every test asserts both the refusal (exit 2, one line naming the fix) and that the marker is absent.
"""

from __future__ import annotations

import json
import shutil
import sys

import onnx
import pytest
from click.testing import CliRunner

from exporter.onnx_export import export_onnx
from xattn.registry import MAX_RECORDED_ARG, load_model, load_model_from_record
from runtime.validate import ValidateOptions, resolve_reference, validate_artifact
from tools.cli import cli
from xattn.errors import ModelError, UntrustedCodeError
from xattn.provenance import set_onnx_metadata

EVIL_MODULE = "xattn_evil_module"


def invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture
def evil_folder(tmp_path, monkeypatch):
    """A folder (the working directory) holding a module whose import writes a marker file."""
    marker = tmp_path / "IMPORTED"
    (tmp_path / f"{EVIL_MODULE}.py").write_text(
        f"open({str(marker)!r}, 'w').write('the module ran')\n"
        "def factory(**kwargs):\n"
        f"    open({str(marker)!r}, 'w').write('the factory ran')\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield tmp_path, marker
    sys.modules.pop(EVIL_MODULE, None)


def hostile_copy(exported_small, folder, **record) -> str:
    """A real, verified ONNX file whose provenance was rewritten to name other code."""
    _, result = exported_small
    path = folder / "downloaded.onnx"
    shutil.copy(result.path, path)
    proto = onnx.load(str(path))
    set_onnx_metadata(proto, record)
    onnx.save(proto, str(path))
    return str(path)


@pytest.mark.parametrize("model", [f"{EVIL_MODULE}:factory", "os:system"])
def test_validate_never_imports_the_model_an_artifact_names(exported_small, evil_folder, model):
    folder, marker = evil_folder
    path = hostile_copy(exported_small, folder, model=model,
                        model_args={"command": f"touch {folder / 'IMPORTED'}"})
    res = invoke("validate", path)
    assert res.exit_code == 2
    assert f"names '{model}' as its model; a file never chooses code" in res.output
    assert f"--reference {model}" in res.output            # the way to opt in, named
    assert "Traceback" not in res.output
    assert not marker.exists()
    assert EVIL_MODULE not in sys.modules


def test_bench_never_imports_the_model_an_artifact_names(exported_small, evil_folder):
    folder, marker = evil_folder
    path = hostile_copy(exported_small, folder, model=f"{EVIL_MODULE}:factory")
    res = invoke("bench", path, "--iterations", "1", "--warmup", "0", "--no-memory",
                 "--shapes", "x1:1x8x8x8,x2:1x6x8x8")
    assert res.exit_code == 2, res.output
    assert "a file never chooses code" in res.output and "--reference" in res.output
    assert not marker.exists()


def test_engine_sidecar_record_is_data_too(evil_folder):
    """An engine's sidecar carries the same record; the same rule applies (checked on the record itself)."""
    folder, marker = evil_folder
    record = {"model": f"{EVIL_MODULE}:factory", "model_args": {}, "init_seed": 0}
    with pytest.raises(UntrustedCodeError, match="a file never chooses code"):
        resolve_reference(record, artifact="model.engine")
    assert not marker.exists()


def test_user_names_the_factory_on_the_command_line(tmp_path):
    """Opting in: --reference naming the recorded factory rebuilds it with the file's recorded args and seed."""
    model = load_model("tests.user_models:declared", seed=3)
    path = tmp_path / "user.onnx"
    export_onnx(model, path)
    refused = invoke("validate", path)
    assert refused.exit_code == 2 and "--reference tests.user_models:declared" in refused.output
    res = invoke("validate", path, "--reference", "tests.user_models:declared")
    assert res.exit_code == 0, res.output
    assert res.output.startswith("PASS user.onnx")
    bench = invoke("bench", path, "--reference", "tests.user_models:declared", "--iterations", "2", "--warmup", "0",
                   "--no-memory", "--shapes", "x1:1x4x8x8,x2:1x4x8x8")
    assert bench.exit_code == 0 and "torch eager" in bench.output, bench.output
    optimized = invoke("optimize", path, "--reference", "tests.user_models:declared", "-o", tmp_path / "user.ort.onnx")
    assert optimized.exit_code == 0 and "verified against PyTorch" in optimized.output, optimized.output
    assert invoke("optimize", path, "-o", tmp_path / "again.ort.onnx").exit_code == 2   # not without naming it
    # The seed came from the file: a reference rebuilt with another seed would not match.
    rebuilt = resolve_reference({"model": "tests.user_models:declared", "init_seed": 3,
                                 "inputs": {"x1": 4, "x2": 4}, "outputs": ["y"]},
                                reference="tests.user_models:declared")
    assert rebuilt.init_seed == 3


@pytest.mark.parametrize("args, match", [
    ({"out_channels": 10 ** 12}, "recorded argument out_channels=1000000000000"),
    ({"out_channels": "128"}, "recorded argument out_channels='128'"),
    ({"out_channels": True}, "recorded argument out_channels=True"),
    ([1, 2], "recorded model_args is list"),
])
def test_recorded_arguments_of_builtins_are_bounded(args, match):
    """A file cannot make a built-in model allocate without bound or take odd types."""
    with pytest.raises(ModelError, match=match):
        load_model_from_record({"model": "cross-attention", "model_args": args}, where="x.onnx")
    assert MAX_RECORDED_ARG == 65536


def test_recorded_seed_must_be_an_integer():
    with pytest.raises(ModelError, match="recorded init_seed '0; import os' is not an integer"):
        load_model_from_record({"model": "cross-attention", "init_seed": "0; import os"})


def gate_file(folder, artifact, **settings):
    lines = ["[[artifacts]]", f"path = {json.dumps(str(artifact))}"]
    lines += [f"{k} = {json.dumps(v)}" for k, v in settings.items()]
    path = folder / "gate.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.mark.parametrize("key", ["reference", "data"])
def test_gate_file_never_names_code_on_its_own(exported_small, evil_folder, key):
    folder, marker = evil_folder
    _, result = exported_small
    gate = gate_file(folder, result.path, **{key: f"{EVIL_MODULE}:factory"})
    res = invoke("gate", gate)
    assert res.exit_code == 2
    assert f"names code to import ('{EVIL_MODULE}:factory')" in res.output
    assert f"--allow-import {EVIL_MODULE}:factory" in res.output
    assert not marker.exists()


def test_gate_allow_import_opts_in(tmp_path):
    model = load_model("tests.user_models:declared")
    artifact = tmp_path / "user.onnx"
    export_onnx(model, artifact)
    gate = gate_file(tmp_path, artifact, reference="tests.user_models:declared")
    assert invoke("gate", gate).exit_code == 2
    res = invoke("gate", gate, "--allow-import", "tests.user_models:declared")
    assert res.exit_code == 0, res.output
    assert "gate: 1 of 1 artifacts pass" in res.output


def test_python_api_refuses_too(exported_small, evil_folder):
    folder, marker = evil_folder
    path = hostile_copy(exported_small, folder, model=f"{EVIL_MODULE}:factory")
    with pytest.raises(UntrustedCodeError):
        validate_artifact(path, ValidateOptions())
    assert not marker.exists()
