"""Pipeline steps shared by single commands and ``xattn deploy``: each does the work, then says what it did."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Callable

from xattn.errors import BadInputError
from xattn.provenance import require_fp32

Echo = Callable[[str], None]


def fp16_step(onnx_path, output, *, keep=(), keep_attention=None, target="tensorrt", check_spec=None,
              check_feeds=None, check_label=None, attention_op="matmul", echo: Echo) -> Path:
    from exporter.fp16 import Fp16Settings, convert_fp16

    if check_spec and check_feeds is None:
        from xattn.data import DataSettings, load_for_model
        from xattn.onnxfile import load_onnx

        data = load_for_model(check_spec, load_onnx(onnx_path), DataSettings(samples=8, seed=1000))
        check_feeds, check_label = data.feeds, data.label
    result = convert_fp16(onnx_path, output, Fp16Settings(target=target, keep_attention_fp32=keep_attention,
                                                          fp32_keep=tuple(keep), attention_op=attention_op),
                          check_feeds=check_feeds, check_label=check_label)
    for note in result.notes:
        echo(note)
    checked = f" (rel. L2 {result.rel_l2:.2g} vs FP32 on {result.check_data})" if result.rel_l2 is not None else ""
    if not result.blocks:
        attention = "no softmax attention found"
    elif not result.attention_fp16:
        attention = "attention score path FP32"
    else:
        attention = "attention FP16" + (f", scale moved onto Q in {len(result.scale_moved)} of {result.blocks} "
                                        f"block(s)" if result.scale_moved else "")
    echo(f"wrote {result.path}: FP16 for {target}, FP32 inputs/outputs; {attention}"
         f"{' as ONNX Attention (opset 23: TensorRT 10.14+/11.x)' if attention_op == 'onnx' else ''}{checked}; "
         f"kept in FP32: {', '.join(result.fp32_nodes) or 'nothing'}")
    return result.path


def optimize_step(onnx_path, output, *, target="onnxruntime", reference=None, checkpoint=None, echo: Echo) -> Path:
    from xattn.onnxfile import load_onnx
    from exporter.optimize import optimize_onnx
    from xattn.provenance import get_onnx_metadata

    model = None
    if reference or checkpoint:
        from runtime.validate import resolve_reference

        model = resolve_reference(get_onnx_metadata(load_onnx(onnx_path)), reference, checkpoint,
                                  artifact=str(onnx_path))
    result = optimize_onnx(onnx_path, output, target=target, reference=model)
    worst = max(c.rel_l2 for c in result.checks)
    if target == "openvino":
        from exporter.attention import MIN_CHUNK_ROWS

        done = (f"queries in slices of at least {MIN_CHUNK_ROWS} rows, for OpenVINO ("
                + ", ".join(f"{name}: {result.chunks[name]} slices" for name in result.fused) + ")")
    else:
        done = f"attention fused into com.microsoft.MultiHeadAttention ({', '.join(result.fused)})"
    echo(f"wrote {result.path}: {done}; verified against PyTorch at {len(result.checks)} shape sets, "
         f"worst rel. L2 {worst:.2g}")
    for name, why in result.left:
        echo(f"not rewritten: {name} ({why})")
    return result.path


def check_outputs(*paths, cache=None, trt_version="10.3.0") -> None:
    """Before any work: every output writable, and the cache's TensorRT version readable."""
    from xattn.trt_cache import trt_version_number
    from xattn.fileio import check_writable

    for path in (*paths, cache):
        if path:
            check_writable(path)
    if cache:
        trt_version_number(trt_version)


def write_cache(cache, table, trt_version, echo: Echo) -> None:
    from xattn.trt_cache import write_trt_cache

    written = write_trt_cache(cache, table.amax, table.method, trt_version)
    echo(f"wrote {cache}: TRT-{written.version_number}-{written.algorithm}, {len(written.amax)} tensors")


