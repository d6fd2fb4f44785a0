"""Latency benchmarking: several backends measured interleaved, statistics, work accounting, baselines.

Interleaving: for each shape set, every runner is warmed up, then measured in rounds; each round gives
every runner one *block* of consecutive calls (about ``block_seconds``), in an order rotated per round.
Machine drift (another process, thermal throttling) then hits every backend alike, which is what makes
ratios measured in one run trustworthy. Blocks rather than single calls, because ONNX Runtime's and
PyTorch's thread pools spin-wait after each call: alternating call by call, each backend's spinning
threads steal the cores from the next one (measured here: PyTorch at 32x32 took 16.3 ms interleaved
call by call with ONNX Runtime, 6.2 ms alone). The first call of each block absorbs that transition
and is not timed; within a block each backend runs as it would alone, with its own defaults.

Work accounting is analytic, from the ONNX graph at the measured shapes (tensor shapes read off one
run with every intermediate exposed): convolutions (including the 1x1 projections) and MatMuls at 2
FLOPs per multiply-add, Softmax at 5 per element (max, subtract, exp, sum, divide), other elementwise
ops at 1 per output element; minimum bytes = inputs + outputs + weights, each moved once.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import resource
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np

from runtime.base import Runner, check_shapes
from xattn.data import random_feed
from xattn.errors import ArtifactError, BadInputError
from xattn.fileio import write_text_atomic
from xattn.shapes import ShapeSet, format_shape_set

BENCH_FORMAT = "xattn-bench/1"


@dataclass
class LatencyStats:
    """Latency statistics in milliseconds over ``count`` timed runs."""

    count: int
    p50: float
    p90: float
    p95: float
    p99: float
    mean: float
    std: float
    min: float
    max: float

    @classmethod
    def from_seconds(cls, samples: Sequence[float]) -> "LatencyStats":
        if not samples:
            raise BadInputError("no timed runs to summarise")
        ms = np.asarray(samples, dtype=np.float64) * 1000.0
        p50, p90, p95, p99 = np.percentile(ms, [50, 90, 95, 99])
        return cls(len(ms), float(p50), float(p90), float(p95), float(p99), float(ms.mean()),
                   float(ms.std(ddof=1)) if len(ms) > 1 else 0.0, float(ms.min()), float(ms.max()))


@dataclass
class Work:
    flops: int
    min_bytes: int
    by_op: dict[str, int] = field(default_factory=dict)


@dataclass
class BenchRow:
    backend: str
    shapes: str
    batch: int
    stats: LatencyStats
    precision: str
    throughput: float                 # samples per second, from the median
    clock: str = "host"               # "host" (wall clock around the call) or "device" (CUDA events)
    rss_mb: float | None = None       # peak RSS of this backend alone (separate process), CPU
    device_mb: float | None = None    # device memory (GPU)
    flops: int | None = None
    min_bytes: int | None = None
    speedup: float | None = None      # vs the baseline backend at the same shapes (median ratio)
    #: why this row's figures (and ratios using them) are not to be trusted: too few calls, wide spread
    warnings: list[str] = field(default_factory=list)

    @property
    def gflops(self) -> float | None:
        return None if not self.flops else self.flops / (self.stats.p50 / 1000.0) / 1e9

    def as_dict(self) -> dict:
        data = asdict(self)
        data["gflops"] = self.gflops
        return data


@dataclass
class BenchResult:
    rows: list[BenchRow]
    settings: dict
    versions: dict
    peak_gflops: float | None = None
    peak_detail: dict | None = None
    interrupted: bool = False
    baseline_backend: str | None = None
    host: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        return {"format": BENCH_FORMAT, "settings": self.settings, "versions": self.versions, "host": self.host,
                "peak_gflops": self.peak_gflops, "peak_detail": self.peak_detail, "interrupted": self.interrupted,
                "baseline_backend": self.baseline_backend, "rows": [r.as_dict() for r in self.rows]}


@dataclass
class BenchSettings:
    """Attributes:
        warmup: untimed runs per runner and shape set (default 3).
        iterations: timed calls per runner and shape set (default: as many as fit in ``duration``).
        duration: seconds of timed calls per shape set, all runners together, when ``iterations`` is
            not given (default 3).
        min_iterations: at least this many timed calls per runner even when ``duration`` runs out (default 10).
        seed: seed of the random inputs.
        block_seconds: length of one runner's block of consecutive calls (default 0.2 s).
    """

    warmup: int = 3
    iterations: int | None = None
    duration: float = 3.0
    min_iterations: int = 10
    seed: int = 0
    block_seconds: float = 0.2
    #: rows with fewer timed calls, or a p90/p50 above this, are flagged unreliable (and their ratios)
    reliable_count: int = 10
    reliable_spread: float = 1.5


def count_work(onnx_path: str | os.PathLike, shapes: ShapeSet, seed: int = 0) -> Work:
    """FLOPs and minimum bytes of one inference of ``onnx_path`` at ``shapes`` (see the module docstring).

    Shapes come from ONNX shape inference with the inputs fixed to ``shapes``, never from running the
    model: counting the work of a 256x256 attention must not materialise its 16 GiB of scores.
    ``seed`` is kept for compatibility and unused.
    """
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(onnx_path))
    initializers = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    concrete = onnx.ModelProto()
    concrete.CopyFrom(model)
    for graph_input in concrete.graph.input:
        if graph_input.name in shapes:
            for dim, size in zip(graph_input.type.tensor_type.shape.dim, shapes[graph_input.name]):
                dim.Clear()
                dim.dim_value = int(size)
    del concrete.graph.value_info[:]
    inferred = onnx.shape_inference.infer_shapes(concrete, data_prop=True)
    known: dict[str, tuple[int, ...]] = {}
    sizes: dict[str, int] = {}
    for info in list(inferred.graph.value_info) + list(inferred.graph.output) + list(inferred.graph.input):
        dims = info.type.tensor_type.shape.dim
        if dims and all(d.HasField("dim_value") for d in dims):
            known[info.name] = tuple(d.dim_value for d in dims)
            sizes[info.name] = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(info.type.tensor_type.elem_type)).itemsize
    for name, value in initializers.items():
        known[name] = value.shape

    def shape(name):
        return known.get(name)

    by_op: dict[str, int] = {}
    for node in model.graph.node:
        out = shape(node.output[0]) if node.output else None
        if out is None:
            continue
        out_elems = int(np.prod(out))
        flops = 0
        if node.op_type in ("Conv", "ConvInteger", "QLinearConv"):
            weight = shape(node.input[1])
            if weight is not None:
                flops = 2 * out_elems * int(np.prod(weight[1:]))   # Cin/groups * kh * kw per output
        elif node.op_type in ("MatMul", "Gemm", "MatMulInteger"):
            a = shape(node.input[0])
            if a is not None:
                flops = 2 * out_elems * int(a[-1])
        elif node.op_type == "Softmax":
            flops = 5 * out_elems
        elif node.op_type in ("Relu", "Mul", "Add", "Div", "Sub", "Sigmoid", "Tanh", "Erf"):
            flops = out_elems
        if flops:
            by_op[node.op_type] = by_op.get(node.op_type, 0) + flops
    weights = sum(v.nbytes for v in initializers.values())
    graph_outputs = [o.name for o in model.graph.output]
    io_bytes = sum(int(np.prod(s)) * 4 for s in shapes.values()) + sum(
        int(np.prod(known[n])) * sizes.get(n, 4) for n in graph_outputs if n in known)
    return Work(sum(by_op.values()), int(weights + io_bytes), by_op)


def measure_peak_gflops(threads: int | None = None, size: int = 2048, seconds: float = 1.5) -> dict[str, float]:
    """This machine's float32 matmul ceiling (GFLOP/s) with ``threads`` threads: best of ONNX Runtime
    (MLAS, the engine the ONNX artifacts run on) and PyTorch (``torch.mm``). Both are returned; the
    ceiling is the larger (measured here: ORT 470, torch 221 GFLOP/s on 2 AVX-512 cores)."""
    from onnx import TensorProto, helper

    from runtime.onnxrt import import_onnxruntime

    flops = 2.0 * size ** 3

    def best_of(call) -> float:
        call()
        best, runs, start = math.inf, 0, time.perf_counter()
        while time.perf_counter() - start < seconds or runs < 3:
            t0 = time.perf_counter()
            call()
            best = min(best, time.perf_counter() - t0)
            runs += 1
        return flops / best / 1e9

    ort = import_onnxruntime()
    tensor = lambda name: helper.make_tensor_value_info(name, TensorProto.FLOAT, [size, size])  # noqa: E731
    graph = helper.make_graph([helper.make_node("MatMul", ["a", "b"], ["c"])], "peak", [tensor("a"), tensor("b")],
                              [tensor("c")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    a = np.random.default_rng(0).standard_normal((size, size), dtype=np.float32)
    result = {"onnxruntime": best_of(lambda: session.run(None, {"a": a, "b": a}))}
    try:
        import torch

        previous = torch.get_num_threads()
        if threads:
            torch.set_num_threads(threads)
        try:
            t = torch.from_numpy(a)
            result["torch"] = best_of(lambda: torch.mm(t, t))
        finally:
            torch.set_num_threads(previous)
    except ImportError:
        pass
    result["peak"] = max(result.values())
    return result


def peak_rss_mb() -> float:
    """Peak RSS of this process in MiB. Linux's VmHWM belongs to this address space; ru_maxrss would
    carry over the parent's peak across fork+exec (a probe started by a 1.3 GiB parent read 1.3 GiB)."""
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def benchmark(runners: Mapping[str, Runner], shape_sets: Sequence[ShapeSet], settings: BenchSettings | None = None,
              *, work: Callable[[ShapeSet], Work | None] | None = None, baseline: str | None = None,
              progress: Callable[[str], None] | None = None, threads: int | None = None) -> BenchResult:
    """Measure every runner at every shape set, interleaved (see the module docstring).

    Ctrl-C stops the measurement and returns the shape sets completed so far (``interrupted`` is set);
    the one under way is dropped, since its backends got unequal shares of the interleaved rounds.
    """
    settings = settings or BenchSettings()
    say = progress or (lambda message: None)
    host = host_facts(threads)
    rows: list[BenchRow] = []
    interrupted = False
    labels = list(runners)
    try:
        for runner in runners.values():
            runner.activate()
        for shapes in shape_sets:   # every shape set fits every runner, checked before any array is drawn
            for runner in runners.values():
                check_shapes(shapes, runner.input_metadata)
        for index, shapes in enumerate(shape_sets):
            feed = random_feed(shapes, seed=settings.seed + index)
            batch = int(next(iter(shapes.values()))[0])
            label = format_shape_set(shapes)
            say(f"{label}: warming up")
            for name in labels:
                for _ in range(settings.warmup):
                    runners[name].infer(feed)
            samples: dict[str, list[float]] = {name: [] for name in labels}
            typical = {}
            clocks: dict[str, str] = {}
            for name in labels:   # blocks sized from the median of three calls, not from one slow call
                times = []
                for _ in range(3):
                    runners[name].infer(feed)
                    times.append(runners[name].last_inference_time)
                typical[name] = max(float(np.median(times)), 1e-6)
            start = time.perf_counter()
            rounds = 0
            while True:
                order = labels[rounds % len(labels):] + labels[:rounds % len(labels)]
                for name in order:
                    runner = runners[name]
                    # always: another backend's spinning threads (or its caches) must not land on a timed call
                    runner.infer(feed, check=False)   # the transition call: not timed
                    wanted = settings.iterations if settings.iterations is not None else 10**9
                    block = max(1, min(int(settings.block_seconds / typical[name]), wanted - len(samples[name])))
                    for _ in range(block):
                        runner.infer(feed, check=False)
                        # On a GPU the device-side time (CUDA events) where the backend measures it.
                        device = runner.last_device_time
                        samples[name].append(device if device is not None else runner.last_inference_time)
                        clocks[name] = "device" if device is not None else "host"
                rounds += 1
                counts = [len(v) for v in samples.values()]
                if settings.iterations is not None:
                    if min(counts) >= settings.iterations:
                        break
                elif min(counts) >= settings.min_iterations and time.perf_counter() - start >= settings.duration:
                    break
            counted = work(shapes) if work else None
            for name in labels:
                stats = LatencyStats.from_seconds(samples[name])
                described = runners[name].describe()
                precision = described.get("precision") or described.get("dtype") or "fp32"
                rows.append(BenchRow(name, label, batch, stats, precision, batch / (stats.p50 / 1000.0),
                                     clocks.get(name, "host"), None, None, counted.flops if counted else None,
                                     counted.min_bytes if counted else None,
                                     warnings=reliability_warnings(stats, settings)))
            say(f"{label}: {rounds} rounds, {min(counts)}+ timed calls per backend")
    except KeyboardInterrupt:
        interrupted = True
    finally:
        for runner in runners.values():
            runner.deactivate()
    _speedups(rows, baseline)
    from xattn.environment import library_versions

    host["load_average_end"] = _load_average()
    return BenchResult(rows, asdict(settings), library_versions(), interrupted=interrupted, baseline_backend=baseline,
                       host=host)


