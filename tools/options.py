"""Option sets shared by several commands, defined once (Polygraphy's argument-group idea)."""

from __future__ import annotations

import functools
import sys

import click

from xattn.errors import BadInputError
from xattn.shapes import ShapeSet, parse_shape_set


class ShapeSetType(click.ParamType):
    """``x1:1x3x64x64,x2:1x3x32x32``; parse errors surface as one-line ShapeErrors (exit 2)."""

    name = "SHAPES"

    def convert(self, value, param, ctx) -> ShapeSet:
        if isinstance(value, dict):
            return value
        return parse_shape_set(value)


SHAPES = ShapeSetType()


class FiniteFloat(click.FloatRange):
    """A float range that also refuses NaN and infinities (click's FloatRange lets NaN through)."""

    def convert(self, value, param, ctx):
        import math

        number = click.FloatRange.convert(self, value, param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number", param, ctx)
        return number


# Numeric option types, defined once: a bad value is refused (exit 2) before any work.
COUNT = click.IntRange(min=1)                  # samples, iterations, batch sizes, rows
# 100000 made ONNX Runtime try to start 100000 threads; 0 is ONNX Runtime's own "its default" (one per core)
THREADS = click.IntRange(min=0, max=1024)
SEED = click.IntRange(min=0, max=2**32 - 1)
NON_NEGATIVE = FiniteFloat(min=0.0)
POSITIVE = FiniteFloat(min=0.0, min_open=True)
FRACTION = FiniteFloat(min=0.0, max=1.0)
COSINE = FiniteFloat(min=-1.0, max=1.0)


def option_group(*decorators):
    """Apply click options in the order listed (so --help lists them in that order)."""
    def apply(func):
        for decorator in reversed(decorators):
            func = decorator(func)
        return func
    return apply


def model_options(func):
    """--model, --checkpoint, --model-arg, --input-channels."""
    decorators = [
        click.option("--model", "model_name", default=None, metavar="NAME|pkg.mod:factory",
                     help="Built-in model (cross-attention-net [default], cross-attention, seed-cross-attention) "
                          "or package.module:factory returning an nn.Module."),
        click.option("--checkpoint", default=None,
                     help="State dict (.pt/.pth, loaded weights-only, or .safetensors). Without one, built-in "
                          "models use seeded weights (seed 0) that can be rebuilt exactly."),
        click.option("--model-arg", "model_args", multiple=True, metavar="KEY=VALUE",
                     help="Constructor argument, repeatable (e.g. num_heads=4). With a checkpoint, sizes not "
                          "given are read from its weights."),
        click.option("--input-channels", default=None, metavar="x1=3,x2=3",
                     help="Input names and channels of a user model that does not declare xattn_io."),
    ]
    return option_group(*decorators)(func)


def profile_options(func):
    """--min-shapes, --opt-shapes, --max-shapes."""
    for label, text in (("max", "largest"), ("opt", "most common (TensorRT tunes for it)"), ("min", "smallest")):
        func = click.option(f"--{label}-shapes", type=SHAPES, default=None, metavar="SHAPES",
                            help=f"The {text} shapes to support, e.g. x1:1x3x64x64,x2:1x3x32x32.")(func)
    return func


def parse_input_channels(text: str | None):
    from xattn.registry import ModelIO

    if not text:
        return None
    inputs = {}
    for part in text.split(","):
        name, sep, channels = part.partition("=")
        if not sep or not channels.strip().isdigit():
            raise BadInputError(f"bad --input-channels {text!r}", hint="write x1=3,x2=3")
        inputs[name.strip()] = int(channels)
    return ModelIO(inputs)


def load_model_from_options(model_name, checkpoint, model_args, input_channels):
    from xattn.registry import DEFAULT_MODEL, load_model, parse_model_args

    return load_model(model_name or DEFAULT_MODEL, checkpoint, parse_model_args(model_args),
                      io=parse_input_channels(input_channels))


class Progress:
    """Progress lines on stderr (not with --quiet or XATTN_QUIET=1).

    On a terminal every message is shown. In a log (CI, a pipe) a line every message would flood it
    and no line would look hung, so the first message is shown at once and then at most one every
    ``LOG_INTERVAL`` seconds (the latest one), which keeps a long calibration visibly alive.
    """

    LOG_INTERVAL = 10.0

    def __init__(self, quiet: bool = False):
        import os

        self.enabled = not quiet and not os.environ.get("XATTN_QUIET")
        self.terminal = sys.stderr.isatty()
        self.last = None

    def __call__(self, message: str) -> None:
        if not self.enabled:
            return
        import time

        now = time.monotonic()
        if self.terminal or self.last is None or now - self.last >= self.LOG_INTERVAL:
            self.last = now
            click.echo(f"  .. {message}", err=True)


def progress_from(ctx: click.Context) -> Progress:
    root = ctx.find_root()
    return Progress(quiet=bool(root.params.get("quiet")))


def pass_progress(func):
    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        return func(*args, progress=progress_from(click.get_current_context()), **kwargs)

    return wrapper


def tolerance_options(func):
    """--precision and the tolerance overrides."""
    decorators = [
        click.option("--precision", type=click.Choice(["fp32", "fp16", "int8", "fp8"]), default=None,
                     help="Selects default tolerances (default: what the artifact records, else fp32)."),
        click.option("--max-rel-l2", type=NON_NEGATIVE, default=None, help="Largest relative L2 error allowed."),
        click.option("--min-cosine", type=COSINE, default=None, help="Smallest cosine similarity allowed."),
        click.option("--atol", type=NON_NEGATIVE, default=None, help="Elementwise absolute tolerance."),
        click.option("--rtol", type=NON_NEGATIVE, default=None, help="Elementwise relative tolerance."),
        click.option("--max-outlier-fraction", type=FRACTION, default=None,
                     help="Largest share of elements outside atol + rtol*|ref| (fp32 default 0; fp16/int8: not judged)."),
    ]
    return option_group(*decorators)(func)


def report_options(func):
    """--json-report, --junit, --markdown."""
    for flag, text in (("--markdown", "Markdown table"), ("--junit", "JUnit XML"), ("--json-report", "JSON report")):
        func = click.option(flag, default=None, metavar="FILE", help=f"Write a {text} here.")(func)
    return func


def runtime_options(func):
    """--providers, --threads."""
    func = click.option("--threads", type=THREADS, default=None,
                        help="ONNX Runtime intra-op threads (0 or unset: one per core, ONNX Runtime's default).")(func)
    func = click.option("--providers", default=None, metavar="P1,P2",
                        help="ONNX Runtime providers in priority order (cpu, cuda, tensorrt or full names; "
                             "default: best available).")(func)
    return func


def split_list(text: str | None) -> list[str] | None:
    return [part.strip() for part in text.split(",") if part.strip()] if text else None


def data_options(func):
    """--data and how to turn it into feeds (samples, seed, batch size, sizes, normalisation)."""
    decorators = [
        click.option("--data", "data_spec", default="shipped", show_default=True, metavar="SOURCE",
                     help="Folder (x1/ + x2/, or images to pair), .csv manifest, .npz, 'shipped' (photos "
                          "scikit-image ships), pkg.mod:function, or 'synthetic' (random; labelled as such)."),
        click.option("--samples", type=COUNT, default=64, show_default=True, help="Image pairs (or feeds) to use."),
        click.option("--seed", type=SEED, default=0, show_default=True, help="Seed for shuffling and crops."),
        click.option("--batch-size", type=COUNT, default=1, show_default=True, help="Pairs per feed."),
        click.option("--resize", multiple=True, metavar="x1:HxW,x2:HxW",
                     help="Target sizes, repeatable: every pair is rendered at each (default x1:64x64,x2:48x80 "
                          "and x1:96x96,x2:64x64)."),
        click.option("--mean", default=None, metavar="R,G,B", help="Normalisation mean (default ImageNet's)."),
        click.option("--std", default=None, metavar="R,G,B", help="Normalisation std (default ImageNet's)."),
    ]
    return option_group(*decorators)(func)


def _floats(text: str | None, label: str):
    if text is None:
        return None
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError as exc:
        raise BadInputError(f"bad --{label} {text!r}", hint="write three numbers, e.g. 0.5,0.5,0.5") from exc
    if len(values) != 3:
        raise BadInputError(f"--{label} needs three values (R,G,B), got {len(values)}")
    import math

    if not all(math.isfinite(v) for v in values) or (label == "std" and any(v <= 0 for v in values)):
        raise BadInputError(f"--{label} {text!r}: every value must be finite" + (" and > 0" if label == "std" else ""))
    return values


def data_settings(samples, seed, batch_size, resize, mean, std):
    from xattn.data import IMAGENET_MEAN, IMAGENET_STD, DataSettings

    sizes = []
    for text in resize or ():
        size = {}
        for name, shape in parse_shape_set(text).items():
            if len(shape) != 2:
                raise BadInputError(f"--resize {text!r}: give height x width per input, e.g. x1:64x64,x2:48x80")
            size[name] = shape
        sizes.append(size)
    return DataSettings(samples=samples, seed=seed, batch_size=batch_size, sizes=sizes or None,
                        mean=_floats(mean, "mean") or IMAGENET_MEAN, std=_floats(std, "std") or IMAGENET_STD)


def calibration_options(func):
    """--method, --percentile, --quantize-ops."""
    decorators = [
        click.option("--method", type=click.Choice(["minmax", "entropy", "percentile"]), default="percentile",
                     show_default=True, help="How activation ranges are computed."),
        click.option("--percentile", type=FiniteFloat(min=50.0, max=100.0), default=99.99, show_default=True,
                     help="For --method percentile (50..100)."),
        click.option("--quantize-ops", default="Conv", show_default=True, metavar="OP1,OP2",
                     help="Node types to quantize; 'Linear' = Gemm and MatMuls with a weight (nn.Linear "
                          "projections, never the attention matmuls). Attention and softmax stay float unless named."),
    ]
    return option_group(*decorators)(func)
