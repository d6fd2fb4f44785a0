"""Engines built and run for real: the suite a machine with TensorRT and an NVIDIA GPU runs.

Skipped here (no TensorRT can be installed on these machines, and there is no GPU); each test says why.
"""

import numpy as np
import pytest

from xattn.tensorrt import current_device, installed_tensorrt_version

pytestmark = [
    pytest.mark.tensorrt,
    pytest.mark.skipif(installed_tensorrt_version() is None, reason="needs the tensorrt package (not installable here)"),
    pytest.mark.skipif(installed_tensorrt_version() is not None and current_device() is None,
                       reason="needs an NVIDIA GPU"),
]

SHAPES = ["x1:1x8x12x10,x2:1x6x7x15", "x1:3x8x20x9,x2:3x6x5x30"]


@pytest.fixture(scope="module")
def engines(exported_small, tmp_path_factory):
    from xattn.data import load_calibration_data
    from calibration.quantize import quantize_onnx
    from calibration.ranges import collect_ranges
    from exporter.engine import build_engine
    from exporter.fp16 import convert_fp16
    from xattn.trt_plan import BuildOptions
    import onnx

    _, export = exported_small
    folder = tmp_path_factory.mktemp("engines")
    fp16 = convert_fp16(export.path, folder / "m.fp16.onnx").path
    data = load_calibration_data("synthetic", ["x1", "x2"], {"x1": 8, "x2": 6})
    int8 = quantize_onnx(export.path, collect_ranges(onnx.load(str(export.path)), data), folder / "m.int8.onnx").path
    built = {}
    for name, onnx_path in (("fp32", export.path), ("fp16", fp16), ("int8", int8)):
        built[name] = build_engine(onnx_path, folder / f"m.{name}.engine", BuildOptions(),
                                   mins=[], opts=[], maxs=[]).path
    return export.path, built


@pytest.mark.parametrize("precision, bound", [("fp32", 1e-3), ("fp16", 5e-3), ("int8", 5e-2)])
def test_engine_matches_onnxruntime(engines, precision, bound):
    from xattn.data import random_feed
    from runtime.onnxrt import OnnxRuntimeRunner
    from runtime.tensorrt_runner import TensorRTRunner
    from xattn.shapes import parse_shape_set

    onnx_path, built = engines
    with TensorRTRunner(built[precision]) as trt_runner, OnnxRuntimeRunner(onnx_path, ["cpu"]) as ort_runner:
        for text in SHAPES * 2:   # shapes change and repeat: buffers are reused, profiles selected
            feed = random_feed(parse_shape_set(text))
            got, want = trt_runner.infer(feed)["y"], ort_runner.infer(feed)["y"]
            assert got.shape == want.shape
            assert np.linalg.norm(got - want) / np.linalg.norm(want) < bound


def test_cuda_graph_replay_gives_the_same_outputs(engines):
    from xattn.data import random_feed
    from runtime.tensorrt_runner import TensorRTRunner
    from xattn.shapes import parse_shape_set

    _, built = engines
    feed = random_feed(parse_shape_set(SHAPES[0]))
    with TensorRTRunner(built["fp32"]) as plain, TensorRTRunner(built["fp32"], cuda_graph=True) as graphed:
        expected = plain.infer(feed)["y"]
        for _ in range(3):
            np.testing.assert_allclose(graphed.infer(feed)["y"], expected, rtol=1e-5, atol=1e-6)


def test_validate_accepts_engines(engines):
    from runtime.validate import ValidateOptions, validate_artifact
    from xattn.shapes import parse_shape_set

    _, built = engines
    result = validate_artifact(built["fp16"], ValidateOptions(shapes=[parse_shape_set(s) for s in SHAPES]))
    assert result.passed and result.precision == "fp16"
