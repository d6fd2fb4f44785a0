"""Glue between the command line and runtime.bench: which runners, which shapes, which work counter."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from runtime.bench import Work, count_work
from runtime.open import artifact_kind, open_runner
from xattn.errors import BadInputError
from xattn.shapes import ShapeSet, parse_shape_set


def label_for(spec: str, taken: set[str]) -> str:
    label = Path(spec).name if artifact_kind(spec) != "model" else f"torch:{spec}"
    base, n = label, 2
    while label in taken:
        label, n = f"{base}#{n}", n + 1
    return label


def make_runners(specs: Sequence[str], *, threads: int | None, providers, checkpoint: str | None, torch_baseline: bool,
                 device: str = "cpu", cuda_graph: bool = False):
    """Runners by label (the PyTorch eager baseline first) and the label of the baseline, if any."""
    from runtime.validate import artifact_record, resolve_reference
    from runtime.torch_runner import TorchRunner

    if not specs:
        raise BadInputError("nothing to benchmark", hint="give .onnx/.engine files or a model name")
    if threads:
        import torch

        torch.set_num_threads(threads)
    runners: dict = {}
    baseline = None
    onnx_specs = [s for s in specs if artifact_kind(s) == "onnx"]
    if torch_baseline and all(artifact_kind(s) != "model" for s in specs) and onnx_specs:
        record = artifact_record(onnx_specs[0])
        model = resolve_reference(record, checkpoint=checkpoint, artifact=onnx_specs[0])
        runners["torch eager"] = TorchRunner(model, name="torch eager", device=device)
        baseline = "torch eager"
    for spec in specs:
        label = label_for(spec, set(runners))
        runners[label] = open_runner(spec, providers=providers, threads=threads, checkpoint=checkpoint, name=label,
                                     device=device, cuda_graph=cuda_graph)
        if artifact_kind(spec) == "model" and baseline is None:
            baseline = label
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


def parse_shapes_list(texts) -> list[ShapeSet]:
    return [t if isinstance(t, dict) else parse_shape_set(t) for t in texts]
