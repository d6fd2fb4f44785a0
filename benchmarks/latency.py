"""Reproduce the README's CPU performance table: PyTorch eager vs ONNX Runtime fp32 / int8 / fp16.

    python benchmarks/latency.py [--threads 2] [--duration 4] [--out benchmarks/results]

Exports the default model, converts it to FP16, quantizes it to INT8 (calibrated on the shipped
photos), then measures all four backends interleaved in one run (see runtime/bench.py) at 32x32,
64x64, 96x96 and 128x128 (both inputs) and one asymmetric case, 2 threads. Prints medians, ratios,
the targets' verdicts, the FLOP/s share of this machine's matmul peak, and ONNX Runtime's per-op time
for fp32 vs int8 where INT8 is meant to win, to show what limits it.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

SIZES = [((32, 32), (32, 32)), ((64, 64), (64, 64)), ((96, 96), (96, 96)), ((128, 128), (128, 128)),
         ((96, 96), (32, 64))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--duration", type=float, default=4.0, help="seconds of timed calls per shape set")
    parser.add_argument("--out", default=None, help="folder for JSON/CSV/PNG")
    args = parser.parse_args()

    import onnx

    from xattn.data import DataSettings, load_calibration_data
    from calibration.quantize import QuantizeSettings, quantize_onnx
    from calibration.ranges import collect_ranges
    from exporter.fp16 import convert_fp16
    from exporter.onnx_export import export_onnx
    from xattn.registry import load_model
    from runtime.bench import BenchSettings, benchmark, format_table, measure_peak_gflops, \
        profile_ops, write_outputs
    from runtime.bench_setup import isolated_peak_rss, make_runners, work_counter
    from xattn.shapes import format_shape_set

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        fp32 = export_onnx(load_model(), folder / "fp32.onnx").path
        fp16 = convert_fp16(fp32, folder / "fp16.onnx").path
        data = load_calibration_data("shipped", ["x1", "x2"], {"x1": 3, "x2": 3}, DataSettings(samples=32))
        # the INT8 form ONNX Runtime runs fast (QLinearConv placement); the TensorRT form is for TensorRT
        int8 = quantize_onnx(fp32, collect_ranges(onnx.load(str(fp32)), data), folder / "int8.onnx",
                             QuantizeSettings(target="onnxruntime")).path
        specs = [str(fp32), str(int8), str(fp16)]
        shape_sets = [{"x1": (1, 3, *a), "x2": (1, 3, *b)} for a, b in SIZES]
        runners, base = make_runners(specs, threads=args.threads, providers=["cpu"], checkpoint=None, torch_baseline=True)
        result = benchmark(runners, shape_sets, BenchSettings(duration=args.duration), work=work_counter(specs),
                           baseline=base, progress=lambda m: print("  ..", m, file=sys.stderr))
        for label in runners:
            peaks = isolated_peak_rss(specs, label, shape_sets, threads=args.threads, providers=["cpu"])
            for row in result.rows:
                if row.backend == label:
                    row.rss_mb = peaks[[format_shape_set(s) for s in shape_sets].index(row.shapes)]
        result.peak_detail = measure_peak_gflops(args.threads)
        result.peak_gflops = result.peak_detail["peak"]
        profiles = {}
        for precision, path in (("fp32", fp32), ("int8", int8)):
            for i in (0, 1):
                size = SIZES[i][0]
                profiles[f"{precision} {size[0]}x{size[1]}"] = profile_ops(path, shape_sets[i], args.threads)
    print(format_table(result))
    median = {(r.backend, r.shapes): r.stats.p50 for r in result.rows}
    print(f"\n{datetime.date.today()}, {platform.processor() or platform.machine()}, {args.threads} threads, "
          f"{result.versions.get('torch')}, onnxruntime {result.versions.get('onnxruntime')}; medians\n")
    print("| x1 | x2 | PyTorch eager ms | ORT fp32 ms | ORT int8 ms | ORT fp16 ms | fp32 vs eager | int8 vs fp32 | fp16 vs fp32 | fp32 share of peak |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    verdicts = []
    for (a, b), shapes in zip(SIZES, shape_sets):
        key = format_shape_set(shapes)
        eager, f32, i8, f16 = (median[(n, key)] for n in ("torch eager", "fp32.onnx", "int8.onnx", "fp16.onnx"))
        row = next(r for r in result.rows if r.backend == "fp32.onnx" and r.shapes == key)
        share = row.gflops / result.peak_gflops if row.gflops else float("nan")
        print(f"| {a[0]}x{a[1]} | {b[0]}x{b[1]} | {eager:.1f} | {f32:.1f} | {i8:.1f} | {f16:.1f} | {eager / f32:.2f}x | "
              f"{f32 / i8:.2f}x | {f32 / f16:.2f}x | {share:.0%} |")
        if a == b and a[0] in (64, 128):
            verdicts.append(f"ORT fp32 >= 2x PyTorch eager at {a[0]}x{a[1]}: {eager / f32:.2f}x "
                            f"{'MET' if eager / f32 >= 2 else 'NOT MET'}")
        if a == b and a[0] in (32, 64):
            verdicts.append(f"INT8 >= 1.3x ORT fp32 at {a[0]}x{a[1]}: {f32 / i8:.2f}x "
                            f"{'MET' if f32 / i8 >= 1.3 else 'NOT MET'}")
    print("\nTargets:")
    for line in verdicts:
        print(f"- {line}")
    print(f"\nfp32 matmul peak: {result.peak_gflops:.0f} GFLOP/s "
          f"({', '.join(f'{k} {v:.0f}' for k, v in result.peak_detail.items() if k != 'peak')})")
    print("\nONNX Runtime time per op type (ms per run, profiler):")
    for name, ops in profiles.items():
        total = sum(ops.values())
        print(f"- {name}: " + ", ".join(f"{op} {ms:.2f} ({ms / total:.0%})" for op, ms in list(ops.items())[:6]))
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        write_outputs(result, out / "latency.json", out / "latency.csv", out / "latency.png")
        (out / "profiles.json").write_text(json.dumps(profiles, indent=2))


if __name__ == "__main__":
    main()
