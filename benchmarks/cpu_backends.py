"""CPU backends side by side in one run: ONNX Runtime's forms against OpenVINO f32/bf16 on the plain and fused files.

    python benchmarks/cpu_backends.py [--sizes 64,128,192] [--threads 2] [--duration 2] [--out DIR] [--update-readme]
                                      [--plain-limit-gib 1.5]

On the default model (batch 1, x1 = x2 = S x S), measured interleaved in blocks (runtime/bench.py), speed as a
ratio to ONNX Runtime's fused file (``model.ort.onnx``, the toolkit's best ONNX Runtime form), peak RSS of each
alone in its own process (3 calls), and relative L2 against ONNX Runtime's FP32 result on the same inputs:

* ONNX Runtime: ``model.onnx`` (plain), ``model.ort.onnx`` (fused MultiHeadAttention), ``model.ort.int8.onnx``;
* OpenVINO (``--providers openvino`` / ``openvino-bf16``): the plain file, the fused one, ``model.ov.onnx``
  (``xattn optimize --target openvino``: queries in slices), ``model.ov.int8.onnx`` (``xattn quantize --target
  openvino``: the same with int8 Q and K^T) and ``model.ov.int8-both.onnx`` (``--int8-products both``: the
  second product's probabilities and V in 8 bits too), f32 and bf16 (bf16 only where the CPU has it:
  AVX512-BF16 or AMX). OpenVINO compiles per input shape (the runner's default).

Accuracy twice: on one random input at the largest size (attention spread over many keys), and worst over 32
held-out photo pairs (seed 1000; calibration uses seed 0), where attention is
peaked and 8-bit V shows.

Each size is timed in a fresh process of its own (this script again, ``--time-size``), every form interleaved
in it, so no size is timed with what another left behind: timed one after another in one process, the sizes
before left the default form's 192x192 figure at 1.87x / 1.90x in two runs where 192 alone in the same script
ran 2.04x (the README gives both figures).

The machine's CPU model and features are printed and stored with the figures; a shared machine moves ratios by
about 20%. ``--update-readme`` writes the table between the README's ``cpu-backends-table`` markers.

Forms on the plain ``model.onnx`` hold the ``N1 x N2`` scores: they are timed only at sizes where those scores fit
``--plain-limit-gib`` in float32 (every form is timed side by side in one process, so they would add up); their
peak RSS at the largest size is still measured, alone.
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

MARKERS = ("<!-- cpu-backends-table:start -->", "<!-- cpu-backends-table:end -->")
PROBE = """
import json, sys
sys.path.insert(0, {root!r})
import numpy as np
from runtime.bench import peak_rss_mb
from runtime.open import open_runner
path, provider, size, threads = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
feed = {{n: np.random.default_rng(0).standard_normal((1, 3, size, size)).astype(np.float32) for n in ("x1", "x2")}}
with open_runner(path, providers=[provider], threads=threads) as runner:
    for _ in range(3):
        runner.infer(feed)
