"""Memory sizes and budgets, shared by every layer (no torch, no onnx).

A verification run executes the model in PyTorch and in ONNX Runtime at concrete shapes; at a cross-attention
model's max shapes that can need tens of GiB (the naive scores are ``batch x heads x N1 x N2``). Every such run
is held to :func:`verify_memory_budget`, derived from the machine unless the user sets it.
"""

from __future__ import annotations

import os
import re

from xattn.errors import BadInputError

#: The verification budget never exceeds this by default, whatever the machine (a laptop runs other things).
DEFAULT_VERIFY_BUDGET_CAP = 2 << 30
#: ... nor this share of the machine's physical memory.
DEFAULT_VERIFY_BUDGET_SHARE = 1 / 8
#: Environment variable that sets the budget (same syntax as ``--verify-memory``).
VERIFY_BUDGET_ENV = "XATTN_VERIFY_MEMORY"


def parse_size(text: str | int) -> int:
    """``"4GiB"``, ``"512MiB"``, ``"4G"``, ``1073741824`` -> bytes."""
    if isinstance(text, int):
        return text
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(i?B)?\s*", str(text), flags=re.IGNORECASE)
    if not match:
        raise BadInputError(f"bad size {text!r}", hint="write e.g. 4GiB, 512MiB or a number of bytes")
    scale = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}[match.group(2).upper()]
    return int(float(match.group(1)) * scale)


def format_size(nbytes: int | float) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if nbytes >= scale:
            return f"{nbytes / scale:.1f} {unit}"
    return f"{int(nbytes)} B"


def physical_memory() -> int | None:
    """This machine's physical memory in bytes (None where the OS does not say)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def verify_memory_budget(given: str | int | None = None) -> tuple[int, str]:
    """The memory one verification run may use, and where the figure came from.

    ``given`` (``--verify-memory``) wins, then ``$XATTN_VERIFY_MEMORY``, then the machine's default:
    the smaller of :data:`DEFAULT_VERIFY_BUDGET_CAP` and :data:`DEFAULT_VERIFY_BUDGET_SHARE` of its memory.
    """
    if given is not None:
        budget, source = parse_size(given), "--verify-memory"
    elif os.environ.get(VERIFY_BUDGET_ENV):
        budget, source = parse_size(os.environ[VERIFY_BUDGET_ENV]), f"${VERIFY_BUDGET_ENV}"
    else:
        memory = physical_memory()
        budget = DEFAULT_VERIFY_BUDGET_CAP if memory is None else min(DEFAULT_VERIFY_BUDGET_CAP,
                                                                      int(memory * DEFAULT_VERIFY_BUDGET_SHARE))
        source = "default: min(2 GiB, 1/8 of this machine's memory)"
    if budget <= 0:
        raise BadInputError(f"verification memory budget {given!r} must be positive", hint="e.g. --verify-memory 2GiB")
    return budget, source
