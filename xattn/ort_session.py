"""ONNX Runtime sessions that a native crash cannot take the command down with (shared by every layer).

Some graphs crash ONNX Runtime natively while it optimises them: 1.32 segfaults at ORT_ENABLE_ALL on the
FP16 and INT8 forms of torch's nn.TransformerDecoder, and is right at ORT_ENABLE_EXTENDED. A crash in the
toolkit's own process would end the command with no message, so :func:`create_session` first creates each
distinct model's session in a child process, level by level, and then opens it here at the best level that
worked.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

from xattn.errors import ArtifactError, MissingDependencyError


def import_onnxruntime():
    try:
        import onnxruntime
    except ImportError as exc:
        raise MissingDependencyError("onnxruntime is not installed",
                                     hint="pip install 'xattn-deploy[cpu]' (or [gpu] on a CUDA machine)") from exc
    return onnxruntime


#: ONNX Runtime's graph optimisation levels, most optimised first (SessionOptions.graph_optimization_level).
OPTIMIZATION_LEVELS = ("ORT_ENABLE_ALL", "ORT_ENABLE_EXTENDED", "ORT_ENABLE_BASIC", "ORT_DISABLE_ALL")
#: model sha256 + providers -> the most optimised level at which a session can be created without a crash
_SAFE_LEVELS: dict[str, tuple[str, list[str]]] = {}
#: Creating a session in a child process must not take longer than this (a hang counts as a failure).
PROBE_TIMEOUT_S = 120
_PROBE = """
import sys
import onnxruntime as ort
options = ort.SessionOptions()
options.log_severity_level = 4
options.intra_op_num_threads = 1
options.graph_optimization_level = getattr(ort.GraphOptimizationLevel, sys.argv[2])
try:
    ort.InferenceSession(open(sys.argv[1], "rb").read(), options, providers=sys.argv[3].split(","))
except Exception:
    sys.exit(3)   # a Python-level refusal: the caller's own session creation reports it cleanly