def reliability_warnings(stats: LatencyStats, settings: BenchSettings) -> list[str]:
    found = []
    if stats.count < settings.reliable_count:
        found.append(f"only {stats.count} timed calls (< {settings.reliable_count})")
    if stats.p50 > 0 and stats.p90 / stats.p50 > settings.reliable_spread:
        found.append(f"spread p90/p50 {stats.p90 / stats.p50:.2f} (> {settings.reliable_spread:g}): a loaded machine?")
    return found


def host_facts(threads: int | None = None) -> dict:
    """What the figures depend on: CPU model and features, cores, load, thread settings (recorded in the JSON)."""
    import platform

    from xattn.cpu import describe_cpu

    return {**describe_cpu(), "logical_cores": os.cpu_count(),
            "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
            "machine": platform.machine(), "system": platform.system(), "hostname": platform.node(),
            "threads": threads, "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
            "load_average_start": _load_average()}


def _load_average() -> list[float] | None:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


def _speedups(rows: list[BenchRow], baseline: str | None) -> None:
    if not baseline:
        return
    base = {r.shapes: r for r in rows if r.backend == baseline}
    for row in rows:
        if row.shapes in base:
            row.speedup = base[row.shapes].stats.p50 / row.stats.p50
            if base[row.shapes].warnings and row is not base[row.shapes]:
                row.warnings.append(f"its baseline row is unreliable ({'; '.join(base[row.shapes].warnings)})")


