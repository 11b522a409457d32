"""Layer placement: the min-max dynamic program against brute force, and the balanced splits
it gives real model shapes."""

import itertools
import random

import pytest

from common.model import NAMED_SHAPES
from common.model.placement import balanced_layer_split, head_cost_in_layers, min_max_partition


def stage_costs(counts, costs, first_extra, last_extra):
    out, start = [], 0
    for k in counts:
        out.append(sum(costs[start:start + k]))
        start += k
    out[0] += first_extra
    out[-1] += last_extra
    return out


def brute_force(costs, stages, first_extra, last_extra, cap):
    n, best = len(costs), None
    for cuts in itertools.combinations(range(1, n), stages - 1):
        counts = [b - a for a, b in zip((0, *cuts), (*cuts, n))]
        if max(counts) > cap:
            continue
        worst = max(stage_costs(counts, costs, first_extra, last_extra))
        best = worst if best is None else min(best, worst)
    return best


def test_dynamic_program_matches_brute_force_on_random_chains():
    rng = random.Random(5)
    for _ in range(200):
        n = rng.randint(2, 10)
        stages = rng.randint(1, min(n, 4))
        costs = [rng.uniform(0.5, 3.0) for _ in range(n)]
        first, last = rng.uniform(0, 2), rng.uniform(0, 6)
        cap = rng.randint(-(-n // stages), n)
        counts = min_max_partition(costs, stages, first, last, max_layers=cap)
        assert sum(counts) == n and len(counts) == stages and min(counts) >= 1
        assert max(counts) <= cap
        got = max(stage_costs(counts, costs, first, last))
        assert got == pytest.approx(brute_force(costs, stages, first, last, cap))


def test_the_lm_head_moves_layers_off_the_last_stage():
    smollm2 = NAMED_SHAPES["smollm2-135m"]
    # 49152 x 576 head weights ~ 8 decoder layers; half of that is planned for.
    assert head_cost_in_layers(smollm2) == pytest.approx(4.0, abs=0.01)
    assert balanced_layer_split(smollm2, 2) == [17, 13]
    assert balanced_layer_split(smollm2, 1) == [30]
    # With a head that weighs nothing, the split is even again.
    assert balanced_layer_split(smollm2, 2, head_weight=0.0) == [15, 15]
    llama = NAMED_SHAPES["llama3-8b"]
    assert sum(balanced_layer_split(llama, 4)) == 32


def test_memory_cap_and_impossible_splits_are_refused_clearly():
    assert max(min_max_partition([1.0] * 10, 2, last_extra=8.0, max_layers=6)) <= 6
    with pytest.raises(ValueError, match="do not fit"):
        min_max_partition([1.0] * 10, 2, max_layers=4)
    with pytest.raises(ValueError, match="cannot split 3 layers over 4 stages"):
        min_max_partition([1.0] * 3, 4)


def test_stage_bounds_follow_explicit_counts_then_the_placement():
    from common.model.placement import stage_layer_bounds

    smollm2 = NAMED_SHAPES["smollm2-135m"]
    assert stage_layer_bounds(smollm2, 2) == [(0, 17), (17, 30)]
    assert stage_layer_bounds(smollm2, 2, placement="even") == [(0, 15), (15, 30)]
    assert stage_layer_bounds(smollm2, 2, [20, 10]) == [(0, 20), (20, 30)]
    with pytest.raises(ValueError, match="unknown placement"):
        stage_layer_bounds(smollm2, 2, placement="random")
