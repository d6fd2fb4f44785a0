"""Shape guards that torch.export recorded, and the input shapes on each side of them.

A ``forward`` that branches on a size (kornia's LinearAttention: ``if v_length > heads * dim``), or a
parameter of fixed length added to a flattened map (a learned positional embedding), makes the
torch.export-based exporter record a *runtime assert* on the symbolic sizes (with
``prefer_deferred_runtime_asserts_over_guards``, which torch.onnx uses) and trace one side only. The
assert never reaches the ONNX file: at sizes where it is false the file silently computes the other
side's arithmetic, or fails. So every assert is collected, written with the input axis names, and the
export is verified at a shape set on each side of it: on the false side the ONNX must still match
PyTorch, or the export fails naming the assert.
"""

from __future__ import annotations

import itertools
import math
import re
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from xattn.shapes import ShapeSet, format_shape_set

#: combinations of candidate sizes evaluated per guard (sampled, seeded, above this)
MAX_COMBINATIONS = 4000


@dataclass
class RecordedGuard:
    """One assert on input sizes.

    Attributes:
        expression: the assert with input axis names (``256 < x2_height*x2_width``).
        holds_in_range: False when some sizes inside the declared ranges violate it (the export then
            traced one branch only); True when it held at every size tried; None when it involves
            sizes that are not input axes (internal sizes cannot be chosen from outside) or could not be
            evaluated at any size tried.
        true_at / false_at: a shape set (inside the ranges) on each side, near the boundary.
    """

    expression: str
    holds_in_range: bool | None
    true_at: str | None = None
    false_at: str | None = None
    true_shapes: ShapeSet | None = field(default=None, repr=False)
    false_shapes: ShapeSet | None = field(default=None, repr=False)

    def as_dict(self) -> dict[str, Any]:
        return {"expression": self.expression, "holds_in_range": self.holds_in_range,
                "true_at": self.true_at, "false_at": self.false_at}


def symbols_of_inputs(program, input_names: list[str]) -> dict[str, list[tuple[str, int]]]:
    """Which input axes each size symbol of an ``ExportedProgram`` stands for (``s24`` -> batch of x1 and x2)."""
    import sympy

    placeholders = {n.name: n for n in program.graph.nodes if n.op == "placeholder"}
    found: dict[str, list[tuple[str, int]]] = {}
    for user_input, name in zip(program.graph_signature.user_inputs, input_names):
        value = placeholders[user_input].meta.get("val")
        for axis, size in enumerate(getattr(value, "shape", ())):
            expr = getattr(getattr(size, "node", None), "expr", None)
            if isinstance(expr, sympy.Symbol):
                found.setdefault(str(expr), []).append((name, axis))
    return found


def recorded_asserts(program) -> list[Any]:
    """The sympy expressions of every ``_assert_scalar`` on sizes (trivially true ones left out)."""
    expressions = []
    for node in program.graph.nodes:
        if node.op != "call_function" or "assert_scalar" not in str(node.target) or not node.args:
            continue
        value = getattr(node.args[0], "meta", {}).get("val")
        expr = getattr(getattr(value, "node", None), "expr", None)
        if expr is None or not getattr(expr, "free_symbols", None):
            continue   # True after simplification (the divisibility checks of a reshape(-1))
        if all(str(e) != str(expr) for e in expressions):
            expressions.append(expr)
    return expressions


