"""``xattn bench --server URL``: a client-side load benchmark of a running KServe v2 server (Triton or
``xattn serve``), in the manner of Triton's perf_analyzer.

For each concurrency level, that many client threads (one client each) send requests back to back,
bounded by a request count and a time limit per level; each request's latency is timed on the client,
from the call to its decoded response. Per level: latency percentiles, requests/s and samples/s, errors.
Outputs of a sample of requests are compared with a local run of the same artifact
(``compare_with``): a server that answers fast but wrong must not pass.
"""

from __future__ import annotations

import csv
import io
import json
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Callable
from urllib.parse import urlparse

import numpy as np

from runtime.bench import LatencyStats, host_facts
from xattn.data import random_feed
from xattn.errors import BadInputError, CheckFailedError, MissingDependencyError
from xattn.fileio import write_text_atomic
from xattn.shapes import ShapeSet, format_shape_set
from xattn.triton import SERVE_HINT

LOAD_FORMAT = "xattn-load/1"


@dataclass
class LoadSettings:
    """Attributes:
        url: ``http://host:port`` or ``grpc://host:port`` (the scheme picks the protocol).
        model: the model to load (default: the server's only ready model).
        shapes: the request's inputs (random normal, batch included).
        concurrency: client threads per level (default 1, 2, 4, 8).
        requests: at most this many timed requests per level (default 200).
        duration: at most this many seconds per level (default 10).
        warmup: untimed requests before the first level (default 5).
        compare_with: a local artifact whose outputs the server's must match on ``compare_samples`` requests.
        compare_providers: what the server runs the artifact on, when not ONNX Runtime's default (``--providers``
            of ``xattn serve``): the local run uses the same, and a bf16/f16 runtime is judged at its bound.
        seed: seed of the request inputs (a few distinct inputs are cycled).
    """

    url: str
    shapes: ShapeSet
    model: str | None = None
    concurrency: tuple[int, ...] = (1, 2, 4, 8)
    requests: int = 200
    duration: float = 10.0
    warmup: int = 5
    compare_with: str | None = None
    compare_providers: list[str] | None = None
    compare_samples: int = 4
    seed: int = 0


@dataclass
class LoadLevel:
    concurrency: int
    requests: int
    errors: int
    seconds: float
    throughput: float          # requests per second
    samples_per_second: float
    stats: LatencyStats | None
    first_error: str = ""


@dataclass
class LoadResult:
    settings: dict
    model: str
    protocol: str
    levels: list[LoadLevel]
    host: dict
    comparison: dict | None = None
    notes: list[str] = field(default_factory=list)
    #: the server's own counts over the measured levels (requests, executions, mean batch), when readable
    server: dict | None = None

    def as_dict(self) -> dict:
        return {"format": LOAD_FORMAT, "settings": self.settings, "model": self.model, "protocol": self.protocol,
                "host": self.host, "comparison": self.comparison, "notes": self.notes, "server": self.server,
                "levels": [{**asdict(level), "stats": asdict(level.stats) if level.stats else None}
                           for level in self.levels]}


#: client threads one level may start (each holds a connection and a stack)
MAX_CONCURRENCY = 256


def parse_url(url: str) -> tuple[str, str]:
    """(protocol, host:port) from ``http://...`` or ``grpc://...``."""
    parsed = urlparse(url if "://" in url else f"http://{url}")
    try:
        port = parsed.port   # urllib raises ValueError for a port outside 0..65535
    except ValueError:
        port = None
    if parsed.scheme not in ("http", "grpc") or not parsed.hostname or not port:
        raise BadInputError(f"--server {url!r} is not http://HOST:PORT or grpc://HOST:PORT (port 1..65535)")
    host = f"[{parsed.hostname}]" if ":" in parsed.hostname else parsed.hostname   # IPv6 literal
    return parsed.scheme, f"{host}:{port}"


