"""Merging cost profiles of one model on one machine taken at different times: every figure
becomes the median over them (the mean of two).

A shared VM's speed drifts by 10-20% over minutes; one `conveyor profile` run samples it once,
while the benchmarks it is compared with run over hours. Merging runs taken at different times
estimates the machine's usual speed instead of one moment's. The inputs must share the model
shape, dtype and grid; layer counts may differ (each input's layer timings are scaled to the
first's layer count, as the cost model scales them). The link, device and metadata come from
the first input.
"""

from __future__ import annotations

import dataclasses
import statistics

from common.costmodel.profile import Profile, ProfileError, Sample, check_shape


def _med(values: list[float]) -> float:
    return statistics.median(values)


def merge_profiles(profiles: list[Profile]) -> Profile:
    if len(profiles) < 2:
        raise ProfileError("give at least two profiles to merge")
    first = profiles[0]
    grid = (first.prefill_axis, first.decode_axis, first.context_axis)
    for i, p in enumerate(profiles[1:], 2):
        check_shape(p, first.shape, where=f"profile {i}")
        if (p.prefill_axis, p.decode_axis, p.context_axis) != grid or p.dtype != first.dtype:
            raise ProfileError(f"profile {i} has another grid or dtype than the first")
        if (p.head_rows, p.embedding_tokens) != (first.head_rows, first.embedding_tokens):
            raise ProfileError(f"profile {i} has other head rows or embedding sizes")
    scale = [first.num_layers / p.num_layers for p in profiles]
    samples = []
    for s in first.samples:
        at = [p.sample_at(s.prefill_tokens, s.decode_tokens, s.context_len) for p in profiles]
        if any(a is None for a in at):
            raise ProfileError(f"a profile lacks the grid point {s.prefill_tokens}, "
                               f"{s.decode_tokens}, {s.context_len}")
        samples.append(Sample(s.prefill_tokens, s.decode_tokens, s.context_len,
                              _med([a.median_s * k for a, k in zip(at, scale)]),
                              _med([a.p10_s * k for a, k in zip(at, scale)]),
                              _med([a.p90_s * k for a, k in zip(at, scale)]),
                              _med([a.prepare_s for a in at])))
    # The prefill split: over the inputs that timed the same one.
    splits = [(p.prefill_split, k) for p, k in zip(profiles, scale) if p.prefill_split]
    split = None
    if splits:
        base = splits[0][0]
        same = [(s, k) for s, k in splits
                if (s["tokens"], s["sequences"]) == (base["tokens"], base["sequences"])]
        split = {**base, "median_s": [_med([s["median_s"][i] * k for s, k in same])
                                      for i in range(len(base["sequences"]))]}

    def column(name: str) -> list[float]:
        return [_med(list(v)) for v in zip(*(getattr(p, name) for p in profiles))]

    return dataclasses.replace(
        first, samples=samples, prefill_split=split, embedding_s=column("embedding_s"),
        head_s=column("head_s"), head_p10_s=column("head_p10_s"),
        head_p90_s=column("head_p90_s"),
        notes=f"median of {len(profiles)} profiles ({', '.join(p.created for p in profiles)})"
              f"; {first.notes}")
