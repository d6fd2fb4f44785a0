"""Plain-text summaries for the terminal."""

from __future__ import annotations

from exporter.onnx_export import ExportResult
from exporter.registry import LoadedModel
from xattn.shapes import format_shape


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
                     f"  max_abs {check.max_abs:.2e}")
    lines.append(f"  report: {result.report_path}")
    return "\n".join(lines)