def warn_if_synthetic(data, echo: Echo) -> None:
    if data is not None and data.synthetic:
        echo("warning: calibrated on SYNTHETIC data; ranges may not fit real inputs")


def calibrate_step(onnx_path, output, *, data_spec, data_settings, settings, cache=None, trt_version="10.3.0",
                   echo: Echo, progress: Callable[[str], None]):
    """Range table for ``onnx_path`` (reused when current), plus a TensorRT cache when asked."""
    from xattn.data import load_for_model
    from calibration.ranges import calibrate
    from xattn.onnxfile import load_onnx

    check_outputs(output, cache=cache, trt_version=trt_version)
    settings.check()
    model = require_fp32(load_onnx(onnx_path), onnx_path, "calibrate")
    data = load_for_model(data_spec, model, data_settings)
    echo(f"data: {data.summary()}")
    table, reused = calibrate(model, data, settings, output=output, progress=progress)
    detail = f" {settings.percentile}" if settings.method == "percentile" else ""
    echo(f"{'reused' if reused else 'wrote'} {output}: {len(table.amax)} tensors, {settings.method}{detail}, "
         f"{table.samples} samples")
    if cache:
        write_cache(cache, table, trt_version, echo)
    warn_if_synthetic(data, echo)
    return table


def modules_to_nodes(model, op_types, patterns, echo: Echo) -> list[str]:
    """The quantizable nodes inside the PyTorch modules ``patterns`` name (refused when one matches none)."""
    from xattn.nodes import module_of, nodes_in_modules, selected_nodes

    candidates = selected_nodes(model, op_types)
    names, unmatched = nodes_in_modules(candidates, patterns)
    if unmatched:
        known = sorted({m for m in (module_of(n) for n in candidates) if m})
        raise BadInputError(f"--exclude-modules {', '.join(unmatched)} matches no quantizable node",
                            hint=(f"modules with {'/'.join(op_types)} nodes: {', '.join(known)}" if known else
                                  "this ONNX records no module names (export it with xattn export); use --exclude-nodes"))
    echo(f"--exclude-modules keeps {len(names)} node(s) in float: {', '.join(names)}")
    return names


