"""The one way an ONNX file is read (:func:`load_onnx`: one clear error for a missing, truncated or foreign file)
and written: sorted, checked, then moved into place atomically.

Every writer (export, FP16, INT8, the attention rewrites) saves through :func:`save_onnx`, so no file
the toolkit writes can skip the checks: nodes in topological order (``onnx.checker`` and other
consumers require it; ONNX Runtime alone tolerates disorder), ``onnx.checker.check_model(full_check=True)``
and strict shape inference. A model that fails them is a bug in the writer, reported as such, and the
destination file is left untouched.
"""

from __future__ import annotations

import os
from pathlib import Path

from xattn.errors import ArtifactError, CalibrationError, CheckFailedError
from xattn.fileio import atomic_path


def load_onnx(path: str | os.PathLike):
    """Load an ONNX model with a clear error for missing, truncated or foreign files."""
    import onnx

    path = Path(path)
    if path.is_dir():
        raise ArtifactError(f"{path} is a folder, not an ONNX file")
    if not path.is_file():
        raise ArtifactError(f"ONNX file {path} does not exist")
    try:
        with open(path, "rb") as handle:   # a file object: onnx's path argument must be valid UTF-8
            model = onnx.load(handle)
    except Exception as exc:
        raise ArtifactError(f"{path} is not a readable ONNX file ({' '.join(str(exc).split())[:120]})",
                            hint="is it truncated? re-export it") from exc
    if not model.graph.node and not model.graph.input:
        raise ArtifactError(f"{path} is not an ONNX model (no graph)", hint="is it truncated? re-export it")
    return model


def topological_sort(graph) -> None:
    """Reorder ``graph.node`` so every node comes after the producers of its inputs (stable, in place).

    Inputs produced by nobody (graph inputs, initializers, empty optional inputs) count as available.
    Subgraphs' outer-scope references are not followed: a node with a subgraph is placed by its own
    inputs, which is what the checker requires of the main graph.
    """
    nodes = list(graph.node)
    produced_by = {}
    for index, node in enumerate(nodes):
        for name in node.output:
            if name:
                produced_by[name] = index
    waiting = [0] * len(nodes)
    users: dict[int, list[int]] = {}
    for index, node in enumerate(nodes):
        producers = {produced_by[name] for name in _all_inputs(node) if name in produced_by}
        producers.discard(index)
        waiting[index] = len(producers)
        for producer in producers:
            users.setdefault(producer, []).append(index)
    import heapq

    ready = [i for i, count in enumerate(waiting) if count == 0]
    heapq.heapify(ready)
    order = []
    while ready:
        index = heapq.heappop(ready)   # the smallest original index first: keeps the order stable
        order.append(index)
        for user in users.get(index, []):
            waiting[user] -= 1
            if waiting[user] == 0:
                heapq.heappush(ready, user)
    if len(order) != len(nodes):
        stuck = [nodes[i].name or nodes[i].op_type for i in range(len(nodes)) if i not in set(order)]
        raise CheckFailedError(f"the graph has a cycle through {', '.join(stuck[:5])}")
    del graph.node[:]
    graph.node.extend(nodes[i] for i in order)


def _all_inputs(node) -> list[str]:
    """A node's inputs plus the outer-scope names its subgraphs read (If/Loop/Scan bodies)."""
    names = [n for n in node.input if n]
    for attribute in node.attribute:
        graphs = list(attribute.graphs) + ([attribute.g] if attribute.HasField("g") else [])
        for sub in graphs:
            local = {i.name for i in sub.input} | {i.name for i in sub.initializer}
            for inner in sub.node:
                local.update(inner.output)
            for inner in sub.node:
                names.extend(n for n in _all_inputs(inner) if n not in local)
    return names


def check_onnx(model, where: str = "the model") -> None:
    """Raise :class:`CheckFailedError` unless ``model`` passes the full checker and strict shape inference."""
    import onnx

    try:
        onnx.checker.check_model(model, full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckFailedError(f"{where} fails onnx.checker: {first}",
                               hint="this is a bug in the step that wrote it; please report it") from exc


def save_onnx(model, path: str | os.PathLike, *, where: str | None = None, probe: bool = True) -> Path:
    """Sort, check (see the module docstring) and atomically write ``model`` to ``path``; with ``probe``, the
    ONNX Runtime level at which it loads without a native crash is kept in its record
    (:func:`xattn.ort_session.record_safe_level`).

    Large models (over protobuf's 2 GiB) are not supported by this path: none of the toolkit's writers
    produces one, and the checker needs the model in memory anyway.
    """
    import onnx

    topological_sort(model.graph)
    check_onnx(model, where or Path(path).name)
    if probe:
        from xattn.ort_session import record_safe_level

        record_safe_level(model, where or Path(path).name)
    with atomic_path(path) as tmp:
        onnx.save(model, str(tmp))
    return Path(path)


def refresh_value_info(model) -> None:
    """Drop intermediate value_info and infer it again (strictly): after a rewrite, stale types or shapes
    recorded by the exporter would contradict the new nodes."""
    import onnx

    del model.graph.value_info[:]
    topological_sort(model.graph)
    inferred = onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True, data_prop=True)
    model.graph.value_info.extend(inferred.graph.value_info)


def tensor_names(model) -> set[str]:
    """Every tensor a graph computes or takes: its inputs and every node's outputs."""
    names = {i.name for i in model.graph.input}
    for node in model.graph.node:
        names.update(node.output)
    return names


def require_tensors(model, names, source: str) -> None:
    """Raise a :class:`CalibrationError` unless every tensor in ``names`` exists in ``model``.

    Range tables and TensorRT caches name tensors; one that names tensors the model does not have
    was made for another model.
    """
    foreign = [n for n in names if n not in tensor_names(model)]
    if foreign:
        raise CalibrationError(f"{source} was made for another model: tensors {', '.join(foreign[:4])}"
                               f"{' and more' if len(foreign) > 4 else ''} are not in this one",
                               hint="calibrate this model again ('xattn calibrate', with --cache for TensorRT)")
