"""The ``xattn`` command line.

Each command parses its options and calls one library function; heavy imports (torch, onnx,
onnxruntime, tensorrt) happen inside the commands so ``xattn --help`` is instant and works anywhere.
Errors from the toolkit's exception family print as one line and exit with their code (2 bad input,
1 a failed check); ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import sys
from pathlib import Path

import click

from tools.options import (COSINE, COUNT, POSITIVE, SEED, SHAPES, THREADS, FiniteFloat, NON_NEGATIVE, calibration_options, data_options, data_settings, load_model_from_options,
                           model_options, pass_progress, profile_options, report_options, runtime_options,
                           split_list, tolerance_options)
from xattn import __version__
from xattn.errors import SIGNALLED, Terminated, XattnError


def _raise_terminated(signum, frame):
    SIGNALLED["signum"] = signum
    raise Terminated()


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
        except click.exceptions.UsageError as exc:
            # one line, like every other refusal (click would print usage, a hint and the error on four)
            command = f"{exc.ctx.command_path}: " if exc.ctx is not None and exc.ctx.command_path else ""
            click.echo(f"error: {command}{exc.format_message()} (see --help)", err=True)
            ctx.exit(2)
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            ctx.exit(130)
        except Terminated:
            click.echo("terminated", err=True)
            ctx.exit(143)


class _WarningLine(logging.Handler):
    """Prints the toolkit's warnings as ``warning: ...`` lines on stderr (the stream is resolved at each call,
    so it follows click's test runner too)."""

    xattn_warnings = True

    def __init__(self):
        super().__init__(level=logging.WARNING)

    def emit(self, record) -> None:
        click.echo(f"warning: {record.getMessage()}", err=True)


@click.group(cls=XattnGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="xattn-deploy")
@click.option("--debug", is_flag=True,
              help="Show tracebacks instead of one-line errors, and the toolkit's debug log (exporter warnings "
                   "and output, backend failures) on stderr.")
@click.option("--quiet", "-q", is_flag=True, help="No progress output.")
def cli(debug: bool, quiet: bool):
    """Deploy cross-attention models: export, convert, quantize, build, validate, benchmark."""
    logger = logging.getLogger("xattn")
    if not any(getattr(h, "xattn_warnings", False) for h in logger.handlers):
        logger.addHandler(_WarningLine())
    if debug:

        logger = logging.getLogger("xattn")
        if not any(getattr(h, "xattn_debug", False) for h in logger.handlers):
            handler = logging.StreamHandler(click.get_text_stream("stderr"))
            handler.setFormatter(logging.Formatter("debug: %(message)s"))
            handler.xattn_debug = True
            logger.addHandler(handler)
        logger.setLevel(logging.DEBUG)


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
    from xattn.registry import describe_builtin_models

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
@click.option("--verify-memory", default=None, metavar="SIZE",
              help="Memory one verification run may use, e.g. 8GiB (default: the smaller of 2 GiB and 1/8 of this "
                   "machine's memory, or $XATTN_VERIFY_MEMORY). Larger shape sets are scaled down or skipped, "
                   "and said.")
@click.option("--json", "as_json", is_flag=True, help="Print the export report as JSON.")
@pass_progress
def export(model_name, checkpoint, model_args, input_channels, output, opset, min_shapes, opt_shapes, max_shapes,
           verify_shapes, exporter, simplify, verify_memory, as_json, progress):
    """Export a model to ONNX with dynamic batch/height/width, verified against PyTorch."""
    from xattn.fileio import refuse_overwriting_inputs

    refuse_overwriting_inputs({"-o": output}, {"checkpoint": checkpoint})
    from exporter.onnx_export import DEFAULT_OPSET, ExportSettings, export_onnx
    from tools.render import export_summary
    from xattn.fileio import check_writable
    from xattn.memory import parse_size

    check_writable(output)
    settings = ExportSettings(opset=opset or DEFAULT_OPSET, exporter=exporter, min_shapes=min_shapes,
                              opt_shapes=opt_shapes, max_shapes=max_shapes,
                              verify_shapes=list(verify_shapes) or None, simplify=simplify,
                              verify_memory=None if verify_memory is None else parse_size(verify_memory))
    model = load_model_from_options(model_name, checkpoint, model_args, input_channels)
    result = export_onnx(model, output, settings, progress=progress)
    click.echo(json.dumps(result.as_dict(), indent=2) if as_json else export_summary(model, result))


@cli.command()
@click.argument("path")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def inspect(path, as_json):
    """Describe a file the toolkit made: an ONNX file (I/O and dynamic axes, opsets, ops, attention,
    provenance, weights and buffers), a range table, a TensorRT calibration cache, an engine or its
    sidecar, an export or validation report."""
    from tools.describe import describe_artifact, format_description

    info = describe_artifact(path)
    click.echo(json.dumps(info, indent=2) if as_json else format_description(info))


