"""PNG charts of a run (latency CDFs) and of a sweep (figures against the request rate).

matplotlib is imported inside the functions, with the Agg backend (no display needed), so the
CLI and the plain benchmark never pay for it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from conveyor.bench.arrivals import rate_text
from conveyor.bench.report import tpot
from conveyor.bench.runner import RequestRecord


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_latency_cdfs(records: Sequence[RequestRecord], path: Path, title: str = "") -> Path:
    """Empirical CDFs of TTFT, TPOT and E2E latency over the completed requests, each in ms,
    or in s when it reaches 10 s (long waits would crowd the ticks with digits)."""
    plt = _pyplot()
    ok = [r for r in records if r.ok]
    series = {"TTFT": [r.ttft_s for r in ok if r.ttft_s is not None],
              "TPOT": [t for t in map(tpot, ok) if t is not None],
              "E2E": [r.e2e_s for r in ok if r.e2e_s is not None]}
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for ax, (name, values) in zip(axes, series.items()):
        unit, scale = ("s", 1.0) if values and max(values) >= 10 else ("ms", 1e3)
        xs = sorted(scale * v for v in values)
        if xs:
            ax.step([xs[0], *xs], [0.0, *((i + 1) / len(xs) for i in range(len(xs)))],
                    where="post")
        ax.set(title=f"{name} CDF", xlabel=f"{name} ({unit})", ylabel="fraction of requests",
               ylim=(0, 1.02))
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _rate_axis(runs: Sequence[dict[str, Any]]) -> tuple[list[float], dict[float, int]]:
    """Rates as evenly spaced categories, inf last: an infinite rate has no place on a numeric
    axis, and the sweep's rates are usually a doubling series anyway."""
    rates = sorted({r["rate"] for r in runs}, key=lambda x: (math.isinf(x), x))
    return rates, {rate: i for i, rate in enumerate(rates)}


def _series_label(run: dict[str, Any], vary_stages: bool) -> str:
    return f"{run['policy']} ({run['stages']} stages)" if vary_stages else run["policy"]


def _plot_metric(ax: Any, runs: Sequence[dict[str, Any]], metric: Callable[[dict], Any],
                 ylabel: str) -> bool:
    """One line per policy (and stage count): `metric(summary)` against the rate. Returns
    whether anything was drawn."""
    rates, pos = _rate_axis(runs)
    vary_stages = len({r["stages"] for r in runs}) > 1
    lines: dict[str, list[tuple[int, float]]] = {}
    for run in runs:
        value = metric(run["summary"]) if run.get("summary") else None
        if value is not None:
            lines.setdefault(_series_label(run, vary_stages), []).append((pos[run["rate"]],
                                                                           value))
    for label, points in lines.items():
        points.sort()
        ax.plot([p for p, _ in points], [v for _, v in points], marker="o", label=label)
    ax.set_xticks(range(len(rates)), [rate_text(r) for r in rates])
    ax.set(xlabel="request rate (req/s)", ylabel=ylabel)
    ax.grid(alpha=0.3)
    if lines:
        ax.legend(fontsize=8)
    return bool(lines)


def _dig(*keys: str) -> Callable[[dict], Any]:
    def get(summary: dict) -> Any:
        value: Any = summary
        for k in keys:
            value = value.get(k) if isinstance(value, dict) else None
        return value
    return get


def _ms(getter: Callable[[dict], Any]) -> Callable[[dict], Any]:
    return lambda s: None if getter(s) is None else 1e3 * getter(s)


def plot_sweep(runs: Sequence[dict[str, Any]], out_dir: Path) -> list[Path]:
    """Charts of a sweep; `runs` hold stages, policy, rate and summary (None if it failed).
    Writes throughput, bubble ratio and p99 latency against the rate; a chart with nothing
    to draw (e.g. no bubble counters from the controller) is skipped."""
    plt = _pyplot()
    out_dir.mkdir(parents=True, exist_ok=True)
    charts = {
        "sweep-throughput.png": [(_dig("output_throughput"), "output tokens/s"),
                                 (_dig("request_throughput"), "requests/s")],
        "sweep-bubble.png": [(_dig("controller", "mean_bubble_ratio"), "mean bubble ratio")],
        "sweep-latency.png": [(_ms(_dig("ttft", "p99")), "p99 TTFT (ms)"),
                              (_ms(_dig("tpot", "p99")), "p99 TPOT (ms)")],
    }
    written = []
    for name, panels in charts.items():
        fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4), squeeze=False)
        drawn = [_plot_metric(ax, runs, metric, label)
                 for ax, (metric, label) in zip(axes[0], panels)]
        if any(drawn):
            fig.tight_layout()
            fig.savefig(out_dir / name, dpi=110)
            written.append(out_dir / name)
        plt.close(fig)
    return written
