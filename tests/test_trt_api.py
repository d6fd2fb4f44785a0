"""Every TensorRT name the code touches exists in the bindings of each version where that code runs.

TensorRT cannot be installed here, so the name lists in tests/trt_api/ (identifiers found in the
official bindings wheels of 10.3, 10.13 and 11.4; copied from shared/trt-api) stand in. Code that touches TensorRT sits in functions marked
``@runs_on("10.x" | "10.9+" | "11.x")``; for each such function the test collects the attributes read
from TensorRT objects (the ``trt`` module and variables holding TensorRT objects: builder, network,
config, engine, context...) and the callback methods of classes derived from TensorRT classes, and
looks each one up in the lists of those versions. Enum members are bare names in the lists, so some
members are also checked qualified: ``BuilderFlag.INT8`` must not appear on an 11.x path even though
``INT8`` lives on as a DataType.
"""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
API_DIR = Path(__file__).resolve().parent / "trt_api"
SOURCES = [ROOT / "exporter" / "trt_build.py", ROOT / "runtime" / "tensorrt_runner.py", ROOT / "xattn" / "tensorrt.py"]
VERSION_FILES = {"10.x": ["tensorrt-10.3.0.txt", "tensorrt-10.13.3.9.txt"], "10.9+": ["tensorrt-10.13.3.9.txt"],
                 "11.x": ["tensorrt-11.4.0.106.txt"]}
# Variables (or self attributes) that hold TensorRT objects in our code.
TRT_ROOTS = {"trt", "builder", "network", "parser", "config", "profile", "engine", "context", "runtime", "logger",
             "serialized"}
# Defined in tensorrt/__init__.py (Python), not in the bindings the lists were made from.
PYTHON_LEVEL = {"__version__", "__init__"}
# Qualified names that exist only in 10.x (their bare member names may survive elsewhere in 11.x).
TEN_ONLY_QUALIFIED = {("BuilderFlag", "INT8"), ("BuilderFlag", "FP16"), ("NetworkDefinitionCreationFlag", "EXPLICIT_BATCH"),
                      ("BuilderFlag", "OBEY_PRECISION_CONSTRAINTS"), ("BuilderFlag", "PREFER_PRECISION_CONSTRAINTS")}


def load_names(version_key):
    names = []
    for filename in VERSION_FILES[version_key]:
        names.append(set((API_DIR / filename).read_text().split()))
    return names


def exists(name, names):
    # The linker can merge a name into the tail of a longer one (INT8 inside UINT8): a suffix counts.
    return name in names or any(other.endswith(name) for other in names)


def _root(node):
    """The root name of an attribute chain: trt.BuilderFlag.FP16 -> trt; self.engine.x -> engine."""
    while isinstance(node, ast.Attribute):
        if isinstance(node.value, ast.Name) and node.value.id == "self":
            return node.attr
        node = node.value
    return node.id if isinstance(node, ast.Name) else None


def trt_uses(func):
    """(name, qualifier, line) for each TensorRT attribute read in ``func`` and each TensorRT callback defined."""
    uses = []
    for node in ast.walk(func):
        if isinstance(node, ast.Attribute) and _root(node.value) in TRT_ROOTS:
            qualifier = node.value.attr if isinstance(node.value, ast.Attribute) else None
            if not (isinstance(node.value, ast.Name) and node.value.id == "self"):
                uses.append((node.attr, qualifier, node.lineno))
        if isinstance(node, ast.ClassDef) and any(_root(b) == "trt" for b in node.bases):
            base_names = {b.attr for b in node.bases if isinstance(b, ast.Attribute)}
            for item in node.body:
                if isinstance(item, ast.FunctionDef) and item.name != "__init__" and not item.name.startswith("_"):
                    uses.append((item.name, next(iter(base_names), None), item.lineno))
    return uses


def runs_on(func):
    for decorator in func.decorator_list:
        if isinstance(decorator, ast.Call) and getattr(decorator.func, "id", None) == "runs_on":
            return [arg.value for arg in decorator.args]
    return None