class _Client:
    """One tritonclient client (HTTP or gRPC) and the request it sends."""

    def __init__(self, protocol: str, address: str):
        try:
            if protocol == "grpc":
                import tritonclient.grpc as module
            else:
                import tritonclient.http as module
        except ImportError as exc:
            raise MissingDependencyError("xattn bench --server needs tritonclient", hint=SERVE_HINT) from exc
        self.module, self.protocol = module, protocol
        self.client = module.InferenceServerClient(address)

    def infer(self, model: str, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        inputs = []
        for name, array in feed.items():
            tensor = self.module.InferInput(name, list(array.shape), "FP32")
            tensor.set_data_from_numpy(array)
            inputs.append(tensor)
        result = self.client.infer(model, inputs)
        outputs = result.get_response()
        names = [o.name for o in outputs.outputs] if self.protocol == "grpc" else [o["name"] for o in outputs["outputs"]]
        return {name: result.as_numpy(name) for name in names}

    def close(self) -> None:
        self.client.close()


def server_statistics(client: _Client) -> dict[str, dict[str, int]] | None:
    """Per model: requests (inference_count) and executions (execution_count), or None where the server
    restricts its statistics endpoint. More requests than executions means requests were batched."""
    try:
        stats = client.client.get_inference_statistics(as_json=True) if client.protocol == "grpc" \
            else client.client.get_inference_statistics()
    except Exception:   # restricted or unsupported: the figures are unknown, not an error
        return None
    return {m["name"]: {"requests": int(m.get("inference_count", 0)), "executions": int(m.get("execution_count", 0))}
            for m in stats.get("model_stats", [])}


def pick_model(client: _Client, wanted: str | None) -> str:
    if wanted:
        if not client.client.is_model_ready(wanted):
            raise BadInputError(f"the server has no ready model {wanted!r}")
        return wanted
    stats = server_statistics(client)
    if stats is None:
        raise BadInputError("the server does not list its models (its statistics endpoint is restricted)",
                            hint="name the model with --model")
    ready = [name for name in stats if client.client.is_model_ready(name)]
    if len(ready) != 1:
        raise BadInputError(f"the server has {len(ready)} ready models ({', '.join(ready) or 'none'})",
                            hint="name one with --model")
    return ready[0]


def run_load(settings: LoadSettings, progress: Callable[[str], None] | None = None) -> LoadResult:
    """Measure every concurrency level (see the module docstring)."""
    say = progress or (lambda message: None)
    protocol, address = parse_url(settings.url)
    if any(c < 1 for c in settings.concurrency):
        raise BadInputError("--concurrency levels must be at least 1")
    if any(c > MAX_CONCURRENCY for c in settings.concurrency):
        # one client thread (and connection) per level: thousands exhaust the process before the server
        raise BadInputError(f"--concurrency {max(settings.concurrency)} is above {MAX_CONCURRENCY} client threads",
                            hint="more load than that is a job for several machines, or perf_analyzer")
    probe = _Client(protocol, address)
    try:
        if not probe.client.is_server_live():
            raise CheckFailedError(f"the server at {settings.url} is not live")
    except Exception as exc:
        if isinstance(exc, CheckFailedError):
            raise
        raise CheckFailedError(f"no KServe v2 server answers at {settings.url} ({' '.join(str(exc).split())[:160]})",
                               hint="start one: xattn serve ARTIFACT") from exc
    from tritonclient.utils import InferenceServerException

    model = pick_model(probe, settings.model)
    feeds = [random_feed(settings.shapes, seed=settings.seed + i) for i in range(8)]
    batch = int(next(iter(settings.shapes.values()))[0])
    try:
        for i in range(settings.warmup or 1):   # at least one request: a server that refuses it fails here, once
            probe.infer(model, feeds[i % len(feeds)])
    except InferenceServerException as exc:
        raise CheckFailedError(f"the server refused the request ({format_shape_set(settings.shapes)}) for model "
                               f"{model!r}: {_last_line(exc)}") from None
    comparison = compare_outputs(probe, model, feeds[: settings.compare_samples], settings.compare_with,
                                 settings.compare_providers) if settings.compare_with else None
    before = server_statistics(probe)
    levels = []
    for concurrency in settings.concurrency:
        say(f"concurrency {concurrency}: up to {settings.requests} requests or {settings.duration:g} s")
        levels.append(_level(protocol, address, model, feeds, batch, concurrency, settings))
    after = server_statistics(probe)
    probe.close()
    result = LoadResult({**asdict(settings), "shapes": format_shape_set(settings.shapes)}, model, protocol, levels,
                        host_facts(None), comparison)
    if before and after and model in after:
        requests = after[model]["requests"] - before.get(model, {}).get("requests", 0)
        executions = after[model]["executions"] - before.get(model, {}).get("executions", 0)
        result.server = {"requests": requests, "executions": executions,
                         "mean_batch": requests / executions if executions else None}
    if comparison and not comparison["passed"]:
        result.notes.append("the server's outputs do NOT match the local run of the artifact (if the server runs it "
                            "on other --providers, e.g. openvino-bf16, give the same --providers here)")
    return result


def _level(protocol, address, model, feeds, batch, concurrency, settings) -> LoadLevel:
    latencies: list[float] = []
    errors: list[str] = []
    lock = threading.Lock()
    start_gate = threading.Barrier(concurrency + 1)
    sent = [0]
    deadline = [0.0]

    def worker(index: int) -> None:
        client = _Client(protocol, address)
        start_gate.wait()
        n = index
        try:
            while True:
                with lock:
                    if sent[0] >= settings.requests or time.perf_counter() >= deadline[0]:
                        return
                    sent[0] += 1
                t0 = time.perf_counter()
                try:
                    client.infer(model, feeds[n % len(feeds)])
                except Exception as exc:   # a server error is a measured outcome, not a crash of the benchmark
                    with lock:
                        errors.append(_last_line(exc))
                    continue
                finally:
                    n += concurrency
                with lock:
                    latencies.append(time.perf_counter() - t0)
        finally:
            client.close()

    threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(concurrency)]
    for thread in threads:
        thread.start()
    began = time.perf_counter()
    deadline[0] = began + settings.duration
    start_gate.wait()
    for thread in threads:
        thread.join()
    seconds = time.perf_counter() - began
    done = len(latencies)
    return LoadLevel(concurrency, done, len(errors), seconds, done / seconds if seconds else 0.0,
                     done * batch / seconds if seconds else 0.0,
                     LatencyStats.from_seconds(latencies) if latencies else None, errors[0] if errors else "")


