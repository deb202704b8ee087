"""stats.py against independent computations: published Wilson intervals, the score test inverted by
bisection, exact binomial sums with fractions, scipy where it is installed, and evaluate.py-shaped
results for paired()."""
import math
import statistics
from fractions import Fraction

import pytest

import stats

# Newcombe 1998, "Two-sided confidence intervals for the single proportion", Table I, method 3 (Wilson score)
NEWCOMBE = {(81, 263): (0.2553, 0.3662), (15, 148): (0.0624, 0.1605), (0, 20): (0.0, 0.1611), (1, 29): (0.0061, 0.1718)}


def score_interval_by_bisection(k, n, z=1.959963984540054):
    """The p in [0, 1] whose score statistic |k - n p| / sqrt(n p (1 - p)) stays <= z, found by bisection."""
    def inside(p):
        return p in (0.0, 1.0) and k == n * p or 0 < p < 1 and abs(k - n * p) <= z * math.sqrt(n * p * (1 - p))

    def edge(lo, hi):  # inside(lo) != inside(hi)
        for _ in range(100):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if inside(mid) == inside(lo) else (lo, mid)
        return (lo + hi) / 2
    p = k / n
    return (0.0 if k == 0 else edge(0.0, p)), (1.0 if k == n else edge(p, 1.0))


def test_wilson_matches_published_values_and_the_brief():
    for (k, n), (low, high) in NEWCOMBE.items():
        got = stats.wilson(k, n)
        assert (round(got[0], 4), round(got[1], 4)) == (low, high), (k, n, got)
    assert stats.percent_interval(68, 200) == "34.0 [27.8, 40.8]"
    assert stats.percent_interval(34, 200) == "17.0 [12.4, 22.8]"


@pytest.mark.parametrize("k,n", [(0, 1), (1, 1), (0, 7), (3, 7), (7, 7), (34, 200), (199, 200), (5000, 10000), (1, 50000)])
def test_wilson_inverts_the_score_test(k, n):
    low, high = stats.wilson(k, n)
    ref = score_interval_by_bisection(k, n)
    assert low == pytest.approx(ref[0], abs=1e-9) and high == pytest.approx(ref[1], abs=1e-9)
    assert 0 <= low <= k / n <= high <= 1


def test_wilson_agrees_with_scipy():
    scipy_stats = pytest.importorskip("scipy.stats")
    for k, n in [(0, 10), (3, 10), (50, 100), (34, 200), (81, 263), (999, 1000)]:
        for confidence in (0.9, 0.95, 0.99):
            ref = scipy_stats.binomtest(k, n).proportion_ci(confidence_level=confidence, method="wilson")
            assert stats.wilson(k, n, confidence) == pytest.approx((ref.low, ref.high), abs=1e-12)


def test_wilson_edges_and_refusals():
    assert stats.wilson(0, 0) == (0.0, 1.0) and stats.percent_interval(0, 0) == "-"
    narrow, wide = stats.wilson(30, 100, 0.9), stats.wilson(30, 100, 0.99)
    assert wide[0] < narrow[0] < narrow[1] < wide[1]
    for bad in [(5, 3), (-1, 3), (1.5, 3), (True, 3)]:
        with pytest.raises(ValueError, match="k"):
            stats.wilson(*bad)
    with pytest.raises(ValueError, match="confidence"):
        stats.wilson(1, 2, 95)


def exact_p(b, c):
    """Two-sided exact McNemar p from exact fractions: min(1, 2 P(X <= min(b, c))), X ~ Bin(b + c, 1/2)."""
    m = b + c
    if m == 0:
        return 1.0
    tail = sum(Fraction(math.comb(m, i), 2 ** m) for i in range(min(b, c) + 1))
    return float(min(Fraction(1), 2 * tail))


