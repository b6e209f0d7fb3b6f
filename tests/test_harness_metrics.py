from math import comb

import numpy as np
import pytest

from harness.metrics import bootstrap_mean, mcnemar_exact, paired_comparison, pass_at_k


@pytest.mark.parametrize("n,c,k", [(1, 0, 1), (1, 1, 1), (10, 3, 1), (10, 3, 5), (20, 0, 10), (200, 17, 100),
                                   (5, 4, 2)])
def test_pass_at_k_matches_closed_form(n, c, k):
    assert pass_at_k(n, c, k) == pytest.approx(1 - comb(n - c, k) / comb(n, k), abs=1e-12)


def test_pass_at_k_is_stable_for_large_n():
    assert 0 < pass_at_k(10_000, 3, 1) == pytest.approx(3 / 10_000)
    with pytest.raises(ValueError):
        pass_at_k(3, 1, 5)


def test_bootstrap_interval_contains_mean_and_shrinks_with_data():
    rng = np.random.default_rng(0)
    small, large = rng.random(20) < 0.3, rng.random(2000) < 0.3
    a, b = bootstrap_mean(small), bootstrap_mean(large)
    assert a.low <= a.value <= a.high and b.low <= b.value <= b.high
    assert (b.high - b.low) < (a.high - a.low)


def test_mcnemar_exact_and_paired_comparison():
    assert mcnemar_exact(0, 0) == 1.0
    assert mcnemar_exact(0, 10) == pytest.approx(2 / 2**10)
    assert mcnemar_exact(5, 5) == 1.0
    a = np.array([1, 1, 1, 1, 1, 1, 1, 1, 0, 0] * 5, float)
    b = np.array([0, 0, 0, 0, 0, 0, 1, 1, 0, 0] * 5, float)
    cmp = paired_comparison(a, b)
    assert cmp.difference.value == pytest.approx(-0.6) and cmp.only_a == 30 and cmp.only_b == 0
    assert cmp.p_value < 1e-6 and cmp.difference.high < 0
