"""The CI accuracy gate: a TOML file lists artifacts and thresholds; every one is validated.

Example (paths are relative to the gate file)::

    [defaults]                       # applies to every artifact; each key may be overridden per artifact
    shapes = ["x1:1x3x64x64,x2:1x3x48x80", "x1:2x3x40x24,x2:2x3x24x56"]
    samples = 2
    seed = 0

    [baseline]                       # used with --baseline previous.json
    max_regression = 0.25            # fail when rel. L2 grew by more than 25% ...
    min_delta = 1e-6                 # ... and by more than this absolute amount (noise floor)

    [reports]                        # optional; command-line options override
    json = "reports/accuracy.json"
    junit = "reports/accuracy.xml"
    markdown = "reports/accuracy.md"

    [[artifacts]]
    path = "artifacts/model.onnx"    # precision is read from the file when not given

    [[artifacts]]
    path = "artifacts/model.int8.onnx"
    precision = "int8"
    max_rel_l2 = 0.02
    min_cosine = 0.999

Unknown keys, wrong types and missing artifacts are refused (exit 2) before anything runs.
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from runtime.tolerances import PRECISIONS
from runtime.validate import ValidationResult
from xattn.errors import ArtifactError, BadInputError, UntrustedCodeError
from xattn.shapes import ShapeSet, parse_shape_set

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

# key -> accepted types, for [defaults] and [[artifacts]] entries alike
_SETTING_TYPES: dict[str, tuple[type, ...]] = {
    "shapes": (list,), "samples": (int,), "seed": (int,), "providers": (list,), "threads": (int,),
    "reference": (str,), "checkpoint": (str,), "model_args": (dict,), "data": (str,), "precision": (str,),
    "max_rel_l2": (float, int), "min_cosine": (float, int), "atol": (float, int), "rtol": (float, int),
    "max_outlier_fraction": (float, int),
}
_ARTIFACT_ONLY = {"path": (str,), "name": (str,)}
_BASELINE_TYPES = {"max_regression": (float, int), "min_delta": (float, int)}
_REPORT_TYPES = {"json": (str,), "junit": (str,), "markdown": (str,)}
_TOP_LEVEL = {"defaults", "artifacts", "baseline", "reports"}


class GateFileError(BadInputError):
    """The gate file is malformed."""


@dataclass
class GateArtifact:
    name: str
    path: Path
    settings: dict[str, Any]

    @property
    def shapes(self) -> list[ShapeSet]:
        return [parse_shape_set(s) for s in self.settings.get("shapes", [])]


@dataclass
class GateConfig:
    source: Path
    artifacts: list[GateArtifact]
    max_regression: float = 0.25
    min_delta: float = 1e-6
    reports: dict[str, Path] = field(default_factory=dict)


def _check_table(table: Any, types: dict[str, tuple[type, ...]], where: str, source: Path) -> dict[str, Any]:
    if not isinstance(table, dict):
        raise GateFileError(f"{source}: {where} must be a table")
    for key, value in table.items():
        if key not in types:
            raise GateFileError(f"{source}: unknown key {key!r} in {where}",
                                hint=f"allowed: {', '.join(sorted(types))}")
        allowed = types[key]
        if isinstance(value, bool) or not isinstance(value, allowed):
            names = " or ".join(t.__name__ for t in allowed)
            raise GateFileError(f"{source}: {where}.{key} must be {names}, got {type(value).__name__} {value!r}")
        # TOML has nan and inf: a threshold of nan passes every comparison, so it is no threshold at all
        if isinstance(value, float) and not math.isfinite(value):
            raise GateFileError(f"{source}: {where}.{key} is {value!r}, not a finite number")
        if isinstance(value, (int, float)) and value < 0 and key != "min_cosine":
            raise GateFileError(f"{source}: {where}.{key} is {value!r}; it cannot be negative")
    return dict(table)


def _check_settings(settings: dict[str, Any], where: str, source: Path) -> None:
    for shape_text in settings.get("shapes", []):
        if not isinstance(shape_text, str):
            raise GateFileError(f"{source}: {where}.shapes must be a list of strings like 'x1:1x3x64x64,x2:1x3x32x32'")
        parse_shape_set(shape_text)
    if "precision" in settings and settings["precision"] not in PRECISIONS:
        raise GateFileError(f"{source}: {where}.precision {settings['precision']!r} is not one of {', '.join(PRECISIONS)}")
    if "samples" in settings and settings["samples"] < 1:
        raise GateFileError(f"{source}: {where}.samples must be at least 1")
    if any(not isinstance(p, str) for p in settings.get("providers", [])):
        raise GateFileError(f"{source}: {where}.providers must be a list of strings")


#: a reference ending so is another artifact (data, compared against), never code to import
ARTIFACT_SUFFIXES = (".onnx", ".engine", ".plan", ".trt")


def _check_code_references(settings: dict[str, Any], where: str, source: Path, allowed: frozenset[str]) -> None:
    """A gate file is data: a ``pkg.mod:name`` it names is imported only if the user allowed that reference."""
    from xattn.registry import BUILTIN_MODELS

    candidates = []
    reference = settings.get("reference")
    if reference and reference not in BUILTIN_MODELS and not reference.lower().endswith(ARTIFACT_SUFFIXES):
        candidates.append(("reference", reference))
    data = settings.get("data")
    if data and ":" in data and not (source.parent / data).exists() and not Path(data).exists():
        candidates.append(("data", data))
    for key, ref in candidates:
        if ref not in allowed:
            raise UntrustedCodeError(f"{source}: {where}.{key} names code to import ({ref!r}); a gate file never "
                                     "chooses code for the toolkit to run",
                                     hint=f"if you trust it, allow it on the command line: --allow-import {ref}")


def load_gate(path: str | Path, allow_imports: frozenset[str] | set[str] | tuple[str, ...] = ()) -> GateConfig:
    """Read and check a gate file; artifact paths are resolved against its folder.

    Args:
        path: the TOML gate file.
        allow_imports: ``pkg.mod:name`` references the user allows the file to name (``reference``
            and ``data`` keys); any other reference in the file is refused before anything runs.
    """
    allowed = frozenset(allow_imports)
    source = Path(path)
    if not source.is_file():
        raise GateFileError(f"gate file {source} does not exist")
    try:
        data = tomllib.loads(source.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise GateFileError(f"{source} is not valid TOML: {exc}") from exc
    unknown = sorted(set(data) - _TOP_LEVEL)
    if unknown:
        raise GateFileError(f"{source}: unknown section {', '.join(map(repr, unknown))}",
                            hint=f"allowed: {', '.join(sorted(_TOP_LEVEL))}")
    defaults = _check_table(data.get("defaults", {}), _SETTING_TYPES, "[defaults]", source)
    _check_settings(defaults, "[defaults]", source)
    _check_code_references(defaults, "[defaults]", source, allowed)
    baseline = _check_table(data.get("baseline", {}), _BASELINE_TYPES, "[baseline]", source)
    reports = _check_table(data.get("reports", {}), _REPORT_TYPES, "[reports]", source)
    entries = data.get("artifacts")
    if not isinstance(entries, list) or not entries:
        raise GateFileError(f"{source}: no [[artifacts]] entries", hint="add [[artifacts]] with path = \"model.onnx\"")
    artifacts, names = [], set()
    for index, entry in enumerate(entries):
        where = f"artifacts[{index}]"
        table = _check_table(entry, {**_SETTING_TYPES, **_ARTIFACT_ONLY}, where, source)
        if "path" not in table:
            raise GateFileError(f"{source}: {where} has no path")
        _check_settings(table, where, source)
        _check_code_references(table, where, source, allowed)
        artifact_path = (source.parent / table.pop("path")).resolve()
        if not artifact_path.exists():
            raise ArtifactError(f"{source}: {where} names {artifact_path}, which does not exist",
                                hint="build the artifact first, or fix the path (relative to the gate file)")
        name = table.pop("name", None) or artifact_path.name
        if name in names:
            raise GateFileError(f"{source}: two artifacts are named {name!r}", hint="give each a distinct name")
        names.add(name)
        settings = {**defaults, **table}
        if "checkpoint" in settings:
            settings["checkpoint"] = str((source.parent / settings["checkpoint"]).resolve())
        if str(settings.get("reference", "")).lower().endswith(ARTIFACT_SUFFIXES):
            reference = (source.parent / settings["reference"]).resolve()
            if not reference.exists():
                raise ArtifactError(f"{source}: {where}.reference names {reference}, which does not exist")
            settings["reference"] = str(reference)
        # data may also be a keyword ("shipped") or pkg.mod:function: only paths are made relative
        if "data" in settings and (source.parent / settings["data"]).exists():
            settings["data"] = str((source.parent / settings["data"]).resolve())
        artifacts.append(GateArtifact(name, artifact_path, settings))
    return GateConfig(source, artifacts, float(baseline.get("max_regression", 0.25)),
                      float(baseline.get("min_delta", 1e-6)),
                      {k: (source.parent / v) for k, v in reports.items()})


def load_baseline(path: str | Path) -> dict[tuple[str, str, str], float]:
    """``(artifact, shapes, output) -> rel_l2`` from an earlier JSON report."""
    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"baseline {path} does not exist")
    try:
        data = json.loads(path.read_text())
        table = {}
        for artifact in data["artifacts"]:
            for case in artifact["cases"]:
                table[(artifact["artifact"], case["shapes"], case["output"])] = float(case["rel_l2"])
        return table
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        raise ArtifactError(f"baseline {path} is not an xattn JSON report",
                            hint="use the --json-report of an earlier gate or validate run") from exc


def find_regressions(result: ValidationResult, baseline: dict[tuple[str, str, str], float],
                     max_regression: float, min_delta: float) -> list[str]:
    """Cases whose relative L2 grew by more than ``max_regression`` (relative) and ``min_delta`` (absolute)."""
    found = []
    for case in result.cases:
        old = baseline.get((result.artifact, case.shapes, case.output))
        new = case.metrics.rel_l2
        if old is None:
            continue
        if new > old * (1.0 + max_regression) and new - old > min_delta:
            found.append(f"{case.output} @ {case.shapes}: relative L2 {new:.4g} vs baseline {old:.4g} "
                         f"(+{(new / old - 1) if old else float('inf'):.0%}, allowed +{max_regression:.0%})")
    return found


def run_gate(config: GateConfig, validate_artifact: Callable[[GateArtifact], ValidationResult],
             baseline: dict | None = None) -> list[ValidationResult]:
    """Validate every artifact (with ``validate_artifact``) and add baseline regressions."""
    results = []
    for artifact in config.artifacts:
        result = validate_artifact(artifact)
        if baseline is not None:
            result.regressions = find_regressions(result, baseline, config.max_regression, config.min_delta)
        results.append(result)
    return results
