"""Validation reports: JSON (everything), JUnit XML (CI test reporters), Markdown (humans, job summaries).

JUnit: one ``<testsuite>`` per artifact, one ``<testcase>`` per shape set x output, named
``<output> @ <shapes>``; a failing case carries ``<failure message=...>`` with the figures, so Jenkins,
GitLab and GitHub test reporters show why it failed without opening the JSON.
"""

from __future__ import annotations

import json
import math
import os
import xml.etree.ElementTree as ET
from typing import Sequence

from runtime.validate import ValidationResult
from xattn.environment import library_versions
from xattn.fileio import check_writable, write_text_atomic
from xattn.provenance import base_record


def json_report(results: Sequence[ValidationResult], **extra) -> dict:
    return {**base_record(), "versions": library_versions(), "passed": all(r.passed for r in results),
            **extra, "artifacts": [r.as_dict() for r in results]}


def write_json_report(path, results: Sequence[ValidationResult], **extra) -> None:
    write_text_atomic(path, json.dumps(json_report(results, **extra), indent=2, default=str) + "\n")


def _figures(case) -> str:
    m = case.metrics
    return (f"rel_l2={m.rel_l2:.4g} cosine={m.cosine:.6f} sqnr_db={m.sqnr_db:.2f} max_abs={m.max_abs:.4g} "
            f"mean_abs={m.mean_abs:.4g} outliers={m.outlier_fraction:.4%} nan={m.nan_count} inf={m.inf_count}")


def junit_xml(results: Sequence[ValidationResult], suite_name: str = "xattn") -> str:
    root = ET.Element("testsuites", name=suite_name)
    for result in results:
        failures = sum(not c.passed for c in result.cases) + len(result.regressions)
        suite = ET.SubElement(root, "testsuite", name=result.artifact,
                              tests=str(len(result.cases) + len(result.regressions)), failures=str(failures),
                              errors="0", skipped="0")
        props = ET.SubElement(suite, "properties")
        for key, value in (("precision", result.precision), ("data", result.data), ("seed", str(result.seed)),
                           ("sha256", result.sha256 or "")):
            ET.SubElement(props, "property", name=key, value=value)
        for case in result.cases:
            element = ET.SubElement(suite, "testcase", classname=result.artifact, name=f"{case.output} @ {case.shapes}")
            if case.passed:
                ET.SubElement(element, "system-out").text = _figures(case)
            else:
                failure = ET.SubElement(element, "failure", message="; ".join(case.reasons), type="AccuracyError")
                failure.text = _figures(case)
        for regression in result.regressions:
            element = ET.SubElement(suite, "testcase", classname=result.artifact, name="baseline regression")
            ET.SubElement(element, "failure", message=regression, type="AccuracyRegression").text = regression
    ET.indent(root)
    return '<?xml version="1.0" encoding="utf-8"?>\n' + ET.tostring(root, encoding="unicode") + "\n"


def write_junit(path, results: Sequence[ValidationResult]) -> None:
    write_text_atomic(path, junit_xml(results))


def _num(value: float, fmt: str) -> str:
    if isinstance(value, float) and (math.isnan(value) or math.isinf(value)):
        return str(value)
    return format(value, fmt)


def markdown_table(results: Sequence[ValidationResult]) -> str:
    lines = ["| artifact | precision | shapes | output | rel. L2 | cosine | SQNR dB | max abs | verdict |",
             "| --- | --- | --- | --- | ---: | ---: | ---: | ---: | --- |"]
    for result in results:
        for case in result.cases:
            m = case.metrics
            verdict = "pass" if case.passed else "**FAIL**: " + "; ".join(case.reasons)
            lines.append(f"| {result.artifact} | {result.precision} | `{case.shapes}` | {case.output} | "
                         f"{_num(m.rel_l2, '.2e')} | {_num(m.cosine, '.6f')} | {_num(m.sqnr_db, '.1f')} | "
                         f"{_num(m.max_abs, '.2e')} | {verdict} |")
        for regression in result.regressions:
            lines.append(f"| {result.artifact} | {result.precision} | | | | | | | **REGRESSION**: {regression} |")
    lines.append("")
    for data in dict.fromkeys(r.data for r in results):
        synthetic = any(r.synthetic for r in results if r.data == data)
        lines.append(f"Inputs: {data}" + (" (synthetic: real data may behave differently)" if synthetic else ""))
    return "\n".join(lines) + "\n"


def write_markdown(path, results: Sequence[ValidationResult], title: str = "Accuracy") -> None:
    write_text_atomic(path, f"## {title}\n\n" + markdown_table(results))


def append_step_summary(results: Sequence[ValidationResult], title: str = "xattn accuracy") -> bool:
    """Append the Markdown table to ``$GITHUB_STEP_SUMMARY`` when set; returns whether it did."""
    target = os.environ.get("GITHUB_STEP_SUMMARY")
    if not target:
        return False
    with open(target, "a", encoding="utf-8") as handle:
        handle.write(f"## {title}\n\n" + markdown_table(results) + "\n")
    return True


def check_report_paths(*paths) -> None:
    """Fail before any work when a report cannot be written."""
    for path in paths:
        if path:
            check_writable(path)
