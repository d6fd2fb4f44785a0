"""Attention per backend, side by side in one run: the README's attention tables.

    python benchmarks/attention.py [--threads 2] [--duration 3] [--sizes 32,64,128,192,256] [--out DIR]

On the default model (batch 1, x1 = x2 = S x S), measured interleaved in blocks (runtime/bench.py):

* plain FP32 ONNX (MatMul -> Softmax -> MatMul) vs the ONNX Runtime form (``xattn optimize``: fused
  ``com.microsoft.MultiHeadAttention``) and its INT8 (``xattn quantize --target onnxruntime``, at 32 and 64);
* the best PyTorch a user would write: ``F.scaled_dot_product_attention`` on contiguous Q/K/V (the same
  weights), eager;
* peak RSS of each form alone in its own process over 3 repeated calls (a serving process sees the
  second call's buffers, which a single-call probe misses);
* the fp32 share of this machine's matmul peak (analytic FLOPs / median time);
* accuracy on held-out photos of the TensorRT forms (FP16 with attention FP16 vs the former FP32
  score path; INT8 with Q/DQ on inputs and weights, with and without the 1.1% fallback) and of the
  ONNX Runtime INT8 form.

Where OpenVINO is installed, the form the main job recommends on such CPUs is measured beside them in every
table (latency, peak RSS, accuracy): ``model.ov.int8.onnx`` (``xattn quantize --target openvino``: queries in
slices, int8 Q and K^T) on OpenVINO, bf16 where the CPU has AVX512-BF16 or AMX, else f32. Every OpenVINO form
(plain, fused, f32 and bf16) is in ``benchmarks/cpu_backends.py``. The CPU's model and features are recorded
with the figures (``host`` in the JSON, and the table's header line).

The plain graph is not run at 256x256: its 16 GiB score tensor does not fit this machine. Nor is torch's
SDPA: it was excluded after an OOM kill at 256 that turned out to come from counting FLOPs by running
the plain graph (fixed since); SDPA's own cost there is unmeasured.
"""

from __future__ import annotations

import argparse
import datetime
import json
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

PLAIN_MAX = 192          # the plain graph's scores: 1 GiB at 128, 5 GiB at 192, 16 GiB at 256
SDPA_MAX = 192           # not run at 256: excluded after an OOM kill that turned out to be count_work's (since fixed)
INT8_SIZES = (32, 64)
PROBE = """
import json, sys
sys.path.insert(0, {root!r})
import numpy as np
from runtime.bench import peak_rss_mb
spec, size, threads = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
feed = {{n: np.random.default_rng(0).standard_normal((1, 3, size, size)).astype(np.float32) for n in ("x1", "x2")}}
if spec == "sdpa":
    import torch
    torch.set_num_threads(threads)
    sys.path.insert(0, {here!r})
    from attention import sdpa_model
    model = sdpa_model()
    with torch.no_grad():
        for _ in range(3):
            model(*(torch.from_numpy(v) for v in feed.values()))
else:
    from runtime.open import open_runner
    path, at, provider = spec.rpartition("@")   # "file@openvino-bf16" runs on OpenVINO; a bare file on ORT's CPU
    path, provider = (path, provider) if at else (spec, "cpu")
    with open_runner(path, providers=[provider], threads=threads) as runner:
        for _ in range(3):
            runner.infer(feed)
print(json.dumps(peak_rss_mb()))
"""


