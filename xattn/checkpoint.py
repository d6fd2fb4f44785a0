"""Reading checkpoints safely.

``.pt``/``.pth`` files are read with ``torch.load(weights_only=True)``: a checkpoint that holds
pickled code is refused, never executed. ``.safetensors`` files hold tensors only by design.
"""

from __future__ import annotations

import pickle
import warnings
import zipfile
from pathlib import Path

import torch

from xattn.errors import CheckpointError
from xattn.fileio import sha256_file

StateDict = dict[str, torch.Tensor]

# Containers that training scripts commonly wrap a state dict in.
_WRAPPER_KEYS = ("state_dict", "model_state_dict", "model", "net")


def load_state_dict(path: str | Path) -> StateDict:
    """Load a state dict from ``.pt``/``.pth``/``.bin`` (weights-only) or ``.safetensors``.

    A dict with a single well-known wrapper key (``state_dict``, ``model``...) holding the tensors is
    unwrapped. Raises :class:`CheckpointError` with a one-line reason otherwise.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    if path.suffix == ".safetensors":
        return _load_safetensors(path)
    with open(path, "rb") as handle:
        head = handle.read(4)
    # torch.save's legacy (pre-1.6) format starts with a pickled magic number (protocol 2, LONG1 of 10
    # bytes) and weights_only loads it; any other pickle is a bare pickle.dump
    if head[:1] == b"\x80" and head != b"\x80\x02\x8a\x0a" and not zipfile.is_zipfile(path):
        raise CheckpointError(f"checkpoint {path} is a bare Python pickle, not a torch.save file of tensors; "
                              "refusing to unpickle it (that can run arbitrary code)",
                              hint="re-save it with torch.save(model.state_dict(), path) or as .safetensors")
    try:
        # torch warns on stderr for legacy (non-zip) pickles before it refuses them; our error says it in one line
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        # torch names the class it refused ("Unsupported global: GLOBAL pkg.Class"); any other
        # unpickling failure (bad opcodes, truncation) means the bytes are not a checkpoint at all.
        if "global" in str(exc).lower():
            raise CheckpointError(
                f"checkpoint {path} holds pickled Python objects, not only tensors; refusing to load it "
                "(unpickling can run arbitrary code)",
                hint="re-save it with torch.save(model.state_dict(), path) or as .safetensors") from exc
        raise CheckpointError(f"checkpoint {path} is corrupt or not a PyTorch file ({_short(exc)})") from exc
    except (RuntimeError, zipfile.BadZipFile, EOFError, OSError, ValueError, TypeError, AttributeError) as exc:
        raise CheckpointError(f"checkpoint {path} is corrupt or not a PyTorch file ({_short(exc)})") from exc
    return check_weights(_as_state_dict(obj, path), path)


def check_weights(state: StateDict, path) -> StateDict:
    """Refuse weights a float model cannot use, naming the tensor: non-float parameters (an int8 or bool
    tensor where a float weight belongs) and NaN/Inf values (they would export and validate as NaN)."""
    for name, tensor in state.items():
        if not (tensor.is_floating_point() or name.endswith("num_batches_tracked")):
            raise CheckpointError(f"checkpoint {path}: {name} is {str(tensor.dtype).replace('torch.', '')}, not a "
                                  "floating-point tensor", hint="save the float model's state_dict (not a quantized one)")
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            bad = int((~torch.isfinite(tensor)).sum())
            raise CheckpointError(f"checkpoint {path}: {name} holds {bad} NaN/Inf values",
                                  hint="the training run diverged or the file is damaged; use an earlier checkpoint")
    return state


def checkpoint_sha256(path: str | Path | None) -> str | None:
    return None if path is None else sha256_file(path)


def _load_safetensors(path: Path) -> StateDict:
    try:
        from safetensors.torch import load_file
    except ImportError as exc:  # declared as a dependency; guard for trimmed installs
        raise CheckpointError("reading .safetensors needs the safetensors package",
                              hint="pip install safetensors") from exc
    try:
        state = dict(load_file(str(path), device="cpu"))
    except Exception as exc:  # safetensors raises its own SafetensorError and others
        raise CheckpointError(f"checkpoint {path} is not a readable safetensors file ({_short(exc)})") from exc
    return check_weights(state, path)


def _as_state_dict(obj: object, path: Path) -> StateDict:
    if isinstance(obj, dict):
        if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
            return dict(obj)
        for key in _WRAPPER_KEYS:
            inner = obj.get(key)
            if isinstance(inner, dict) and inner and all(isinstance(v, torch.Tensor) for v in inner.values()):
                return dict(inner)
    raise CheckpointError(f"checkpoint {path} is not a state dict of tensors",
                          hint="save it with torch.save(model.state_dict(), path)")


def check_keys(module: torch.nn.Module, state: StateDict, path: str | Path, model_name: str) -> None:
    """Raise a :class:`CheckpointError` listing missing/unexpected keys and shape mismatches."""
    expected = module.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing keys {_listing(missing)}")
        if unexpected:
            parts.append(f"unexpected keys {_listing(unexpected)}")
        hint = None
        for prefix in ("module.", "model.", "_orig_mod."):
            if unexpected and all(k.startswith(prefix) for k in unexpected):
                hint = (f"the keys start with {prefix!r}: the checkpoint was saved from a wrapper "
                        f"(DataParallel, torch.compile...); strip the prefix before saving")
        raise CheckpointError(f"checkpoint {path} does not fit model {model_name!r}: " + "; ".join(parts),
                              hint=hint or "check --model and --model-arg")
    wrong = [f"{k} {tuple(state[k].shape)} != {tuple(v.shape)}" for k, v in expected.items()
             if tuple(state[k].shape) != tuple(v.shape)]
    if wrong:
        raise CheckpointError(f"checkpoint {path} does not fit model {model_name!r}: shape mismatch "
                              f"{_listing(wrong)}", hint="check --model-arg sizes against the checkpoint")


def _listing(items: list[str], limit: int = 6) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f" and {len(items) - limit} more" if len(items) > limit else "")


def _short(exc: BaseException) -> str:
    return " ".join(str(exc).split())[:160] or type(exc).__name__