# -- output -------------------------------------------------------------------------------------------

def format_table(result: BenchResult) -> str:
    peak = result.peak_gflops
    width = max([30] + [len(row.backend) for row in result.rows])   # "model.ov.int8.onnx [openvino-bf16]" whole
    header = (f"{'backend':<{width}} {'shapes':<30} {'p50 ms':>9} {'p90 ms':>9} {'p99 ms':>9} {'std':>7} "
              f"{'samples/s':>10} {'GFLOP/s':>8}{' of peak':>9} {'speedup':>8} {'peak RSS':>9}")
    lines = [header, "-" * len(header)]
    for row in result.rows:
        gflops = f"{row.gflops:8.1f}" if row.gflops else f"{'':>8}"
        # The measured ceiling is fp32's: INT8/FP16 rows run other instructions, a share would mislead.
        share = f"{row.gflops / peak:9.0%}" if peak and row.gflops and row.precision == "fp32" else f"{'':>9}"
        speedup = f"{row.speedup:7.2f}x" if row.speedup else f"{'':>8}"
        rss = f"{row.rss_mb:6.0f} MiB" if row.rss_mb else f"{'':>9}"
        lines.append(f"{row.backend:<{width}} {row.shapes[:30]:<30} {row.stats.p50:9.2f} {row.stats.p90:9.2f} "
                     f"{row.stats.p99:9.2f} {row.stats.std:7.2f} {row.throughput:10.1f} {gflops}{share} {speedup} {rss}")
    if peak:
        detail = ", ".join(f"{k} {v:.0f}" for k, v in (result.peak_detail or {}).items() if k != "peak")
        lines.append(f"fp32 matmul peak of this machine: {peak:.0f} GFLOP/s ({detail}); 'of peak' = achieved / peak, "
                     "fp32 rows only")
    if result.baseline_backend:
        lines.append(f"speedup = median of {result.baseline_backend} / median of the row; timings are medians of "
                     f"blocks interleaved across backends")
    if any(r.rss_mb for r in result.rows):
        lines.append("peak RSS: each backend alone in its own process (a whole-process figure: Python + libraries + model)")
    flagged = [r for r in result.rows if r.warnings]
    for row in flagged:
        lines.append(f"warning: {row.backend} @ {row.shapes}: {'; '.join(row.warnings)}: its figures"
                     + (" and speedup are" if result.baseline_backend else " are") + " not reliable")
    if flagged:
        lines.append("  (more calls: --duration or --iterations; a quieter machine)")
    if result.interrupted:
        lines.append("interrupted: the figures above are the shape sets completed before Ctrl-C")
    host = result.host or {}
    if host:
        lines.append(f"machine: {host.get('cpu_model') or 'unknown CPU'}, {host.get('usable_cores', '?')} usable cores, "
                     f"features {', '.join(host.get('cpu_features') or []) or 'unknown'}")
    return "\n".join(lines)


