"""stats.py: how sure an accuracy is, and whether two models differ on the same images.

    wilson(68, 200)              -> (0.2779, 0.4081)       Wilson score interval, as proportions
    percent_interval(68, 200)    -> "34.0 [27.8, 40.8]"    the same in percent, as tables show it
    mcnemar(a_right, b_right)    -> {"n", "a_only", "b_only", "p_value", "difference"}
    paired(result_a, result_b)   -> mcnemar of two evaluate.py results on the same images
    mean_std([33.5, 34.0, 35.1]) -> (34.2, 0.818...)       over seeds: sample std (ddof=1)

Plain Python (math, statistics): no scipy. evaluate.py stores, per dataset, which images it
evaluated and which of them each model got right (image_record); paired() reads that record back.
"""
import math
from statistics import NormalDist

CONFIDENCE = 0.95  # the usual two-sided 95% [C]


def _z(confidence: float) -> float:
    """The standard normal quantile of a two-sided interval: 0.95 -> 1.95996..."""
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must lie strictly between 0 and 1, e.g. 0.95, got {confidence!r}")
    return NormalDist().inv_cdf(1 - (1 - confidence) / 2)


def _check_count(k, n):
    for name, v in (("k", k), ("n", n)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise ValueError(f"{name} must be an integer >= 0, got {v!r}")
    if k > n:
        raise ValueError(f"k (successes) must be at most n (trials), got k={k}, n={n}")


def wilson(k: int, n: int, confidence: float = CONFIDENCE) -> tuple:
    """Wilson score interval (Wilson 1927) for k successes of n: ints -> (low, high) proportions in [0, 1].

    The p whose score test |k - n p| / sqrt(n p (1 - p)) <= z does not reject; unlike the normal
    (Wald) interval it stays inside [0, 1] and keeps its coverage near 0% and 100%, where robust
    accuracies lie. n == 0 -> (0.0, 1.0): nothing is known."""
    _check_count(k, n)
    z = _z(confidence)
    if n == 0:
        return 0.0, 1.0
    p, z2 = k / n, z * z
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = z / (1 + z2 / n) * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)


def percent_interval(k: int, n: int, confidence: float = CONFIDENCE) -> str:
    """k of n as percent with its Wilson interval, one decimal: (68, 200) -> '34.0 [27.8, 40.8]'; n == 0 -> '-'."""
    low, high = wilson(k, n, confidence)
    return "-" if n == 0 else f"{100 * k / n:.1f} [{100 * low:.1f}, {100 * high:.1f}]"


def _binomial_half_cdf(k: int, m: int) -> float:
    """P(X <= k) for X ~ Binomial(m, 1/2), exactly (integer sums), as a float."""
    total, c = 0, 1
    for i in range(k + 1):
        total += c
        c = c * (m - i) // (i + 1)
    return total / 2 ** m


def _booleans(name: str, values) -> list:
    out = []
    for v in values:
        if v not in (0, 1) or isinstance(v, str):
            raise ValueError(f"{name} must hold one boolean per image (right or wrong), got {v!r}")
        out.append(bool(v))
    return out


def mcnemar(a_correct, b_correct) -> dict:
    """Exact McNemar test (McNemar 1947; binomial, two-sided) of two models on the SAME images.

    a_correct, b_correct: equal-length sequences of booleans (per image: model A right, model B
    right). Only the images one model gets right and the other wrong count: with b = A-only and
    c = B-only, p = min(1, 2 P(X <= min(b, c))), X ~ Binomial(b + c, 1/2); b + c == 0 -> p = 1.
    -> {"n", "a_only", "b_only", "p_value", "difference" (A minus B accuracy in percent; None for n == 0)}"""
    a, b = _booleans("a_correct", a_correct), _booleans("b_correct", b_correct)
    if len(a) != len(b):
        raise ValueError(f"a paired test needs both models' results on the same images: got {len(a)} and {len(b)}")
    a_only = sum(x and not y for x, y in zip(a, b))
    b_only = sum(y and not x for x, y in zip(a, b))
    m = a_only + b_only
    p = 1.0 if m == 0 else min(1.0, 2 * _binomial_half_cdf(min(a_only, b_only), m))
    difference = 100 * (a_only - b_only) / len(a) if a else None
    return {"n": len(a), "a_only": a_only, "b_only": b_only, "p_value": p, "difference": difference}


def mean_std(values) -> tuple:
    """Mean and sample standard deviation (ddof=1) of numbers, e.g. one accuracy over seeds -> (mean, std).

    One value -> (value, None): one run says nothing about the spread. No value -> ValueError."""
    values = [float(v) for v in values]
    if not values:
        raise ValueError("mean_std needs at least one value")
    mean = sum(values) / len(values)
    if len(values) == 1:
        return mean, None
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


# ---------------------------------------------------------------------- per-image records of evaluate.py

def bits(flags) -> str:
    """Booleans (one per image) -> a '0'/'1' string: [True, False] -> '10'."""
    return "".join("1" if f else "0" for f in flags)


def image_record(size: int, indices, correct: dict) -> dict:
    """Which of a dataset's `size` images were evaluated (indices, ascending) and which were right.

    correct: {"clean": '0'/'1' string per evaluated image, in index order, "robust": ... or None};
    '?' marks an image whose correctness was not recorded.
    -> {"dataset_size", "evaluated": '0'/'1' per dataset image, "clean", "robust"}"""
    chosen = set(indices)
    for key, value in correct.items():
        if value is not None and len(value) != len(chosen):
            raise ValueError(f"{key}: {len(value)} per-image flags for {len(chosen)} images")
    return {"dataset_size": size, "evaluated": bits(i in chosen for i in range(size)), **correct}


def _correct(result: dict, key: str, which: str) -> list:
    """The per-image booleans of one result's record (key 'clean' or 'robust'), refusing what it lacks."""
    flags = (result.get("images") or {}).get(key) if isinstance(result, dict) else None
    if flags is None:
        raise ValueError(f"result {which} holds no per-image {key} correctness (an older evaluate.py, or "
                         f"--attack none for robust); evaluate it again with this version")
    if "?" in flags:
        raise ValueError(f"result {which} lacks the per-image correctness of {flags.count('?')} images (batches "
                         f"of an older evaluate.py); evaluate it again into a new --out")
    return [f == "1" for f in flags]


def paired(result_a: dict, result_b: dict, key: str = "robust") -> dict:
    """The exact McNemar test of two evaluate.py results (one dataset each) on the same images -> mcnemar()'s dict.

    key: "robust" (default [C]: the number the comparison is about) or "clean". Results on other
    images (other data files, --n-samples or --seed) are refused: a paired test needs the same ones."""
    if key not in ("clean", "robust"):
        raise ValueError(f"key must be 'clean' or 'robust', got {key!r}")
    a, b = _correct(result_a, key, "A"), _correct(result_b, key, "B")
    same_data = (result_a.get("contents") or {}).get("data") == (result_b.get("contents") or {}).get("data")
    same_images = result_a["images"]["evaluated"] == result_b["images"]["evaluated"]
    if not (same_data and same_images):
        what = "data files" if not same_data else "evaluated images (--n-samples, --seed)"
        raise ValueError(f"the two results are on different images (their {what} differ); a paired test needs "
                         f"both models evaluated on the same data with the same --n-samples and --seed")
    return mcnemar(a, b)
