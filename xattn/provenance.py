"""Provenance written into every artifact and read back by every consumer.

ONNX files carry it in ``metadata_props`` under keys prefixed ``xattn.``; values that are not plain
strings are JSON. Engines carry the same record in a JSON sidecar; calibration caches in their header.
"""

from __future__ import annotations

import datetime as _dt
import json
import platform
from typing import Any, Mapping

from xattn import __version__

PREFIX = "xattn."
# Keys whose values are JSON documents rather than plain strings.
_JSON_KEYS = {"model_args", "dynamic_axes", "inputs", "outputs", "init_seed", "opset", "fp16", "quantization",
              "calibration", "source", "weights", "buffers", "buffer_names",
              "equal_positions"}


def base_record() -> dict[str, Any]:
    """What every artifact records about the tool that made it."""
    return {
        "toolkit_version": __version__,
        "created": _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat(),
        "python": platform.python_version(),
    }


def to_metadata_props(record: Mapping[str, Any]) -> dict[str, str]:
    """Flatten a record into ``{"xattn.key": "string"}`` for ONNX ``metadata_props``."""
    props = {}
    for key, value in record.items():
        if value is None:
            continue
        text = json.dumps(value, sort_keys=True) if key in _JSON_KEYS or not isinstance(value, str) else value
        props[PREFIX + key] = text
    return props


def from_metadata_props(props: Mapping[str, str]) -> dict[str, Any]:
    """Inverse of :func:`to_metadata_props`; keys without the prefix are ignored."""
    record: dict[str, Any] = {}
    for key, text in props.items():
        if not key.startswith(PREFIX):
            continue
        name = key[len(PREFIX):]
        if name in _JSON_KEYS:
            try:
                record[name] = json.loads(text)
            except json.JSONDecodeError:
                record[name] = text
        else:
            record[name] = text
    return record


def set_onnx_metadata(model, record: Mapping[str, Any]) -> None:
    """Merge ``record`` into an ``onnx.ModelProto``'s ``metadata_props`` (replacing same keys)."""
    props = {p.key: p.value for p in model.metadata_props}
    props.update(to_metadata_props(record))
    del model.metadata_props[:]
    for key in sorted(props):
        entry = model.metadata_props.add()
        entry.key, entry.value = key, props[key]


def get_onnx_metadata(model) -> dict[str, Any]:
    return from_metadata_props({p.key: p.value for p in model.metadata_props})


def require_fp32(model, path, verb: str):
    """``model`` itself, unless its record says it is already lower precision (FP16, INT8, FP8): those are not
    the float model that converting, calibrating or quantizing starts from, so they are refused first."""
    from xattn.errors import BadInputError

    precision = get_onnx_metadata(model).get("precision", "fp32")
    if precision != "fp32":
        raise BadInputError(f"{path} is {precision}: {verb} the fp32 ONNX", hint="the one 'xattn export' wrote")
    return model

