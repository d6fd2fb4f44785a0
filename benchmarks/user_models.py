"""Users' attention styles per backend, side by side in one run: the README's "Your own model" table.

    python benchmarks/user_models.py [--sizes 32,64,128] [--threads 2] [--duration 1.5] [--out DIR]
                                     [--masks] [--update-readme]

For every style of ``tests/attention_styles.py`` (torch only, stride-4 patch stems, x1 = x2 = S x S, batch 1):

* what the finder says (blocks, written as einsum, masked, multi-query) and what each backend gets: the
  ONNX Runtime rewrite (``com.microsoft.MultiHeadAttention``, verified) or the reason it is left plain, and
  whether TensorRT's fused kernel would take it (head size, precision, scale position, mask);
* ONNX Runtime speed of the fused file vs the plain file at each size, as a ratio measured interleaved in
  one process (runtime/bench.py), and the peak RSS of each alone in its own process (3 calls);
* with ``--masks``: ONNX Runtime's masked MultiHeadAttention (``attention_bias`` expanded to B x 1 x N1 x N2)
  vs the plain MatMul/Add/Softmax graph at 1024 and 4096 tokens (the measurement behind keeping masked blocks
  plain; exporter/attention.py ``MASK_KEPT_PLAIN``).

``--update-readme`` writes the table between the README's ``user-models-table`` markers. The machine (CPU model,
features, cores, load) is printed and stored with the figures; ratios move by about 20% on a shared machine.
"""

from __future__ import annotations

import argparse
import datetime
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))   # readme_table

PROBE = """
import json, sys
sys.path.insert(0, {root!r})
import numpy as np
from runtime.bench import peak_rss_mb
from runtime.onnxrt import OnnxRuntimeRunner
spec, size, threads = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
feed = {{n: np.random.default_rng(0).standard_normal((1, 3, size, size)).astype(np.float32) for n in ("x1", "x2")}}
with OnnxRuntimeRunner(spec, ["cpu"], threads=threads) as runner:
    for _ in range(3):
        runner.infer(feed)
print(json.dumps(peak_rss_mb()))
"""
MARKERS = ("<!-- user-models-table:start -->", "<!-- user-models-table:end -->")
DESCRIPTIONS = {
    "mha_batch_first": "`nn.MultiheadAttention`, batch-first",
    "mha_seq_first_padding": "`nn.MultiheadAttention`, sequence-first, `key_padding_mask`",
    "sdpa_plain": "SDPA", "sdpa_bool_mask": "SDPA, boolean `attn_mask`",
    "sdpa_additive_bias": "SDPA, float `attn_mask`", "sdpa_causal": "SDPA, `is_causal=True`",
    "sdpa_gqa": "SDPA, grouped-query (`enable_gqa`)",
    "sam_style": "segment-anything style (scale on the scores)", "multi_query": "multi-query (one K/V head broadcast)",
    "one_query_token": "one learned query token", "einsum_last": "einsum, softmax on the last axis",
    "einsum_loftr": "einsum, softmax on axis 2 (LoFTR `nlsh`)", "linear_attention": "linear attention (LoFTR, elu + 1)",
    "torch_decoder": "`nn.TransformerDecoder` (self + cross)",
}


def rss(path: Path, size: int, threads: int) -> float | None:
    code = PROBE.format(root=str(ROOT))
    done = subprocess.run([sys.executable, "-c", code, str(path), str(size), str(threads)], capture_output=True,
                          text=True)
    return float(done.stdout.strip().splitlines()[-1]) if done.returncode == 0 else None


def _as_fp16_file(block):
    """The block as ``model.fp16.onnx`` holds it (the file TensorRT builds): FP16, the scale moved onto Q
    where that is exact."""
    import dataclasses

    moved = block.scale_position == "scores" and not block.mask_scaled and not block.issues
    return dataclasses.replace(block, precision="fp16", scale_position="query" if moved else block.scale_position)


def _short(reasons) -> str:
    """Each reason up to its first explanation ("(...)" or ": ..."), distinct, in order."""
    import re

    parts = []
    for why in reasons:
        for part in re.sub(r"\s*\([^)]*\)", "", why).split("; "):
            part = part.split(": ", 1)[0]
            if part not in parts:
                parts.append(part)
    return "; ".join(parts)