def _last_line(exc: Exception) -> str:
    """A server's error in one line: the last non-empty line of its text (PyTriton sends a traceback)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip() and not line.strip().startswith("At:")]
    lines = [line for line in lines if not line.startswith("/") and not line.startswith("File ")]
    return (lines[-1] if lines else str(exc))[:300]


def compare_outputs(client: _Client, model: str, feeds, artifact: str, providers=None) -> dict:
    """The server's outputs against a local run of ``artifact`` on the same inputs (and ``providers``)."""
    from runtime.metrics import compare
    from runtime.open import open_runner
    from runtime.tolerances import tolerances_for
    from runtime.validate import artifact_record, runtime_precision

    precision = artifact_record(artifact).get("precision") or "fp32"
    if precision == "fp32" and runtime_precision(providers):
        precision = runtime_precision(providers)   # an FP32 file the server computes in bf16 (OpenVINO)
    # the server may batch and run the file on other kernels: allow its own precision's bound
    tol = tolerances_for(precision)
    worst = 0.0
    with open_runner(artifact, providers=providers) as local:
        for feed in feeds:
            remote, here = client.infer(model, feed), local.infer(feed)
            for name, value in here.items():
                if name not in remote:
                    return {"artifact": artifact, "passed": False, "why": f"the server returned no output {name!r}"}
                worst = max(worst, compare(remote[name], value).rel_l2)
    return {"artifact": artifact, "samples": len(feeds), "worst_rel_l2": worst, "bound": tol.max_rel_l2,
            "passed": bool(worst <= tol.max_rel_l2)}


