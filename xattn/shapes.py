"""Shape sets in trtexec's syntax: ``x1:2x3x64x48,x2:2x3x32x80``.

A *shape set* maps each input name to a concrete shape. Profiles (``--min-shapes`` etc.) are shape
sets too. Parsing errors say which part of the text is wrong.
"""

from __future__ import annotations

import re
from typing import Iterable, Mapping

from xattn.errors import ShapeError

ShapeSet = dict[str, tuple[int, ...]]

_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_.:/-]*$")


def parse_shape_set(text: str) -> ShapeSet:
    """Parse ``name:AxBxC,name2:DxE`` into ``{"name": (A, B, C), "name2": (D, E)}``.

    Raises:
        ShapeError: on empty text, a missing ``:``, a repeated name, or a dimension that is not a
            positive integer.
    """
    if not text or not text.strip():
        raise ShapeError("empty shape set", hint="write shapes as x1:1x3x64x64,x2:1x3x32x32")
    result: ShapeSet = {}
    for part in text.split(","):
        part = part.strip()
        name, sep, dims = part.rpartition(":")
        if not sep or not name or not dims:
            raise ShapeError(f"cannot parse shape {part!r} in {text!r}",
                             hint="write NAME:DxDxD, e.g. x1:1x3x64x64")
        if not _NAME.match(name):
            raise ShapeError(f"bad input name {name!r} in shapes {text!r}")
        if name in result:
            raise ShapeError(f"input {name!r} appears twice in shapes {text!r}")
        values = []
        for dim in re.split("[xX]", dims):
            if not dim.isdigit() or int(dim) < 1:
                raise ShapeError(f"dimension {dim!r} of {name!r} in {text!r} is not a positive integer",
                                 hint="write NAME:DxDxD, e.g. x1:1x3x64x64")
            values.append(int(dim))
        result[name] = tuple(values)
    return result


def recorded_max_shapes(record: Mapping) -> ShapeSet | None:
    """The export's ``--max-shapes`` as recorded in a file's metadata, or ``None`` where there are none or they do
    not parse (a file is data: its record may be anything)."""
    text = record.get("max_shapes")
    try:
        return parse_shape_set(text) if isinstance(text, str) and text.strip() else None
    except ShapeError:
        return None


def format_shape(shape: Iterable[int]) -> str:
    return "x".join(str(int(d)) for d in shape)


def format_shape_set(shapes: Mapping[str, Iterable[int]]) -> str:
    """Inverse of :func:`parse_shape_set`."""
    return ",".join(f"{name}:{format_shape(shape)}" for name, shape in shapes.items())


def check_profile(min_shapes: ShapeSet, opt_shapes: ShapeSet, max_shapes: ShapeSet) -> None:
    """Check that three shape sets form a valid profile: same names, same ranks, min <= opt <= max."""
    for label, other in (("opt", opt_shapes), ("max", max_shapes)):
        if set(other) != set(min_shapes):
            raise ShapeError(f"{label} shapes name inputs {sorted(other)} but min shapes name {sorted(min_shapes)}")
    for name, low in min_shapes.items():
        opt, high = opt_shapes[name], max_shapes[name]
        if not len(low) == len(opt) == len(high):
            raise ShapeError(f"input {name!r}: min/opt/max shapes have different ranks "
                             f"({format_shape(low)}, {format_shape(opt)}, {format_shape(high)})")
        for axis, (a, b, c) in enumerate(zip(low, opt, high)):
            if not a <= b <= c:
                raise ShapeError(f"input {name!r} axis {axis}: need min <= opt <= max, got {a}, {b}, {c}",
                                 hint="fix --min-shapes/--opt-shapes/--max-shapes")


def varied_shape_sets(inputs: Mapping[str, int], equal_positions: bool, low: ShapeSet, high: ShapeSet,
                      example: ShapeSet) -> list[ShapeSet]:
    """Three shape sets unlike ``example``: odd sizes with batch 1, batch 3, and x1 smaller than x2.

    ``inputs`` maps input names to channels; ``equal_positions`` keeps H1*W1 == H2*W2 (the seed
    snippet's constraint). Each set is clamped into the declared ranges; sets that collapse onto the
    example or onto each other are dropped (only possible with very narrow ranges).
    """
    names = list(inputs)
    plans = [(1, [(17, 23), (9, 31)]), (3, [(40, 24), (24, 40)]), (2, [(12, 20), (33, 13)])]
    result: list[ShapeSet] = []
    for batch, sizes in plans:
        shape_set: ShapeSet = {}
        for index, name in enumerate(names):
            h, w = sizes[min(index, len(sizes) - 1)] if index < 2 else (10 + index, 14 + index)
            if equal_positions and index == 1:
                first = shape_set[names[0]]
                h, w = first[3], first[2]  # transposed: same position count, different shape
            shape_set[name] = _clamp((batch, inputs[name], h, w), low[name], high[name])
        if equal_positions and len(names) == 2:
            a, b = (shape_set[n] for n in names)
            if a[2] * a[3] != b[2] * b[3]:
                shape_set[names[1]] = a
        if shape_set != example and shape_set not in result:
            result.append(shape_set)
    return result


def _clamp(shape, low, high) -> tuple[int, ...]:
    return tuple(min(max(v, a), b) for v, a, b in zip(shape, low, high))
