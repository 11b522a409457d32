"""Which layers each pipeline stage runs: a dynamic program over per-layer cost (UELLM's layer
placement, reduced to what a chain of identical devices needs).

A pipeline runs at the pace of its slowest stage, so the split should minimize the largest
stage cost, not the difference in layer counts. The stages are not alike: the first also looks
up embeddings (cheap), the last also runs the final norm, the LM head and sampling. On a small
model the LM head is large — SmolLM2-135M's 49152 x 576 head has as many weights as eight of its
decoder layers — so an even split leaves the first stage idle while the last one works, which
is a pipeline bubble no scheduling policy can remove.

Costs are in "layer equivalents". A decode step reads every weight of its stage once, so the
head weighs (head weights / layer weights) when every token samples; a prefill chunk samples
one row, and the head weighs almost nothing. `head_weight` is the fraction of that full cost to
plan for; the default 0.5 stands for micro-batches that mix prefill chunks and decodes.
`memory_cap_layers` bounds how many layers one stage may hold (device memory), the second
constraint of UELLM's program; inter-stage link cost does not depend on where a contiguous
split falls (every boundary carries one hidden vector per token), so it drops out.
"""

from __future__ import annotations

from collections.abc import Sequence

from common.model.shape import ModelShape
from common.model.source import split_layers

DEFAULT_HEAD_WEIGHT = 0.5


def head_cost_in_layers(shape: ModelShape, head_weight: float = DEFAULT_HEAD_WEIGHT) -> float:
    """The last stage's extra work (final norm + LM head), in decoder-layer equivalents."""
    head_params = shape.vocab_size * shape.hidden_size + shape.hidden_size
    return head_weight * head_params / shape.layer_param_count()


def min_max_partition(costs: Sequence[float], stages: int, first_extra: float = 0.0,
                      last_extra: float = 0.0, max_layers: int | None = None) -> list[int]:
    """Layer counts per stage (contiguous, each >= 1) minimizing the costliest stage, where a
    stage costs the sum of its layers' costs, plus `first_extra` on the first stage and
    `last_extra` on the last. Among splits with the same maximum, the DP keeps the first it
    meets. O(stages x layers^2), which is nothing at model sizes."""
    n = len(costs)
    if not 1 <= stages <= n:
        raise ValueError(f"cannot split {n} layers over {stages} stages")
    cap = max_layers or n
    if cap * stages < n:
        raise ValueError(f"{n} layers do not fit in {stages} stages of at most {cap} layers")
    prefix = [0.0]
    for c in costs:
        prefix.append(prefix[-1] + c)
    inf = float("inf")
    # best[s][i]: the smallest possible max stage cost placing layers [0, i) on stages [0, s).
    best = [[inf] * (n + 1) for _ in range(stages + 1)]
    cut = [[0] * (n + 1) for _ in range(stages + 1)]
    best[0][0] = 0.0
    for s in range(1, stages + 1):
        extra_first = first_extra if s == 1 else 0.0
        for i in range(s, n - (stages - s) + 1):
            extra = extra_first + (last_extra if s == stages else 0.0)
            for j in range(max(s - 1, i - cap), i):
                if best[s - 1][j] == inf:
                    continue
                cost = max(best[s - 1][j], prefix[i] - prefix[j] + extra)
                if cost < best[s][i] - 1e-12:
                    best[s][i], cut[s][i] = cost, j
    counts, i = [], n
    for s in range(stages, 0, -1):
        j = cut[s][i]
        counts.append(i - j)
        i = j
    return counts[::-1]


def balanced_layer_split(shape: ModelShape, stages: int,
                         head_weight: float = DEFAULT_HEAD_WEIGHT,
                         max_layers: int | None = None) -> list[int]:
    """Layer counts per stage for `shape` that balance the stages' work, LM head included."""
    return min_max_partition([1.0] * shape.num_layers, stages,
                             last_extra=head_cost_in_layers(shape, head_weight)
                             if stages > 1 else 0.0,
                             max_layers=max_layers)


def stage_layer_bounds(shape: ModelShape, stages: int, explicit: Sequence[int] = (),
                       placement: str = "balanced",
                       head_weight: float = DEFAULT_HEAD_WEIGHT) -> list[tuple[int, int]]:
    """[start, end) layers of every stage: the explicit counts when given, else the placement's
    (what stage workers, the profiler and the simulator all use, so they agree)."""
    if explicit:
        return split_layers(shape.num_layers, stages, explicit)
    if placement == "even":
        return split_layers(shape.num_layers, stages)
    if placement != "balanced":
        raise ValueError(f"unknown placement {placement!r}; choose balanced or even")
    return split_layers(shape.num_layers, stages,
                        balanced_layer_split(shape, stages, head_weight))
