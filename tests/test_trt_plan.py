"""TensorRT decisions in plain Python: plans for every version x precision x ONNX kind, profiles, sidecars,
compatibility, trtexec lines, calibration cache serving, and `xattn build` without TensorRT."""


import onnx
import pytest
from click.testing import CliRunner

from xattn.trt_cache import parse_trt_cache, write_trt_cache
from xattn.trt_plan import (BuildOptions, Device, EngineMismatchError, PlanError, Profile, check_compatibility,
                            derive_profiles, make_plan, onnx_precision, prepare_calibration,
                            read_sidecar, select_profile, trtexec_command, write_sidecar)
from tools.cli import cli
from xattn.errors import ShapeError
from xattn.memory import parse_size
from xattn.shapes import parse_shape_set

VERSIONS = ["10.3.0", "10.13.3", "11.4.0"]
CACHE = BuildOptions(calibration_cache="m.cache")

# (version, onnx kind, requested precision, options) -> (strongly typed, builder flags, calibrator)
EXPECTED = [
    *[(v, "fp32", None, BuildOptions(), (True, [], None)) for v in VERSIONS],
    *[(v, "fp16", None, BuildOptions(), (True, [], None)) for v in VERSIONS],
    *[(v, "int8", None, BuildOptions(), (True, [], None)) for v in VERSIONS],
    *[(v, "fp16", "fp16", BuildOptions(), (True, [], None)) for v in VERSIONS],
    *[(v, "int8", "int8", BuildOptions(), (True, [], None)) for v in VERSIONS],
    ("10.3.0", "fp32", "fp16", BuildOptions(), (False, ["FP16"], None)),
    ("10.13.3", "fp32", "fp16", BuildOptions(), (False, ["FP16"], None)),
    ("10.3.0", "fp32", "int8", CACHE, (False, ["INT8", "FP16"], "entropy")),
    ("10.13.3", "fp32", "int8", BuildOptions(calibration_data="shipped"), (False, ["INT8", "FP16"], "entropy")),
    ("10.3.0", "int8", None, BuildOptions(dla_core=0), (True, ["GPU_FALLBACK"], None)),
    ("10.3.0", "fp32", "fp16", BuildOptions(dla_core=1), (False, ["FP16", "GPU_FALLBACK"], None)),
    ("11.4.0", "fp16", None, BuildOptions(version_compatible=True), (True, ["VERSION_COMPATIBLE"], None)),
    ("10.13.3", "fp32", None, BuildOptions(hardware_compatibility="same-cc"), (True, [], None)),
    ("10.3.0", "fp16", None, BuildOptions(hardware_compatibility="ampere+"), (True, [], None)),
]

REFUSED = [
    ("11.4.0", "fp32", "fp16", BuildOptions(), r"takes precision from the graph .* build model.fp16.onnx"),
    ("11.4.0", "fp32", "int8", CACHE, r"TensorRT 11 has no implicit INT8.*Q/DQ ONNX"),
    ("11.4.0", "fp32", "int8", BuildOptions(), r"no INT8 builder flag -- build model.int8.onnx"),
    ("10.3.0", "fp32", "int8", BuildOptions(), r"implicit INT8 needs calibration: give --calibration-cache"),
    ("10.3.0", "int8", None, CACHE, r"only for implicit INT8 of the fp32 ONNX"),
    ("10.3.0", "fp16", "int8", BuildOptions(), r"this ONNX is fp16: it builds as fp16, not int8"),
    ("11.4.0", "int8", "fp32", BuildOptions(), r"this ONNX is int8: it builds as int8, not fp32"),
    ("10.3.0", "fp32", None, BuildOptions(dla_core=0), r"DLA runs FP16 and INT8 only"),
    ("10.3.0", "int8", None, BuildOptions(dla_core=0, version_compatible=True), "DLA engines cannot be"),
    ("10.3.0", "fp32", None, BuildOptions(hardware_compatibility="same-cc"), r"'same-cc' needs TensorRT 10.9"),
    ("10.3.0", "fp32", None, BuildOptions(opt_level=9), r"optimization level 9 is out of range"),
    ("8.6.1", "fp32", None, BuildOptions(), r"TensorRT 8.6.1 is not supported"),
]


@pytest.mark.parametrize("version, kind, precision, options, expected", EXPECTED)
def test_plans(version, kind, precision, options, expected):
    options.precision = precision
    plan = make_plan(version, kind, options)
    assert (plan.strongly_typed, plan.builder_flags, plan.calibrator) == expected
    assert plan.precision == (precision or kind)
    if plan.major == 11:
        assert plan.strongly_typed and not {"FP16", "INT8"} & set(plan.builder_flags)


