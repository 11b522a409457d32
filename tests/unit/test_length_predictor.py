"""The online length predictor: it learns a known length law, keeps honest quantiles, is cheap,
and its state survives a restart (a bad or missing file: a warning and a fresh predictor)."""

from __future__ import annotations

import math
import random
import time

import numpy as np

from common.instance import CoreRequest, Finish
from common.prediction import OnlineLengthPredictor
from common.prediction.requests import RequestLengths
from common.prediction.store import load_predictor, save_predictor

SHORT, LONG = 101, 202
"""Instruction tokens of the synthetic law: SHORT asks for a short reply, LONG for a long one."""


def synthetic(rng: random.Random) -> tuple[int, list[int], int]:
    """A prompt and its true reply length: log length = 2 + 0.5 log(prompt) + 1.5 (LONG) or
    -1 (SHORT) + noise of sigma 0.3."""
    n = rng.randint(8, 400)
    kind = rng.choice((SHORT, LONG, 0))
    ids = [kind] + [rng.randint(1000, 30000) for _ in range(n - 1)]
    mu = 2 + 0.5 * math.log(n) + {SHORT: -1.0, LONG: 1.5, 0: 0.0}[kind]
    return n, ids, max(1, round(math.exp(mu + rng.gauss(0, 0.3))))


def log_error(p: OnlineLengthPredictor, stream) -> float:
    return float(np.mean([abs(math.log1p(p.predict(n, ids).median) - math.log1p(out))
                          for n, ids, out in stream]))


def test_error_on_a_known_law_falls_as_it_learns():
    rng = random.Random(1)
    test = [synthetic(rng) for _ in range(300)]
    p = OnlineLengthPredictor()
    errors = []
    for seen in (0, 100, 1000, 5000):
        while p.seen < seen:
            p.observe(*synthetic(rng))
        errors.append(log_error(p, test))
    assert errors[0] > 0.9  # the prior knows nothing of the law
    assert errors == sorted(errors, reverse=True)
    assert errors[-1] < 0.35  # near the noise's own mean |error|, 0.3 * sqrt(2/pi) = 0.24
    # It learned the instruction tokens: a LONG prompt is predicted ~12x a SHORT one (e^2.5).
    ratio = p.predict(100, [LONG] + [5000] * 99).median / p.predict(100, [SHORT] + [5000] * 99
                                                                    ).median
    assert 6 < ratio < 25


def test_the_high_quantile_covers_its_share():
    rng = random.Random(2)
    p = OnlineLengthPredictor()
    for _ in range(4000):
        p.observe(*synthetic(rng))
    test = [synthetic(rng) for _ in range(1000)]
    covered = np.mean([out <= p.predict(n, ids).high for n, ids, out in test])
    below_median = np.mean([out <= p.predict(n, ids).median for n, ids, out in test])
    assert 0.85 <= covered <= 0.95
    assert 0.4 <= below_median <= 0.6


def test_without_token_ids_it_learns_from_the_prompt_length():
    rng = random.Random(3)
    p = OnlineLengthPredictor()
    for _ in range(3000):
        n = rng.randint(4, 2000)
        p.observe(n, None, max(1, round(3 * n ** 0.7)))
    assert abs(math.log(p.predict(1000, None).median / (3 * 1000 ** 0.7))) < 0.3
    assert p.predict(1000, None).median > 4 * p.predict(50, None).median


def test_predicting_and_learning_are_cheap():
    rng = random.Random(4)
    p = OnlineLengthPredictor()
    stream = [synthetic(rng) for _ in range(500)]
    t0 = time.perf_counter()
    for n, ids, out in stream:
        p.predict(n, ids)
        p.observe(n, ids, out)
    per_request = (time.perf_counter() - t0) / len(stream)
    assert per_request < 1e-3  # the bound for the hot path; ~50 us here


def test_state_survives_a_restart(tmp_path):
    rng = random.Random(5)
    p = OnlineLengthPredictor()
    for _ in range(500):
        p.observe(*synthetic(rng))
    path = tmp_path / "run" / "length_predictor.npz"
    save_predictor(p, path)
    q = load_predictor(path)
    assert q.seen == 500
    n, ids, _ = synthetic(rng)
    assert q.predict(n, ids) == p.predict(n, ids)


def test_a_missing_or_bad_state_file_warns_and_starts_fresh(tmp_path, capsys):
    fresh = OnlineLengthPredictor().predict(10, None)
    assert load_predictor(tmp_path / "none.npz").seen == 0
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"not a zip file")
    p = load_predictor(bad)
    assert p.seen == 0 and p.predict(10, None) == fresh
    other = tmp_path / "other.npz"
    save_predictor(OnlineLengthPredictor(), other)
    from common.prediction import PredictorSettings

    assert load_predictor(other, PredictorSettings(dim_bits=10)).seen == 0  # wrong size
    assert "starting fresh" in capsys.readouterr().out


def test_requests_are_predicted_at_admission_and_learned_only_at_eos():
    lengths = RequestLengths(OnlineLengthPredictor())
    req = CoreRequest(1, 0.0, 16, 64, 2048)
    lengths.admit(req)
    assert req.predicted_output == 128 and req.predicted_high > 128  # the prior
    req.out, req.finish = 64, Finish.LENGTH
    lengths.finished(req)  # capped by max_tokens: censored, not learned from
    assert lengths.predictor.seen == 0
    req.finish = Finish.STOP
    lengths.finished(req)
    assert lengths.predictor.seen == 1
    oracle = CoreRequest(2, 0.0, 16, 64, 2048)
    oracle.predicted_output = 40
    lengths.admit(oracle)
    assert (oracle.predicted_output, oracle.predicted_high) == (40, 40)
