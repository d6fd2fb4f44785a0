"""Benchmark statistics, work accounting, outputs and the latency gate. No test asserts a speed."""

import json
import os
import time

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper
from PIL import Image

from runtime.base import Runner, TensorMeta
from runtime.bench import (CSV_FIELDS, BenchSettings, LatencyStats, benchmark, count_work, find_slowdowns, format_table,
                           parse_percent)
from runtime.onnxrt import OnnxRuntimeRunner
from tools.cli import cli
from xattn.shapes import parse_shape_set


def test_stats_on_known_samples():
    seconds = [i / 1000 for i in range(1, 101)]           # 1..100 ms
    stats = LatencyStats.from_seconds(seconds)
    ms = np.arange(1, 101, dtype=float)
    assert stats.count == 100 and stats.min == 1.0 and stats.max == 100.0
    assert stats.p50 == pytest.approx(np.percentile(ms, 50)) == pytest.approx(50.5)
    assert stats.p90 == pytest.approx(90.1) and stats.p99 == pytest.approx(99.01)
    assert stats.mean == pytest.approx(50.5) and stats.std == pytest.approx(np.std(ms, ddof=1))


def test_work_is_counted_from_the_graph(tmp_path):
    """Conv 3->4 (3x3) on 8x8, then MatMul (B, 64, 4) @ (4, 5) and a Softmax: FLOPs by hand."""
    w = np.ones((4, 3, 3, 3), np.float32)
    m = np.ones((4, 5), np.float32)
    shape = helper.make_node("Constant", [], ["shape"], value=helper.make_tensor("s", TensorProto.INT64, [3], [1, 4, 64]))
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]), shape,
             helper.make_node("Reshape", ["c", "shape"], ["r"]),
             helper.make_node("Transpose", ["r"], ["t"], perm=[0, 2, 1]),
             helper.make_node("MatMul", ["t", "m"], ["mm"]), helper.make_node("Softmax", ["mm"], ["y"], axis=-1)]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 64, 5])],
                              [numpy_helper.from_array(w, "w"), numpy_helper.from_array(m, "m")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(tmp_path / "g.onnx"))
    work = count_work(tmp_path / "g.onnx", {"x": (1, 3, 8, 8)})
    conv = 2 * (4 * 8 * 8) * (3 * 3 * 3)
    matmul = 2 * (64 * 5) * 4
    softmax = 5 * 64 * 5
    assert work.by_op == {"Conv": conv, "MatMul": matmul, "Softmax": softmax}
    assert work.flops == conv + matmul + softmax
    assert work.min_bytes == w.nbytes + m.nbytes + 3 * 8 * 8 * 4 + 64 * 5 * 4   # weights (initializers) + input + output


def test_default_model_flops_match_the_architecture(exported_net):
    _, export = exported_net
    work = count_work(export.path, parse_shape_set("x1:1x3x64x64,x2:1x3x64x64"))
    n = 64 * 64
    stems = 2 * (2 * 64 * 27 * n + 2 * 128 * 576 * n)
    projections = 3 * 2 * 128 * 128 * n
    head = 2 * 256 * 1152 * n
    assert work.by_op["Conv"] == stems + projections + head
    assert work.by_op["MatMul"] == 2 * (2 * n * n * 128)      # Q.K^T and A.V
    assert work.by_op["Softmax"] == 5 * n * n


class Interrupting(Runner):
    """A backend interrupted (Ctrl-C) as soon as it is given batch 2, i.e. during the second shape set."""

    backend = "test"

    def __init__(self):
        super().__init__("interrupting")

    def activate_impl(self):
        pass

    def input_metadata_impl(self):
        return {"x1": TensorMeta("x1", np.dtype(np.float32), (None, 8, None, None)),
                "x2": TensorMeta("x2", np.dtype(np.float32), (None, 6, None, None))}

    def output_names_impl(self):
        return ["y"]

    def infer_impl(self, feed):
        if feed["x1"].shape[0] == 2:
            raise KeyboardInterrupt
        return {"y": feed["x1"]}


SMALL = ["x1:1x8x6x6,x2:1x6x5x7", "x1:2x8x10x4,x2:2x6x4x9"]


