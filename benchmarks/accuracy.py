"""Reproduce the README's accuracy table: FP16 and INT8 (per calibration method and target) vs PyTorch on photos.

    python benchmarks/accuracy.py [--samples 64] [--out benchmarks/results]

Exports the default model, calibrates on 64 pairs of scikit-image's photos at two resolutions (timed),
quantizes with each method for each target (TensorRT: Q/DQ on inputs and weights, the rest FP16;
ONNX Runtime: QLinearConv placement, uint8 activations, 7-bit weights, fused attention), converts to
FP16, and validates every artifact against PyTorch on held-out crops (seed 1000; calibration uses
seed 0). Prints a Markdown table; writes JSON.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--out", default=None, help="folder for results JSON")
    args = parser.parse_args()

    import onnx
    import torch

    from xattn.data import DataSettings, load_calibration_data
    from calibration.quantize import QuantizeSettings, quantize_onnx
    from calibration.ranges import CalibrationSettings, collect_ranges
    from exporter.fp16 import convert_fp16
    from exporter.onnx_export import export_onnx
    from xattn.registry import load_model
    from runtime.validate import ValidateOptions, validate_artifact
    from xattn.environment import library_versions

    torch.set_num_threads(2)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        model = load_model()
        fp32 = export_onnx(model, folder / "model.onnx").path
        proto = onnx.load(str(fp32))
        start = time.perf_counter()
        data = load_calibration_data("shipped", ["x1", "x2"], {"x1": 3, "x2": 3}, DataSettings(samples=args.samples))
        load_seconds = time.perf_counter() - start
        held_out = ValidateOptions(data="shipped", data_settings=DataSettings(samples=32, seed=1000))
        artifacts = [("fp32", fp32, "", 0.0)]
        start = time.perf_counter()
        artifacts.append(("fp16", convert_fp16(fp32, folder / "model.fp16.onnx").path, "", time.perf_counter() - start))
        for method in ("percentile", "minmax", "entropy"):
            start = time.perf_counter()
            ranges = collect_ranges(proto, data, CalibrationSettings(method=method))
            seconds = time.perf_counter() - start + load_seconds
            for target in ("tensorrt", "onnxruntime"):
                path = quantize_onnx(fp32, ranges, folder / f"model.int8.{method}.{target}.onnx",
                                     QuantizeSettings(target=target)).path
                artifacts.append((f"int8 {target}", path, method, seconds))
        for precision, path, method, seconds in artifacts:
            result = validate_artifact(path, held_out)
            for case in result.cases:
                rows.append({"precision": precision, "method": method, "target": precision.split(" ")[-1], "shapes": case.shapes,
                             "rel_l2": case.metrics.rel_l2, "cosine": case.metrics.cosine,
                             "sqnr_db": case.metrics.sqnr_db, "passed": case.passed,
                             "calibration_seconds": round(seconds, 1) if method else None})
    print(f"Default model, {args.samples} calibration pairs x 2 resolutions ({len(data)} feeds); validation on "
          f"32 held-out pairs; {platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"onnxruntime {library_versions().get('onnxruntime')}\n")
    print("| artifact | calibration | calibration time | shapes | rel. L2 | cosine | SQNR dB | verdict |")
    print("| --- | --- | ---: | --- | ---: | ---: | ---: | --- |")
    for row in rows:
        seconds = f"{row['calibration_seconds']} s" if row["calibration_seconds"] else ""
        print(f"| {row['precision']} | {row['method'] or '-'} | {seconds} | `{row['shapes']}` | {row['rel_l2']:.2e} | "
              f"{row['cosine']:.6f} | {row['sqnr_db']:.1f} | {'pass' if row['passed'] else 'FAIL'} |")
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "accuracy.json").write_text(json.dumps({"versions": library_versions(), "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
