"""Request arrival processes of the benchmark."""

from __future__ import annotations

import math

import numpy as np
import pytest

from conveyor.bench.arrivals import arrival_gaps, arrival_times, parse_rate


def test_poisson_mean_gap_is_one_over_the_rate():
    gaps = np.array(arrival_gaps(20000, rate=4.0, burstiness=1.0, seed=0))
    assert gaps.mean() == pytest.approx(0.25, rel=0.05)
    assert gaps.std() / gaps.mean() == pytest.approx(1.0, rel=0.05)  # exponential: CV 1
    assert (gaps > 0).all()


@pytest.mark.parametrize("k", [0.25, 1.0, 4.0])
def test_gamma_burstiness_sets_the_coefficient_of_variation(k):
    gaps = np.array(arrival_gaps(40000, rate=10.0, burstiness=k, seed=1))
    assert gaps.mean() == pytest.approx(0.1, rel=0.05)  # the rate holds whatever k is
    assert gaps.std() / gaps.mean() == pytest.approx(1 / math.sqrt(k), rel=0.07)


def test_infinite_rate_sends_everything_at_once():
    assert arrival_gaps(5, math.inf) == [0.0] * 5
    assert arrival_times(5, parse_rate("inf")) == [0.0] * 5


def test_seeded_and_cumulative():
    a = arrival_times(50, 2.0, 0.5, seed=7)
    assert a == arrival_times(50, 2.0, 0.5, seed=7)
    assert a != arrival_times(50, 2.0, 0.5, seed=8)
    assert a[0] == 0.0 and len(a) == 50
    assert all(later >= earlier for earlier, later in zip(a, a[1:]))
    gaps = arrival_gaps(49, 2.0, 0.5, seed=7)
    assert a[-1] == pytest.approx(sum(gaps))
    assert arrival_times(0, 2.0) == [] and arrival_times(1, 2.0) == [0.0]


@pytest.mark.parametrize("text", ["0", "-1", "nan", "fast", ""])
def test_bad_rates_are_refused(text):
    with pytest.raises(ValueError, match="request rate"):
        parse_rate(text)


def test_bad_burstiness_is_refused():
    with pytest.raises(ValueError, match="burstiness"):
        arrival_gaps(3, 1.0, burstiness=0.0)