def test_interleaved_rows_speedups_and_ctrl_c(exported_small):
    _, export = exported_small
    runners = {"a": OnnxRuntimeRunner(export.path, ["cpu"], name="a"), "b": OnnxRuntimeRunner(export.path, ["cpu"], name="b")}
    shapes = [parse_shape_set(s) for s in SMALL]
    result = benchmark(runners, shapes, BenchSettings(warmup=1, iterations=4), baseline="a")
    assert [(r.backend, r.shapes) for r in result.rows] == [(n, s) for s in SMALL for n in ("a", "b")]
    assert all(r.stats.count >= 4 and r.stats.min <= r.stats.p50 <= r.stats.max for r in result.rows)
    assert all(r.speedup == 1.0 for r in result.rows if r.backend == "a")
    assert result.rows[2].batch == 2 and result.rows[2].throughput == pytest.approx(2 / (result.rows[2].stats.p50 / 1000))
    # Ctrl-C during the second shape set: the first one's rows survive, the run says it was interrupted.
    partial = benchmark({"x": Interrupting()}, shapes, BenchSettings(warmup=1, iterations=4))
    assert partial.interrupted and [r.shapes for r in partial.rows] == [SMALL[0]]


def test_cli_outputs_schema_plot_and_latency_gate(exported_small, tmp_path):
    _, export = exported_small
    args = ["bench", str(export.path), "--no-torch", "--no-memory", "--iterations", "3", "--warmup", "1",
            "--shapes", SMALL[0], "--shapes", SMALL[1]]
    res = CliRunner().invoke(cli, args + ["--json", str(tmp_path / "b.json"), "--csv", str(tmp_path / "b.csv"),
                                          "--plot", str(tmp_path / "b.png")])
    assert res.exit_code == 0, res.output
    data = json.loads((tmp_path / "b.json").read_text())
    assert data["format"] == "xattn-bench/1" and len(data["rows"]) == 2
    row = data["rows"][0]
    assert {"p50", "p90", "p95", "p99", "mean", "std", "min", "max", "count"} <= set(row["stats"])
    assert row["flops"] > 0 and row["gflops"] > 0 and row["precision"] == "fp32" and row["clock"] == "host"
    lines = (tmp_path / "b.csv").read_text().splitlines()
    assert lines[0].split(",") == CSV_FIELDS and len(lines) == 3
    with Image.open(tmp_path / "b.png") as image:
        assert image.format == "PNG" and image.size[0] > 300
    assert (tmp_path / "b.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # Same run as baseline: no row is 10x slower. Doctored baseline (100x faster): the gate fires.
    assert CliRunner().invoke(cli, args + ["--baseline", str(tmp_path / "b.json"), "--max-slowdown", "900%"]).exit_code == 0
    for r in data["rows"]:
        r["stats"]["p50"] /= 100
    (tmp_path / "fast.json").write_text(json.dumps(data))
    res = CliRunner().invoke(cli, args + ["--baseline", str(tmp_path / "fast.json")])
    assert res.exit_code == 1 and res.output.count("SLOWER") == 2 and "allowed +10%" in res.output


def test_find_slowdowns_and_percent_parsing():
    class Row:
        def __init__(self, p50):
            self.backend, self.shapes, self.stats = "a", "s", LatencyStats(1, p50, p50, p50, p50, p50, 0, p50, p50)

    class Result:
        rows = [Row(11.5)]

    baseline = {"rows": [{"backend": "a", "shapes": "s", "stats": {"p50": 10.0}}]}
    assert find_slowdowns(Result(), baseline, 0.10) == ["a @ s: median 11.50 ms vs 10.00 ms (+15%, allowed +10%)"]
    assert find_slowdowns(Result(), baseline, 0.20) == []
    assert parse_percent("10%") == 0.1 and parse_percent("0.25") == 0.25
    with pytest.raises(Exception, match="bad percentage"):
        parse_percent("ten")


def test_memory_is_measured_per_backend_in_its_own_process(exported_small):
    from runtime.bench_setup import isolated_peak_rss

    _, export = exported_small
    peaks = isolated_peak_rss([str(export.path)], export.path.name, [parse_shape_set(SMALL[0])], torch_baseline=False)
    assert len(peaks) == 1 and peaks[0] is not None and 20 < peaks[0] < 4096   # MiB, a fresh process's


def test_one_backend_alone_does_not_load_torch(exported_small):
    """The memory probe measures one backend alone: an ONNX Runtime process must not carry PyTorch
    (about 200 MiB of RSS from the import alone), while the PyTorch baseline is still labelled."""
    import subprocess
    import sys

    _, export = exported_small
    code = ("import sys; from runtime.bench_setup import make_runners; "
            f"r, base = make_runners([{str(export.path)!r}], threads=1, providers=['cpu'], checkpoint=None, "
            f"torch_baseline=True, only={export.path.name!r}); "
            "print(sorted(r), base, 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split("\n")[-2]
    assert out == f"['{export.path.name}'] torch eager False"


class Sleeping(Interrupting):
    """A backend whose calls take known times: ``first`` for the first call, then ``times`` in turn."""

    def __init__(self, name, first, times):
        Runner.__init__(self, name)
        self.first, self.times, self.calls = first, list(times), 0

    def infer_impl(self, feed):
        time.sleep(self.first if self.calls == 0 else self.times[self.calls % len(self.times)])
        self.calls += 1
        return {"y": feed["x1"]}


def test_blocks_are_sized_from_several_calls_and_unreliable_rows_are_flagged():
    shapes = [parse_shape_set(SMALL[0])]
    # one slow first call (0.3 s) must not make every block a single call, as one-call sizing did
    # (5 ms calls: long enough that a loaded machine's sleep overshoot cannot widen p90/p50 past 1.5)
    steady = Sleeping("steady", 0.3, [0.005])
    result = benchmark({"steady": steady}, shapes, BenchSettings(warmup=0, duration=0.6, block_seconds=0.1))
    assert result.rows[0].stats.count >= 60 and result.rows[0].warnings == []
    # few calls, and a wide spread (1 ms and 5 ms alternating), are each named; the ratio against them too
    jumpy = Sleeping("jumpy", 0.001, [0.001, 0.005])
    few = benchmark({"steady": Sleeping("steady", 0.002, [0.002]), "jumpy": jumpy}, shapes,
                    BenchSettings(warmup=0, iterations=4), baseline="jumpy")
    rows = {r.backend: r for r in few.rows}
    assert "only 4 timed calls (< 10)" in rows["steady"].warnings
    assert any(w.startswith("its baseline row is unreliable") for w in rows["steady"].warnings)
    spread = benchmark({"jumpy": Sleeping("jumpy", 0.001, [0.001, 0.001, 0.006])}, shapes,
                       BenchSettings(warmup=0, iterations=30))
    assert any(w.startswith("spread p90/p50") for w in spread.rows[0].warnings)
    assert "warning: jumpy @ " in format_table(spread) and "not reliable" in format_table(spread)


def test_host_facts_and_plot_labels_per_backend_and_batch(exported_small, tmp_path):
    _, export = exported_small
    res = CliRunner().invoke(cli, ["bench", str(export.path), "--no-torch", "--no-memory", "--iterations", "3",
                                   "--warmup", "1", "--threads", "1", "--shapes", SMALL[0], "--shapes", SMALL[1],
                                   "--json", str(tmp_path / "b.json")])
    assert res.exit_code == 0, res.output
    data = json.loads((tmp_path / "b.json").read_text())
    host = data["host"]
    assert host["threads"] == 1 and host["logical_cores"] == os.cpu_count() and host["cpu_model"]
    assert len(host["load_average_start"]) == 3 and len(host["load_average_end"]) == 3
    from runtime.bench import BenchResult, BenchRow, plot

    rows = [BenchRow("ort", s, b, LatencyStats(5, 1, 1, 1, 1, 1, 0, 1, 1), "fp32", 1.0)
            for s, b in (("x1:1x3x8x8,x2:1x3x8x8", 1), ("x1:2x3x8x8,x2:2x3x8x8", 2), ("x1:1x3x16x16,x2:1x3x16x16", 1))]
    labels, title = plot(BenchResult(rows, {}, {}, host=host), tmp_path / "p.png")
    assert labels == ["ort, batch 1", "ort, batch 2"] and title.startswith("xattn bench: 1 threads, ")
    assert host["cpu_model"][:20] in title


def test_memory_peaks_are_per_shape_set_not_cumulative(exported_small):
    from runtime.bench_setup import isolated_peak_rss

    _, export = exported_small
    # 96x96 against 96x96 with 2 heads: 2 x 9216^2 x 4 bytes = 648 MiB of scores; then a tiny set
    big, small = parse_shape_set("x1:1x8x96x96,x2:1x6x96x96"), parse_shape_set(SMALL[0])
    peaks = isolated_peak_rss([str(export.path)], export.path.name, [big, small], torch_baseline=False)
    assert peaks[0] > 600 and peaks[1] < peaks[0] - 300, peaks