def sdpa_model():
    """The default model (seeded weights) with its attention as F.scaled_dot_product_attention on
    contiguous Q/K/V: what a user would write for speed in PyTorch (transposed views fall back to the
    math path and hold the scores)."""
    import torch
    import torch.nn.functional as F

    from xattn.registry import load_model

    net = load_model().module

    class Sdpa(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.net = net

        def forward(self, x1, x2):
            a, n = self.net.attention, self.net
            f1, f2 = n.stem1(x1), n.stem2(x2)
            b, _, h, w = f1.shape
            heads, d = a.num_heads, a.head_dim
            q = a.conv_query(f1).reshape(b, heads, d, -1).transpose(2, 3).contiguous()
            k = a.conv_key(f2).reshape(b, heads, d, -1).transpose(2, 3).contiguous()
            v = a.conv_value(f2).reshape(b, heads, d, -1).transpose(2, 3).contiguous()
            out = F.scaled_dot_product_attention(q, k, v)
            return F.relu(n.head(out.transpose(2, 3).reshape(b, a.out_channels, h, w)))

    return Sdpa().eval()


class SdpaRunner:
    """A Runner for the SDPA model (the toolkit's TorchRunner takes registry models)."""

    def __new__(cls, threads):
        from xattn.registry import LoadedModel, ModelIO
        from runtime.torch_runner import TorchRunner

        model = LoadedModel("sdpa", sdpa_model(), ModelIO({"x1": 3, "x2": 3}), {})
        return TorchRunner(model, name="torch SDPA")


def openvino_form() -> tuple[str | None, str | None]:
    """(label, provider) of the OpenVINO form measured, or (None, None) without OpenVINO."""
    import importlib.util

    from xattn.cpu import cpu_features, has_bf16

    if importlib.util.find_spec("openvino") is None:
        print("  .. OpenVINO not installed: its rows are left out ('pip install -e .[openvino]')", file=sys.stderr)
        return None, None
    precision = "bf16" if has_bf16(cpu_features()) else "f32"
    return f"OpenVINO {precision} ov.int8", "openvino-bf16" if precision == "bf16" else "openvino"


def rss(spec: str, size: int, threads: int) -> float | None:
    here = str(Path(__file__).resolve().parent)
    code = PROBE.format(root=str(Path(here).parent), here=here)
    done = subprocess.run([sys.executable, "-c", code, spec, str(size), str(threads)], capture_output=True, text=True)
    if done.returncode != 0:
        return None
    return float(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--duration", type=float, default=3.0, help="seconds of timed calls per shape set")
    parser.add_argument("--sizes", default="32,64,128,192,256")
    parser.add_argument("--out", default=None, help="folder for the JSON of every figure")
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]

    import torch

    from xattn.data import DataSettings, load_calibration_data
    from calibration.quantize import AccuracyTarget, QuantizeSettings, quantize_onnx, quantize_to_target
    from calibration.ranges import collect_ranges
    from exporter.fp16 import Fp16Settings, convert_fp16
    from exporter.onnx_export import ExportSettings, export_onnx
    from exporter.optimize import optimize_for_onnxruntime
    from xattn.registry import load_model
    from runtime.bench import BenchSettings, benchmark, count_work, host_facts, measure_peak_gflops
    from runtime.onnxrt import OnnxRuntimeRunner
    from runtime.open import open_runner
    from runtime.validate import ValidateOptions, validate_artifact

    torch.set_num_threads(args.threads)
    say = lambda m: print("  ..", m, file=sys.stderr, flush=True)   # noqa: E731
    host = host_facts(args.threads)
    figures: dict = {"date": str(datetime.date.today()), "host": host, "threads": args.threads, "torch": torch.__version__}
    ov_label, ov_provider = openvino_form()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        say("export, optimize, calibrate, quantize")
        model = load_model()
        largest = max(sizes + [128])
        wide = ExportSettings(max_shapes={"x1": (2, 3, largest, largest), "x2": (2, 3, largest, largest)})
        fp32 = export_onnx(model, folder / "model.onnx", wide).path
        fused = optimize_for_onnxruntime(fp32, folder / "model.ort.onnx", reference=model).path
        import onnx

        data = load_calibration_data("shipped", ["x1", "x2"], {"x1": 3, "x2": 3}, DataSettings(samples=64))
        calib, heldout_q = data.split(0.25)
        ranges = collect_ranges(onnx.load(str(fp32)), calib)
        ort_int8 = quantize_onnx(fp32, ranges, folder / "model.ort.int8.onnx", QuantizeSettings(target="onnxruntime")).path
        ov_int8 = None
        if ov_label:
            from calibration.attention_int8 import quantize_attention_scores

            ov_int8 = quantize_attention_scores(fp32, calib, folder / "model.ov.int8.onnx").path

        # -- latency ------------------------------------------------------------------------------
        peak = measure_peak_gflops(args.threads)
        figures["matmul_peak_gflops"] = peak
        rows = {}
        for size in sizes:
            shapes = {"x1": (1, 3, size, size), "x2": (1, 3, size, size)}
            runners = {"fused fp32": OnnxRuntimeRunner(fused, ["cpu"], threads=args.threads, name="fused fp32")}
            if size <= SDPA_MAX:
                runners["torch SDPA"] = SdpaRunner(args.threads)
            if size <= PLAIN_MAX:
                runners["plain fp32"] = OnnxRuntimeRunner(fp32, ["cpu"], threads=args.threads, name="plain fp32")
            if size in INT8_SIZES:
                runners["fused int8"] = OnnxRuntimeRunner(ort_int8, ["cpu"], threads=args.threads, name="fused int8")
            if ov_label:
                runners[ov_label] = open_runner(ov_int8, providers=[ov_provider], threads=args.threads, name=ov_label)
            say(f"latency at {size}x{size}: {', '.join(runners)}")
            result = benchmark(runners, [shapes], BenchSettings(duration=args.duration, warmup=1, min_iterations=3),
                               progress=say)
            flops = count_work(str(fp32), shapes).flops
            for row in result.rows:
                rows[(row.backend, size)] = {"p50_ms": row.stats.p50, "p90_ms": row.stats.p90, "calls": row.stats.count,
                                             "gflops": flops / (row.stats.p50 / 1e3) / 1e9}
                print(f"latency {row.backend} @ {size}: p50 {row.stats.p50:.1f} ms, p90 {row.stats.p90:.1f} ms, "
                      f"{row.stats.count} calls", flush=True)   # partial results survive an interruption
        figures["latency"] = {f"{b} @ {s}": v for (b, s), v in rows.items()}

        # -- memory over repeated calls -------------------------------------------------------------
        memory = {}
        for size in [s for s in sizes if s >= 128]:
            specs = [("plain fp32", str(fp32)), ("fused fp32", str(fused)), ("torch SDPA", "sdpa")]
            if ov_label:
                specs.append((ov_label, f"{ov_int8}@{ov_provider}"))
            for label, spec in specs:
                if (label == "plain fp32" and size > PLAIN_MAX) or (label == "torch SDPA" and size > SDPA_MAX):
                    continue
                say(f"peak RSS of {label} at {size}x{size} (3 calls, own process)")
                memory[(label, size)] = rss(spec, size, args.threads)
                print(f"peak RSS {label} @ {size}: {memory[(label, size)]}", flush=True)
        figures["peak_rss_mib"] = {f"{b} @ {s}": v for (b, s), v in memory.items()}

        # -- accuracy of every form on held-out photos -----------------------------------------------
        say("accuracy on held-out photos")
        forms = {
            "fp16, score path FP32 (previous)": convert_fp16(fp32, folder / "a.onnx", Fp16Settings(keep_attention_fp32=True)).path,
            "fp16, attention FP16, scale on Q (TensorRT)": convert_fp16(fp32, folder / "b.onnx").path,
            "int8 TensorRT placement, every conv": quantize_onnx(fp32, ranges, folder / "c.onnx").path,
            "int8 TensorRT placement, target 1.1%": quantize_to_target(
                fp32, ranges, folder / "d.onnx", heldout_q, AccuracyTarget(max_rel_l2=0.011)).path,
            "int8 ONNX Runtime placement (fused)": ort_int8,
            "fp32 fused (ONNX Runtime)": fused,
        }
        if ov_label:
            forms[ov_label] = ov_int8
        accuracy = {}
        held_out = DataSettings(samples=32, seed=1000)
        for label, path in forms.items():
            providers = [ov_provider] if label == ov_label else None
            result = validate_artifact(path, ValidateOptions(data="shipped", data_settings=held_out, providers=providers))
            accuracy[label] = {"rel_l2": max(c.metrics.rel_l2 for c in result.cases),
                               "cosine": min(c.metrics.cosine for c in result.cases), "passed": result.passed}
            print(f"accuracy {label}: {accuracy[label]}", flush=True)
        figures["accuracy"] = accuracy

    features = ", ".join(host.get("cpu_features") or []) or "features unknown"
    print(f"\n{figures['date']}, {host.get('cpu_model')} ({features}), {args.threads} threads, torch "
          f"{figures['torch']}; medians; fp32 matmul peak {peak['peak']:.0f} GFLOP/s\n")
    ov_head = f" {ov_label} ms | it vs fused |" if ov_label else ""
    print("| S | plain fp32 ms | fused fp32 ms | fused int8 ms | torch SDPA ms | fused vs plain | fused vs SDPA "
          "| int8 vs fused | fused share of peak |" + ov_head)
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |" + (" ---: | ---: |" if ov_label else ""))
    for size in sizes:
        get = lambda b: rows.get((b, size), {}).get("p50_ms")   # noqa: E731
        plain, fz, i8, sd = get("plain fp32"), get("fused fp32"), get("fused int8"), get("torch SDPA")
        ratio = lambda a, b: f"{a / b:.2f}x" if a and b else "-"   # noqa: E731
        ms = lambda v: f"{v:.1f}" if v else "-"   # noqa: E731
        share = rows[("fused fp32", size)]["gflops"] / peak["peak"]
        ov = f" {ms(get(ov_label))} | {ratio(fz, get(ov_label))} |" if ov_label else ""
        print(f"| {size} | {ms(plain)} | {ms(fz)} | {ms(i8)} | {ms(sd)} | {ratio(plain, fz)} | {ratio(sd, fz)} | "
              f"{ratio(fz, i8)} | {share:.0%} |" + ov)
    print("\nPeak RSS over 3 calls, each form alone in its own process (MiB):")
    for (label, size), mib in memory.items():
        print(f"- {label} at {size}x{size}: {mib:.0f}" if mib else f"- {label} at {size}x{size}: failed")
    print("\nAccuracy on 32 held-out photo pairs (other crops than calibration), worst of two resolutions:")
    print("| form | rel. L2 | cosine |\n| --- | ---: | ---: |")
    for label, acc in accuracy.items():
        print(f"| {label} | {acc['rel_l2']:.3g} | {acc['cosine']:.6f} |")
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "attention.json").write_text(json.dumps(figures, indent=2, default=str))


if __name__ == "__main__":
    main()