@cli.command("run")
@click.argument("artifact")
@click.option("--inputs", "inputs_path", default=None, metavar="FILE.npz", help="Inputs (arrays named like the inputs).")
@click.option("--shapes", type=SHAPES, default=None, metavar="SHAPES", help="Random normal inputs of these shapes.")
@click.option("--seed", type=SEED, default=0, show_default=True, help="Seed of random inputs.")
@click.option("-o", "--output", default=None, metavar="FILE.npz", help="Write the outputs here.")
@click.option("--checkpoint", default=None, help="Checkpoint, when ARTIFACT is a model name.")
@click.option("--model-arg", "model_args", multiple=True, metavar="KEY=VALUE", help="Model argument (model names).")
@click.option("--allow-nonfinite", is_flag=True, help="Accept NaN/Inf in the inputs.")
@runtime_options
def run_command(artifact, inputs_path, shapes, seed, output, checkpoint, model_args, allow_nonfinite, providers, threads):
    """Run ARTIFACT (.onnx, .engine, or a model name) on inputs; print and save the outputs."""
    from xattn.fileio import refuse_overwriting_inputs

    refuse_overwriting_inputs({"-o": output}, {"artifact": artifact if os.path.exists(artifact) else None,
                                               "--inputs file": inputs_path, "checkpoint": checkpoint})
    from xattn.data import npz_feeds, random_feed
    from runtime.open import open_runner
    from xattn.errors import BadInputError
    from xattn.fileio import atomic_path, check_writable
    from xattn.shapes import format_shape

    if (inputs_path is None) == (shapes is None):
        raise BadInputError("give exactly one of --inputs FILE.npz or --shapes SHAPES")
    if output:
        check_writable(output)
    runner = open_runner(artifact, providers=split_list(providers), threads=threads, checkpoint=checkpoint,
                         model_args=_model_args(model_args), allow_nonfinite=allow_nonfinite)
    with runner:
        names = list(runner.input_metadata)
        if shapes is not None:   # refused before any array is drawn
            from runtime.base import check_shapes

            check_shapes(shapes, runner.input_metadata)
        feed = npz_feeds(inputs_path, names)[0] if inputs_path else random_feed(shapes, seed=seed)
        outputs = runner.infer(feed)
        click.echo(f"{runner.name} ({runner.backend}): {runner.last_inference_time * 1000:.2f} ms")
        for name, value in outputs.items():
            click.echo(f"  {name}: {value.dtype} {format_shape(value.shape)}  mean {value.mean():.6g}  "
                       f"std {value.std():.6g}")
    if output:
        import numpy as np

        import io

        # zipped in memory, then written: a write the file system refuses is then one OSError, not numpy's
        # ZipFile failing again in its destructor ("seek of closed file")
        packed = io.BytesIO()
        np.savez(packed, **outputs)
        with atomic_path(output) as tmp:
            tmp.write_bytes(packed.getvalue())
        click.echo(f"outputs: {output}")


@cli.command("validate")
@click.argument("artifact")
@click.option("--reference", default=None, metavar="MODEL|pkg.mod:factory|FILE.onnx|FILE.engine",
              help="What to compare with: a PyTorch model (default: the one recorded in the artifact), or another "
                   "artifact (ONNX vs ONNX, engine vs ONNX, FP16 vs FP32), without PyTorch.")
@click.option("--checkpoint", default=None, help="The reference's checkpoint (must match the recorded sha256).")
@click.option("--model-arg", "model_args", multiple=True, metavar="KEY=VALUE", help="Reference model argument.")
@click.option("--shapes", type=SHAPES, multiple=True, metavar="SHAPES",
              help="Shape set of random inputs (repeatable; default: opt shapes + three asymmetric sets).")
@click.option("--samples", type=COUNT, default=None,
              help="Random samples per shape set (default 1), or image pairs drawn from --data (default 16).")
@click.option("--seed", type=SEED, default=None,
              help="Seed of the random inputs (default 0), or of the crops drawn from --data (default 1000: other "
                   "crops than calibration's seed 0).")
@click.option("--data", default=None, metavar="SOURCE",
              help="Real inputs instead of random ones (a folder, .csv, .npz, 'shipped'; --shapes sets the "
                   "resolution and batch, --samples the pairs).")
@tolerance_options
@report_options
@runtime_options
@click.option("--emulate-fused-fp16", is_flag=True,
              help="Compare with PyTorch emulating an FP16 network whose attention runs in TensorRT's fused kernel "
                   "(FP16 tensors between layers, FP32 matmul accumulation and softmax): the figure a TensorRT "
                   "FP16 engine should reproduce.")
@pass_progress
def validate_command(artifact, reference, checkpoint, model_args, shapes, samples, seed, data, precision, max_rel_l2,
                     min_cosine, atol, rtol, max_outlier_fraction, json_report, junit, markdown, providers, threads,
                     emulate_fused_fp16, progress):
    """Compare ARTIFACT with its PyTorch reference; exit 0 if it passes, 1 if it fails."""
    from xattn.fileio import refuse_overwriting_inputs

    refuse_overwriting_inputs({"--json-report": json_report, "--junit": junit, "--markdown": markdown},
                              {"artifact": artifact, "checkpoint": checkpoint, "--data file": data,
                               "--reference": reference if reference and os.path.exists(reference) else None})
    from runtime.reports import append_step_summary, check_report_paths
    from runtime.validate import ValidateOptions, validate_artifact
    from tools.render import validation_table, write_reports

    check_report_paths(json_report, junit, markdown)
    overrides = {"max_rel_l2": max_rel_l2, "min_cosine": min_cosine, "atol": atol, "rtol": rtol,
                 "max_outlier_fraction": max_outlier_fraction}
    options = ValidateOptions(reference=reference, checkpoint=checkpoint, model_args=_model_args(model_args),
                              shapes=list(shapes) or None, samples=samples, seed=seed, data=data, precision=precision,
                              tolerance_overrides={k: v for k, v in overrides.items() if v is not None},
                              providers=split_list(providers), threads=threads,
                              reference_dtype="fp16-fused" if emulate_fused_fp16 else "fp32")
    progress(f"validating {artifact}")
    result = validate_artifact(artifact, options)
    click.echo(validation_table([result]))
    write_reports([result], json_report, junit, markdown)
    append_step_summary([result])
    if not result.passed:
        raise click.exceptions.Exit(1)


@cli.command("gate")
@click.argument("gate_file")
@click.option("--baseline", default=None, metavar="FILE.json",
              help="An earlier JSON report: also fail when an artifact's error grew beyond the gate's margin.")
@report_options
@pass_progress
@click.option("--allow-import", "allow_imports", multiple=True, metavar="PKG.MOD:NAME",
              help="Allow the gate file to name this reference or data function (repeatable); a gate file "
                   "never imports code on its own.")