def pairs(both, a_only, b_only, neither):
    """Per-image (A right, B right) lists in a mixed order."""
    rows = [(1, 1)] * both + [(1, 0)] * a_only + [(0, 1)] * b_only + [(0, 0)] * neither
    rows = rows[::2] + rows[1::2]
    return [bool(a) for a, _ in rows], [bool(b) for _, b in rows]


@pytest.mark.parametrize("b,c", [(0, 0), (0, 1), (0, 10), (3, 12), (7, 7), (12, 3), (40, 61), (250, 300)])
def test_mcnemar_equals_the_exact_binomial_sum(b, c):
    a, bb = pairs(20, b, c, 9)
    r = stats.mcnemar(a, bb)
    assert (r["n"], r["a_only"], r["b_only"]) == (29 + b + c, b, c)
    assert r["p_value"] == pytest.approx(exact_p(b, c), rel=1e-12)
    assert r["difference"] == pytest.approx(100 * (sum(a) - sum(bb)) / len(a))


def test_mcnemar_known_values_and_scipy():
    assert stats.mcnemar(*pairs(5, 0, 10, 0))["p_value"] == 2 / 1024  # 2 * (1/2)^10
    assert stats.mcnemar(*pairs(5, 7, 7, 0))["p_value"] == 1.0
    scipy_stats = pytest.importorskip("scipy.stats")
    for b, c in [(1, 9), (13, 30), (100, 130)]:
        ref = scipy_stats.binomtest(b, b + c, 0.5).pvalue
        assert stats.mcnemar(*pairs(3, b, c, 3))["p_value"] == pytest.approx(ref, rel=1e-9)


def test_mcnemar_refusals():
    with pytest.raises(ValueError, match="same images: got 3 and 2"):
        stats.mcnemar([True, False, True], [True, True])
    with pytest.raises(ValueError, match="one boolean per image"):
        stats.mcnemar(["1", "0"], [True, False])
    assert stats.mcnemar([], [])["difference"] is None and stats.mcnemar([], [])["p_value"] == 1.0


def test_mean_std_is_the_sample_std():
    values = [33.5, 34.0, 35.1, 31.2]
    mean, std = stats.mean_std(values)
    assert mean == pytest.approx(statistics.mean(values)) and std == pytest.approx(statistics.stdev(values))
    assert stats.mean_std([34.0]) == (34.0, None)
    with pytest.raises(ValueError, match="at least one"):
        stats.mean_std([])


def result(clean, robust, evaluated="0111", data="abc"):
    """An evaluate.py-shaped result of one dataset of 4 images, 3 evaluated."""
    return {"contents": {"data": data}, "images": {"dataset_size": 4, "evaluated": evaluated,
                                                   "clean": clean, "robust": robust}}


def test_paired_reads_evaluate_results_and_refuses_other_images():
    r = stats.paired(result("111", "100"), result("110", "011"))
    assert r == stats.mcnemar([True, False, False], [False, True, True])
    assert stats.paired(result("111", "100"), result("110", "011"), key="clean")["a_only"] == 1
    with pytest.raises(ValueError, match="different images.*--n-samples"):
        stats.paired(result("111", "100"), result("111", "100", evaluated="1110"))
    with pytest.raises(ValueError, match="different images.*data files"):
        stats.paired(result("111", "100"), result("111", "100", data="xyz"))
    with pytest.raises(ValueError, match="no per-image robust"):
        stats.paired(result("111", None), result("111", "100"))
    with pytest.raises(ValueError, match="lacks the per-image correctness of 2 images"):
        stats.paired(result("111", "1??"), result("111", "100"))
    with pytest.raises(ValueError, match="no per-image"):
        stats.paired({"clean": 50.0}, result("111", "100"))


def test_image_record_marks_the_evaluated_images():
    record = stats.image_record(6, [1, 4, 5], {"clean": "101", "robust": None})
    assert record == {"dataset_size": 6, "evaluated": "010011", "clean": "101", "robust": None}
    with pytest.raises(ValueError, match="2 per-image flags for 3 images"):
        stats.image_record(6, [1, 4, 5], {"clean": "10"})
