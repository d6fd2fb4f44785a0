"""Finding, building and loading models: built-in names, users' factories, checkpoints, seeds.

A model is named either by a built-in name (``cross-attention-net``, ``cross-attention``,
``seed-cross-attention``) or by ``package.module:factory`` for a user's own module. Loading gives a
:class:`LoadedModel`: the module in eval mode plus everything needed to rebuild the exact same module
later (name, constructor arguments, checkpoint hash, init seed). Validation rebuilds the PyTorch
reference from that record, so it is written into every exported ONNX.
"""

from __future__ import annotations

import ast
import inspect
import os
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import torch
from torch import nn

from xattn import models
from xattn.checkpoint import StateDict, check_keys, checkpoint_sha256, load_state_dict
from xattn.errors import ModelError, ShapeError, UntrustedCodeError
from xattn.shapes import ShapeSet, check_profile, varied_shape_sets

DEFAULT_MODEL = "cross-attention-net"
DEFAULT_SEED = 0


@dataclass(frozen=True)
class ModelIO:
    """Names of a model's inputs (with their channel counts, NCHW) and outputs.

    Every input is a 4-D feature map ``(batch, channels, height, width)`` whose batch, height and
    width are free; the channels are fixed.
    """

    inputs: dict[str, int]
    outputs: tuple[str, ...] = ("y",)

    @classmethod
    def from_mapping(cls, value: Mapping[str, Any], where: str) -> "ModelIO":
        try:
            inputs = {str(k): int(v) for k, v in dict(value["inputs"]).items()}
            outputs = tuple(str(o) for o in value.get("outputs", ("y",)))
        except (KeyError, TypeError, ValueError) as exc:
            raise ModelError(f"{where}: xattn_io must look like "
                             "{'inputs': {'x1': 3, 'x2': 3}, 'outputs': ['y']}") from exc
        return cls(inputs, outputs)


@dataclass(frozen=True)
class ModelSpec:
    """A built-in model: how to build it and how to read its sizes from a checkpoint."""

    name: str
    factory: Callable[..., nn.Module]
    io: Callable[[nn.Module], ModelIO]
    args_from_state: Callable[[StateDict], dict[str, Any]]
    summary: str
    #: The seed snippet only runs when both maps have the same number of positions.
    equal_positions: bool = False


@dataclass
class LoadedModel:
    """A model ready to run or export, with the record needed to rebuild it exactly."""

    name: str
    module: nn.Module
    io: ModelIO
    model_args: dict[str, Any]
    checkpoint: str | None = None
    checkpoint_sha256: str | None = None
    init_seed: int | None = None
    equal_positions: bool = False

    def record(self) -> dict[str, Any]:
        """JSON-able description: enough to rebuild the same weights with :func:`load_model`."""
        return {
            "model": self.name,
            "model_args": self.model_args,
            "checkpoint": self.checkpoint,
            "checkpoint_sha256": self.checkpoint_sha256,
            "init_seed": self.init_seed,
            "inputs": self.io.inputs,
            "outputs": list(self.io.outputs),
            # consumers that cannot import torch choose shape sets from it (runtime.validate.record_shape_sets)
            "equal_positions": self.equal_positions,
        }


def _net_args(state: StateDict) -> dict[str, Any]:
    return {
        "in_channels": state["stem1.0.weight"].shape[1],
        "stem_channels": state["stem1.0.weight"].shape[0],
        "attn_channels": state["attention.conv_query.weight"].shape[0],
        "out_channels": state["head.weight"].shape[0],
    }


def _attention_args(state: StateDict) -> dict[str, Any]:
    return {
        "in_channels": state["conv_query.weight"].shape[1],
        "out_channels": state["conv_query.weight"].shape[0],
        "kv_channels": state["conv_key.weight"].shape[1],
    }


def _seed_args(state: StateDict) -> dict[str, Any]:
    return {"in_channels": state["conv_query.weight"].shape[1], "out_channels": state["conv_query.weight"].shape[0]}


BUILTIN_MODELS: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in (
        ModelSpec("cross-attention-net", models.CrossAttentionNet,
                  lambda m: ModelIO({"x1": m.in_channels, "x2": m.in_channels}),
                  _net_args, "two conv stems + cross attention + conv head; 3-channel images in (default)"),
        ModelSpec("cross-attention", lambda in_channels=128, out_channels=128, num_heads=1, kv_channels=None:
                  models.CrossAttention(in_channels, out_channels, num_heads, kv_channels),
                  lambda m: ModelIO({"x1": m.in_channels, "x2": m.kv_channels}),
                  _attention_args, "the cross-attention block alone (correct arithmetic)"),
        ModelSpec("seed-cross-attention", lambda in_channels=128, out_channels=128:
                  models.SeedCrossAttention(in_channels, out_channels),
                  lambda m: ModelIO({"x1": m.in_channels, "x2": m.in_channels}),
                  _seed_args, "bit-faithful to the widely copied snippet (for its checkpoints)",
                  equal_positions=True),
    )
}