def format_load(result: LoadResult) -> str:
    lines = [f"{result.protocol} load on model {result.model} ({result.settings['shapes']}):",
             f"{'concurrency':>11} {'requests':>9} {'errors':>7} {'req/s':>8} {'samples/s':>10} {'p50 ms':>8} "
             f"{'p90 ms':>8} {'p99 ms':>8}"]
    for level in result.levels:
        s = level.stats
        figures = f"{s.p50:8.2f} {s.p90:8.2f} {s.p99:8.2f}" if s else f"{'-':>8} {'-':>8} {'-':>8}"
        lines.append(f"{level.concurrency:>11} {level.requests:>9} {level.errors:>7} {level.throughput:8.1f} "
                     f"{level.samples_per_second:10.1f} {figures}")
        if level.first_error:
            lines.append(f"{'':>11} first error: {level.first_error}")
    if result.comparison:
        c = result.comparison
        lines.append(f"outputs vs a local run of {c['artifact']}: " + (
            f"worst rel. L2 {c['worst_rel_l2']:.2e} on {c['samples']} requests (bound {c['bound']:g}): "
            f"{'match' if c['passed'] else 'MISMATCH'}" if "worst_rel_l2" in c else c.get("why", "")))
    if result.server:
        s = result.server
        lines.append(f"server: {s['requests']} requests in {s['executions']} executions"
                     + (f" (mean batch {s['mean_batch']:.2f})" if s["mean_batch"] else ""))
    lines.extend(f"note: {n}" for n in result.notes)
    return "\n".join(lines)


LOAD_CSV_FIELDS = ["concurrency", "requests", "errors", "seconds", "throughput", "samples_per_second",
                   "p50", "p90", "p95", "p99", "mean", "std", "min", "max"]


def write_load_outputs(result: LoadResult, json_path=None, csv_path=None, plot_path=None) -> None:
    if json_path:
        write_text_atomic(json_path, json.dumps(result.as_dict(), indent=2) + "\n")
    if csv_path:
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=LOAD_CSV_FIELDS, lineterminator="\n")
        writer.writeheader()
        for level in result.levels:
            row = {k: v for k, v in asdict(level).items() if k in LOAD_CSV_FIELDS}
            stats = {k: v for k, v in asdict(level.stats).items() if k in LOAD_CSV_FIELDS} if level.stats else {}
            writer.writerow({**row, **stats})
        write_text_atomic(csv_path, buffer.getvalue())
    if plot_path:
        _plot(result, plot_path)


def _plot(result: LoadResult, path) -> None:
    try:
        import matplotlib
    except ImportError as exc:
        raise MissingDependencyError("--plot needs matplotlib", hint="pip install 'xattn-deploy[plot]'") from exc
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from xattn.fileio import atomic_path

    levels = [lv for lv in result.levels if lv.stats]
    figure, (left, right) = plt.subplots(1, 2, figsize=(9, 4), dpi=110)
    xs = [lv.concurrency for lv in levels]
    left.plot(xs, [lv.stats.p50 for lv in levels], marker="o", label="p50")
    left.plot(xs, [lv.stats.p90 for lv in levels], marker="o", label="p90")
    left.set_xlabel("concurrency")
    left.set_ylabel("latency (ms)")
    left.legend()
    right.plot(xs, [lv.throughput for lv in levels], marker="o")
    right.set_xlabel("concurrency")
    right.set_ylabel("requests / s")
    figure.suptitle(f"xattn load: {result.model} over {result.protocol}, {result.settings['shapes']}", fontsize=9)
    figure.tight_layout()
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png")
    plt.close(figure)