def gate_command(gate_file, baseline, json_report, junit, markdown, progress, allow_imports):
    """The CI accuracy gate: validate every artifact in GATE_FILE; exit 1 if any fails."""
    from xattn.fileio import refuse_overwriting_inputs

    refuse_overwriting_inputs({"--json-report": json_report, "--junit": junit, "--markdown": markdown},
                              {"gate file": gate_file, "baseline": baseline})
    from runtime.gate import load_baseline, load_gate, run_gate
    from runtime.reports import append_step_summary, check_report_paths
    from runtime.validate import ValidateOptions, validate_artifact
    from tools.render import validation_table, write_reports

    config = load_gate(gate_file, allow_imports)
    json_report = json_report or config.reports.get("json")
    junit = junit or config.reports.get("junit")
    markdown = markdown or config.reports.get("markdown")
    check_report_paths(json_report, junit, markdown)
    previous = load_baseline(baseline) if baseline else None
    runners: dict = {}
    cache: dict = {}

    def one(artifact):
        s = artifact.settings
        progress(f"validating {artifact.name}")
        tolerance_keys = ("max_rel_l2", "min_cosine", "atol", "rtol", "max_outlier_fraction")
        options = ValidateOptions(reference=s.get("reference"), checkpoint=s.get("checkpoint"),
                                  model_args=s.get("model_args"), shapes=artifact.shapes or None,
                                  samples=s.get("samples"), seed=s.get("seed"), data=s.get("data"),
                                  precision=s.get("precision"),
                                  tolerance_overrides={k: float(s[k]) for k in tolerance_keys if k in s},
                                  providers=s.get("providers"), threads=s.get("threads"))
        return validate_artifact(artifact.path, options, name=artifact.name, reference_runners=runners,
                                 reference_cache=cache)

    results = run_gate(config, one, previous)
    click.echo(validation_table(results))
    write_reports(results, json_report, junit, markdown, gate=str(config.source), baseline=baseline)
    append_step_summary(results, title="xattn accuracy gate")
    failed = [r.artifact for r in results if not r.passed]
    click.echo(f"gate: {len(results) - len(failed)} of {len(results)} artifacts pass"
               + (f"; failed: {', '.join(failed)}" if failed else ""))
    if failed:
        raise click.exceptions.Exit(1)


@cli.command()
@click.argument("onnx_path", metavar="MODEL.onnx")
@data_options
@calibration_options
@click.option("-o", "--output", required=True, metavar="RANGES.json", help="Range table to write (reused when current).")
@click.option("--cache", default=None, metavar="FILE", help="Also write a TensorRT calibration cache (10.x implicit INT8).")
@click.option("--trt-version", default="10.3.0", show_default=True, help="TensorRT version the cache is for.")
@pass_progress
def calibrate(onnx_path, data_spec, samples, seed, batch_size, resize, mean, std, method, percentile, quantize_ops,
              output, cache, trt_version, progress):
    """Compute activation ranges of MODEL.onnx on calibration data."""
    from xattn.fileio import refuse_overwriting_inputs

    refuse_overwriting_inputs({"-o": output, "--cache": cache}, {"model": onnx_path, "--data file": data_spec})
    from calibration.ranges import CalibrationSettings
    from tools.steps import calibrate_step

    settings = CalibrationSettings(method=method, percentile=percentile, op_types=tuple(split_list(quantize_ops)))
    calibrate_step(onnx_path, output, data_spec=data_spec,
                   data_settings=data_settings(samples, seed, batch_size, resize, mean, std), settings=settings,
                   cache=cache, trt_version=trt_version, echo=click.echo, progress=progress)


@cli.command()
@click.argument("onnx_path", metavar="MODEL.onnx")
@data_options
@calibration_options
@click.option("--ranges", default=None, metavar="RANGES.json", help="Use this range table instead of calibrating.")
@click.option("--exclude-nodes", default=None, metavar="N1,N2", help="Nodes to keep in float.")
@click.option("--exclude-modules", default=None, metavar="PATTERN,...",
              help="Keep the nodes of these PyTorch modules in float (wildcards: 'stem1.*'; a parent names its children).")
@click.option("--target-rel-l2", type=POSITIVE, default=None, help="Keep sensitive nodes in float until this holds.")
@click.option("--target-cosine", type=COSINE, default=None, help="Same, as a cosine target.")
@click.option("--holdout", type=FiniteFloat(min=0.0, max=1.0, min_open=True, max_open=True), default=0.25,
              show_default=True,
              help="Share of the data held out to check a target (not used for calibration).")
@click.option("--cache", default=None, metavar="FILE", help="Also write a TensorRT calibration cache.")
@click.option("--trt-version", default="10.3.0", show_default=True, help="TensorRT version the cache is for.")
@click.option("--target", type=click.Choice(["tensorrt", "onnxruntime", "openvino"]), default="tensorrt",
              show_default=True,
              help="tensorrt: Q/DQ on inputs and weights, the rest FP16, attention fusible; onnxruntime: "
                   "QLinearConv-friendly Q/DQ and attention fused into MultiHeadAttention; openvino: int8 attention "
                   "scores (Q and K^T; see --int8-products), queries in slices, the rest float.")
@click.option("--high-precision", type=click.Choice(["fp16", "fp32"]), default="fp16", show_default=True,
              help="Precision of what is not quantized (TensorRT target).")
@click.option("--attention-op", type=click.Choice(["matmul", "onnx"]), default="matmul", show_default=True,
              help="TensorRT target: onnx writes ONNX's opset-23 Attention (TensorRT 10.14+ and 11.x only).")
@click.option("--cpu-target", type=click.Choice(["this", "vnni", "no-vnni"]), default="this", show_default=True,
              help="ONNX Runtime target: the CPU the file is for; 'this' reads this machine's features (VNNI/AMX: "
                   "full 8-bit weights; without: 7-bit, so u8 x s8 products cannot saturate).")
@click.option("--precision", type=click.Choice(["int8", "fp8"]), default="int8", show_default=True,
              help="fp8: float8e4m3fn Q/DQ with attention inside, for TensorRT on compute capability 8.9+.")
@click.option("--bf16-weights/--no-bf16-weights", default=True, show_default=True,
              help="OpenVINO target: put the weights on the bf16 grid by error feedback on --data, so a bf16 run "
                   "keeps their rounding error off the output (an FP32 run moves by about 3e-4; off: the weights as they are).")
@click.option("--int8-products", type=click.Choice(["scores", "both"]), default="scores", show_default=True,
              help="OpenVINO target: which attention products run in int8: scores (Q K^T), or both (also the "
                   "probabilities times V: 5-16% faster in bf16 on the README's machine, but 4.25e-3 instead of "
                   "3.05e-3 worst on held-out photos, where attention is peaked).")
