"""The ``xattn`` command line.

Each command parses its options and calls one library function; heavy imports (torch, onnx,
onnxruntime, tensorrt) happen inside the commands so ``xattn --help`` is instant and works anywhere.
Errors from the toolkit's exception family print as one line and exit with their code (2 bad input,
1 a failed check); ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import click

from tools.options import (SHAPES, load_model_from_options, model_options, pass_progress, profile_options)
from xattn import __version__
from xattn.errors import XattnError


class XattnGroup(click.Group):
    """A click group that turns toolkit errors into one clean line and the right exit code."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except XattnError as exc:
            if ctx.params.get("debug") or os.environ.get("XATTN_DEBUG"):
                raise
            click.echo(f"error: {exc}", err=True)
            ctx.exit(exc.exit_code)
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            ctx.exit(130)


@click.group(cls=XattnGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="xattn-deploy")
@click.option("--debug", is_flag=True, help="Show tracebacks instead of one-line errors.")
@click.option("--quiet", "-q", is_flag=True, help="No progress output.")
def cli(debug: bool, quiet: bool):
    """Deploy cross-attention models: export, convert, quantize, build, validate, benchmark."""


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def doctor(as_json: bool):
    """Show versions, providers, GPU, and which features can run here."""
    from tools.doctor import collect, format_report

    info = collect()
    click.echo(json.dumps(info, indent=2) if as_json else format_report(info))


@cli.command("models")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def list_models(as_json: bool):
    """List the built-in models."""
    from exporter.registry import describe_builtin_models

    rows = describe_builtin_models()
    if as_json:
        click.echo(json.dumps([{"name": n, "summary": s} for n, s in rows], indent=2))
    else:
        for name, summary in rows:
            click.echo(f"{name:<22} {summary}")


@cli.command()
@model_options
@click.option("-o", "--output", required=True, help="ONNX file to write.")
@click.option("--opset", type=int, default=None, help="ONNX opset (default 18; 17..21).")
@profile_options
@click.option("--verify-shapes", type=SHAPES, multiple=True, metavar="SHAPES",
              help="Shape set to verify at (repeatable; default: three derived from the ranges).")
@click.option("--exporter", type=click.Choice(["dynamo", "legacy"]), default="dynamo", show_default=True,
              help="torch.export-based exporter, or the legacy TorchScript one.")
@click.option("--simplify", is_flag=True, help="Simplify the graph with onnxslim (verified the same way).")
@click.option("--json", "as_json", is_flag=True, help="Print the export report as JSON.")
@pass_progress
def export(model_name, checkpoint, model_args, input_channels, output, opset, min_shapes, opt_shapes, max_shapes,
           verify_shapes, exporter, simplify, as_json, progress):
    """Export a model to ONNX with dynamic batch/height/width, verified against PyTorch."""
    from exporter.onnx_export import DEFAULT_OPSET, ExportSettings, export_onnx
    from tools.render import export_summary
    from xattn.fileio import check_writable

    check_writable(output)
    settings = ExportSettings(opset=opset or DEFAULT_OPSET, exporter=exporter, min_shapes=min_shapes,
                              opt_shapes=opt_shapes, max_shapes=max_shapes,
                              verify_shapes=list(verify_shapes) or None, simplify=simplify)
    model = load_model_from_options(model_name, checkpoint, model_args, input_channels)
    result = export_onnx(model, output, settings, progress=progress)
    click.echo(json.dumps(result.as_dict(), indent=2) if as_json else export_summary(model, result))


@cli.command()
@click.argument("path")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def inspect(path, as_json):
    """Describe an ONNX file: I/O and dynamic axes, opsets, ops, provenance, size, parameters."""
    from exporter.inspect_onnx import format_inspection, inspect_onnx

    info = inspect_onnx(path)
    click.echo(json.dumps(info, indent=2) if as_json else format_inspection(info))


@cli.command()
@model_options
@click.option("-o", "--output-dir", default="artifacts", show_default=True, type=click.Path(file_okay=False),
              help="Folder for every artifact and report.")
@pass_progress
def deploy(model_name, checkpoint, model_args, input_channels, output_dir, progress):
    """The main job, end to end: export + verify + inspect."""
    from tools.pipeline import run_pipeline

    model = load_model_from_options(model_name, checkpoint, model_args, input_channels)
    run_pipeline(model, Path(output_dir), echo=click.echo, progress=progress)


def main() -> None:
    cli(prog_name="xattn")


if __name__ == "__main__":
    main()