def touches_trt(func):
    """Uses the trt module, or reads an attribute of a TensorRT object (assigning self.engine = None does not count)."""
    return any(isinstance(n, ast.Name) and n.id == "trt" for n in ast.walk(func)) or \
        any(isinstance(n, ast.Attribute) and isinstance(n.ctx, ast.Load) and _root(n.value) in TRT_ROOTS
            and not (isinstance(n.value, ast.Name) and n.value.id == "self") for n in ast.walk(func))


def check_source(source, filename="<source>"):
    """All problems found in ``source``: names missing in a version, 10.x-only names on 11.x, unmarked functions."""
    problems = []
    tree = ast.parse(source)
    inherits = set()   # functions nested in a marked function run where it runs
    for func in ast.walk(tree):
        if isinstance(func, ast.FunctionDef) and runs_on(func):
            inherits.update(id(n) for n in ast.walk(func) if isinstance(n, ast.FunctionDef) and n is not func)
    for func in ast.walk(tree):
        if not isinstance(func, (ast.FunctionDef, ast.AsyncFunctionDef)) or id(func) in inherits:
            continue
        versions = runs_on(func)
        if versions is None:
            if touches_trt(func) and func.name not in {"import_tensorrt"}:
                problems.append(f"{filename}:{func.lineno} {func.name} touches TensorRT without @runs_on")
            continue
        for version in versions:
            lists = load_names(version)
            for name, qualifier, line in trt_uses(func):
                if name in PYTHON_LEVEL:
                    continue
                if version == "11.x" and (qualifier, name) in TEN_ONLY_QUALIFIED:
                    problems.append(f"{filename}:{line} {func.name}: {qualifier}.{name} does not exist in TensorRT 11")
                    continue
                for names, file in zip(lists, VERSION_FILES[version]):
                    if not exists(name, names):
                        problems.append(f"{filename}:{line} {func.name}: {name} is not in {file}")
    return problems


def test_our_tensorrt_code_uses_only_names_that_exist_where_it_runs():
    problems = []
    for path in SOURCES:
        problems += check_source(path.read_text(), path.name)
    assert problems == []


def test_every_version_key_is_used_correctly():
    """Sanity: the marks in our sources name known version keys, and both majors are covered."""
    seen = set()
    for path in SOURCES:
        for func in ast.walk(ast.parse(path.read_text())):
            if isinstance(func, ast.FunctionDef) and runs_on(func):
                seen.update(runs_on(func))
    assert seen <= set(VERSION_FILES) and {"10.x", "11.x"} <= seen


@pytest.mark.parametrize("source, message", [
    ('@runs_on("10.x", "11.x")\ndef run(self):\n    self.context.execute_async_v2([], 0)\n',
     "execute_async_v2 is not in tensorrt-10.3.0.txt"),
    ('@runs_on("10.x", "11.x")\ndef build(trt, config):\n    config.set_flag(trt.BuilderFlag.FP16)\n',
     "FP16 does not exist in TensorRT 11"),
    ('@runs_on("11.x")\ndef build(trt, config):\n    config.set_flag(trt.BuilderFlag.INT8)\n',
     "BuilderFlag.INT8 does not exist in TensorRT 11"),
    ('@runs_on("10.x", "11.x")\ndef cal(trt):\n    class C(trt.IInt8EntropyCalibrator2):\n        pass\n',
     "IInt8EntropyCalibrator2 is not in tensorrt-11.4.0.106.txt"),
    ('@runs_on("10.x")\ndef cfg(trt, config):\n    config.hardware_compatibility_level = '
     'trt.HardwareCompatibilityLevel.SAME_COMPUTE_CAPABILITY\n', "SAME_COMPUTE_CAPABILITY is not in tensorrt-10.3.0.txt"),
    ('@runs_on("10.x")\ndef old(builder, network):\n    builder.build_engine(network)\n',
     "build_engine is not in tensorrt-10.3.0.txt"),
    ('def sneaky(trt):\n    return trt.Builder\n', "sneaky touches TensorRT without @runs_on"),
])
def test_the_check_catches_real_mistakes(source, message):
    problems = check_source(source)
    assert any(message in p for p in problems), problems


def test_the_check_accepts_correct_code():
    source = ('@runs_on("10.x", "11.x")\ndef run(self, trt):\n    self.context.execute_async_v3(0)\n'
              '    return trt.Logger(trt.Logger.WARNING)\n')
    assert check_source(source) == []
