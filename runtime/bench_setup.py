"""Setting up a benchmark: which runners, which shapes, which work counter (shared by the CLI, the main job
and the memory probe of :mod:`runtime.bench`)."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from runtime.bench import Work, count_work
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
                 reference: str | None = None):
    """Runners by label (the PyTorch eager baseline first) and the label of the baseline, if any.

    ``reference`` is the PyTorch baseline's model when the user names it (needed for an artifact made
    from a user's ``pkg.mod:factory``: a file never chooses code to import).

    ``only`` builds just the runner with that label (the memory probe measures one backend alone:
    an ONNX Runtime process must not import torch). torch is imported only for a PyTorch runner.
    """
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
        if only in (None, label):
            runners[label] = open_runner(spec, providers=providers, threads=threads, checkpoint=checkpoint,
                                         name=label, device=device, cuda_graph=cuda_graph)
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