@click.option("-o", "--output", required=True, metavar="MODEL.int8.onnx", help="Q/DQ ONNX to write.")
@pass_progress
def quantize(onnx_path, data_spec, samples, seed, batch_size, resize, mean, std, method, percentile, quantize_ops,
             ranges, exclude_nodes, exclude_modules, target_rel_l2, target_cosine, holdout, cache, trt_version, target,
             high_precision, attention_op, cpu_target, precision, bf16_weights, int8_products, output, progress):
    """INT8 Q/DQ ONNX placed for TensorRT 10/11 (default) or ONNX Runtime's CPU; FP8 for TensorRT."""
    from xattn.fileio import refuse_overwriting_inputs

    refuse_overwriting_inputs({"-o": output, "--cache": cache},
                              {"model": onnx_path, "range table": ranges, "--data file": data_spec})
    from calibration.ranges import CalibrationSettings
    from tools.steps import fp8_step, openvino_int8_step, quantize_step
    from xattn.errors import BadInputError

    if target == "openvino" or precision == "fp8":
        # the two attention-including paths calibrate by maximum on --data and take none of the full INT8 path's options
        given = {"--ranges": ranges, "--cache": cache, "--exclude-nodes": exclude_nodes,
                 "--exclude-modules": exclude_modules, "--target-rel-l2": target_rel_l2, "--target-cosine": target_cosine,
                 "--high-precision fp32": high_precision != "fp16", "--attention-op onnx": attention_op != "matmul",
                 "--quantize-ops": quantize_ops != "Conv", "--method": method != "percentile"}
        if target == "openvino":
            given.update({"--precision fp8": precision != "int8", "--cpu-target": cpu_target != "this"})
            chosen, step = "--target openvino", functools.partial(openvino_int8_step, bf16_weights=bf16_weights,
                                                                  products=int8_products)
            hint = "it quantizes attention products only, calibrated by maximum on --data"
        else:
            given.update({"--target onnxruntime": target != "tensorrt", "--no-bf16-weights": not bf16_weights,
                          "--int8-products": int8_products != "scores"})
            chosen, step = "--precision fp8", fp8_step
            hint = "FP8 is for TensorRT, calibrated by maximum on --data, attention included"
        clash = [flag for flag, used in given.items() if used]
        if clash:
            raise BadInputError(f"{chosen} does not take {', '.join(clash)}", hint=hint)
        step(onnx_path, output, data_spec=data_spec,
             data_settings=data_settings(samples, seed, batch_size, resize, mean, std), holdout=holdout,
             echo=click.echo, progress=progress)
        return
    if not bf16_weights or int8_products != "scores":
        flag = "--no-bf16-weights" if not bf16_weights else "--int8-products"
        raise BadInputError(f"{flag} is for --target openvino",
                            hint="the TensorRT and ONNX Runtime INT8 files keep their float weights as they are; "
                                 "their attention placement is the target's own")

    settings = CalibrationSettings(method=method, percentile=percentile, op_types=tuple(split_list(quantize_ops)))
    quantize_step(onnx_path, output, data_spec=data_spec,
                  data_settings=data_settings(samples, seed, batch_size, resize, mean, std), settings=settings,
                  ranges=ranges, exclude_nodes=tuple(split_list(exclude_nodes) or ()), target_rel_l2=target_rel_l2,
                  target_cosine=target_cosine, holdout=holdout, cache=cache, trt_version=trt_version,
                  target=target, high_precision=high_precision, attention_op=attention_op, cpu_target=cpu_target,
                  exclude_modules=tuple(split_list(exclude_modules) or ()), echo=click.echo, progress=progress)


TARGET = click.option("--target", type=click.Choice(["tensorrt", "onnxruntime"]), default="tensorrt", show_default=True,
                      help="Backend the file is for: attention in the form it fuses, Q/DQ where it wants them.")


@cli.command()
@click.argument("onnx_path", metavar="MODEL.onnx")
@click.option("--fp16", is_flag=True, required=True, help="Convert to FP16 (the only conversion so far).")
@TARGET
@click.option("--keep-attention-fp32", is_flag=True,
              help="Keep each attention score path (MatMul, scale, Softmax) in FP32 even when FP16 meets the "
                   "bound (TensorRT cannot fuse attention then).")
@click.option("--keep-fp32", default=None, metavar="NODE_OR_OP,...",
              help="More nodes (by name) or op types (e.g. Resize) to keep in FP32.")
@click.option("--attention-op", type=click.Choice(["matmul", "onnx"]), default="matmul", show_default=True,
              help="matmul: MatMul -> Softmax -> MatMul (every TensorRT 10.x/11.x fuses it); onnx: ONNX's opset-23 "
                   "Attention (TensorRT 10.14+ and 11.x only).")
@click.option("--check-data", "check_spec", default=None, metavar="SOURCE",
              help="Data the FP16 bound is measured on (any --data source; default: random inputs at the opt shapes).")
@click.option("-o", "--output", required=True, metavar="MODEL.fp16.onnx", help="FP16 ONNX to write.")
def convert(onnx_path, fp16, target, keep_attention_fp32, keep_fp32, attention_op, check_spec, output):
    """FP16 ONNX with FP32 inputs/outputs; attention FP16 with the scale on Q (TensorRT's fused form),
    kept FP32 only where FP16 misses the bound on the check data."""
    from xattn.fileio import refuse_overwriting_inputs

    refuse_overwriting_inputs({"-o": output}, {"model": onnx_path})
    from tools.steps import fp16_step

    fp16_step(onnx_path, output, keep=tuple(split_list(keep_fp32) or ()),
              keep_attention=True if keep_attention_fp32 else None, target=target, check_spec=check_spec,
              attention_op=attention_op, echo=click.echo)


@cli.command()
@click.argument("onnx_path", metavar="MODEL.onnx")
@click.option("--target", type=click.Choice(["onnxruntime", "openvino"]), default="onnxruntime", show_default=True,
              help="Backend to optimize for: onnxruntime (attention fused into its tiled kernel, model.ort.onnx) or "
                   "openvino (queries in slices: its fast plain attention with flat memory, model.ov.onnx). "
                   "TensorRT fuses attention itself: use 'convert --fp16'.")
