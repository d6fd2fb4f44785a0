"""The Runner interface shared by every backend, and the input checks it applies before each call.

In the manner of Polygraphy's ``BaseRunner``: ``activate()``/``deactivate()`` (or ``with runner:``),
``infer(feed) -> outputs`` with ``dict[str, np.ndarray]`` on both sides, ``input_metadata`` and
``last_inference_time``. Subclasses fill the ``*_impl`` hooks; the base checks inputs and times calls,
so a backend is short and every backend refuses bad inputs with the same words.
"""

from __future__ import annotations

import abc
import time
from dataclasses import dataclass, field
from typing import Mapping

import numpy as np

from xattn.errors import BadInputError
from xattn.shapes import format_shape

Dim = int | str | None  # fixed size | named dynamic axis | unnamed dynamic axis


class InputError(BadInputError):
    """An inference input does not match what the runner expects."""


@dataclass(frozen=True)
class TensorMeta:
    """What a runner expects of one input (or produces as one output).

    Attributes:
        name: tensor name.
        dtype: numpy dtype.
        shape: per axis, a fixed ``int``, the name of a dynamic axis (``"batch"``), or ``None``.
        ranges: per dynamic axis index, the inclusive ``(min, max)`` the artifact supports, where known.
    """

    name: str
    dtype: np.dtype
    shape: tuple[Dim, ...]
    ranges: dict[int, tuple[int, int]] = field(default_factory=dict)

    def describe(self) -> str:
        dims = []
        for axis, dim in enumerate(self.shape):
            text = "?" if dim is None else str(dim)
            if axis in self.ranges and not isinstance(dim, int):
                low, high = self.ranges[axis]
                text += f"[{low}..{high}]"
            dims.append(text)
        return f"{self.name}: {np.dtype(self.dtype).name} [{', '.join(dims)}]"


def check_shapes(shapes: Mapping[str, tuple[int, ...]], expected: Mapping[str, TensorMeta]) -> None:
    """Raise :class:`InputError` unless input ``shapes`` fit: names (unknown, missing), rank, fixed
    dimensions, dynamic dimensions against their ranges, one value per named axis across inputs.

    Shapes alone, so callers refuse a request *before* drawing or loading any array (a 100000 x 100000
    input is refused without allocating it).
    """
    unknown = sorted(set(shapes) - set(expected))
    if unknown:
        raise InputError(f"unknown input {', '.join(map(repr, unknown))}; expected {', '.join(map(repr, expected))}")
    missing = [name for name in expected if name not in shapes]
    if missing:
        raise InputError(f"missing input {', '.join(map(repr, missing))}; expected {', '.join(map(repr, expected))}")
    named_axes: dict[str, tuple[int, str]] = {}
    for name, meta in expected.items():
        shape = tuple(shapes[name])
        if len(shape) != len(meta.shape):
            raise InputError(f"input {name!r} has rank {len(shape)} (shape {format_shape(shape)}), "
                             f"expected rank {len(meta.shape)} ({meta.describe()})")
        for axis, (size, dim) in enumerate(zip(shape, meta.shape)):
            if isinstance(dim, int):
                if size != dim:
                    raise InputError(f"input {name!r} axis {axis} is {size}, expected {dim} "
                                     f"(shape {format_shape(shape)}; {meta.describe()})")
                continue
            if axis in meta.ranges:
                low, high = meta.ranges[axis]
                if not low <= size <= high:
                    label = f"axis {axis}" + (f" ({dim})" if dim else "")
                    raise InputError(f"input {name!r} {label} is {size}, outside the supported range "
                                     f"{low}..{high} (shape {format_shape(shape)})",
                                     hint="re-export or rebuild with a wider --min-shapes/--max-shapes")
            if isinstance(dim, str):
                seen = named_axes.setdefault(dim, (size, name))
                if seen[0] != size:
                    raise InputError(f"axis {dim!r} is {seen[0]} in input {seen[1]!r} but {size} in input {name!r}")