@pytest.mark.parametrize("version, kind, precision, options, message", REFUSED)
def test_refusals_say_what_would_work(version, kind, precision, options, message):
    options.precision = precision
    with pytest.raises(PlanError, match=message):
        make_plan(version, kind, options)


def test_trtexec_lines_differ_by_version():
    profile = Profile(parse_shape_set("x1:1x3x4x4,x2:1x3x4x4"), parse_shape_set("x1:1x3x64x64,x2:1x3x32x48"),
                      parse_shape_set("x1:4x3x128x128,x2:4x3x96x96"))
    fixed = Profile(*[parse_shape_set("x1:1x3x64x64,x2:1x3x32x48")] * 3)     # DLA: min = opt = max
    legacy = make_plan("10.3.0", "fp32", BuildOptions(precision="int8", calibration_cache="m.cache", profiles=[fixed],
                                                      dla_core=0, opt_level=4, timing_cache="t.cache"))
    assert trtexec_command("m.onnx", "m.engine", legacy) == (
        "trtexec --onnx=m.onnx --saveEngine=m.engine --minShapes=x1:1x3x64x64,x2:1x3x32x48 "
        "--optShapes=x1:1x3x64x64,x2:1x3x32x48 --maxShapes=x1:1x3x64x64,x2:1x3x32x48 --fp16 --int8 "
        "--calib=m.cache --noTF32 --memPoolSize=workspace:4096M --builderOptimizationLevel=4 --timingCacheFile=t.cache "
        "--useDLACore=0 --allowGPUFallback")
    with pytest.raises(PlanError, match="DLA has no dynamic shapes: x1, x2 have min != opt != max"):
        make_plan("10.3.0", "int8", BuildOptions(profiles=[profile], dla_core=0))
    for version in ("11.0.0", "11.4.0"):
        with pytest.raises(PlanError, match=f"TensorRT {version} has no DLA support on Jetson"):
            make_plan(version, "int8", BuildOptions(profiles=[fixed], dla_core=0))
    assert make_plan("11.4.1", "int8", BuildOptions(profiles=[fixed], dla_core=0)).dla_core == 0
    strongly_dla = make_plan("10.3.0", "int8", BuildOptions(profiles=[fixed], dla_core=0))
    assert any("strongly typed DLA build on 10.x: no NVIDIA source documents" in n for n in strongly_dla.notes)
    same_cc = make_plan("10.9.0", "int8", BuildOptions(profiles=[profile], hardware_compatibility="same-cc"))
    assert trtexec_command("q.onnx", "q.engine", same_cc).endswith("--hardwareCompatibilityLevel=sameComputeCapability")
    with pytest.raises(PlanError, match="'same-cc' needs TensorRT 10.9 or later, not 10.8.0"):
        make_plan("10.8.0", "int8", BuildOptions(profiles=[profile], hardware_compatibility="same-cc"))
    ten = make_plan("10.13.3", "int8", BuildOptions(profiles=[profile], hardware_compatibility="ampere+"))
    eleven = make_plan("11.4.0", "int8", BuildOptions(profiles=[profile], version_compatible=True, workspace=1 << 30))
    assert "--stronglyTyped" in trtexec_command("q.onnx", "q.engine", ten)
    assert trtexec_command("q.onnx", "q.engine", ten).endswith("--hardwareCompatibilityLevel=ampere+")
    line = trtexec_command("q.onnx", "q.engine", eleven)
    assert "--stronglyTyped" not in line and "--int8" not in line and "--fp16" not in line
    assert line.endswith("--memPoolSize=workspace:1024M --versionCompatible")


