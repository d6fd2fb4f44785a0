"""Input feeds: random normal data for given shape sets, or arrays from .npz files."""

from __future__ import annotations

import zlib
from pathlib import Path
from typing import Mapping

import numpy as np

from xattn.errors import ArtifactError, BadInputError
from xattn.shapes import ShapeSet, format_shape


def random_feed(shapes: ShapeSet, seed: int = 0, dtype=np.float32) -> dict[str, np.ndarray]:
    """Standard-normal inputs, reproducible from ``seed`` and independent of dict order.

    Each input gets its own generator seeded from (seed, name), so adding an input does not change
    the values of the others.
    """
    feed = {}
    for name, shape in shapes.items():
        rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
        feed[name] = rng.standard_normal(shape).astype(dtype)
    return feed


def load_npz(path: str | Path, names: list[str] | None = None) -> dict[str, np.ndarray]:
    """Read arrays from an .npz; with ``names``, require exactly those (extra arrays are ignored)."""
    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"input file {path} does not exist")
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {k: data[k] for k in data.files}
    except Exception as exc:
        raise ArtifactError(f"cannot read {path} as .npz: {' '.join(str(exc).split())[:160]}") from exc
    if names is not None:
        missing = [n for n in names if n not in arrays]
        if missing:
            raise BadInputError(f"{path} has no array named {', '.join(map(repr, missing))}; "
                                f"it holds {', '.join(map(repr, arrays)) or 'nothing'}",
                                hint="save with np.savez(path, x1=..., x2=...)")
        arrays = {n: arrays[n] for n in names}
    return arrays


def feed_shapes(feed: Mapping[str, np.ndarray]) -> dict[str, str]:
    return {name: format_shape(value.shape) for name, value in feed.items()}