def style_figures(style: str, work: Path, sizes: list[int], threads: int, duration: float, say) -> dict:
    from exporter.attention import find_attention, find_linear_attention
    from exporter.onnx_export import ExportSettings, export_onnx
    from exporter.optimize import optimize_for_onnxruntime
    from xattn.registry import load_model
    from runtime.bench import BenchSettings, benchmark
    from runtime.onnxrt import OnnxRuntimeRunner
    from xattn.errors import XattnError

    import onnx

    top = max(sizes)
    model = load_model(f"tests.attention_styles:{style}")
    plain = work / f"{style}.onnx"
    row: dict = {"style": style}
    try:
        export_onnx(model, plain, ExportSettings(max_shapes={"x1": (1, 3, top, top), "x2": (1, 3, top, top)},
                                                 opt_shapes={"x1": (1, 3, 32, 32), "x2": (1, 3, 32, 32)}),
                    progress=say)
    except XattnError as exc:
        row["export"] = str(exc).splitlines()[0]
        return row
    proto = onnx.load(str(plain))
    blocks, linear = find_attention(proto), find_linear_attention(proto)
    row.update(blocks=len(blocks), linear=len(linear),
               einsum=sum(b.written_as == "einsum" for b in blocks), masked=sum(b.mask is not None for b in blocks),
               multi_query=sum(b.kv_heads == 1 and (b.heads or 1) > 1 for b in blocks),
               onnxruntime=[b.fusible("onnxruntime") for b in blocks],
               tensorrt=[_as_fp16_file(b).fusible("tensorrt") for b in blocks])
    fused_path = work / f"{style}.ort.onnx"
    try:
        optimize_for_onnxruntime(plain, fused_path, reference=model)
        row["fused"] = True
    except XattnError as exc:
        row["fused"], row["not_fused"] = False, str(exc).splitlines()[0]
    if not row["fused"]:
        return row
    row["speed"], row["rss"] = {}, {}
    for size in sizes:
        shapes = {"x1": (1, 3, size, size), "x2": (1, 3, size, size)}
        runners = {"plain": OnnxRuntimeRunner(plain, ["cpu"], threads=threads, name="plain"),
                   "fused": OnnxRuntimeRunner(fused_path, ["cpu"], threads=threads, name="fused")}
        result = benchmark(runners, [shapes], BenchSettings(warmup=2, duration=duration, min_iterations=10),
                           baseline="plain")
        by_name = {r.backend: r for r in result.rows}
        row["speed"][size] = by_name["plain"].stats.p50 / by_name["fused"].stats.p50
        row["rss"][size] = {"plain": rss(plain, size, threads), "fused": rss(fused_path, size, threads)}
        say(f"{style} @ {size}: fused {row['speed'][size]:.2f}x, RSS {row['rss'][size]}")
    return row