print(json.dumps(peak_rss_mb()))
"""


def rss(path: Path, provider: str, size: int, threads: int) -> float | None:
    done = subprocess.run([sys.executable, "-c", PROBE.format(root=str(ROOT)), str(path), provider, str(size),
                           str(threads)], capture_output=True, text=True)
    return float(done.stdout.strip().splitlines()[-1]) if done.returncode == 0 else None


def say(message: str) -> None:
    print("  ..", message, file=sys.stderr, flush=True)


def time_size(folder: Path, size: int, threads: int, duration: float, plain_limit_gib: float) -> dict[str, float]:
    """Median ms of every form at ``size`` (x1 = x2 = size x size), interleaved, in this process."""
    from runtime.bench import BenchSettings, benchmark
    from runtime.open import open_runner
    from xattn.cpu import cpu_features, has_bf16

    rows = forms(folder, has_bf16(cpu_features()))
    shapes = {"x1": (1, 3, size, size), "x2": (1, 3, size, size)}
    timed = [(label, path, provider) for label, path, provider in rows
             if path.name != "model.onnx" or scores_gib(size) <= plain_limit_gib]
    runners = {label: open_runner(path, providers=[provider], threads=threads, name=label)
               for label, path, provider in timed}
    timing = benchmark(runners, [shapes], BenchSettings(warmup=2, duration=duration, min_iterations=5),
                       baseline=rows[0][0], progress=say)
    return {row.backend: row.stats.p50 for row in timing.rows}


def time_size_apart(folder: Path, size: int, threads: int, duration: float, plain_limit_gib: float) -> dict[str, float]:
    """:func:`time_size` in a fresh process (see the module docstring for why)."""
    done = subprocess.run([sys.executable, __file__, "--time-size", str(size), "--folder", str(folder), "--threads",
                           str(threads), "--duration", str(duration), "--plain-limit-gib", str(plain_limit_gib)],
                          stdout=subprocess.PIPE, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def scores_gib(size: int) -> float:
    """float32 ``N1 x N2`` scores of the default model at x1 = x2 = size x size, batch 1."""
    return (size * size) ** 2 * 4 / 2**30


def forms(folder: Path, bf16: bool) -> list[tuple[str, Path, str]]:
    """(label, file, provider) of every form measured."""
    rows = [("ORT fused model.ort.onnx", folder / "model.ort.onnx", "cpu"),
            ("ORT plain model.onnx", folder / "model.onnx", "cpu"),
            ("ORT INT8 model.ort.int8.onnx", folder / "model.ort.int8.onnx", "cpu"),
            ("OpenVINO f32 model.onnx", folder / "model.onnx", "openvino"),
            ("OpenVINO f32 model.ort.onnx", folder / "model.ort.onnx", "openvino"),
            ("OpenVINO f32 model.ov.onnx", folder / "model.ov.onnx", "openvino"),
            ("OpenVINO f32 model.ov.int8.onnx", folder / "model.ov.int8.onnx", "openvino"),
            ("OpenVINO f32 model.ov.int8-both.onnx", folder / "model.ov.int8-both.onnx", "openvino")]
    if bf16:
        rows += [("OpenVINO bf16 model.onnx", folder / "model.onnx", "openvino-bf16"),
                 ("OpenVINO bf16 model.ort.onnx", folder / "model.ort.onnx", "openvino-bf16"),
                 ("OpenVINO bf16 model.ov.onnx", folder / "model.ov.onnx", "openvino-bf16"),
                 ("OpenVINO bf16 model.ov.int8.onnx", folder / "model.ov.int8.onnx", "openvino-bf16"),
                 ("OpenVINO bf16 model.ov.int8-both.onnx", folder / "model.ov.int8-both.onnx", "openvino-bf16")]
    return rows


def markdown(figures: dict) -> str:
    sizes, host = figures["sizes"], figures["host"]
    lines = [f"Generated by `python benchmarks/cpu_backends.py --update-readme` on {figures['date']}: "
             f"{host.get('cpu_model')} ({', '.join(host.get('cpu_features') or []) or 'features unknown'}), "
             f"{figures['threads']} threads, ONNX Runtime {figures['versions']['onnxruntime']}, OpenVINO "
             f"{figures['versions']['openvino']}; speed = ORT fused time / this form's time (interleaved, a "
             "fresh process per size); rel. L2 against ORT FP32 on the same inputs: one random input at the largest size, and the "
             "worst of 32 held-out photo pairs; RSS of each alone, 3 calls.", "",
             "| form | " + " | ".join(f"S={s}" for s in sizes) + f" | rel. L2 random | rel. L2 photos | peak RSS at "
             f"S={max(sizes)} |",
             "| --- | " + " | ".join("---:" for _ in sizes) + " | ---: | ---: | ---: |"]
    for row in figures["rows"]:
        speed = " | ".join(f"{row['speed'][str(s)]:.2f}x" if row["speed"].get(str(s)) else "-" for s in sizes)
        error = f"{row['rel_l2']:.2e}" if row.get("rel_l2") is not None else "-"
        photos = f"{row['rel_l2_photos']:.2e}" if row.get("rel_l2_photos") is not None else "-"
        memory = f"{row['rss']:.0f} MiB" if row.get("rss") else "-"
        lines.append(f"| {row['label']} | {speed} | {error} | {photos} | {memory} |")
    skipped = [s for s in sizes if scores_gib(s) > figures.get("plain_limit_gib", float("inf"))]
    if skipped:
        held = ", ".join(f"{scores_gib(s):.1f} GiB at S={s}" for s in skipped)
        lines += ["", f"-: the plain file's forms hold the N1 x N2 scores ({held} in float32), more than the "
                      f"{figures['plain_limit_gib']:g} GiB this run allowed beside the other forms; their peak RSS was "
                      "measured alone."]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="64,128,192")
    parser.add_argument("--plain-limit-gib", type=float, default=1.5,
                        help="time forms of the plain file only where its float32 scores fit this")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--duration", type=float, default=2.0, help="seconds of timed calls per size and form")
    parser.add_argument("--out", default=None, help="folder for the JSON of every figure")
    parser.add_argument("--update-readme", action="store_true")
    parser.add_argument("--time-size", type=int, default=None,
                        help="(used by the script itself) time every form of --folder at this size in this process "
                             "and print the medians as JSON")
    parser.add_argument("--folder", default=None, help="(with --time-size) the folder of the forms")
    args = parser.parse_args()
    if args.time_size is not None:
        if not args.folder or not Path(args.folder).is_dir():
            parser.error("--time-size needs --folder, the folder of the forms")
        print(json.dumps(time_size(Path(args.folder), args.time_size, args.threads, args.duration,
                                   args.plain_limit_gib)))
        return
    sizes = sorted(int(s) for s in args.sizes.split(","))

    import numpy as np
    import onnx
    import onnxruntime
    import openvino

    from runtime.bench import host_facts
    from runtime.open import open_runner
    from xattn.cpu import cpu_features, has_bf16
    from xattn.data import DataSettings, load_for_model

    figures: dict = {"date": str(datetime.date.today()), "threads": args.threads, "sizes": sizes,
                     "host": host_facts(args.threads),
                     "versions": {"onnxruntime": onnxruntime.__version__, "openvino": openvino.__version__},
                     "plain_limit_gib": args.plain_limit_gib, "rows": []}
    with tempfile.TemporaryDirectory(prefix="xattn-cpu-backends-") as scratch:
        folder = Path(scratch)
        top = max(sizes)
        steps = [["export", "-o", str(folder / "model.onnx"), "--max-shapes", f"x1:1x3x{top}x{top},x2:1x3x{top}x{top}",
                  "--opt-shapes", "x1:1x3x64x64,x2:1x3x64x64"],
                 ["optimize", str(folder / "model.onnx"), "-o", str(folder / "model.ort.onnx")],
                 ["optimize", str(folder / "model.onnx"), "--target", "openvino", "-o", str(folder / "model.ov.onnx")],
                 ["quantize", str(folder / "model.onnx"), "--target", "onnxruntime", "-o",
                  str(folder / "model.ort.int8.onnx")],
                 ["quantize", str(folder / "model.onnx"), "--target", "openvino", "-o",
                  str(folder / "model.ov.int8.onnx")],
                 ["quantize", str(folder / "model.onnx"), "--target", "openvino", "--int8-products", "both", "-o",
                  str(folder / "model.ov.int8-both.onnx")]]
        for step in steps:
            say("xattn " + " ".join(step[:2]))
            subprocess.run([sys.executable, "-m", "tools.cli", *step], cwd=ROOT, check=True, capture_output=True)
        rows = forms(folder, has_bf16(cpu_features()))
        results = {label: {"label": label, "speed": {}, "ms": {}, "rel_l2": None, "rel_l2_photos": None, "rss": None}
                   for label, _, _ in rows}
        say("accuracy on held-out photos")
        photos = load_for_model("shipped", onnx.load(str(folder / "model.onnx"), load_external_data=False),
                                DataSettings(samples=32, seed=1000)).feeds
        with open_runner(folder / "model.onnx", providers=["cpu"], threads=args.threads) as reference:
            wanted = [reference.infer(feed)["y"].astype(np.float64) for feed in photos]
        for label, path, provider in rows:
            with open_runner(path, providers=[provider], threads=args.threads) as runner:
                results[label]["rel_l2_photos"] = max(
                    float(np.linalg.norm(runner.infer(feed)["y"] - want) / np.linalg.norm(want))
                    for feed, want in zip(photos, wanted))
        for size in sizes:
            say(f"timing at {size}x{size} in a fresh process")
            medians = time_size_apart(folder, size, args.threads, args.duration, args.plain_limit_gib)
            for label, ms in medians.items():
                results[label]["speed"][str(size)] = medians[rows[0][0]] / ms
                results[label]["ms"][str(size)] = ms
            if size == top:   # accuracy against ORT FP32 on one input, each form alone
                feed = {n: np.random.default_rng(1).standard_normal((1, 3, size, size)).astype(np.float32)
                        for n in ("x1", "x2")}
                with open_runner(folder / "model.onnx", providers=["cpu"], threads=args.threads) as reference:
                    want = reference.infer(feed)["y"].astype(np.float64)
                for label, path, provider in rows:
                    with open_runner(path, providers=[provider], threads=args.threads) as runner:
                        got = runner.infer(feed)["y"]
                    results[label]["rel_l2"] = float(np.linalg.norm(got - want) / np.linalg.norm(want))
                    results[label]["rss"] = rss(path, provider, size, args.threads)
        figures["rows"] = [results[label] for label, _, _ in rows]
    figures["host"]["load_average_end"] = host_facts(args.threads).get("load_average_start")
    table = markdown(figures)
    print(table)
    print(f"\nmachine: {figures['host'].get('cpu_model')}, features {', '.join(figures['host'].get('cpu_features') or [])}, "
          f"load {figures['host'].get('load_average_start')} -> {figures['host']['load_average_end']}")
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "cpu_backends.json").write_text(json.dumps(figures, indent=1, default=str) + "\n")
    if args.update_readme:
        from readme_table import write_between

        print(f"wrote the table into {write_between(MARKERS, table)}")


if __name__ == "__main__":
    main()
