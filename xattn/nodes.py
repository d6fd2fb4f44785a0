"""Which ONNX nodes an option names: op types, the pseudo-type ``Linear``, and PyTorch module paths.

``--quantize-ops`` takes ONNX op types plus ``Linear``: a ``Gemm``, or a ``MatMul`` whose second input
is a weight (an initializer): the projections of ``nn.Linear``, never the attention matmuls, whose two
inputs are both activations. ``--exclude-modules`` takes PyTorch module paths (``stem1.*``), read from
what the exporter recorded on each node: the torch.export-based exporter writes the module scopes in
the node's ``pkg.torch.onnx.name_scopes`` metadata; the TorchScript exporter names nodes
``/stem1/stem1.0/Conv``.
"""

from __future__ import annotations

import ast
import fnmatch
from typing import Iterable, Sequence

LINEAR = "Linear"


def is_linear(node, initializers: set[str]) -> bool:
    return node.op_type == "Gemm" or (node.op_type == "MatMul" and len(node.input) > 1
                                      and node.input[1] in initializers)


def selected(node, op_types: Sequence[str], initializers: set[str]) -> bool:
    """Whether ``node`` is of one of ``op_types`` (``Linear`` as above)."""
    return node.op_type in op_types or (LINEAR in op_types and is_linear(node, initializers))


def selected_nodes(model, op_types: Sequence[str]) -> list:
    initializers = {i.name for i in model.graph.initializer}
    return [node for node in model.graph.node if selected(node, op_types, initializers)]


def attribute(node, name: str, default=None):
    """The value of ``node``'s attribute ``name`` (decoded by onnx), or ``default``."""
    from onnx import helper

    return next((helper.get_attribute_value(a) for a in node.attribute if a.name == name), default)


def input_readers(graph) -> dict[str, list]:
    """Tensor name -> ``[(node, input index), ...]`` of the nodes of ``graph`` that read it."""
    readers: dict[str, list] = {}
    for node in graph.node:
        for index, name in enumerate(node.input):
            readers.setdefault(name, []).append((node, index))
    return readers


def module_of(node) -> str | None:
    """The PyTorch module path a node came from, or None when the exporter recorded none."""
    for prop in node.metadata_props:
        if prop.key == "pkg.torch.onnx.name_scopes":
            try:
                scopes = ast.literal_eval(prop.value)
            except (ValueError, SyntaxError):
                return None
            # the last scope is the op itself ('conv2d'); the one before is the innermost module
            return scopes[-2] or None if isinstance(scopes, list) and len(scopes) >= 2 else None
    if node.name.startswith("/") and node.name.count("/") >= 2:
        parts = [p for p in node.name.split("/")[1:-1] if p]
        return parts[-1] if parts and "." in parts[-1] else ".".join(parts) or None
    return None


def node_label(name: str, module: str | None) -> str:
    """``node_conv2d_5 (attention.conv_key)``: a node as users know it, by the PyTorch module it came from."""
    return f"{name} ({module})" if module else name


def nodes_in_modules(nodes: Iterable, patterns: Sequence[str]) -> tuple[list[str], list[str]]:
    """(names of the nodes whose module matches any of ``patterns``, patterns that matched nothing).

    A pattern matches a module path by shell wildcards (``stem1.*``), or as the path itself or a
    parent of it (``stem1`` matches ``stem1.0``).
    """
    names, used = [], set()
    for node in nodes:
        module = module_of(node)
        if module is None:
            continue
        for pattern in patterns:
            if fnmatch.fnmatchcase(module, pattern) or module == pattern or module.startswith(pattern + "."):
                names.append(node.name)
                used.add(pattern)
                break
    return names, [p for p in patterns if p not in used]
