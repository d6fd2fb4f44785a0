"""Calibration data sources, range math against independent numpy/torch computations, caches, range tables."""

import json
import struct

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper
from PIL import Image

from xattn.data import CalibrationData, DataSettings, load_calibration_data
from calibration.ranges import (CalibrationSettings, RangeTable, calibrate, collect_ranges, entropy_threshold,
                                percentile_from_histogram)
from xattn.onnxfile import require_tensors
from xattn.trt_cache import parse_trt_cache, read_trt_cache, trt_version_number, write_trt_cache
from tools.cli import cli
from xattn.errors import CalibrationError, DataError

RGB = {"x1": 3, "x2": 3}


def tiny_conv_model():
    """x -> Conv(w1) -> Relu -> Conv(w2) -> y, built by hand so activations can be recomputed in torch."""
    rng = np.random.default_rng(0)
    w1 = rng.standard_normal((4, 3, 3, 3)).astype(np.float32)
    w2 = rng.standard_normal((2, 4, 1, 1)).astype(np.float32)
    nodes = [helper.make_node("Conv", ["x", "w1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
             helper.make_node("Conv", ["r1", "w2"], ["y"], name="conv2")]
    graph = helper.make_graph(nodes, "tiny", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3, "h", "w"])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 2, "h", "w"])],
                              [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model, w1, w2


@pytest.fixture(scope="module")
def tiny():
    model, w1, w2 = tiny_conv_model()
    rng = np.random.default_rng(1)
    feeds = [{"x": (rng.standard_normal((1, 3, 8, 8)) * (1 + i)).astype(np.float32)} for i in range(6)]
    # Independent activations: torch convolutions, not ONNX Runtime.
    acts = {"x": [], "c1": [], "r1": []}
    for feed in feeds:
        x = torch.from_numpy(feed["x"])
        c1 = torch.nn.functional.conv2d(x, torch.from_numpy(w1), padding=1)
        acts["x"].append(feed["x"].ravel())
        acts["c1"].append(c1.numpy().ravel())
        acts["r1"].append(torch.relu(c1).numpy().ravel())
    return model, CalibrationData(feeds, "test feeds"), {k: np.concatenate(v) for k, v in acts.items()}


def test_minmax_is_max_abs(tiny):
    model, data, acts = tiny
    table = collect_ranges(model, data, CalibrationSettings(method="minmax"))
    assert set(table.amax) == {"x", "c1", "r1", "y"}
    for name in ("x", "c1", "r1"):
        assert table.amax[name] == pytest.approx(float(np.abs(acts[name]).max()), rel=1e-5)


def test_percentile_matches_numpy_within_one_bin(tiny):
    model, data, acts = tiny
    table = collect_ranges(model, data, CalibrationSettings(method="percentile", percentile=99.0))
    for name in ("x", "c1", "r1"):
        values = np.abs(acts[name])
        bin_width = values.max() / 2048
        # A histogram percentile is an inverted CDF read at bin resolution: the upper edge of the
        # bin that holds numpy's inverted-CDF percentile.
        exact = np.percentile(values, 99.0, method="inverted_cdf")
        assert exact - 1e-6 <= table.amax[name] <= exact + bin_width * 1.0001


def test_entropy_clips_outliers_but_not_uniform_data():
    rng = np.random.default_rng(0)
    uniform = np.abs(rng.uniform(-1, 1, 200_000))
    hist, _ = np.histogram(uniform, bins=2048, range=(0, uniform.max()))
    assert entropy_threshold(hist, uniform.max()) >= 0.95 * uniform.max()
    heavy = np.abs(np.concatenate([rng.standard_normal(200_000), [60.0, -80.0]]))
    hist, _ = np.histogram(heavy, bins=2048, range=(0, heavy.max()))
    threshold = entropy_threshold(hist, heavy.max())
    assert np.percentile(heavy, 99) < threshold < 0.25 * heavy.max()


def test_percentile_from_histogram_on_known_counts():
    hist = np.zeros(10, np.int64)
    hist[[0, 4, 9]] = [50, 45, 5]          # 95% of values fall in the first 5 bins of [0, 10]
    assert percentile_from_histogram(hist, 10.0, 95.0) == 5.0
    assert percentile_from_histogram(hist, 10.0, 99.0) == 10.0


def test_trt_cache_exact_text_and_round_trip(tmp_path):
    amax = {"x1": 127.0, "stem/conv_out": 12.7}
    path = tmp_path / "model.cache"
    write_trt_cache(path, amax, "entropy", "10.3.0")
    expected = "TRT-100300-EntropyCalibration2\nx1: 3f800000\nstem/conv_out: " + struct.pack(">f", 0.1).hex() + "\n"
    assert path.read_text() == expected
    back = read_trt_cache(path)
    assert back.version_number == 100300 and back.algorithm == "EntropyCalibration2"
    assert back.amax == pytest.approx(amax, rel=1e-6)
    write_trt_cache(tmp_path / "mm.cache", amax, "minmax", "10.13.3")
    assert (tmp_path / "mm.cache").read_text().startswith("TRT-101303-MinMaxCalibration\n")
    assert trt_version_number("8.6.1") == 8601 and trt_version_number("11.4.0") == 110400


@pytest.mark.parametrize("text, message", [
    ("", "is empty"),
    ("TRT-100300-Unknown\n", "is not a TensorRT calibration cache"),
    ("hello\nx1: 3f800000\n", "is not a TensorRT calibration cache"),
    ("TRT-100300-MinMaxCalibration\nx1 3f800000\n", "line 2 is not 'tensor: <8 hex digits>'"),
])
def test_corrupt_caches(text, message):
    with pytest.raises(CalibrationError, match=message):
        parse_trt_cache(text)


def test_foreign_cache_and_range_table_are_refused(tiny, tmp_path):
    model, data, _ = tiny
    cache = parse_trt_cache("TRT-100300-MinMaxCalibration\nother_model/conv: 3f800000\n")
    with pytest.raises(CalibrationError, match="model.cache was made for another model: tensors other_model/conv"):
        require_tensors(model, cache.amax, "model.cache")
    table = collect_ranges(model, data, CalibrationSettings(method="minmax"))
    table.amax = {"not_here": 1.0}
    with pytest.raises(CalibrationError, match="ranges.json was made for another model: tensors not_here"):
        table.check_model(model, "ranges.json")
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(CalibrationError, match="is not an xattn range table"):
        RangeTable.load(tmp_path / "bad.json")


def test_range_table_round_trip_and_reuse(tiny, tmp_path):
    model, data, _ = tiny
    path = tmp_path / "ranges.json"
    first, reused = calibrate(model, data, CalibrationSettings(method="minmax"), output=path)
    assert not reused and RangeTable.load(path).amax == first.amax
    text = path.read_text()
    second, reused = calibrate(model, data, CalibrationSettings(method="minmax"), output=path)
    assert reused and path.read_text() == text
    other = CalibrationData(data.feeds[:3], "fewer")
    _, reused = calibrate(model, other, CalibrationSettings(method="minmax"), output=path)
    assert not reused and json.loads(path.read_text())["samples"] == 3
    _, reused = calibrate(model, other, CalibrationSettings(method="percentile"), output=path)
    assert not reused


# -- data sources ----------------------------------------------------------------------------------

def _image(path, mode="RGB", size=(40, 30)):
    Image.new(mode, size, color=128 if mode == "L" else (10, 200, 30, 255)[: len(mode)]).save(path)


def test_paired_folders_sizes_and_normalisation(tmp_path):
    for sub in ("x1", "x2"):
        (tmp_path / sub).mkdir()
        for name in ("a", "b", "c"):
            _image(tmp_path / sub / f"{name}.png")
    settings = DataSettings(samples=3, batch_size=2, sizes=[{"x1": (16, 12), "x2": (8, 20)}], mean=(0, 0, 0),
                            std=(1, 1, 1), shuffle=False)
    data = load_calibration_data(str(tmp_path), ["x1", "x2"], RGB, settings)
    assert [f["x1"].shape for f in data.feeds] == [(2, 3, 16, 12), (1, 3, 16, 12)]
    assert data.feeds[0]["x2"].shape == (2, 3, 8, 20)
    np.testing.assert_allclose(data.feeds[0]["x1"][0, :, 0, 0], np.array([10, 200, 30]) / 255, rtol=1e-6)


def test_grayscale_and_rgba_are_converted_unreadable_skipped(tmp_path):
    _image(tmp_path / "gray.png", "L")
    _image(tmp_path / "rgba.png", "RGBA")
    _image(tmp_path / "rgb.jpg", "RGB")
    (tmp_path / "broken.png").write_bytes(b"not an image")
    data = load_calibration_data(str(tmp_path), ["x1", "x2"], RGB, DataSettings(samples=3))
    assert data.pairs == 3 and data.skipped == 1 and data.converted == 2
    assert "1 unreadable files skipped" in data.summary()
    assert data.feeds[0]["x1"].shape[1] == 3


@pytest.mark.parametrize("setup, message", [
    (lambda p: None, "holds no images"),
    (lambda p: (p / "a.png").write_bytes(b"junk"), "none of the 1 image pairs could be read"),
    (lambda p: [(p / s).mkdir() for s in ("x1", "x2")] and _image(p / "x1" / "only.png"),
     r"hold no pair of images with the same name \(1 in x1/, 0 in x2/\)"),
])
def test_bad_folders(tmp_path, setup, message):
    setup(tmp_path)
    with pytest.raises(DataError, match=message):
        load_calibration_data(str(tmp_path), ["x1", "x2"], RGB)


def test_csv_manifest_npz_callable_and_synthetic(tmp_path):
    _image(tmp_path / "l.png")
    _image(tmp_path / "r.png")
    (tmp_path / "pairs.csv").write_text("x1,x2\nl.png,r.png\n")
    assert load_calibration_data(str(tmp_path / "pairs.csv"), ["x1", "x2"], RGB).pairs == 1
    (tmp_path / "bad.csv").write_text("left,right\nl.png,r.png\n")
    with pytest.raises(DataError, match="needs columns x1,x2"):
        load_calibration_data(str(tmp_path / "bad.csv"), ["x1", "x2"], RGB)
    np.savez(tmp_path / "d.npz", x1=np.zeros((1, 3, 4, 4), np.float32), x2=np.zeros((1, 5, 4, 4), np.float32))
    with pytest.raises(DataError, match=r"input 'x2' has shape \(1, 5, 4, 4\), expected \(N, 3, H, W\)"):
        load_calibration_data(str(tmp_path / "d.npz"), ["x1", "x2"], RGB)
    np.savez(tmp_path / "k.npz", a=np.zeros((1, 3, 4, 4), np.float32))
    with pytest.raises(Exception, match="has no array named 'x1'"):
        load_calibration_data(str(tmp_path / "k.npz"), ["x1", "x2"], RGB)
    data = load_calibration_data("tests.user_data:feeds", ["x1", "x2"], RGB)
    assert len(data) == 3 and data.feeds[0]["x1"].shape == (1, 3, 8, 8)
    synthetic = load_calibration_data("synthetic", ["x1", "x2"], RGB, DataSettings(samples=2))
    assert synthetic.synthetic and "SYNTHETIC" in synthetic.summary() and len(synthetic) == 4


def test_shipped_photos_are_real_and_deterministic():
    first = load_calibration_data("shipped", ["x1", "x2"], RGB, DataSettings(samples=8))
    again = load_calibration_data("shipped", ["x1", "x2"], RGB, DataSettings(samples=8))
    other = load_calibration_data("shipped", ["x1", "x2"], RGB, DataSettings(samples=8, seed=5))
    assert first.pairs == 8 and not first.synthetic and len(first) == 16   # two resolutions
    assert first.sha256 == again.sha256 != other.sha256
    # Real photos: strongly correlated neighbouring pixels, unlike noise.
    x = first.feeds[0]["x1"][0, 0]
    assert np.corrcoef(x[:, :-1].ravel(), x[:, 1:].ravel())[0, 1] > 0.8


def test_unpaired_file_is_skipped_and_counted(tmp_path):
    for sub in ("x1", "x2"):
        (tmp_path / sub).mkdir()
        for name in ("a", "b"):
            _image(tmp_path / sub / f"{name}.png")
    _image(tmp_path / "x1" / "stray.png")
    data = load_calibration_data(str(tmp_path), ["x1", "x2"], RGB, DataSettings(samples=8, shuffle=False))
    assert data.pairs == 2
    assert "1 file(s) without a partner in the other subfolder skipped: stray" in data.summary()


def test_images_for_grayscale_and_other_channel_counts(tmp_path):
    """A 1-channel input gets luminance (Pillow's L = R*299/1000 + G*587/1000 + B*114/1000), normalised with
    ImageNet's averaged mean/std; a 4-channel one gets RGBA; any other count, grayscale replicated."""
    _image(tmp_path / "a.png", "RGB")
    settings = DataSettings(samples=1, sizes=[{"x1": (8, 8), "x2": (6, 10)}])
    data = load_calibration_data(str(tmp_path), ["x1", "x2"], {"x1": 1, "x2": 3}, settings)
    x1, x2 = data.feeds[0]["x1"], data.feeds[0]["x2"]
    assert x1.shape == (1, 1, 8, 8) and x2.shape == (1, 3, 6, 10)
    luminance = np.asarray(Image.new("RGB", (1, 1), (10, 200, 30)).convert("L"))[0, 0] / 255   # 123 of 255
    np.testing.assert_allclose(x1[0, 0], (luminance - 0.449) / 0.226, rtol=1e-5)
    np.testing.assert_allclose(x2[0, :, 0, 0], (np.array([10, 200, 30]) / 255 - np.array([0.485, 0.456, 0.406]))
                               / np.array([0.229, 0.224, 0.225]), rtol=1e-5)
    four = load_calibration_data(str(tmp_path), ["x1", "x2"], {"x1": 4, "x2": 2},
                                 DataSettings(samples=1, sizes=settings.sizes, mean=(0,), std=(1,)))
    np.testing.assert_allclose(four.feeds[0]["x1"][0, :, 0, 0], np.array([10, 200, 30, 255]) / 255, rtol=1e-6)
    two = four.feeds[0]["x2"]
    assert two.shape == (1, 2, 6, 10) and np.array_equal(two[:, 0], two[:, 1])
    assert "grayscale replicated to 2 channels" in four.summary()
    with pytest.raises(DataError, match="--mean/--std give 3 values for a 2-channel input"):
        load_calibration_data("shipped", ["x1", "x2"], {"x1": 3, "x2": 2})


def test_cli_bad_data_exit_2(tmp_path, exported_net):
    _, result = exported_net
    res = CliRunner().invoke(cli, ["calibrate", str(result.path), "--data", str(tmp_path), "-o",
                                   str(tmp_path / "r.json")])
    assert res.exit_code == 2 and res.output.startswith("error: ") and "holds no images" in res.output
    assert not (tmp_path / "r.json").exists()


def test_data_function_errors_are_one_line_data_errors():
    with pytest.raises(DataError, match="cannot import module 'tests.nowhere' for data function"):
        load_calibration_data("tests.nowhere:feeds", ["x1", "x2"], RGB)
    with pytest.raises(DataError, match="module 'tests.user_data' has no attribute 'nope'"):
        load_calibration_data("tests.user_data:nope", ["x1", "x2"], RGB)