def analyse_guards(expressions, symbols: dict[str, list[tuple[str, int]]], axis_names: dict[str, dict[int, str]],
                   low: ShapeSet, high: ShapeSet, base: ShapeSet) -> list[RecordedGuard]:
    """Write each assert with axis names and find shape sets on each side of it within the ranges."""
    import sympy

    # Symbols of one named axis (x1's and x2's batch are one Dim) are one size: unify them first, so a
    # check like Mod(4*b1*h*w, 4*b2) == 0 simplifies to True instead of reading as a restriction.
    by_label: dict[str, list[tuple[str, int]]] = {}
    unify = {}
    for name, places in symbols.items():
        label = _axis_label(places, axis_names)
        by_label.setdefault(label, [])
        by_label[label].extend(p for p in places if p not in by_label[label])
        unify[sympy.Symbol(name)] = sympy.Symbol(label, integer=True, positive=True)
    guards = []
    for expr in expressions:
        renamed = {sym: unify.get(sympy.Symbol(str(sym)), sympy.Symbol("internal_size")) for sym in expr.free_symbols}
        expr = sympy.simplify(expr.xreplace(renamed))
        if expr is sympy.true or not getattr(expr, "free_symbols", None):
            continue
        text = _tidy(str(expr))
        if any(str(s) not in by_label for s in expr.free_symbols):
            guards.append(RecordedGuard(text, None))
            continue
        ordered = sorted(expr.free_symbols, key=str)
        candidates = [_candidates(expr, by_label[str(s)], low, high, base) for s in ordered]
        combos = list(itertools.islice(itertools.product(*candidates), MAX_COMBINATIONS * 4))
        if len(combos) > MAX_COMBINATIONS:
            rng = np.random.default_rng(0)
            combos = [combos[i] for i in sorted(rng.choice(len(combos), MAX_COMBINATIONS, replace=False))]
        truth = [_holds(expr, ordered, combo) for combo in combos]
        true_side = [c for c, t in zip(combos, truth) if t is True]
        false_side = [c for c, t in zip(combos, truth) if t is False]
        # no definite answer at any size tried: unknown, not "holds"
        guard = RecordedGuard(text, False if false_side else (True if true_side else None))
        if true_side and false_side:
            t, f = _nearest_pair(true_side, false_side)
            guard.true_shapes = _shape_set(base, ordered, t, by_label)
            guard.false_shapes = _shape_set(base, ordered, f, by_label)
            guard.true_at, guard.false_at = format_shape_set(guard.true_shapes), format_shape_set(guard.false_shapes)
        guards.append(guard)
    return guards


def _axis_label(places, axis_names) -> str:
    if not places:
        return "internal_size"
    name, axis = places[0]
    return axis_names.get(name, {}).get(axis) or f"{name}_dim{axis}"


def _tidy(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip()


def _candidates(expr, places, low: ShapeSet, high: ShapeSet, base: ShapeSet) -> list[int]:
    """Sizes worth trying for one symbol: its range ends, the traced size, and sizes around every constant
    of the expression and around their square roots (``h*w > 256`` flips between 16x16 and 16x17)."""
    import sympy

    name, axis = places[0]
    lo = max(low[n][a] for n, a in places)
    hi = min(high[n][a] for n, a in places)
    values = {lo, hi, base[name][axis]}
    for atom in expr.atoms(sympy.Integer):
        c = abs(int(atom))
        if c < 2:
            continue
        root = math.isqrt(c)
        values.update({c - 1, c, c + 1, root - 1, root, root + 1, c // 2, c // 2 + 1})
    return sorted(v for v in values if lo <= v <= hi)


def _holds(expr, ordered, combo) -> bool | None:
    import sympy

    try:
        value = expr.xreplace({s: sympy.Integer(v) for s, v in zip(ordered, combo)})
        value = sympy.simplify(value) if not isinstance(value, (bool, sympy.logic.boolalg.BooleanAtom)) else value
        return bool(value) if isinstance(value, (bool, sympy.logic.boolalg.BooleanAtom)) else None
    except (TypeError, ValueError, ZeroDivisionError):
        return None


def _nearest_pair(true_side, false_side):
    a, b = np.asarray(true_side, np.float64), np.asarray(false_side, np.float64)
    distance = np.abs(a[:, None, :] - b[None, :, :]).sum(axis=2) if len(a) * len(b) <= 4_000_000 else None
    if distance is None:
        return true_side[0], false_side[0]
    i, j = np.unravel_index(int(np.argmin(distance)), distance.shape)
    return true_side[i], false_side[j]


def _shape_set(base: ShapeSet, ordered, combo, symbols) -> ShapeSet:
    shapes = {name: list(shape) for name, shape in base.items()}
    for sym, value in zip(ordered, combo):
        for name, axis in symbols[str(sym)]:
            shapes[name][axis] = int(value)
    return {name: tuple(shape) for name, shape in shapes.items()}