def quantize_step(onnx_path, output, *, data_spec, data_settings, settings, ranges=None, exclude_nodes=(),
                  target_rel_l2=None, target_cosine=None, holdout=0.25, cache=None, trt_version="10.3.0",
                  ranges_output=None, target="tensorrt", high_precision="fp16", attention_op="matmul",
                  exclude_modules=(), cpu_target="this", echo: Echo, progress: Callable[[str], None]):
    """Calibrate (or load ranges), quantize (with the fallback when a target is given), write the cache."""
    from xattn.data import load_for_model
    from calibration.quantize import AccuracyTarget, QuantizeSettings, quantize_onnx, quantize_to_target
    from calibration.ranges import RangeTable, calibrate
    from xattn.onnxfile import load_onnx
    from xattn.nodes import node_label

    check_outputs(output, ranges_output, cache=cache, trt_version=trt_version)
    settings.check()
    quant = QuantizeSettings(op_types=tuple(settings.op_types), exclude_nodes=tuple(exclude_nodes), target=target,
                             high_precision=high_precision, attention_op=attention_op, cpu_target=cpu_target)
    quant.check()
    if target == "onnxruntime":
        from xattn.cpu import describe_cpu

        cpu = describe_cpu()
        echo(f"CPU target {cpu_target}: {'7-bit' if quant.reduce_range() else 'full 8-bit'} weights (this machine: "
             f"{cpu['cpu_model'] or 'unknown CPU'}, {', '.join(cpu['cpu_features']) or 'features unknown'})")
    model = require_fp32(load_onnx(onnx_path), onnx_path, "quantize")
    if exclude_modules:
        quant = replace(quant, exclude_nodes=tuple(exclude_nodes) + tuple(
            modules_to_nodes(model, settings.op_types, exclude_modules, echo)))
    table = None
    if ranges:
        table = RangeTable.load(ranges)
        table.check_model(model, ranges)   # before any data or quantization work
    wants_target = target_rel_l2 is not None or target_cosine is not None
    data = load_for_model(data_spec, model, data_settings) if wants_target or not ranges else None
    if data is not None:
        from xattn.data import format_statistics

        echo(f"data: {data.summary()}")
        # said before calibrating: INT8 ranges fit this data, and only data like it (validate says when not)
        echo(f"data statistics: {format_statistics(data.statistics())}")
    if table is not None:
        echo(f"ranges: {ranges} ({table.method}, {table.samples} samples of {table.data_label})")
    else:
        calib = data.split(holdout)[0] if wants_target else data
        table, reused = calibrate(model, calib, settings, output=ranges_output, progress=progress)
        echo(f"ranges: {'reused ' + str(ranges_output) if reused else 'computed'} ({settings.method}, "
             f"{table.samples} samples)")
    if wants_target:
        heldout = data.split(holdout)[1]
        accuracy = AccuracyTarget(target_rel_l2, target_cosine)
        result = quantize_to_target(onnx_path, table, output, heldout, accuracy, quant, progress=progress)
        for step in result.history[1:]:
            echo(f"  kept {node_label(step['kept_in_float'], step.get('module'))} in float: rel. L2 "
                 f"{step['rel_l2']:.4g}, cosine {step['cosine']:.6f}")
        first, last = result.history[0], result.history[-1]
        echo(f"target {accuracy.describe()} on {len(heldout)} held-out feeds: rel. L2 {first['rel_l2']:.4g} -> "
             f"{last['rel_l2']:.4g}, cosine {first['cosine']:.6f} -> {last['cosine']:.6f}; kept in float: "
             f"{', '.join(result.excluded_nodes) or 'nothing'}")
    else:
        result = quantize_onnx(onnx_path, table, output, quant)
    for note in result.notes:
        echo(note)
    placement = ("Q/DQ on inputs and weights, symmetric, per-channel weights, the rest "
                 f"{high_precision.upper()}" if target == "tensorrt" else
                 "uint8 activations, 7-bit per-channel weights (QLinearConv on x86)")
    echo(f"wrote {result.path}: INT8 for {target} on {len(result.quantized_nodes)} nodes "
         f"({', '.join(settings.op_types)}): {placement}")
    if cache:
        write_cache(cache, table, trt_version, echo)
    warn_if_synthetic(data, echo)
    return result, table, data


def fp8_step(onnx_path, output, *, data_spec, data_settings, holdout=0.25, echo: Echo,
             progress: Callable[[str], None]):
    """FP8 Q/DQ for TensorRT: calibrate on most of the data, measure on the held-out rest, write the file."""
    import numpy as np

    from calibration.fp8 import quantize_fp8
    from xattn.onnxfile import load_onnx
    from runtime.tolerances import tolerances_for
    from xattn.data import format_statistics, load_for_model

    model = load_onnx(onnx_path)
    data = load_for_model(data_spec, model, data_settings)
    echo(f"data: {data.summary()}")
    echo(f"data statistics: {format_statistics(data.statistics())}")
    calib, heldout = data.split(holdout)
    result = quantize_fp8(onnx_path, calib, output, say=progress)
    errors = heldout_errors(onnx_path, output, heldout)
    bound = tolerances_for("fp8").max_rel_l2
    echo(f"wrote {result.path}: FP8 (float8e4m3fn) Q/DQ for TensorRT on {len(result.quantized_nodes)} nodes, "
         f"attention in FP8 in {len(result.attention_blocks)} block(s); rel. L2 vs FP32 on {len(heldout)} held-out "
         f"feeds: {max(errors):.3g} worst, {np.mean(errors):.3g} mean (fp8 bound {bound:g})")
    for note in result.notes:
        echo(f"  note: {note}")
    warn_if_synthetic(data, echo)
    return result