CSV_FIELDS = ["backend", "shapes", "batch", "precision", "clock", "count", "p50", "p90", "p95", "p99", "mean", "std", "min", "max",
              "throughput", "rss_mb", "device_mb", "flops", "min_bytes", "gflops", "speedup"]


def to_csv(result: BenchResult) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=CSV_FIELDS, lineterminator="\n")
    writer.writeheader()
    for row in result.rows:
        data = row.as_dict()
        writer.writerow({**{k: data[k] for k in CSV_FIELDS if k in data}, **asdict(row.stats)})
    return buffer.getvalue()


def write_outputs(result: BenchResult, json_path=None, csv_path=None, plot_path=None) -> bool:
    """Write the reports; with nothing measured (interrupted before the first shape set completed) write
    none, so an earlier report (perhaps a --baseline) is kept rather than replaced by an empty one."""
    if not result.rows:
        return False
    if json_path:
        write_text_atomic(json_path, json.dumps(result.as_dict(), indent=2) + "\n")
    if csv_path:
        write_text_atomic(csv_path, to_csv(result))
    if plot_path:
        plot(result, plot_path)
    return True


def plot(result: BenchResult, path) -> tuple[list[str], str]:
    """Median latency against input size (positions of x1 + x2), one line per backend and batch, log
    scale, as a PNG; returns the line labels and the title."""
    try:
        import matplotlib
    except ImportError as exc:
        from xattn.errors import MissingDependencyError

        raise MissingDependencyError("--plot needs matplotlib", hint="pip install 'xattn-deploy[plot]'") from exc
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from xattn.fileio import atomic_path
    from xattn.shapes import parse_shape_set

    figure, axis = plt.subplots(figsize=(7.5, 4.8), dpi=110)
    # one line per backend and batch size: latencies of different batches are not one curve
    for backend, batch in dict.fromkeys((r.backend, r.batch) for r in result.rows):
        points = []
        for row in result.rows:
            if row.backend == backend and row.batch == batch:
                shapes = parse_shape_set(row.shapes)
                positions = sum(s[2] * s[3] for s in shapes.values() if len(s) == 4)
                points.append((positions, row.stats.p50, row.stats.p90))
        points.sort()
        xs, p50, p90 = zip(*points)
        axis.errorbar(xs, p50, yerr=[np.zeros(len(p50)), np.subtract(p90, p50)], marker="o", capsize=3,
                      label=f"{backend}, batch {batch}")
    axis.set_xscale("log")
    axis.set_yscale("log")
    axis.set_xlabel("positions (H1*W1 + H2*W2)")
    axis.set_ylabel("latency, median (ms); bar to p90")
    host = result.host or {}
    threads = host.get("threads") or "default"
    axis.set_title(f"xattn bench: {threads} threads, {host.get('cpu_model') or 'unknown CPU'} "
                   f"({host.get('usable_cores', '?')} cores)", fontsize=9)
    axis.grid(True, which="both", alpha=0.3)
    axis.legend(fontsize=8)
    figure.tight_layout()
    labels, title = [line.get_label() for line in axis.containers], axis.get_title()
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png")
    plt.close(figure)
    return labels, title