@click.option("--reference", default=None, metavar="MODEL",
              help="PyTorch model to verify against (default: the built-in model the file records).")
@click.option("--checkpoint", default=None, help="The reference's checkpoint (must match the recorded sha256).")
@click.option("-o", "--output", required=True, metavar="MODEL.ort.onnx", help="ONNX to write.")
def optimize(onnx_path, target, reference, checkpoint, output):
    """Rewrite each attention block into the form a CPU runtime runs best (ONNX Runtime: its fused
    MultiHeadAttention; OpenVINO: query slices), verified against PyTorch before it is written."""
    from xattn.fileio import refuse_overwriting_inputs

    refuse_overwriting_inputs({"-o": output}, {"model": onnx_path, "checkpoint": checkpoint})
    from tools.steps import optimize_step

    optimize_step(onnx_path, output, target=target, reference=reference, checkpoint=checkpoint, echo=click.echo)


@cli.command()
@click.argument("candidate", metavar="CANDIDATE.onnx")
@click.option("--reference", "--float", "float_path", required=True, metavar="REFERENCE.onnx",
              help="The ONNX file to compare with, layer by layer: the float model a quantized or FP16 file came "
                   "from, or any file of the same graph (tensors matched by name).")
@data_options
@click.option("--top", type=COUNT, default=15, show_default=True, help="Rows to show.")
@click.option("--order", type=click.Choice(["worst", "graph"]), default="worst", show_default=True,
              help="worst: lowest SQNR first; graph: in graph order (the first bad tensor is where error enters).")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def debug(candidate, float_path, data_spec, samples, seed, batch_size, resize, mean, std, top, order, as_json):
    """Per-tensor error (SQNR, relative L2) of CANDIDATE against a reference ONNX of the same graph."""
    from xattn.data import load_for_model
    from calibration.sensitivity import format_errors, tensor_errors
    from xattn.onnxfile import load_onnx

    data = load_for_model(data_spec, load_onnx(float_path), data_settings(samples, seed, batch_size, resize, mean, std))
    errors = tensor_errors(float_path, candidate, data)
    if order == "graph":
        errors = sorted(errors, key=lambda e: e.order)
    if as_json:
        click.echo(json.dumps({"data": data.label, "tensors": [e.as_dict() for e in errors]}, indent=2))
    else:
        click.echo(f"{candidate} vs {float_path} on {data.summary()}: {len(errors)} tensors matched by name")
        click.echo(format_errors(errors, top))


@cli.command()
@click.argument("onnx_path", metavar="MODEL.onnx")
@click.option("-o", "--output", required=True, metavar="MODEL.engine", help="Engine to write (a plain TensorRT plan).")
@click.option("--min-shapes", type=SHAPES, multiple=True, metavar="SHAPES", help="Profile minimum (repeat per profile).")
@click.option("--opt-shapes", type=SHAPES, multiple=True, metavar="SHAPES", help="Profile optimum (repeat per profile).")
@click.option("--max-shapes", type=SHAPES, multiple=True, metavar="SHAPES", help="Profile maximum (repeat per profile).")
@click.option("--profile-from-export", is_flag=True,
              help="Use the ranges recorded at export (the default when no shapes are given).")
@click.option("--precision", type=click.Choice(["fp32", "fp16", "int8", "fp8"]), default=None,
              help="Default: the ONNX's own. On 10.x an fp32 ONNX may build fp16/int8 the legacy way.")
@click.option("--calibration-cache", default=None, metavar="FILE", help="TensorRT cache for implicit INT8 (10.x).")
@click.option("--calibration-data", default=None, metavar="SOURCE", help="Data to create that cache if missing.")
@click.option("--workspace", default="4GiB", show_default=True, help="Workspace memory pool limit.")
@click.option("--opt-level", type=click.IntRange(0, 5), default=None, help="Builder optimization level 0..5.")
@click.option("--timing-cache", default=None, metavar="FILE", help="Timing cache, loaded and saved.")
@click.option("--dla-core", type=click.IntRange(min=0), default=None, help="Build for this DLA core (Jetson), with GPU fallback.")
@click.option("--version-compatible", is_flag=True, help="Build a version-compatible engine.")
@click.option("--hardware-compatibility", type=click.Choice(["none", "ampere+", "same-cc"]), default="none",
              show_default=True, help="Hardware compatibility level.")
@click.option("--tf32", is_flag=True, help="Let FP32 layers run as TF32 on Ampere+ (off by default: FP32 means FP32).")
@click.option("--target-trt", default=None, metavar="VERSION",
              help="Without TensorRT here: print the trtexec line for this version (default: 10.3 and 11.4).")
@click.option("--memory-budget", default="4GiB", show_default=True,
              help="Warn when unfused attention at the max shapes needs more than this.")
@pass_progress
def build(onnx_path, output, min_shapes, opt_shapes, max_shapes, profile_from_export, precision, calibration_cache,
          calibration_data, workspace, opt_level, timing_cache, dla_core, version_compatible, hardware_compatibility,
          tf32, target_trt, memory_budget, progress):
    """Build a TensorRT engine (10.x or 11.x) and its JSON sidecar; without TensorRT, print trtexec lines."""
    from xattn.fileio import refuse_overwriting_inputs

    refuse_overwriting_inputs({"-o": output}, {"model": onnx_path, "calibration cache": calibration_cache,
                                               "timing cache": timing_cache})
    from exporter.engine import build_engine, trtexec_lines
    from xattn.tensorrt import installed_tensorrt_version
    from xattn.trt_plan import BuildOptions
    from xattn.memory import parse_size
    from xattn.errors import BadInputError, MissingDependencyError
    from xattn.fileio import check_writable

    if profile_from_export and (min_shapes or opt_shapes or max_shapes):
        raise BadInputError("--profile-from-export and explicit shapes exclude each other")
    check_writable(output)
    options = BuildOptions(precision=precision, workspace=parse_size(workspace), opt_level=opt_level,
                           timing_cache=timing_cache, calibration_cache=calibration_cache,
                           calibration_data=calibration_data, dla_core=dla_core,
                           version_compatible=version_compatible, hardware_compatibility=hardware_compatibility,
                           memory_budget=parse_size(memory_budget), tf32=tf32)
    shapes = dict(mins=min_shapes, opts=opt_shapes, maxs=max_shapes)
    if installed_tensorrt_version() is None:
        lines = trtexec_lines(onnx_path, output, options, targets=[target_trt] if target_trt else None, **shapes)
        for line in lines:
            click.echo(line)
        possible = any("\ntrtexec " in line for line in lines)
        raise MissingDependencyError("TensorRT is not installed here: nothing was built",
                                     hint=("run a trtexec line above on the device, or install "
                                           "'xattn-deploy[tensorrt]' on a machine with an NVIDIA GPU") if possible else
                                          "no version can build this file as it is: see the reasons above")
    result = build_engine(onnx_path, output, options, say=progress, **shapes)
    click.echo(f"built {result.path} ({result.size / 2**20:.1f} MiB) in {result.seconds:.1f} s with TensorRT "
               f"{result.plan.trt_version}, {result.plan.precision}"
               f"{', strongly typed' if result.plan.strongly_typed else ', legacy precision flags'}")
    for note in result.notes:
        click.echo(f"  note: {note}")
    click.echo(f"sidecar: {result.sidecar}")