def heldout_errors(float_path, quantized_path, heldout) -> list[float]:
    """Relative L2 of every output of ``quantized_path`` against ``float_path`` on ONNX Runtime's CPU, per held-out
    feed (ONNX Runtime computes Q/DQ exactly as written: the quantization's own error)."""
    from runtime.metrics import compare
    from runtime.onnxrt import OnnxRuntimeRunner

    errors = []
    with (OnnxRuntimeRunner(float_path, ["cpu"], memory_arena=False) as reference,
          OnnxRuntimeRunner(quantized_path, ["cpu"], memory_arena=False) as candidate):
        for feed in heldout.feeds:
            want, got = reference.infer(feed), candidate.infer(feed)
            errors += [compare(got[name], want[name]).rel_l2 for name in want]
    return errors


def openvino_int8_step(onnx_path, output, *, data_spec, data_settings, holdout=0.25, bf16_weights: bool = True,
                       products: str = "scores", echo: Echo, progress: Callable[[str], None]):
    """INT8 attention for OpenVINO: calibrate on most of the data, measure on the held-out rest, write."""
    import numpy as np

    from calibration.attention_int8 import quantize_attention_scores
    from xattn.onnxfile import load_onnx
    from runtime.tolerances import tolerances_for
    from xattn.data import format_statistics, load_for_model
    from xattn.errors import CheckFailedError
    from xattn.fileio import atomic_path

    data = load_for_model(data_spec, load_onnx(onnx_path), data_settings)
    echo(f"data: {data.summary()}")
    echo(f"data statistics: {format_statistics(data.statistics())}")
    calib, heldout = data.split(holdout)
    bound = tolerances_for("int8").max_rel_l2
    with atomic_path(output) as trial:   # measured before it takes the name: a file that misses the bound never does
        result = quantize_attention_scores(onnx_path, calib, trial, bf16_weights=bf16_weights, products=products,
                                           say=progress)
        errors = heldout_errors(onnx_path, trial, heldout)
        if max(errors) > bound:
            raise CheckFailedError(f"int8 attention misses the INT8 bound on {len(heldout)} held-out feeds: rel. "
                                   f"L2 {max(errors):.3g} > {bound:g}; {output} was not written",
                                   hint="run model.ov.onnx ('xattn optimize --target openvino') at bf16 instead")
    slices = ", ".join(f"{name}: {count}" for name, count in result.chunks.items())
    what = ("int8 Q and K^T" if not result.output_int8 else "int8 Q and K^T, uint8 probabilities and int8 V" +
            (f" (the latter in {len(result.output_int8)})" if len(result.output_int8) < len(result.blocks) else ""))
    echo(f"wrote {output}: for OpenVINO, {what} in {len(result.blocks)} attention block(s), queries in "
         f"slices ({slices}), the rest float (run it with --providers openvino-bf16 where the CPU has BF16); "
         f"rel. L2 vs FP32 on {len(heldout)} held-out feeds: {max(errors):.3g} worst, {np.mean(errors):.3g} mean "
         f"(int8 bound {bound:g})")
    for name, why in result.left:
        echo(f"not quantized: {name} ({why})")
    for name, why in result.output_left:
        echo(f"second product kept float: {name} ({why})")
    if result.bf16_weights is not None:
        rounded, left = result.bf16_weights.layers, result.bf16_weights.left
        if rounded:
            ratios = sorted(rounded.values())
            echo(f"bf16 weights: {len(rounded)} weight(s) on the bf16 grid by error feedback; their layers' output "
                 f"error {ratios[len(ratios) // 2]:.2f}x round-to-nearest's (median; {ratios[-1]:.2f}x worst)")
        for name, why in left:
            echo(f"bf16 weights: {name} left to the runtime's rounding ({why})")
    warn_if_synthetic(data, echo)
    return result
