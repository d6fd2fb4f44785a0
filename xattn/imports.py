"""Importing ``package.module:attribute`` references (users' model factories and data functions)."""

from __future__ import annotations

import importlib
import os
import sys
from typing import Any

from xattn.errors import XattnError


def import_object(spec: str, error: type[XattnError], what: str) -> Any:
    """Import the attribute named by ``package.module:attribute``; failures raise ``error`` naming ``what``.

    Like ``python -m``, modules in the current folder can be named.
    """
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise error(f"bad {what} reference {spec!r}", hint="write package.module:name")
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise error(f"cannot import module {module_name!r} for {what} {spec!r}: {exc}",
                    hint="check the module path and that it is importable from this folder") from exc
    except Exception as exc:   # the user's module itself raised while importing
        raise error(f"importing {module_name!r} for {what} {spec!r} failed: {type(exc).__name__}: {exc}") from exc
    value = getattr(module, attr, None)
    if value is None:
        raise error(f"module {module_name!r} has no attribute {attr!r}")
    if not callable(value):
        raise error(f"{spec!r} is not callable", hint=f"point at a function that returns the {what}'s value")
    return value