def test_profiles_from_export_and_overrides():
    record = {"min_shapes": "x1:1x3x4x4,x2:1x3x4x4", "opt_shapes": "x1:1x3x64x64,x2:1x3x64x64",
              "max_shapes": "x1:8x3x128x128,x2:8x3x128x128"}
    [recorded] = derive_profiles(record)
    assert recorded.opt["x2"] == (1, 3, 64, 64) and recorded.max["x1"] == (8, 3, 128, 128)
    small, large = derive_profiles(record, mins=[parse_shape_set("x1:1x3x8x8"), parse_shape_set("x1:1x3x65x65")],
                                   maxs=[parse_shape_set("x1:1x3x64x64"), parse_shape_set("x1:2x3x128x128")])
    assert small.max["x1"] == (1, 3, 64, 64) and small.opt["x1"] == (1, 3, 64, 64)
    assert small.min["x2"] == (1, 3, 4, 4)                       # x2 keeps its recorded range
    assert large.opt["x1"] == (1, 3, 65, 65)                     # recorded opt clamped into the range
    assert select_profile([small, large], {"x1": (1, 3, 100, 90), "x2": (1, 3, 10, 10)}) == 1
    assert select_profile([small, large], {"x1": (1, 3, 20, 20), "x2": (1, 3, 10, 10)}) == 0
    with pytest.raises(ShapeError, match=r"no optimization profile holds shapes x1:1x3x200x200"):
        select_profile([small, large], {"x1": (1, 3, 200, 200), "x2": (1, 3, 10, 10)})
    with pytest.raises(ShapeError, match="axis 1 is fixed at 3"):
        derive_profiles(record, mins=[parse_shape_set("x1:1x4x8x8")], maxs=[parse_shape_set("x1:1x4x64x64")])
    with pytest.raises(ShapeError, match="profile 1 names unknown input 'x3'; the ONNX has x1, x2"):
        derive_profiles(record, mins=[parse_shape_set("x3:1x3x8x8")], maxs=[parse_shape_set("x3:1x3x9x9")])
    with pytest.raises(ShapeError, match="2 profiles need 2 --opt-shapes, got 1"):
        derive_profiles(record, mins=[parse_shape_set("x1:1x3x8x8")] * 2, maxs=[parse_shape_set("x1:1x3x9x9")] * 2,
                        opts=[parse_shape_set("x1:1x3x8x8")])
    with pytest.raises(ShapeError, match="2 profiles need 2 --max-shapes"):
        derive_profiles(record, mins=[parse_shape_set("x1:1x3x8x8")] * 2, maxs=[parse_shape_set("x1:1x3x9x9")])
    with pytest.raises(ShapeError, match="records no dynamic ranges"):
        derive_profiles({})


def test_sidecar_round_trip_and_compatibility(tmp_path):
    engine = tmp_path / "m.engine"
    engine.write_bytes(b"plan")
    write_sidecar(engine, {"tensorrt_version": "10.3.0", "gpu": {"name": "Orin", "compute_capability": [8, 7]},
                           "version_compatible": False, "hardware_compatibility": "none",
                           "build_command": "trtexec --onnx=m.onnx"})
    sidecar = read_sidecar(engine)
    assert sidecar["format"] == "xattn-engine/1" and engine.read_bytes() == b"plan"   # no header on the plan
    orin = Device("Orin", (8, 7))
    assert check_compatibility(sidecar, "10.3.0", orin) == []
    with pytest.raises(EngineMismatchError, match=r"built with TensorRT 10.3.0 but this is TensorRT 10.13.3 -- "
                                                  r"rebuild it here \(trtexec --onnx=m.onnx\)"):
        check_compatibility(sidecar, "10.13.3", orin)
    with pytest.raises(EngineMismatchError, match=r"built on Orin \(sm_87\) but this GPU is H100 \(sm_90\)"):
        check_compatibility(sidecar, "10.3.0", Device("H100", (9, 0)))
    compatible = {**sidecar, "version_compatible": True, "hardware_compatibility": "ampere+"}
    assert check_compatibility(compatible, "10.13.3", Device("H100", (9, 0))) == [
        "version-compatible engine from TensorRT 10.3.0 running on 10.13.3",
        "hardware-compatible engine from Orin running on H100"]
    with pytest.raises(EngineMismatchError, match="cannot run on 11.4.0"):
        check_compatibility(compatible, "11.4.0", orin)
    assert "no .json sidecar" in check_compatibility(None, "10.3.0", orin)[0]
    (tmp_path / "bad.engine.json").write_text("{")
    with pytest.raises(EngineMismatchError, match="not valid JSON"):
        read_sidecar(tmp_path / "bad.engine")


def test_calibration_cache_is_served_for_the_running_version(exported_net, tmp_path):
    _, export = exported_net
    model = onnx.load(str(export.path))
    write_trt_cache(tmp_path / "m.cache", {"x1": 2.5, "x2": 2.5}, "minmax", "10.3.0")
    plan = make_plan("10.13.3", "fp32", BuildOptions(precision="int8", calibration_cache=str(tmp_path / "m.cache")))
    text = prepare_calibration(plan, model, "10.13.3")
    served = parse_trt_cache(text)
    assert served.version_number == 101303 and plan.calibrator == "minmax"
    assert served.amax == pytest.approx({"x1": 2.5, "x2": 2.5})
    assert "written for TRT-100300, served as TRT-101303" in plan.notes[-1]
    write_trt_cache(tmp_path / "foreign.cache", {"other/tensor": 1.0}, "entropy")
    plan = make_plan("10.3.0", "fp32", BuildOptions(precision="int8", calibration_cache=str(tmp_path / "foreign.cache")))
    with pytest.raises(Exception, match="foreign.cache was made for another model"):
        prepare_calibration(plan, model, "10.3.0")


