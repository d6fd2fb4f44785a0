"""How much memory a model needs at given input shapes, found without allocating it.

The model runs once under PyTorch's ``FakeTensorMode`` (tensors carry shapes and dtypes, no data), while a
dispatch mode adds up the bytes of every tensor an op creates and subtracts them when Python frees it.
The peak of that sum bounds what PyTorch eager holds at once, locals kept alive by ``forward`` included, so it
works for any model, whatever ONNX shape inference can follow. It is an upper bound: fake tensors are freed
later than real ones (measured: 1.8x the real peak on the attention block, tests/test_memory.py). ONNX Runtime's plain graph holds at most
about as much (it frees intermediates as it goes), so one verification run (PyTorch, then ONNX Runtime)
needs about this figure above the process's baseline.
"""

from __future__ import annotations

import logging
import weakref
from typing import Callable

from xattn.shapes import ShapeSet


def estimate_peak_bytes(module, shapes: ShapeSet, dtype=None) -> int | None:
    """Peak bytes of live tensors while ``module(*inputs)`` runs at ``shapes`` (one input per entry, in
    order), without computing anything; ``None`` when the model cannot run on fake tensors
    (data-dependent control flow, ``.item()``)."""
    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.utils._python_dispatch import TorchDispatchMode

    class _Tally(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.live = self.peak = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for tensor in (out if isinstance(out, (tuple, list)) else (out,)):
                if isinstance(tensor, torch.Tensor) and not tensor._is_view():
                    size = tensor.numel() * tensor.element_size()
                    self.live += size
                    self.peak = max(self.peak, self.live)
                    weakref.finalize(tensor, self._free, size)
            return out

        def _free(self, size):
            self.live -= size

    dtype = dtype or torch.float32
    try:
        with torch.no_grad(), FakeTensorMode(allow_non_fake_inputs=True) as mode:
            inputs = [torch.empty(shape, dtype=dtype) for shape in shapes.values()]   # fake: no data
            tally = _Tally()
            with tally:
                out = module(*inputs)
                del out
            return int(tally.peak)
    except Exception as exc:   # the estimate is best effort; callers fail closed on None
        logging.getLogger("xattn").debug("memory estimate at %s failed: %s", shapes, exc)
        return None


def fit_in_budget(needs: Callable[[ShapeSet], int | None], shapes: ShapeSet, low: ShapeSet,
                  budget: int) -> tuple[ShapeSet | None, int | None]:
    """``shapes``, or the largest scaled-down version of it within ``budget``: first at the min batch, then
    with every spatial size shrunk by one factor (bisected; never below ``low``). ``needs`` estimates the
    bytes a shape set needs (e.g. :func:`estimate_peak_bytes` of the module). Returns the shape set (None
    when even the smallest does not fit, or nothing can be estimated) and its estimated peak bytes."""
    needed = needs(shapes)
    if needed is None or needed <= budget:
        return (None if needed is None else dict(shapes)), needed
    at_min_batch = {name: (low[name][0], *shape[1:]) for name, shape in shapes.items()}

    def scaled(factor: float) -> ShapeSet:
        return {name: (shape[0], shape[1], *(max(round(v * factor), a) for v, a in zip(shape[2:], low[name][2:])))
                for name, shape in at_min_batch.items()}

    best: tuple[ShapeSet | None, int | None] = (None, None)
    fits, fails = 0.0, 1.0
    if (first := needs(at_min_batch)) is not None and first <= budget:
        return at_min_batch, first
    for _ in range(8):   # the sizes settle to within 1/256 of the largest that fits
        factor = (fits + fails) / 2
        candidate = scaled(factor)
        needed = needs(candidate)
        if needed is None:
            return None, None
        if needed <= budget:
            fits, best = factor, (candidate, needed)
        else:
            fails = factor
    if best[0] is None:
        smallest = scaled(0.0)
        needed = needs(smallest)
        if needed is not None and needed <= budget:
            best = (smallest, needed)
    return best