def load_bench(path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"baseline {path} does not exist")
    try:
        data = json.loads(path.read_text())
        if data.get("format") != BENCH_FORMAT:
            raise ValueError(f"format {data.get('format')!r}")
        rows = data.get("rows")
        if not isinstance(rows, list):
            raise ValueError("no rows")
        for row in rows:   # read as data: every field find_slowdowns uses, with its type
            p50 = row["stats"]["p50"]
            if not (isinstance(row["backend"], str) and isinstance(row["shapes"], str)
                    and isinstance(p50, (int, float)) and not isinstance(p50, bool) and math.isfinite(p50) and p50 > 0):
                raise ValueError(f"a row without backend, shapes and a positive stats.p50: {str(row)[:80]}")
        return data
    except (json.JSONDecodeError, UnicodeDecodeError, ValueError, AttributeError, KeyError, TypeError) as exc:
        raise ArtifactError(f"baseline {path} is not an xattn bench JSON ({exc})",
                            hint="use the --json of an earlier run") from None


def find_slowdowns(result: BenchResult, baseline: dict, max_slowdown: float) -> list[str]:
    """Rows whose median is more than ``max_slowdown`` (0.10 = 10%) slower than the baseline's same row."""
    before = {(r["backend"], r["shapes"]): r["stats"]["p50"] for r in baseline["rows"]}
    found = []
    for row in result.rows:
        old = before.get((row.backend, row.shapes))
        if old and row.stats.p50 > old * (1.0 + max_slowdown):
            found.append(f"{row.backend} @ {row.shapes}: median {row.stats.p50:.2f} ms vs {old:.2f} ms "
                         f"(+{row.stats.p50 / old - 1:.0%}, allowed +{max_slowdown:.0%})")
    return found