def test_misc_parsing():
    assert parse_size("4GiB") == 4 << 30 and parse_size("512M") == 512 << 20 and parse_size(1024) == 1024
    with pytest.raises(Exception, match="bad size"):
        parse_size("lots")
    assert onnx_precision({}, ["Conv", "QuantizeLinear"]) == "int8" and onnx_precision({"precision": "fp16"}) == "fp16"


def test_build_without_tensorrt_prints_trtexec_and_exits_2(exported_net, tmp_path):
    pytest.importorskip("onnx")
    try:
        import tensorrt  # noqa: F401
        pytest.skip("TensorRT is installed: the no-TensorRT path does not apply")
    except ImportError:
        pass
    _, export = exported_net
    out = tmp_path / "m.engine"
    res = CliRunner().invoke(cli, ["build", str(export.path), "-o", str(out), "--precision", "fp16"])
    assert res.exit_code == 2 and not out.exists()
    header = res.output.index("# JetPack 6 / TensorRT 10.x\n")
    line = res.output.index("\ntrtexec --onnx=", header)
    # between them only lint warnings: FP16 by flag lets TensorRT run attention in FP16, the scale is still after BMM1
    assert all(w.startswith("# warning: ") for w in res.output[header:line].splitlines()[1:])
    assert "attention runs in fp32" not in res.output[header:line] and "the scale sits on the scores" in res.output
    assert "--fp16" in res.output
    assert "# TensorRT 11.x: not possible: TensorRT 11.4.0 takes precision from the graph" in res.output
    assert res.output.strip().splitlines()[-1].startswith("error: TensorRT is not installed here")
    res = CliRunner().invoke(cli, ["build", str(export.path), "-o", str(out), "--target-trt", "11.4.0"])
    assert res.exit_code == 2 and res.output.count("trtexec --onnx") == 1 and "--stronglyTyped" not in res.output


def test_trtexec_line_carries_every_profile(exported_net, tmp_path):
    from exporter.engine import trtexec_lines

    _, export = exported_net
    lines = trtexec_lines(export.path, tmp_path / "m.engine", BuildOptions(),
                          mins=[parse_shape_set("x1:1x3x8x8"), parse_shape_set("x1:1x3x65x65")],
                          maxs=[parse_shape_set("x1:1x3x64x64"), parse_shape_set("x1:1x3x128x128")])
    assert lines[0].startswith("# JetPack 6 / TensorRT 10.x (2 profiles)\n")
    # trtexec reads several profiles only as --profile=N directly followed by that profile's triple
    # (sampleOptions.cpp getOptimizationProfiles; a bare repeated triple is refused)
    command = next(line for line in lines[0].splitlines() if line.startswith("trtexec")).split()
    for index, maximum in ((0, "x1:1x3x64x64,"), (1, "x1:1x3x128x128,")):
        at = command.index(f"--profile={index}")
        assert [a.split("=")[0] for a in command[at + 1:at + 4]] == ["--minShapes", "--optShapes", "--maxShapes"]
        assert command[at + 3].startswith(f"--maxShapes={maximum}")
    assert lines[0].count("--minShapes=") == 2 and lines[0].count("--profile=") == 2


def test_one_profile_keeps_the_bare_triple_and_paths_are_shell_quoted(exported_net, tmp_path):
    from exporter.engine import trtexec_lines

    _, export = exported_net
    lines = trtexec_lines(export.path, tmp_path / "my engine.plan", BuildOptions())
    assert "--profile=" not in lines[0] and lines[0].count("--minShapes=") == 1
    assert f"--saveEngine='{tmp_path / 'my engine.plan'}'" in lines[0]


def test_profiles_beyond_the_exported_range_are_warned_with_the_figures(exported_net, tmp_path):
    from exporter.engine import trtexec_lines

    _, export = exported_net   # exported for 4..128 px, batch 1..8
    lines = trtexec_lines(export.path, tmp_path / "m.engine", BuildOptions(), targets=["10.3.0"],
                          maxs=[parse_shape_set("x1:8x3x256x128")])
    assert ("# warning: profile 1: x1 height 4..256 goes beyond the exported range 4..128, where the ONNX was never "
            "verified against PyTorch") in lines[0]
    inside = trtexec_lines(export.path, tmp_path / "m.engine", BuildOptions(), targets=["10.3.0"],
                           maxs=[parse_shape_set("x1:8x3x96x96")])
    assert "goes beyond the exported range" not in inside[0]
