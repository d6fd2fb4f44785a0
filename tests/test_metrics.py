"""Metrics against hand-computed numpy formulas on known arrays."""

import math

import numpy as np
import pytest

from runtime.metrics import compare
from runtime.tolerances import DEFAULT_TOLERANCES, judge, tolerances_for
from xattn.errors import BadInputError


def test_known_arrays():
    ref = np.array([3.0, 4.0, 0.0, 0.0])
    cand = np.array([3.0, 4.0, 1.0, 0.0])
    m = compare(cand, ref, atol=0.5, rtol=0.0)
    assert m.max_abs == 1.0 and m.mean_abs == 0.25
    assert m.rel_l2 == pytest.approx(1.0 / 5.0)                          # ||(0,0,1,0)|| / ||(3,4,0,0)||
    assert m.cosine == pytest.approx(25.0 / (5.0 * math.sqrt(26.0)))      # <c,r> / (|c| |r|)
    assert m.sqnr_db == pytest.approx(10 * math.log10(25.0 / 1.0))
    assert m.outlier_fraction == 0.25 and m.nan_count == 0 and m.shape_match


def test_against_numpy_on_random_data():
    rng = np.random.default_rng(0)
    ref = rng.standard_normal((2, 3, 5)).astype(np.float32)
    cand = ref + 0.01 * rng.standard_normal(ref.shape).astype(np.float32)
    m = compare(cand, ref, atol=1e-3, rtol=1e-2)
    r, c = ref.astype(np.float64).ravel(), cand.astype(np.float64).ravel()
    assert m.rel_l2 == pytest.approx(np.linalg.norm(c - r) / np.linalg.norm(r))
    assert m.cosine == pytest.approx(np.dot(c, r) / np.linalg.norm(c) / np.linalg.norm(r))
    assert m.outlier_fraction == pytest.approx(np.mean(np.abs(c - r) > 1e-3 + 1e-2 * np.abs(r)))


def test_nan_inf_shape_and_zero_cases():
    m = compare(np.array([1.0, np.nan, np.inf]), np.array([1.0, 2.0, 3.0]))
    assert m.nan_count == 1 and m.inf_count == 1 and math.isinf(m.rel_l2)
    assert "1 NaN and 1 Inf" in judge(m, DEFAULT_TOLERANCES["int8"])[0]
    m = compare(np.zeros((2, 3)), np.zeros((3, 2)))
    assert not m.shape_match and judge(m, DEFAULT_TOLERANCES["fp32"]) == ["shape (2, 3) != reference (3, 2)"]
    m = compare(np.zeros(3), np.zeros(3))
    assert m.rel_l2 == 0.0 and m.cosine == 1.0 and math.isinf(m.sqnr_db)


def test_judge_per_precision():
    ref = np.linspace(-1, 1, 1000)
    noisy = ref + 0.005 * np.sin(np.arange(1000))    # rel. L2 ~ 6e-3: int8-grade, not fp16-grade
    m = compare(noisy, ref, atol=DEFAULT_TOLERANCES["int8"].atol, rtol=DEFAULT_TOLERANCES["int8"].rtol)
    assert judge(m, tolerances_for("int8")) == []
    reasons = judge(m, tolerances_for("fp16"))
    assert any(r.startswith("relative L2") for r in reasons)
    assert judge(m, tolerances_for("fp16", max_rel_l2=0.01, min_cosine=0.99)) == []
    with pytest.raises(BadInputError, match="unknown precision 'int4'"):
        tolerances_for("int4")
