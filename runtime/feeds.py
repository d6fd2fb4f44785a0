"""Input feeds: random normal data for given shape sets, or arrays from .npz files."""

from __future__ import annotations

import hashlib
import zlib
from pathlib import Path
import numpy as np

from xattn.errors import ArtifactError, BadInputError
from xattn.shapes import ShapeSet


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


def feeds_digest(feeds) -> str:
    """sha256 over every array (name, dtype, shape, bytes) of ``feeds``, in order: same inputs, same digest."""
    digest = hashlib.sha256()
    for feed in feeds:
        for name in sorted(feed):
            value = np.ascontiguousarray(feed[name])
            digest.update(f"{name}:{value.dtype.str}:{value.shape};".encode())
            digest.update(value.tobytes())
    return digest.hexdigest()


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


def npz_feeds(path: str | Path, names: list[str]) -> list[dict[str, np.ndarray]]:
    """Feeds from an .npz: 4-D arrays are one feed; 5-D arrays ``(samples, N, C, H, W)`` are several."""
    arrays = load_npz(path, names)
    ranks = {name: value.ndim for name, value in arrays.items()}
    if set(ranks.values()) == {4}:
        return [{n: np.ascontiguousarray(v, dtype=np.float32) if v.dtype.kind == "f" else v for n, v in arrays.items()}]
    if set(ranks.values()) == {5}:
        counts = {name: value.shape[0] for name, value in arrays.items()}
        if len(set(counts.values())) != 1:
            raise BadInputError(f"{path}: inputs hold different sample counts {counts}")
        return [{n: np.ascontiguousarray(v[i]) for n, v in arrays.items()} for i in range(next(iter(counts.values())))]
    raise BadInputError(f"{path}: arrays must be 4-D (N, C, H, W) or 5-D (samples, N, C, H, W), got ranks {ranks}")


def load_data(spec: str | Path, names: list[str], model_record: dict | None = None,
              settings=None) -> tuple[list[dict[str, np.ndarray]], str]:
    """Real inputs from any calibration data source (see :mod:`calibration.data`): ``(feeds, label)``."""
    from calibration.data import load_calibration_data

    channels = dict((model_record or {}).get("inputs") or {n: 3 for n in names})
    data = load_calibration_data(str(spec), names, channels, settings)
    return data.feeds, data.label