def _bench_server(specs, shapes, batch, warmup, duration, server, model, concurrency, requests, json_path, csv_path,
                  plot_path, progress, providers=None):
    from runtime.load_bench import LoadSettings, format_load, run_load, write_load_outputs
    from runtime.reports import check_report_paths

    check_report_paths(json_path, csv_path, plot_path)
    if len(specs) > 1:
        raise click.UsageError("with --server give at most one ARTIFACT (the file the server serves, run locally "
                               "to check its outputs)")
    levels = tuple(int(c) for c in split_list(concurrency) or () if c.isdigit())
    if not levels or len(levels) != len(split_list(concurrency) or ()) or min(levels) < 1:
        raise click.BadParameter(f"{concurrency!r} is not a list of positive counts", param_hint="--concurrency")
    if len(shapes) > 1:
        raise click.UsageError("with --server give one --shapes (the request's inputs)")
    if not shapes:
        if not specs:
            raise click.UsageError("with --server give --shapes, or the ARTIFACT the server serves")
        from runtime.bench_setup import default_shapes

        shapes = default_shapes(specs)[:1]
    shape_set = dict(shapes[0])
    if batch:
        shape_set = {name: (batch[0], *shape[1:]) for name, shape in shape_set.items()}
    if plot_path:
        import importlib.util

        if importlib.util.find_spec("matplotlib") is None:
            from xattn.errors import MissingDependencyError

            raise MissingDependencyError("--plot needs matplotlib", hint="pip install 'xattn-deploy[plot]'")
    settings = LoadSettings(url=server, shapes=shape_set, model=model, concurrency=levels, requests=requests,
                            duration=duration, warmup=warmup, compare_with=specs[0] if specs else None,
                            compare_providers=providers)
    result = run_load(settings, progress=progress)
    click.echo(format_load(result))
    write_load_outputs(result, json_path, csv_path, plot_path)
    if result.comparison and not result.comparison["passed"]:
        raise click.exceptions.Exit(1)


@cli.command()
@click.argument("specs", nargs=-1, metavar="[ARTIFACT_OR_MODEL]...")
@click.option("--shapes", type=SHAPES, multiple=True, metavar="SHAPES", help="Shape set (repeatable; default 64x64, batch 1).")
@click.option("--batch", type=COUNT, multiple=True, help="Batch sizes to apply to every shape set (repeatable).")
@click.option("--warmup", type=click.IntRange(min=0), default=3, show_default=True, help="Untimed runs per backend and shape set.")
@click.option("--iterations", type=COUNT, default=None, help="Timed rounds (default: as many as fit in --duration).")
@click.option("--duration", type=POSITIVE, default=3.0, show_default=True, help="Seconds of timed rounds per shape set.")
@click.option("--threads", type=THREADS, default=None,
              help="Threads for ONNX Runtime and PyTorch (0 or unset: all cores, ONNX Runtime's convention).")
@click.option("--providers", default=None, metavar="P1,P2", help="ONNX Runtime providers (default: best available).")
@click.option("--backends", default=None, metavar="B1,B2",
              help="Run every ONNX file on each of these, side by side: onnxruntime, openvino, openvino-bf16, "
                   "openvino-f16.")
@click.option("--checkpoint", default=None, help="Checkpoint of the PyTorch baseline, when the ONNX was exported from one.")
@click.option("--reference", default=None, metavar="MODEL",
              help="Model of the PyTorch baseline (default: the built-in model the artifact records; a user's "
                   "pkg.mod:factory is imported only when named here).")
@click.option("--no-torch", is_flag=True, help="Do not add the PyTorch eager baseline.")
@click.option("--device", type=click.Choice(["cpu", "cuda", "auto"]), default="cpu", show_default=True,
              help="Where the PyTorch baseline runs.")
@click.option("--cuda-graph", is_flag=True, help="TensorRT engines: capture each fixed shape as a CUDA graph and replay it.")
@click.option("--peak", is_flag=True, help="Measure this machine's matmul ceiling and report the share reached.")
@click.option("--memory/--no-memory", default=True, show_default=True,
              help="Measure each backend's peak RSS alone, in its own process.")
@click.option("--json", "json_path", default=None, metavar="FILE", help="Write all figures as JSON.")
@click.option("--csv", "csv_path", default=None, metavar="FILE", help="Write all figures as CSV.")
@click.option("--plot", "plot_path", default=None, metavar="FILE.png", help="Plot latency vs input size.")
@click.option("--baseline", default=None, metavar="FILE.json", help="An earlier --json: exit 1 on slowdowns.")
@click.option("--max-slowdown", default="10%", show_default=True, help="Allowed median slowdown vs --baseline.")
@click.option("--server", default=None, metavar="URL",
              help="Load-test a running KServe v2 server (http://HOST:PORT or grpc://HOST:PORT) instead; an ARTIFACT "
                   "given is run locally to check the server's outputs.")
@click.option("--model", "server_model", default=None, help="With --server: the model (default: its only one).")
@click.option("--concurrency", default="1,2,4,8", show_default=True, metavar="N,N,...",
              help="With --server: concurrent clients per level.")