def mask_figures(threads: int, duration: float) -> list[dict]:
    """Masked MultiHeadAttention vs the plain masked graph, on ONNX Runtime's CPU (2 heads of 32)."""
    import time

    import numpy as np
    import onnxruntime as ort
    from onnx import TensorProto as T
    from onnx import helper, numpy_helper

    heads, head_dim = 2, 32
    hidden = heads * head_dim

    def fused():
        inputs = [helper.make_tensor_value_info(n, T.FLOAT, ["B", s, hidden]) for n, s in (("q", "S"), ("k", "L"), ("v", "L"))]
        inputs.append(helper.make_tensor_value_info("bias", T.FLOAT, ["B", 1, 1, "L"]))
        nodes = [helper.make_node("Shape", ["q"], ["qs"], start=1, end=2), helper.make_node("Shape", ["k"], ["ks"], start=1, end=2),
                 helper.make_node("Concat", ["ones", "qs", "ks"], ["target"], axis=0),
                 helper.make_node("Expand", ["bias", "target"], ["full"]),
                 helper.make_node("MultiHeadAttention", ["q", "k", "v", "", "", "full"], ["o"], domain="com.microsoft",
                                  num_heads=heads, scale=head_dim ** -0.5)]
        graph = helper.make_graph(nodes, "masked_mha", inputs, [helper.make_tensor_value_info("o", T.FLOAT, None)],
                                  [numpy_helper.from_array(np.array([1, 1], np.int64), "ones")])
        return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])

    def plain():
        inputs = [helper.make_tensor_value_info(n, T.FLOAT, ["B", heads, s, head_dim]) for n, s in (("q", "S"), ("k", "L"), ("v", "L"))]
        inputs.append(helper.make_tensor_value_info("bias", T.FLOAT, ["B", 1, 1, "L"]))
        nodes = [helper.make_node("Transpose", ["k"], ["kt"], perm=[0, 1, 3, 2]), helper.make_node("MatMul", ["q", "kt"], ["s0"]),
                 helper.make_node("Mul", ["s0", "scale"], ["s1"]), helper.make_node("Add", ["s1", "bias"], ["s2"]),
                 helper.make_node("Softmax", ["s2"], ["p"], axis=-1), helper.make_node("MatMul", ["p", "v"], ["o"])]
        graph = helper.make_graph(nodes, "masked_plain", inputs, [helper.make_tensor_value_info("o", T.FLOAT, None)],
                                  [numpy_helper.from_array(np.array(head_dim ** -0.5, np.float32), "scale")])
        return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])

    options = ort.SessionOptions()
    options.intra_op_num_threads, options.log_severity_level = threads, 3
    sessions = {"plain": ort.InferenceSession(plain().SerializeToString(), options, providers=["CPUExecutionProvider"]),
                "mha": ort.InferenceSession(fused().SerializeToString(), options, providers=["CPUExecutionProvider"])}
    rows = []
    rng = np.random.default_rng(0)
    for tokens in (1024, 4096):
        q, k, v = (rng.standard_normal((1, tokens, hidden)).astype(np.float32) for _ in range(3))
        bias = np.where(rng.random((1, 1, 1, tokens)) < 0.1, -1e4, 0).astype(np.float32)
        four = lambda x: np.ascontiguousarray(x.reshape(1, tokens, heads, head_dim).transpose(0, 2, 1, 3))  # noqa: E731
        feeds = {"plain": {"q": four(q), "k": four(k), "v": four(v), "bias": bias},
                 "mha": {"q": q, "k": k, "v": v, "bias": bias}}
        outputs = {name: s.run(None, feeds[name])[0] for name, s in sessions.items()}
        error = float(np.linalg.norm(outputs["mha"] - outputs["plain"].transpose(0, 2, 1, 3).reshape(1, tokens, hidden))
                      / np.linalg.norm(outputs["plain"]))
        times: dict[str, list[float]] = {"plain": [], "mha": []}
        end = time.perf_counter() + 2 * duration
        while time.perf_counter() < end or min(len(t) for t in times.values()) < 5:
            for name, session in sessions.items():   # interleaved: a load change hits both
                start = time.perf_counter()
                session.run(None, feeds[name])
                times[name].append(time.perf_counter() - start)
        median = {name: sorted(t)[len(t) // 2] for name, t in times.items()}
        rows.append({"tokens": tokens, "plain_ms": median["plain"] * 1e3, "masked_mha_ms": median["mha"] * 1e3,
                     "masked_mha_time_vs_plain": median["mha"] / median["plain"], "rel_l2": error})
    return rows


def markdown(rows: list[dict], sizes: list[int], host: dict, date: str) -> str:
    top = max(sizes)
    lines = [f"Generated by `python benchmarks/user_models.py --update-readme` on {date}: {host.get('cpu_model')} "
             f"({', '.join(host.get('cpu_features') or []) or 'features unknown'}), {host.get('threads')} threads, "
             f"ONNX Runtime {host.get('onnxruntime')}. Speed: plain time / fused time at x1 = x2 = S x S, batch 1 "
             "(interleaved in one process); RSS: each file alone in its own process, 3 calls.", "",
             "| style | found | ONNX Runtime (`model.ort.onnx`) | TensorRT fused MHA (`model.fp16.onnx`) | fused speed at "
             + " / ".join(str(s) for s in sizes) + f" | peak RSS at {top}: fused / plain |",
             "| --- | --- | --- | --- | --- | --- |"]
    for row in rows:
        name = DESCRIPTIONS.get(row["style"], row["style"])
        if "export" in row:
            lines.append(f"| {name} | - | - | - | - | not exported: {row['export'][:200]} |")
            continue
        found = f"{row['blocks']} block(s)" if row["blocks"] else ("linear attention" if row["linear"] else "none")
        extras = [w for w, n in (("written as einsum", row["einsum"]), ("masked", row["masked"]),
                                 ("multi-query", row["multi_query"])) if n]
        if extras:
            found += " (" + ", ".join(extras) + ")"
        if row["fused"]:
            ort_text = "fused, verified"
        elif row["blocks"]:
            ort_text = "plain: " + _short(why for ok, why in row["onnxruntime"] if not ok)
        else:
            ort_text = "plain: nothing to fuse" + (" (O(N) already)" if row["linear"] else "")
        trt = [why for ok, why in row["tensorrt"] if not ok]
        trt_text = "no: " + _short(trt) if trt else ("yes (FP16 file)" if row["blocks"] else "-")
        speed = " / ".join(f"{row['speed'][s]:.2f}x" for s in sizes) if row.get("speed") else "-"
        memory = row.get("rss", {}).get(top) if row.get("rss") else None
        memory_text = (f"{memory['fused']:.0f} / {memory['plain']:.0f} MiB" if memory and memory["fused"] and memory["plain"]
                       else "-")
        lines.append(f"| {name} | {found} | {ort_text} | {trt_text} | {speed} | {memory_text} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="32,64,128")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--duration", type=float, default=1.5, help="seconds of timed calls per size and file")
    parser.add_argument("--styles", default=None, help="comma-separated subset of tests/attention_styles.py STYLES")
    parser.add_argument("--masks", action="store_true", help="also measure masked MultiHeadAttention vs plain")
    parser.add_argument("--out", default=None, help="folder for the JSON of every figure")
    parser.add_argument("--update-readme", action="store_true", help="write the table into README.md")
    args = parser.parse_args()
    sizes = sorted(int(s) for s in args.sizes.split(","))

    import onnxruntime
    import torch

    from runtime.bench import host_facts
    from tests.attention_styles import STYLES

    torch.set_num_threads(args.threads)
    say = lambda m: print("  ..", m, file=sys.stderr, flush=True)   # noqa: E731
    host = {**host_facts(args.threads), "onnxruntime": onnxruntime.__version__, "torch": torch.__version__}
    date = str(datetime.date.today())
    styles = args.styles.split(",") if args.styles else list(STYLES)
    rows = []
    with tempfile.TemporaryDirectory(prefix="xattn-user-models-") as scratch:
        for style in styles:
            rows.append(style_figures(style, Path(scratch), sizes, args.threads, args.duration, say))
    table = markdown(rows, sizes, host, date)
    print(table)
    figures = {"date": date, "host": host, "sizes": sizes, "rows": rows}
    if args.masks:
        figures["masks"] = mask_figures(args.threads, args.duration)
        print("\nmasked MultiHeadAttention (attention_bias) vs the plain masked graph, 2 heads of 32:")
        for row in figures["masks"]:
            print(f"  {row['tokens']} x {row['tokens']} tokens: plain {row['plain_ms']:.1f} ms, masked MHA "
                  f"{row['masked_mha_ms']:.1f} ms ({row['masked_mha_time_vs_plain']:.2f}x the time; rel. L2 {row['rel_l2']:.1e})")
    figures["host"]["load_average_end"] = host_facts(args.threads).get("load_average_start")
    print(f"\nmachine: {host.get('cpu_model')}, features {', '.join(host.get('cpu_features') or []) or 'unknown'}, "
          f"load {host.get('load_average_start')} -> {figures['host']['load_average_end']}")
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "user_models.json").write_text(json.dumps(figures, indent=1, default=str) + "\n")
    if args.update_readme:
        from readme_table import write_between

        print(f"wrote the table into {write_between(MARKERS, table)}")


if __name__ == "__main__":
    main()
