"""HELR: the placement program on small hand-solved heterogeneous cases, against brute force,
its memory limit, and a case where fewer devices win."""

from __future__ import annotations

import itertools

import pytest

from common.model.helr import DeviceCost, ModelMemory, evaluate, helr_placement

MEM = ModelMemory(layer_bytes=1.0)


def dev(name, layer_s, memory=100.0, hop_s=0.0, last_s=0.0):
    return DeviceCost(name, layer_s, memory, last_s=last_s, hop_s=hop_s)


def test_a_device_twice_as_fast_takes_twice_the_layers():
    # 12 layers, fast 1 s/layer then slow 2 s/layer: 8 + 4 gives 8 s on both (even: 6 + 12).
    p = helr_placement([dev("fast", 1.0), dev("slow", 2.0)], 12, MEM)
    assert (p.devices, p.layers, p.bottleneck_s) == ((0, 1), (8, 4), 8.0)
    assert evaluate([dev("fast", 1.0), dev("slow", 2.0)], (0, 1), (6, 6)).bottleneck_s == 12.0


def test_memory_caps_a_stage():
    # The fast device holds only 5 layers: 5 + 7, bottleneck 14 s on the slow one.
    p = helr_placement([dev("fast", 1.0, memory=5.0), dev("slow", 2.0)], 12, MEM)
    assert p.layers == (5, 7) and p.bottleneck_s == 14.0
    with pytest.raises(ValueError, match="do not fit"):
        helr_placement([dev("a", 1.0, memory=5.0), dev("b", 1.0, memory=5.0)], 12, MEM)


def test_fewer_devices_win_when_the_link_is_slow():
    # Across the link a hop costs 7 s: two stages at best 6 + 6 with a 7 s hop = 7 s
    # bottleneck, alone on the first device 12 x 0.5 = 6 s.
    devices = [dev("a", 0.5, hop_s=7.0), dev("b", 0.5)]
    p = helr_placement(devices, 12, MEM)
    assert (p.devices, p.layers, p.bottleneck_s) == ((0,), (12,), 6.0)
    # With a fast link both are used: 6 + 6 layers, 3 s.
    p = helr_placement([dev("a", 0.5, hop_s=0.1), dev("b", 0.5)], 12, MEM)
    assert (p.devices, p.layers, p.bottleneck_s) == ((0, 1), (6, 6), 3.0)


def test_a_slow_device_in_the_middle_is_skipped():
    # h100-like, a much slower one, h100-like: 5 + 5 on the outer two (5 s) beats any
    # placement that gives the slow one even a layer (>= 10 s).
    p = helr_placement([dev("x", 1.0), dev("slow", 10.0), dev("y", 1.0)], 10, MEM)
    assert p.devices == (0, 2) and p.layers == (5, 5) and p.bottleneck_s == 5.0


def test_latency_objective_sums_stages_and_hops():
    # For one request's latency every hop only adds: one device (12 s) beats two (6 + 6 + 1).
    devices = [dev("a", 1.0, hop_s=1.0), dev("b", 1.0)]
    assert helr_placement(devices, 12, MEM, "sum").devices == (0,)
    assert helr_placement(devices, 12, MEM, "bottleneck").layers == (6, 6)


def test_it_matches_brute_force_on_three_heterogeneous_devices():
    devices = [dev("a", 1.0, memory=6, hop_s=0.5), dev("b", 1.7, hop_s=0.2),
               dev("c", 0.8, memory=4, last_s=2.5)]
    n = 11
    best = float("inf")
    for k in range(1, 4):
        for used in itertools.combinations(range(3), k):
            for cuts in itertools.combinations(range(1, n), k - 1):
                counts = [b - a for a, b in zip((0, *cuts), (*cuts, n))]
                if any(c > devices[d].memory_bytes for d, c in zip(used, counts)):
                    continue
                best = min(best, evaluate(devices, used, counts).bottleneck_s)
    assert helr_placement(devices, n, MEM).bottleneck_s == pytest.approx(best)