def check_inputs(feed: Mapping[str, np.ndarray], expected: Mapping[str, TensorMeta], *,
                 allow_nonfinite: bool = False) -> None:
    """Raise :class:`InputError` naming the input, what was expected and what came.

    Checks what :func:`check_shapes` checks, plus array type, dtype and NaN/Inf (refused unless
    ``allow_nonfinite``).
    """
    for name, value in feed.items():
        if name in expected and not isinstance(value, np.ndarray):
            raise InputError(f"input {name!r} is a {type(value).__name__}, expected a numpy array")
    check_shapes({name: tuple(np.shape(value)) for name, value in feed.items()}, expected)
    for name, meta in expected.items():
        value = feed[name]
        if value.dtype != meta.dtype:
            raise InputError(f"input {name!r} has dtype {value.dtype}, expected {np.dtype(meta.dtype).name}",
                             hint=f"convert with .astype(np.{np.dtype(meta.dtype).name})")
        if not allow_nonfinite and value.dtype.kind == "f" and not np.isfinite(value).all():
            bad = int(np.size(value) - np.count_nonzero(np.isfinite(value)))
            raise InputError(f"input {name!r} holds {bad} NaN/Inf values",
                             hint="clean the data, or pass --allow-nonfinite (allow_nonfinite=True in Python)")


class Runner(abc.ABC):
    """Base of every backend.

    Use as ``with runner: outputs = runner.infer(feed)``, or call :meth:`activate` and
    :meth:`deactivate` yourself. Subclasses implement ``activate_impl``, ``deactivate_impl``,
    ``input_metadata_impl``, ``output_names_impl`` and ``infer_impl``.

    Args:
        name: a label for reports (defaults to the class name).
        allow_nonfinite: accept NaN/Inf in inputs instead of refusing them.
    """

    #: The backend's short name in reports: "torch", "onnxruntime", "tensorrt".
    backend = "base"

    def __init__(self, name: str | None = None, *, allow_nonfinite: bool = False):
        self.name = name or type(self).__name__
        self.allow_nonfinite = allow_nonfinite
        self.is_active = False
        self.last_inference_time: float | None = None
        #: Device-side time of the last inference (CUDA events) where the backend measures one, else None.
        self.last_device_time: float | None = None
        self._input_metadata: dict[str, TensorMeta] | None = None

    # -- public API ---------------------------------------------------------------------------------
    def activate(self) -> "Runner":
        if not self.is_active:
            self.activate_impl()
            self.is_active = True
        return self

    def deactivate(self) -> None:
        if self.is_active:
            self.deactivate_impl()
            self.is_active = False
            self._input_metadata = None

    def __enter__(self) -> "Runner":
        return self.activate()

    def __exit__(self, *exc_info) -> None:
        self.deactivate()

    @property
    def input_metadata(self) -> dict[str, TensorMeta]:
        """Names, dtypes and shapes (with dynamic axes and their ranges) of the inputs."""
        self._require_active()
        if self._input_metadata is None:
            self._input_metadata = self.input_metadata_impl()
        return self._input_metadata

    @property
    def output_names(self) -> list[str]:
        self._require_active()
        return self.output_names_impl()

    def infer(self, feed: Mapping[str, np.ndarray], *, check: bool = True) -> dict[str, np.ndarray]:
        """Run one inference. Inputs are checked first (unless ``check=False``); outputs are numpy arrays."""
        self._require_active()
        if check:
            check_inputs(feed, self.input_metadata, allow_nonfinite=self.allow_nonfinite)
        start = time.perf_counter()
        outputs = self.infer_impl(feed)
        self.last_inference_time = time.perf_counter() - start
        return outputs

    def describe(self) -> dict:
        """A JSON-able description for reports (backend, artifact, providers...)."""
        return {"name": self.name, "backend": self.backend}

    # -- hooks --------------------------------------------------------------------------------------
    @abc.abstractmethod
    def activate_impl(self) -> None: ...

    def deactivate_impl(self) -> None:
        pass

    @abc.abstractmethod
    def input_metadata_impl(self) -> dict[str, TensorMeta]: ...

    @abc.abstractmethod
    def output_names_impl(self) -> list[str]: ...

    @abc.abstractmethod
    def infer_impl(self, feed: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]: ...

    def _require_active(self) -> None:
        if not self.is_active:
            raise RuntimeError(f"{self.name} is not active: use 'with runner:' or call activate() first")
