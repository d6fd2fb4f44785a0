"""Setting up a benchmark: which runners, which shapes, which work counter, and each backend's peak memory alone
in its own process (shared by the CLI, the main job and benchmarks/). :mod:`runtime.bench` measures; this module
builds on it and is never imported by it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

from runtime.bench import Work, count_work, peak_rss_mb
from xattn.data import random_feed
from xattn.shapes import format_shape_set
from runtime.open import artifact_kind, open_runner
from xattn.errors import BadInputError
from xattn.shapes import ShapeSet


TORCH_BASELINE = "torch eager"


def label_for(spec: str, taken: set[str]) -> str:
    label = Path(spec).name if artifact_kind(spec) != "model" else f"torch:{spec}"
    base, n = label, 2
    while label in taken:
        label, n = f"{base}#{n}", n + 1
    return label


def make_runners(specs: Sequence[str], *, threads: int | None, providers, checkpoint: str | None, torch_baseline: bool,
                 device: str = "cpu", cuda_graph: bool = False, only: str | None = None,
                 reference: str | None = None, backends: Sequence[str] | None = None):
    """Runners by label (the PyTorch eager baseline first) and the label of the baseline, if any.

    ``reference`` is the PyTorch baseline's model when the user names it (needed for an artifact made
    from a user's ``pkg.mod:factory``: a file never chooses code to import).

    ``only`` builds just the runner with that label (the memory probe measures one backend alone:
    an ONNX Runtime process must not import torch). torch is imported only for a PyTorch runner.

    ``backends`` (``onnxruntime``, ``openvino``, ``openvino-bf16``...) runs every ONNX file on each of them, side by
    side in one run, labelled ``FILE [backend]``; ``providers`` then applies to ONNX Runtime's rows.
    """
    if backends:
        from runtime.openvino_runner import PROVIDERS

        unknown = [b for b in backends if b != "onnxruntime" and b not in PROVIDERS]
        if unknown:
            raise BadInputError(f"--backends {','.join(unknown)}: unknown",
                                hint=f"use onnxruntime, {', '.join(PROVIDERS)}")
    if not specs:
        raise BadInputError("nothing to benchmark", hint="give .onnx/.engine files or a model name")
    if threads and (only is None or only == TORCH_BASELINE or artifact_kind(only) == "model"):
        import torch

        torch.set_num_threads(threads)
    runners: dict = {}
    baseline = None
    artifacts = [s for s in specs if artifact_kind(s) in ("onnx", "engine")]
    if torch_baseline and artifacts and all(artifact_kind(s) != "model" for s in specs):
        baseline = TORCH_BASELINE
        if only in (None, TORCH_BASELINE):
            from runtime.validate import artifact_record, import_registry, resolve_reference

            import_registry()   # one line saying torch is missing, rather than an ImportError
            from runtime.torch_runner import TorchRunner

            model = resolve_reference(artifact_record(artifacts[0]), reference, checkpoint=checkpoint,
                                      artifact=artifacts[0])
            runners[TORCH_BASELINE] = TorchRunner(model, name=TORCH_BASELINE, device=device)
    labels = {TORCH_BASELINE} if baseline else set()
    for spec in specs:
        label = label_for(spec, labels)
        labels.add(label)
        if artifact_kind(spec) == "model" and baseline is None:
            baseline = label
        choices = [(label, providers)]
        if backends and artifact_kind(spec) == "onnx":
            choices = [(f"{label} [{b}]", providers if b == "onnxruntime" else [b]) for b in backends]
            labels.update(name for name, _ in choices)
        for name, chosen in choices:
            if only in (None, name):
                runners[name] = open_runner(spec, providers=chosen, threads=threads, checkpoint=checkpoint,
                                            name=name, device=device, cuda_graph=cuda_graph)
    return runners, baseline


def default_shapes(specs: Sequence[str]) -> list[ShapeSet]:
    """64x64 for every input, batch 1, channels from the first ONNX's record (3 when unknown)."""
    from runtime.validate import artifact_record

    channels = {"x1": 3, "x2": 3}
    for spec in specs:
        if artifact_kind(spec) == "onnx":
            channels = artifact_record(spec).get("inputs") or channels
            break
    return [{name: (1, c, 64, 64) for name, c in channels.items()}]


def with_batches(shape_sets: list[ShapeSet], batches: Sequence[int]) -> list[ShapeSet]:
    if not batches:
        return shape_sets
    if any(b < 1 for b in batches):
        raise BadInputError("--batch values must be at least 1")
    return [{n: (b, *s[1:]) for n, s in shapes.items()} for shapes in shape_sets for b in batches]


def work_counter(specs: Sequence[str]):
    """FLOPs/bytes from the first fp32 ONNX among the specs (cached per shape set), or None."""
    from runtime.validate import artifact_record

    source = next((s for s in specs if artifact_kind(s) == "onnx"
                   and artifact_record(s).get("precision", "fp32") == "fp32"), None)
    if source is None:
        return None
    cache: dict[str, Work] = {}

    def count(shapes: ShapeSet) -> Work:
        key = repr(sorted(shapes.items()))
        if key not in cache:
            cache[key] = count_work(source, shapes)
        return cache[key]

    return count


def isolated_peak_rss(specs: Sequence[str], label: str, shape_sets: Sequence[ShapeSet], *, threads=None,
                      providers=None, checkpoint=None, torch_baseline=True, reference=None,
                      backends=None) -> list[float | None]:
    """Peak RSS (MiB) of one backend alone at each shape set, each in a fresh Python process.

    In the benchmark process every backend's memory is mixed together; a separate process per backend
    is the only honest per-backend figure on a CPU. One process per shape set too: allocators keep what
    a large set took (ONNX Runtime's arena did: 749 MiB after a 96x96 set, then 749 MiB at 6x6), so a
    figure measured after another set would be that set's.
    """
    import subprocess
    import sys

    peaks: list[float | None] = []
    for shapes in shape_sets:
        request = {"specs": list(specs), "label": label, "shapes": format_shape_set(shapes), "threads": threads,
                   "providers": providers, "checkpoint": checkpoint, "torch_baseline": torch_baseline,
                   "reference": reference, "backends": list(backends) if backends else None}
        code = "import json, sys; from runtime.bench_setup import _memory_probe; _memory_probe(json.loads(sys.argv[1]))"
        done = subprocess.run([sys.executable, "-c", code, json.dumps(request)], capture_output=True, text=True)
        peaks.append(json.loads(done.stdout.strip().splitlines()[-1]) if done.returncode == 0 else None)
    return peaks


def _memory_probe(request: dict) -> None:
    from xattn.shapes import parse_shape_set

    runners, _ = make_runners(request["specs"], threads=request["threads"], providers=request["providers"],
                              checkpoint=request["checkpoint"], torch_baseline=request["torch_baseline"],
                              only=request["label"], reference=request.get("reference"),
                              backends=request.get("backends"))
    with runners[request["label"]] as runner:
        runner.infer(random_feed(parse_shape_set(request["shapes"]), seed=0))
    print(json.dumps(peak_rss_mb()))
