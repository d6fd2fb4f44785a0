"""Error metrics between a candidate output and a reference output.

All figures are computed in float64. Definitions (``c`` candidate, ``r`` reference, both flattened):

* ``max_abs`` = max |c - r|;  ``mean_abs`` = mean |c - r|
* ``rel_l2`` = ||c - r||_2 / ||r||_2  (0 when both are zero; inf when only r is zero)
* ``cosine`` = <c, r> / (||c|| ||r||)  (1 when both are zero)
* ``sqnr_db`` = 10 log10(||r||^2 / ||c - r||^2)  (inf for an exact match)
* ``outlier_fraction`` = share of elements with |c - r| > atol + rtol |r|
* ``nan_count`` / ``inf_count`` in the candidate.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np


@dataclass(frozen=True)
class ErrorMetrics:
    max_abs: float
    mean_abs: float
    rel_l2: float
    cosine: float
    sqnr_db: float
    outlier_fraction: float
    nan_count: int
    inf_count: int
    shape_match: bool
    candidate_shape: tuple[int, ...]
    reference_shape: tuple[int, ...]

    def as_dict(self) -> dict:
        return {k: (_json_float(v) if isinstance(v, float) else v) for k, v in asdict(self).items()}


def compare(candidate: np.ndarray, reference: np.ndarray, *, atol: float = 0.0, rtol: float = 0.0) -> ErrorMetrics:
    """Error metrics of ``candidate`` against ``reference`` (see the module docstring)."""
    c = np.asarray(candidate, dtype=np.float64)
    r = np.asarray(reference, dtype=np.float64)
    nan_count = int(np.isnan(c).sum())
    inf_count = int(np.isinf(c).sum())
    if c.shape != r.shape:
        nan = float("nan")
        return ErrorMetrics(nan, nan, math.inf, nan, -math.inf, 1.0, nan_count, inf_count, False, c.shape, r.shape)
    diff = np.abs(c - r)
    with np.errstate(invalid="ignore", over="ignore"):
        max_abs = float(diff.max()) if diff.size else 0.0
        mean_abs = float(diff.mean()) if diff.size else 0.0
        err = float(np.sqrt(np.sum((c - r) ** 2)))
        ref = float(np.sqrt(np.sum(r ** 2)))
        cand = float(np.sqrt(np.sum(c ** 2)))
        rel_l2 = _ratio(err, ref)
        if cand == 0.0 and ref == 0.0:
            cosine = 1.0
        elif cand == 0.0 or ref == 0.0:
            cosine = 0.0
        else:
            cosine = float(np.sum(c * r) / (cand * ref))
        sqnr = math.inf if err == 0.0 else (-math.inf if ref == 0.0 else 20.0 * math.log10(ref / err))
        bad = ~(diff <= atol + rtol * np.abs(r))  # NaN counts as outside
        outliers = float(bad.mean()) if diff.size else 0.0
    if nan_count:  # NaN anywhere poisons the sums; make that unmistakable rather than silently NaN
        max_abs, mean_abs, rel_l2, cosine, sqnr = math.inf, math.inf, math.inf, float("nan"), -math.inf
    return ErrorMetrics(max_abs, mean_abs, rel_l2, cosine, sqnr, outliers, nan_count, inf_count, True, c.shape, r.shape)


def _ratio(num: float, den: float) -> float:
    if den == 0.0:
        return 0.0 if num == 0.0 else math.inf
    return num / den


def _json_float(value: float) -> float | str:
    """JSON has no inf/nan: write them as strings so reports stay standard JSON."""
    if math.isnan(value):
        return "nan"
    if math.isinf(value):
        return "inf" if value > 0 else "-inf"
    return value
