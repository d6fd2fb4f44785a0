"""Plain-text summaries for the terminal."""

from __future__ import annotations

from typing import TYPE_CHECKING

from xattn.shapes import format_shape

if TYPE_CHECKING:   # only for annotations: validating and benchmarking must not import torch to render
    from exporter.onnx_export import ExportResult
    from xattn.registry import LoadedModel


def export_summary(model: LoadedModel, result: ExportResult) -> str:
    size = result.path.stat().st_size / 2**20
    origin = (f"checkpoint sha256 {model.checkpoint_sha256[:12]}" if model.checkpoint_sha256
              else f"seeded weights, seed {model.init_seed}")
    lines = [f"exported {model.name} ({origin}) -> {result.path}",
             f"  opset {result.opset}, {result.exporter} exporter, {size:.2f} MiB, {result.seconds:.1f} s",
             "  dynamic ranges (min / opt / max):"]
    for name in result.min_shapes:
        lines.append(f"    {name}: {format_shape(result.min_shapes[name])} / {format_shape(result.opt_shapes[name])}"
                     f" / {format_shape(result.max_shapes[name])}")
    lines.append(f"  verified on ONNX Runtime (CPU) against PyTorch, relative L2 <= {result.tolerance:g}:")
    for check in result.checks:
        lines.append(f"    {'ok  ' if check.passed else 'FAIL'} {check.shapes:<36} rel_l2 {check.rel_l2:.2e}"
                     f"  max_abs {check.max_abs:.2e}" + (f"  ({check.purpose})" if check.purpose else ""))
    for note in result.notes:
        lines.append(f"  note: {note}")
    if result.guards:
        lines.append(f"  shape guards recorded by the exporter (not in the ONNX; verified on both sides): "
                     + "; ".join(g.expression for g in result.guards))
    tracer = sum(w.startswith("TracerWarning") for w in result.exporter_warnings)
    if tracer:
        lines.append(f"  exporter warnings: {len(result.exporter_warnings)} ({tracer} TracerWarning), in the report")
    lines.append(f"  report: {result.report_path}")
    return "\n".join(lines)


def validation_table(results) -> str:
    """A terminal table of validation results, the worst figures first per artifact."""
    lines = []
    for result in results:
        verdict = "PASS" if result.passed else "FAIL"
        tol = result.tolerances
        lines.append(f"{verdict} {result.artifact} ({result.precision}; rel_l2 <= {tol.max_rel_l2:g}, "
                     f"cosine >= {tol.min_cosine:g}; inputs: {result.data})")
        for case in result.cases:
            m = case.metrics
            mark = "ok  " if case.passed else "FAIL"
            lines.append(f"  {mark} {case.output} @ {case.shapes}  rel_l2 {m.rel_l2:.2e}  cos {m.cosine:.6f}  "
                         f"sqnr {m.sqnr_db:.1f} dB  max_abs {m.max_abs:.2e}"
                         + (f"  <- {'; '.join(case.reasons)}" if case.reasons else ""))
        for regression in result.regressions:
            lines.append(f"  REGRESSION {regression}")
        if result.synthetic:
            lines.append("  note: random inputs; pass --data for real ones")
        for note in result.notes:
            lines.append(f"  note: {note}")
    return "\n".join(lines)


def write_reports(results, json_path=None, junit_path=None, markdown_path=None, **extra) -> None:
    from runtime.reports import write_json_report, write_junit, write_markdown

    if json_path:
        write_json_report(json_path, results, **extra)
    if junit_path:
        write_junit(junit_path, results)
    if markdown_path:
        write_markdown(markdown_path, results)