@click.option("--requests", type=COUNT, default=200, show_default=True,
              help="With --server: at most this many requests per level (and at most --duration seconds).")
@pass_progress
def bench(specs, shapes, batch, warmup, iterations, duration, threads, providers, backends, checkpoint, reference,
          no_torch, device, cuda_graph, peak, memory, json_path, csv_path, plot_path, baseline, max_slowdown, server, server_model,
          concurrency, requests, progress):
    """Latency of every artifact (and PyTorch eager), measured interleaved; percentiles, FLOP/s, speedups.
    With --server, the load a running server sustains per concurrency level."""
    from xattn.fileio import refuse_overwriting_inputs

    refuse_overwriting_inputs({"--json": json_path, "--csv": csv_path, "--plot": plot_path},
                              {f"benchmarked file {s}": s for s in specs if os.path.exists(s)} | {"checkpoint": checkpoint})
    if server:
        return _bench_server(specs, shapes, batch, warmup, duration, server, server_model, concurrency, requests,
                             json_path, csv_path, plot_path, progress, split_list(providers))
    if not specs:
        raise click.UsageError("give at least one ARTIFACT_OR_MODEL (or --server URL)")
    from runtime.bench import (BenchSettings, benchmark, find_slowdowns, format_table, load_bench,
                               measure_peak_gflops, parse_percent, write_outputs)
    from xattn.shapes import format_shape_set
    from runtime.reports import check_report_paths
    from runtime.bench_setup import default_shapes, isolated_peak_rss, make_runners, with_batches, work_counter

    check_report_paths(json_path, csv_path, plot_path)
    if plot_path:
        import importlib.util

        if importlib.util.find_spec("matplotlib") is None:   # before measuring, not after
            from xattn.errors import MissingDependencyError

            raise MissingDependencyError("--plot needs matplotlib", hint="pip install 'xattn-deploy[plot]'")
    allowed = parse_percent(max_slowdown)
    previous = load_bench(baseline) if baseline else None
    shape_sets = with_batches(list(shapes) or default_shapes(specs), batch)
    runners, base = make_runners(specs, threads=threads, providers=split_list(providers), checkpoint=checkpoint,
                                 torch_baseline=not no_torch, device=device, cuda_graph=cuda_graph,
                                 reference=reference, backends=split_list(backends))
    settings = BenchSettings(warmup=warmup, iterations=iterations, duration=duration)
    result = benchmark(runners, shape_sets, settings, work=work_counter(specs), baseline=base, progress=progress,
                       threads=threads)
    result.settings.update(threads=threads, providers=providers, specs=list(specs))
    if memory and not result.interrupted:
        for label in runners:
            progress(f"peak memory of {label} alone")
            peaks = isolated_peak_rss(specs, label, shape_sets, threads=threads, providers=split_list(providers),
                                      checkpoint=checkpoint, torch_baseline=not no_torch,
                                      reference=reference, backends=split_list(backends))
            for row in result.rows:
                if row.backend == label:
                    row.rss_mb = peaks[[format_shape_set(s) for s in shape_sets].index(row.shapes)]
    if peak and not result.interrupted:
        progress("measuring the matmul peak")
        result.peak_detail = measure_peak_gflops(threads)
        result.peak_gflops = result.peak_detail["peak"]
    click.echo(format_table(result))
    if not write_outputs(result, json_path, csv_path, plot_path) and (json_path or csv_path or plot_path):
        click.echo("nothing was measured: no report written (earlier reports are kept)", err=True)
    if previous is not None:
        slower = find_slowdowns(result, previous, allowed)
        for line in slower:
            click.echo(f"SLOWER {line}")
        click.echo("note: compare medians from the same machine; shared machines drift by several percent")
        if slower:
            raise click.exceptions.Exit(1)
    if result.interrupted:
        raise click.exceptions.Exit(130)


@cli.command()
@click.argument("onnx_path", metavar="MODEL.onnx")
@click.option("--target-trt", "versions", multiple=True, metavar="VERSION",
              help="TensorRT version to check for (repeatable; default 10.3.0, 10.13.3 and 11.4.0).")
