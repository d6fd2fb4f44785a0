"""The folders form floors: each imports only the ones below it, lazy imports (inside functions) included.

    xattn/  <-  runtime/  <-  exporter/  <-  calibration/  <-  tools/

runtime owns the runners and validation; exporter verifies its files with those runners; calibration uses the
exporter's attention rewrites and FP16 conversion; tools is the command line over all of them. What more than one
floor reads (the model registry, ONNX reading, TensorRT plans and caches) lives on the ground floor, ``xattn/``.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FLOORS = ["xattn", "runtime", "exporter", "calibration", "tools"]


def imports_of(path: Path) -> list[tuple[int, str]]:
    """(line, module) of every absolute import of one of the project's folders in ``path``, at any depth."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module] + ([f"{node.module}.{a.name}" for a in node.names] if node.module in FLOORS else [])
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            continue
        found += [(node.lineno, name) for name in names if name.split(".")[0] in FLOORS]
    return found


def project_modules() -> dict[str, Path]:
    return {".".join(p.relative_to(ROOT).with_suffix("").parts): p for floor in FLOORS for p in (ROOT / floor).glob("*.py")}


def test_no_folder_imports_one_above_it():
    upward = []
    for module, path in project_modules().items():
        floor = FLOORS.index(module.split(".")[0])
        for line, name in imports_of(path):
            if FLOORS.index(name.split(".")[0]) > floor:
                upward.append(f"{path.relative_to(ROOT)}:{line} imports {name}")
    assert not upward, "imports from a higher floor:\n" + "\n".join(upward)


def test_no_two_modules_import_each_other():
    modules = project_modules()
    graph = {m: {name for _, name in imports_of(p) if name in modules and name != m} for m, p in modules.items()}
    mutual = sorted(f"{a} <-> {b}" for a, targets in graph.items() for b in targets if a < b and a in graph[b])
    assert not mutual, "modules that import each other: " + ", ".join(mutual)


def test_the_check_sees_lazy_imports(tmp_path):
    """The checks above would pass vacuously if imports inside functions were missed: they are not."""
    probe = tmp_path / "probe.py"
    probe.write_text("import os\n\ndef late():\n    from exporter.attention import find_attention\n    import tools.cli\n"
                     "    from xattn import registry\n")
    assert imports_of(probe) == [(4, "exporter.attention"), (5, "tools.cli"), (6, "xattn"), (6, "xattn.registry")]