def parse_percent(text: str) -> float:
    """``"10%"`` or ``"0.1"`` -> 0.1."""
    try:
        value = float(text[:-1]) / 100.0 if str(text).endswith("%") else float(text)
    except ValueError as exc:
        raise BadInputError(f"bad percentage {text!r}", hint="write e.g. 10%") from exc
    if not math.isfinite(value) or value < 0:
        raise BadInputError(f"bad percentage {text!r}: not a finite, non-negative number", hint="write e.g. 10%")
    return value


def profile_ops(onnx_path: str | os.PathLike, shapes: ShapeSet, threads: int | None = None, runs: int = 5) -> dict[str, float]:
    """Milliseconds per run spent in each op type (ONNX Runtime's profiler), largest first."""
    import tempfile

    from runtime.onnxrt import import_onnxruntime

    ort = import_onnxruntime()
    with tempfile.TemporaryDirectory() as folder:
        options = ort.SessionOptions()
        options.enable_profiling = True
        options.profile_file_prefix = os.path.join(folder, "profile")
        options.log_severity_level = 3
        if threads:
            options.intra_op_num_threads = threads
        from xattn.ort_session import create_session

        session = create_session(Path(onnx_path).read_bytes(), options, ["CPUExecutionProvider"], str(onnx_path))
        feed = random_feed(shapes)
        session.run(None, feed)   # warm-up, also profiled: subtracted below by counting runs
        for _ in range(runs):
            session.run(None, feed)
        trace = json.loads(Path(session.end_profiling()).read_text())
    totals: dict[str, float] = {}
    for event in trace:
        if event.get("cat") == "Node" and event.get("name", "").endswith("_kernel_time"):
            op = event.get("args", {}).get("op_name", "?")
            totals[op] = totals.get(op, 0.0) + event["dur"] / 1000.0
    per_run = {op: ms / (runs + 1) for op, ms in totals.items()}
    return dict(sorted(per_run.items(), key=lambda kv: -kv[1]))