"""


#: Keys of the export record (ONNX metadata) where a written file keeps the level its probe found.
LEVEL_KEY, LEVEL_VERSION_KEY, LEVEL_CRASHES_KEY = "ort_optimization_level", "ort_probed_with", "ort_crashed_at"
#: Triton's onnxruntime backend reads ``optimization { graph { level } }`` as -1 BASIC, 1 EXTENDED, 2 DISABLE_ALL,
#: anything else ALL (triton-inference-server/onnxruntime_backend, src/onnxruntime.cc, ``ModelState::ModelState``).
TRITON_GRAPH_LEVEL = {"ORT_ENABLE_ALL": None, "ORT_ENABLE_EXTENDED": 1, "ORT_ENABLE_BASIC": -1, "ORT_DISABLE_ALL": 2}


def _key(model_bytes: bytes, providers: Sequence[str]) -> str:
    import hashlib

    return hashlib.sha256(model_bytes).hexdigest() + "|" + ",".join(providers)


def recorded_level(record: dict) -> str | None:
    """The level a file's record says its probe found, if it was probed by this very ONNX Runtime version
    (another version crashes elsewhere); ``None`` otherwise. Read as data: only a known level name counts."""
    level = record.get(LEVEL_KEY)
    if level not in OPTIMIZATION_LEVELS or record.get(LEVEL_VERSION_KEY) != ort_version_label():
        return None
    return level


def ort_version_label() -> str:
    return f"onnxruntime {import_onnxruntime().__version__}"


def record_safe_level(model, label: str) -> str:
    """Probe ``model`` (an ``onnx.ModelProto`` about to be written) on the CPU provider and keep the level in
    its record, so that later sessions on this ONNX Runtime start there and Triton configs can set it. The
    probe's result is also remembered for the model's bytes with the record, so opening the written file does
    not probe again."""
    from xattn.provenance import set_onnx_metadata

    providers = ["CPUExecutionProvider"]
    data = model.SerializeToString()
    level = safe_optimization_level(data, providers, label)
    crashes = _SAFE_LEVELS.get(_key(data, providers), (level, []))[1]   # absent when the probe could not run
    set_onnx_metadata(model, {LEVEL_KEY: level, LEVEL_VERSION_KEY: ort_version_label(),
                              LEVEL_CRASHES_KEY: ", ".join(crashes) or "none"})
    _SAFE_LEVELS[_key(model.SerializeToString(), providers)] = (level, crashes)
    return level


def safe_optimization_level(model_bytes: bytes, providers: Sequence[str], label: str,
                            start_at: str | None = None) -> str:
    """The most optimised level at which ONNX Runtime creates a session for ``model_bytes`` without dying
    (see the module docstring); remembered per model and providers for the process. ``start_at`` (a level the
    file's record says this ONNX Runtime crashes above) skips the levels above it; that level is still probed.
    Raises :class:`ArtifactError` when every level crashes."""
    import subprocess
    import sys
    import tempfile

    key = _key(model_bytes, providers)
    if key in _SAFE_LEVELS:
        level, crashes = _SAFE_LEVELS[key]
        _say_crashes(label, crashes, level)
        return level
    crashes = []
    levels = OPTIMIZATION_LEVELS[OPTIMIZATION_LEVELS.index(start_at):] if start_at in OPTIMIZATION_LEVELS \
        else OPTIMIZATION_LEVELS
    if levels != OPTIMIZATION_LEVELS:
        crashes.append(f"{', '.join(OPTIMIZATION_LEVELS[:len(OPTIMIZATION_LEVELS) - len(levels)])} "
                       "(its record says it fails there)")
    with tempfile.TemporaryDirectory(prefix="xattn-ort-probe-") as scratch:
        path = Path(scratch) / "model.onnx"
        try:
            path.write_bytes(model_bytes)
        except OSError as exc:   # no room for the probe's scratch copy: open unprobed, and say so
            import logging

            logging.getLogger("xattn").warning("could not probe ONNX Runtime on %s in a child process (%s); opening "
                                               "it directly", label, exc.strerror or exc)
            return levels[0]
        for level in levels:
            try:
                done = subprocess.run([sys.executable, "-c", _PROBE, str(path), level, ",".join(providers)],
                                      capture_output=True, timeout=PROBE_TIMEOUT_S,
                                      env={**os.environ, "OMP_NUM_THREADS": "1"})
                code = done.returncode
            except subprocess.TimeoutExpired:
                code = None
            if code is not None and code >= 0:
                _SAFE_LEVELS[key] = (level, crashes)
                _say_crashes(label, crashes, level)
                return level
            crashes.append(f"{level} ({_signal_name(code)})")
    raise ArtifactError(f"ONNX Runtime crashes natively creating a session for {label} at every optimisation "
                        f"level: {', '.join(crashes)}",
                        hint="the file is kept; report it to ONNX Runtime with the file, or try another form")


def _say_crashes(label: str, crashes: list[str], level: str) -> None:
    if crashes:
        import logging

        logging.getLogger("xattn").warning("ONNX Runtime fails on %s at %s; it runs at %s instead",
                                           label, ", ".join(crashes), level)


def _signal_name(code: int | None) -> str:
    if code is None:
        return f"no answer in {PROBE_TIMEOUT_S} s"
    import signal

    try:
        return signal.Signals(-code).name
    except ValueError:
        return f"signal {-code}"


def create_session(model_bytes: bytes, options, providers: Sequence[str], label: str, record: dict | None = None,
                   provider_options: Sequence[dict] | None = None):
    """An ``InferenceSession`` at the most optimised level that does not crash (see
    :func:`safe_optimization_level`; ``options``' own lower level is kept). ``record``: the file's export
    record, whose probed level (same ONNX Runtime version only) is where the search starts."""
    ort = import_onnxruntime()
    level = safe_optimization_level(model_bytes, providers, label, recorded_level(record or {}))
    safe = getattr(ort.GraphOptimizationLevel, level)
    if int(options.graph_optimization_level) > int(safe):
        options.graph_optimization_level = safe
    if provider_options:
        return ort.InferenceSession(model_bytes, sess_options=options, providers=list(providers),
                                    provider_options=list(provider_options))
    return ort.InferenceSession(model_bytes, sess_options=options, providers=list(providers))
