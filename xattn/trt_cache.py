"""TensorRT's calibration cache text format (TensorRT 10.x implicit INT8).

::

    TRT-100300-EntropyCalibration2
    x1: 3c010a14
    /stem1/conv: 3d4ccccd

The header is ``TRT-<version number>-<algorithm>``; TensorRT ignores a cache whose header does not
match the calibrator it builds with. Each line is a tensor name and the big-endian float32 bits of its
scale, ``amax / 127``. The version number is ``major*10000 + minor*100 + patch`` from 10.0 on
(``100300`` for 10.3) and ``major*1000 + minor*100 + patch`` before (``8601`` for 8.6.1).

The header line is the cache's provenance; nothing else is added to the file, since TensorRT (and
ModelOpt, ONNX Runtime's TensorRT EP) read every other line as a tensor entry.
"""

from __future__ import annotations

import os
import re
import struct
from dataclasses import dataclass
from pathlib import Path

from packaging.version import InvalidVersion, Version

from xattn.errors import BadInputError, CalibrationError
from xattn.fileio import write_text_atomic

ALGORITHMS = {"entropy": "EntropyCalibration2", "minmax": "MinMaxCalibration",
              # Percentile ranges are precomputed; at build time they are served by a MinMax calibrator.
              "percentile": "MinMaxCalibration"}
# The two calibrators the toolkit (and trtexec) can serve a cache to; EntropyCalibration/LegacyCalibration
# caches would be handed to an EntropyCalibration2 calibrator, which ignores them.
KNOWN_ALGORITHMS = {"EntropyCalibration2", "MinMaxCalibration"}
DEFAULT_TRT_VERSION = "10.3.0"   # JetPack 6
_HEADER = re.compile(r"^TRT-(\d+)-([A-Za-z0-9]+)$")
_LINE = re.compile(r"^(.+): ([0-9a-fA-F]{8})$")


def trt_version_number(version: str) -> int:
    """``"10.3.0"`` -> 100300; ``"8.6.1"`` -> 8601."""
    try:
        parsed = Version(version)
    except InvalidVersion as exc:
        raise BadInputError(f"bad TensorRT version {version!r}", hint="write it like 10.3.0") from exc
    major, minor, patch = (list(parsed.release) + [0, 0])[:3]
    return major * 10000 + minor * 100 + patch if major >= 10 else major * 1000 + minor * 100 + patch


@dataclass
class TrtCache:
    version_number: int
    algorithm: str
    amax: dict[str, float]

    def to_text(self) -> str:
        lines = [f"TRT-{self.version_number}-{self.algorithm}"]
        for name, amax in self.amax.items():
            scale = float(amax) / 127.0
            lines.append(f"{name}: {struct.pack('>f', scale).hex()}")
        return "\n".join(lines) + "\n"


def write_trt_cache(path: str | os.PathLike, amax: dict[str, float], method: str,
                    trt_version: str = DEFAULT_TRT_VERSION) -> TrtCache:
    """Write ``amax`` (per tensor) as a TensorRT calibration cache; tensors keep the given order."""
    if method not in ALGORITHMS:
        raise BadInputError(f"no TensorRT calibrator for method {method!r}")
    cache = TrtCache(trt_version_number(trt_version), ALGORITHMS[method], dict(amax))
    write_text_atomic(path, cache.to_text())
    return cache


def parse_trt_cache(text: str, source: str = "cache") -> TrtCache:
    lines = [line.rstrip("\r") for line in text.splitlines() if line.strip()]
    if not lines:
        raise CalibrationError(f"{source} is empty")
    header = _HEADER.match(lines[0])
    if not header or header.group(2) not in KNOWN_ALGORITHMS:
        raise CalibrationError(f"{source} is not a TensorRT calibration cache (first line {lines[0][:60]!r})",
                               hint="expected a header like TRT-100300-EntropyCalibration2")
    amax = {}
    for number, line in enumerate(lines[1:], start=2):
        match = _LINE.match(line)
        if not match:
            raise CalibrationError(f"{source} line {number} is not 'tensor: <8 hex digits>': {line[:60]!r}")
        scale = struct.unpack(">f", bytes.fromhex(match.group(2)))[0]
        amax[match.group(1)] = scale * 127.0
    return TrtCache(int(header.group(1)), header.group(2), amax)


def read_trt_cache(path: str | os.PathLike) -> TrtCache:
    path = Path(path)
    if not path.is_file():
        raise CalibrationError(f"calibration cache {path} does not exist")
    try:
        text = path.read_text(encoding="ascii")
    except UnicodeDecodeError as exc:
        raise CalibrationError(f"{path} is not a TensorRT calibration cache (binary data)") from exc
    return parse_trt_cache(text, str(path))