@click.option("--dla", is_flag=True, help="Also check what a DLA build needs (fixed shapes, a version with DLA).")
@click.option("--memory-budget", default="4GiB", show_default=True,
              help="Warn when unfused attention at the max shapes needs more than this.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def check(onnx_path, versions, dla, memory_budget, as_json):
    """What TensorRT would refuse or run slowly, per version, from facts read in its sources (no TensorRT
    runs here). Exit 0 when no version finds a problem, 1 when one does; warnings are listed apart."""
    from exporter.trt_lint import check_for_tensorrt
    from xattn.memory import parse_size

    budget = parse_size(memory_budget)
    reports = [check_for_tensorrt(onnx_path, v, dla=dla, memory_budget=budget)
               for v in (versions or ("10.3.0", "10.13.3", "11.4.0"))]
    if as_json:
        click.echo(json.dumps([r.as_dict() for r in reports], indent=2))
    else:
        for report in reports:
            click.echo(report.format())
    if not all(r.passed for r in reports):
        raise click.exceptions.Exit(1)


@cli.command()
@model_options
@click.option("-o", "--output-dir", default="artifacts", show_default=True, type=click.Path(file_okay=False),
              help="Folder for every artifact and report.")
@click.option("--data", "data_spec", default="shipped", show_default=True, metavar="SOURCE",
              help="Calibration and validation data (see 'xattn calibrate --help').")
@click.option("--samples", type=COUNT, default=64, show_default=True, help="Calibration pairs (validation: up to 16 others).")
@click.option("--int8-target-rel-l2", type=NON_NEGATIVE, default=0.011, show_default=True,
              help="INT8 (both targets): keep the most sensitive convolutions in float until this holds on held-out "
                   "data (0: no target, quantize every convolution).")
@click.option("--opset", type=click.IntRange(17, 21), default=None, help="ONNX opset of the export (default 18).")
@profile_options
@click.option("--skip-bench", is_flag=True, help="No benchmark at the end.")
@pass_progress
def deploy(model_name, checkpoint, model_args, input_channels, output_dir, data_spec, samples, int8_target_rel_l2,
           opset, min_shapes, opt_shapes, max_shapes, skip_bench, progress):
    """The main job, end to end: export + verify + inspect + validate (exit 1 if a check fails)."""
    from exporter.onnx_export import DEFAULT_OPSET, ExportSettings
    from tools.pipeline import run_pipeline

    export = ExportSettings(opset=opset or DEFAULT_OPSET, min_shapes=min_shapes, opt_shapes=opt_shapes,
                            max_shapes=max_shapes)
    model = load_model_from_options(model_name, checkpoint, model_args, input_channels)
    summary = run_pipeline(model, Path(output_dir), echo=click.echo, progress=progress, data=data_spec,
                           samples=samples, int8_target_rel_l2=int8_target_rel_l2 or None, export_settings=export,
                           benchmark=not skip_bench)
    if not summary["passed"]:
        raise click.exceptions.Exit(1)


@cli.command("triton")
@click.argument("artifacts", nargs=-1, required=True, metavar="ARTIFACT...")
@click.option("-o", "--output", required=True, metavar="REPOSITORY", help="Model repository to write (new or empty folder).")
@click.option("--name", default=None, help="Model name (several artifacts: the prefix of each name).")
@click.option("--max-batch-size", type=COUNT, default=None,
              help="Triton's max_batch_size (default: the batch the artifact was exported for; never above it).")
@click.option("--instances", type=COUNT, default=1, show_default=True, help="Model instances per device.")
@click.option("--kind", type=click.Choice(["cpu", "gpu"]), default="cpu", show_default=True,
              help="Where the instances run (engines need gpu).")
@click.option("--dynamic-batching-delay-us", "delay_us", type=click.IntRange(min=0), default=100, show_default=True,
              help="The dynamic batcher's max queue delay (0: no dynamic batching).")
@click.option("--trt-accelerator", type=click.Choice(["FP16", "INT8"]), default=None,
              help="ONNX files on GPU: ONNX Runtime's TensorRT provider in this precision.")
@click.option("--no-check", is_flag=True, help="Do not load the repository into Triton's core before writing it.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@pass_progress
def triton_command(artifacts, output, name, max_batch_size, instances, kind, delay_us, trt_accelerator, no_check,
                   as_json, progress):
    """A Triton model repository from ONNX files and engines, checked by Triton's own core."""
    from xattn.fileio import refuse_overwriting_inputs

    refuse_overwriting_inputs({"-o": output}, {f"artifact {i + 1}": a for i, a in enumerate(artifacts)})
    from exporter.triton_repo import TritonSettings, write_repository

    settings = TritonSettings(name=name, max_batch_size=max_batch_size, instances=instances, kind=kind,
                              delay_us=delay_us, trt_accelerator=trt_accelerator, check=not no_check)
    models = write_repository(list(artifacts), output, settings, progress=progress)
    if as_json:
        click.echo(json.dumps([m.as_dict() for m in models], indent=2))
        return
    for model in models:
        click.echo(f"{model.name}: {model.backend}, max batch {model.max_batch_size} <- {model.artifact}")
        click.echo(f"  {model.verdict}" + (f" (Triton: {model.triton_said})" if model.triton_said else ""))
        for note in model.notes:
            click.echo(f"  note: {note}")
    click.echo(f"wrote {output} ({len(models)} models); start it as {output}/README.md says")


@cli.command("serve")
@click.argument("artifact")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to bind (loopback by default; 0.0.0.0 exposes the server to the network).")
@click.option("--http-port", type=click.IntRange(1, 65535), default=8000, show_default=True)
@click.option("--grpc-port", type=click.IntRange(1, 65535), default=8001, show_default=True)
@click.option("--name", default=None, help="Model name on the server (default: from the file name).")
@click.option("--max-batch-size", type=COUNT, default=None,
              help="Triton's max batch (default: the artifact's recorded max batch, at most 8).")
@click.option("--dynamic-batching-delay-us", "delay_us", type=click.IntRange(min=0), default=100, show_default=True)
@runtime_options
def serve_command(artifact, host, http_port, grpc_port, name, max_batch_size, delay_us, providers, threads):
    """Serve ARTIFACT (ONNX file or engine) on Triton through PyTriton: KServe v2 HTTP and gRPC."""
    from runtime.serve import ServeSettings, serve

    if http_port == grpc_port:
        raise click.BadParameter("--http-port and --grpc-port must differ")
    settings = ServeSettings(host=host, http_port=http_port, grpc_port=grpc_port, name=name,
                             max_batch_size=max_batch_size, delay_us=delay_us, threads=threads,
                             providers=split_list(providers))
    served = serve(artifact, settings, say=lambda message: click.echo(message, err=True))
    click.echo(f"stopped serving {served['model']} (largest batch run: {served['largest_batch_seen']}; "
               f"requests refused by the HTTP/gRPC fronts: {served['refused_at_the_front']})")


def _model_args(items):
    """``--model-arg`` values; parsing them needs the model registry (and torch) only when there are any."""
    if not items:
        return {}
    from xattn.registry import parse_model_args

    return parse_model_args(items)


def main() -> None:
    import signal

    signal.signal(signal.SIGTERM, _raise_terminated)
    for stream in (sys.stdout, sys.stderr):   # file names need not be UTF-8: print them as \xNN, never fail
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="backslashreplace")
    try:
        cli(prog_name="xattn", standalone_mode=True)
    except SystemExit as exc:
        if SIGNALLED["signum"] is not None and exc.code in (0, None):
            # the signal was swallowed somewhere (and every atomic write refused to publish): say so
            print("terminated", file=sys.stderr)
            raise SystemExit(143) from None
        raise
    except BrokenPipeError:
        # stdout closed early (xattn inspect m.onnx | head): not an error worth a traceback
        os.dup2(os.open(os.devnull, os.O_WRONLY), 1)
        raise SystemExit(1)
    except OSError as exc:   # writing to stdout failed (a full disk: > /dev/full)
        print(f"error: cannot write the output: {exc.strerror or exc}", file=sys.stderr)
        raise SystemExit(2)


if __name__ == "__main__":
    main()
