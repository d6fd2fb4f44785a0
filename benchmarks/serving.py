"""Reproduce the README's serving table: the default model through `xattn serve` (Triton via PyTriton) over
gRPC at concurrency 1/4/8, beside the same runner in-process; the server's overhead as ratios.

    python benchmarks/serving.py [--threads 2] [--requests 300] [--duration 10] [--out benchmarks/results]

Exports the default model and fuses its attention for ONNX Runtime (model.ort.onnx, what a CPU server
serves), then for 32x32 and 64x64 (both inputs, batch-1 requests):
- in-process: the ONNX Runtime runner called back to back (latency p50, requests/s);
- served: `xattn serve` in its own process, loaded by `xattn bench --server` (runtime/load_bench.py)
  with 1, 4 and 8 concurrent clients, outputs checked against the local run.
Client and server share this machine's cores, as on any single host; the table says so.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SIZES = [32, 64]
LEVELS = (1, 4, 8)


def in_process(path: Path, shapes, threads: int, seconds: float) -> dict:
    from runtime.bench import LatencyStats
    from runtime.onnxrt import OnnxRuntimeRunner
    from xattn.data import random_feed

    with OnnxRuntimeRunner(path, ["cpu"], threads=threads) as runner:
        feed = random_feed(shapes, seed=0)
        for _ in range(5):
            runner.infer(feed)
        times, start = [], time.perf_counter()
        while time.perf_counter() - start < seconds or len(times) < 20:
            t0 = time.perf_counter()
            runner.infer(feed)
            times.append(time.perf_counter() - t0)
    stats = LatencyStats.from_seconds(times)
    return {"p50": stats.p50, "p90": stats.p90, "throughput": len(times) / sum(times), "requests": len(times)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2, help="ONNX Runtime threads, in-process and in the server")
    parser.add_argument("--requests", type=int, default=300, help="at most this many requests per level")
    parser.add_argument("--duration", type=float, default=10.0, help="at most this many seconds per level")
    parser.add_argument("--out", default=None, help="folder for the JSON")
    args = parser.parse_args()

    from exporter.onnx_export import export_onnx
    from exporter.optimize import optimize_for_onnxruntime
    from xattn.registry import load_model
    from runtime.load_bench import LoadSettings, run_load
    from xattn.triton import free_port

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        fp32 = export_onnx(load_model(), folder / "model.onnx").path
        served = folder / "model.ort.onnx"
        optimize_for_onnxruntime(fp32, served)
        http_port, grpc_port = free_port(), free_port()
        server = subprocess.Popen([sys.executable, "-m", "tools.cli", "serve", str(served), "--http-port",
                                   str(http_port), "--grpc-port", str(grpc_port), "--threads", str(args.threads),
                                   "--name", "xattn"], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  text=True)
        try:
            _wait_ready(http_port, server)
            for size in SIZES:
                shapes = {"x1": (1, 3, size, size), "x2": (1, 3, size, size)}
                local = in_process(served, shapes, args.threads, seconds=min(args.duration, 5.0))
                print(f"{size}x{size} in-process: p50 {local['p50']:.2f} ms, {local['throughput']:.1f} req/s",
                      file=sys.stderr)
                load = run_load(LoadSettings(url=f"grpc://127.0.0.1:{grpc_port}", shapes=shapes, model="xattn",
                                             concurrency=LEVELS, requests=args.requests, duration=args.duration,
                                             compare_with=str(served)),
                                progress=lambda m: print("  ..", m, file=sys.stderr))
                for level in load.levels:
                    rows.append({"size": size, "concurrency": level.concurrency, "requests": level.requests,
                                 "errors": level.errors, "served_p50": level.stats.p50, "served_p90": level.stats.p90,
                                 "served_rps": level.throughput, "local_p50": local["p50"],
                                 "local_rps": local["throughput"],
                                 "latency_ratio": level.stats.p50 / local["p50"],
                                 "throughput_ratio": level.throughput / local["throughput"],
                                 "outputs_match": load.comparison["passed"], "server": load.server})
        finally:
            server.terminate()
            out, err = server.communicate(timeout=90)
    print(f"\n| size | concurrency | served p50 ms | served p90 ms | served req/s | in-process p50 ms | in-process "
          f"req/s | served / in-process latency | served / in-process throughput |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        print(f"| {r['size']}x{r['size']} | {r['concurrency']} | {r['served_p50']:.2f} | {r['served_p90']:.2f} | "
              f"{r['served_rps']:.1f} | {r['local_p50']:.2f} | {r['local_rps']:.1f} | {r['latency_ratio']:.2f}x | "
              f"{r['throughput_ratio']:.2f}x |")
    print(f"\nserver: {out.strip().splitlines()[-1] if out.strip() else '(no output)'}; outputs matched the local "
          f"run: {all(r['outputs_match'] for r in rows)}; {platform.processor() or platform.machine()}, "
          f"{args.threads} ORT threads, client and server on the same cores, {datetime.date.today()}")
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "serving.json").write_text(json.dumps(rows, indent=2) + "\n")


def _wait_ready(port: int, server) -> None:
    import tritonclient.http as http

    client = http.InferenceServerClient(f"127.0.0.1:{port}")
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"xattn serve exited: {server.communicate()}")
        try:
            if client.is_model_ready("xattn"):
                return
        except Exception:
            pass
        time.sleep(0.5)
    raise SystemExit("xattn serve did not become ready")


if __name__ == "__main__":
    main()