def parse_model_args(items: tuple[str, ...] | list[str] | None) -> dict[str, Any]:
    """Parse ``key=value`` strings; values are Python literals (``128``, ``0.5``, ``True``) or strings."""
    result: dict[str, Any] = {}
    for item in items or ():
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key.isidentifier():
            raise ModelError(f"bad --model-arg {item!r}", hint="write key=value, e.g. num_heads=4")
        try:
            result[key] = ast.literal_eval(raw.strip())
        except (ValueError, SyntaxError):
            result[key] = raw.strip()
    return result


def load_model(
    name: str = DEFAULT_MODEL,
    checkpoint: str | os.PathLike | None = None,
    model_args: Mapping[str, Any] | None = None,
    *,
    seed: int | None = None,
    io: ModelIO | None = None,
) -> LoadedModel:
    """Build a model by name, load its checkpoint, put it in eval mode.

    Args:
        name: a built-in model name or ``package.module:factory``.
        checkpoint: a ``.pt``/``.pth``/``.safetensors`` state dict, or ``None`` for seeded init.
        model_args: constructor arguments; for built-ins given a checkpoint, sizes not given here are
            read from the checkpoint's weight shapes.
        seed: init seed when there is no checkpoint (default :data:`DEFAULT_SEED`), so the same
            weights can be rebuilt later as the reference.
        io: input names/channels and output names of a user model (else read from the factory's
            ``xattn_io`` attribute).
    """
    model_args = dict(model_args or {})
    state = load_state_dict(checkpoint) if checkpoint is not None else None
    spec = BUILTIN_MODELS.get(name)
    if spec is not None:
        factory: Callable[..., nn.Module] = spec.factory
        if state is not None:
            try:
                inferred = spec.args_from_state(state)
            except KeyError:
                inferred = {}  # key errors are reported in full by check_keys below
            model_args = {**inferred, **model_args}
    elif ":" in name:
        factory = _import_factory(name)
    else:
        raise ModelError(f"unknown model {name!r}",
                         hint=f"use one of {', '.join(BUILTIN_MODELS)} or package.module:factory")
    _check_args(factory, model_args, name)
    init_seed = None
    if state is None:
        init_seed = DEFAULT_SEED if seed is None else int(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(DEFAULT_SEED if init_seed is None else init_seed)
        try:
            module = factory(**model_args)
        except (TypeError, ValueError) as exc:
            raise ModelError(f"cannot build model {name!r} with {model_args}: {exc}") from exc
        except Exception as exc:
            raise ModelError(f"the factory of model {name!r} failed: {type(exc).__name__}: {exc}") from exc
    if not isinstance(module, nn.Module):
        raise ModelError(f"factory {name!r} returned {type(module).__name__}, not a torch.nn.Module",
                         hint="the factory must return the model instance")
    if state is not None:
        check_keys(module, state, checkpoint, name)
        module.load_state_dict(state)
    module.eval()
    if spec is not None:
        model_io = spec.io(module)
    else:
        model_io = io or _declared_io(factory, module, name)
    return LoadedModel(
        name=name, module=module, io=model_io, model_args=_jsonable(model_args),
        checkpoint=str(checkpoint) if checkpoint is not None else None,
        checkpoint_sha256=checkpoint_sha256(checkpoint), init_seed=init_seed,
        equal_positions=spec.equal_positions if spec else False,
    )


#: Largest value a recorded integer argument of a built-in model may take. Records come from files, and
#: a file must not be able to make the toolkit allocate without bound (``out_channels=10**12``).
MAX_RECORDED_ARG = 1 << 16


def load_model_from_record(record: Mapping[str, Any], checkpoint: str | os.PathLike | None = None, *,
                           user_factory: str | None = None, where: str = "the artifact") -> LoadedModel:
    """Rebuild the model an artifact was made from (see :meth:`LoadedModel.record`).

    Files are data: a record may select a built-in model by itself, but a ``package.module:factory``
    it names is imported only when the caller passes the same reference as ``user_factory`` (the user
    named it on the command line: ``--reference pkg.mod:factory``). Otherwise the file could make
    the toolkit import and call anything (``os:system``).
    """
    name = record.get("model")
    if not isinstance(name, str) or not name:
        raise ModelError(f"{where} does not record which model it was made from",
                         hint="pass --reference MODEL (and --checkpoint) explicitly")
    if name not in BUILTIN_MODELS and name != user_factory:
        raise UntrustedCodeError(
            f"{where} names {name!r} as its model; a file never chooses code for the toolkit to import",
            hint=f"if you trust that code, name it yourself: --reference {name}")
    model_args = record.get("model_args") or {}
    if not isinstance(model_args, Mapping):
        raise ModelError(f"{where}: recorded model_args is {type(model_args).__name__}, not a table")
    if name in BUILTIN_MODELS:
        _check_recorded_args(model_args, name, where)
    io = None
    if record.get("inputs"):
        io = ModelIO.from_mapping({"inputs": record["inputs"], "outputs": record.get("outputs") or ("y",)}, where)
    seed = record.get("init_seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise ModelError(f"{where}: recorded init_seed {seed!r} is not an integer")
    return load_model(name, checkpoint, model_args, seed=seed, io=io)


def _check_recorded_args(args: Mapping[str, Any], name: str, where: str) -> None:
    for key, value in args.items():
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_RECORDED_ARG:
            raise ModelError(f"{where}: recorded argument {key}={value!r} of model {name!r} is not an integer "
                             f"in 1..{MAX_RECORDED_ARG}", hint="the file is damaged or was not written by xattn")


def _import_factory(spec: str) -> Callable[..., nn.Module]:
    from xattn.imports import import_object

    return import_object(spec, ModelError, "model")


def _check_args(factory: Callable[..., Any], args: Mapping[str, Any], name: str) -> None:
    try:
        params = inspect.signature(factory).parameters
    except (TypeError, ValueError):
        return
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return
    unknown = sorted(set(args) - set(params))
    if unknown:
        accepted = ", ".join(p for p in params if p != "self") or "none"
        raise ModelError(f"model {name!r} has no argument {', '.join(unknown)}", hint=f"accepted: {accepted}")


def _declared_io(factory: Any, module: nn.Module, name: str) -> ModelIO:
    for owner in (module, factory):
        declared = getattr(owner, "xattn_io", None)
        if declared is not None:
            return declared if isinstance(declared, ModelIO) else ModelIO.from_mapping(declared, name)
    raise ModelError(f"model {name!r} does not declare its inputs",
                     hint="set factory.xattn_io = {'inputs': {'x1': 3, 'x2': 3}, 'outputs': ['y']} "
                          "(xattn export also takes --input-channels x1=3,x2=3; other commands read the "
                          "inputs recorded in the artifact)")


def _jsonable(args: Mapping[str, Any]) -> dict[str, Any]:
    out = {}
    for key, value in args.items():
        if hasattr(value, "item"):
            value = value.item()
        out[key] = value if isinstance(value, (int, float, str, bool, type(None), list)) else repr(value)
    return out


def describe_builtin_models() -> list[tuple[str, str]]:
    return [(spec.name, spec.summary) for spec in BUILTIN_MODELS.values()]


#: Default dynamic ranges (inclusive): (min, opt, max) per axis kind, for export and validation alike.
DEFAULT_BATCH = (1, 1, 8)
DEFAULT_SPATIAL = (4, 64, 128)


def resolve_profile(model: LoadedModel, min_shapes: ShapeSet | None = None, opt_shapes: ShapeSet | None = None,
                    max_shapes: ShapeSet | None = None) -> tuple[ShapeSet, ShapeSet, ShapeSet]:
    """Complete the min/opt/max shape sets from the defaults (:data:`DEFAULT_BATCH`, :data:`DEFAULT_SPATIAL`) and
    check them against the model's inputs."""
    shapes: dict[str, ShapeSet] = {}
    for index, (label, given) in enumerate((("min", min_shapes), ("opt", opt_shapes), ("max", max_shapes))):
        result: ShapeSet = {}
        for name, channels in model.io.inputs.items():
            default = (DEFAULT_BATCH[index], channels, DEFAULT_SPATIAL[index], DEFAULT_SPATIAL[index])
            result[name] = tuple(given[name]) if given and name in given else default
        if given:
            unknown = sorted(set(given) - set(model.io.inputs))
            if unknown:
                raise ShapeError(f"--{label}-shapes names unknown input {', '.join(map(repr, unknown))}; "
                                 f"model {model.name!r} has inputs {', '.join(map(repr, model.io.inputs))}")
        shapes[label] = result
    low, opt, high = shapes["min"], shapes["opt"], shapes["max"]
    for name, channels in model.io.inputs.items():
        for label, shape in (("min", low[name]), ("opt", opt[name]), ("max", high[name])):
            if len(shape) != 4:
                raise ShapeError(f"--{label}-shapes for {name!r} has rank {len(shape)}, expected 4 (NxCxHxW)")
            if shape[1] != channels:
                raise ShapeError(f"--{label}-shapes for {name!r} has {shape[1]} channels; model "
                                 f"{model.name!r} takes {channels}")
    # Defaults fill what was not given, so e.g. a given max below the default opt is clamped, not an error.
    for name in opt:
        opt[name] = tuple(min(max(o, a), b) for a, o, b in zip(low[name], opt[name], high[name]))
    check_profile(low, opt, high)
    ranges = {(low[n][0], high[n][0]) for n in low}
    if len(ranges) > 1:   # one named "batch" axis is shared by every input
        raise ShapeError(f"inputs must share one batch range, got {', '.join(f'{a}..{b}' for a, b in sorted(ranges))}")
    return low, opt, high


def verification_shapes(model: LoadedModel, low: ShapeSet, high: ShapeSet, example: ShapeSet) -> list[ShapeSet]:
    """Three shape sets unlike the example (see :func:`xattn.shapes.varied_shape_sets`)."""
    return varied_shape_sets(model.io.inputs, model.equal_positions, low, high, example)
