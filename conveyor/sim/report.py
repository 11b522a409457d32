"""Figures of a simulated run, in `conveyor bench`'s shapes and by its definitions.

Per-request records are bench's `RequestRecord`s (start = arrival, TTFT/E2E from it, one ITL
gap per token after the first), the summary is bench's `summarize` (TTFT/TPOT/ITL/E2E
distributions, request and token throughput, goodput under an SLO) and the pipeline section is
bench's `controller_window` over the simulated controller's counters (per-stage busy/idle and
bubble ratio = idle / time the instance had unfinished requests; prefill and decode tokens per
micro-batch). The simulator adds what only it sees exactly: queue lengths over time, KV use
over time, tokens per micro-batch (prefill + decode), and its own speed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import msgspec
import numpy as np

from conveyor.sim.engine import SimResult
from common.stats import ControllerMetrics, ControllerStats, InstanceStats, StageStats, mean_std

RECORDS_AUTO_TOKEN_LIMIT = 1_000_000
"""--records auto keeps the per-token gaps in the result file up to this many tokens."""


# ---- records and summary ------------------------------------------------------------------------

def request_records(result: SimResult, with_itl: bool = True) -> list:
    """bench's RequestRecord per request (times in seconds from the first arrival)."""
    from conveyor.bench.runner import RequestRecord

    t0 = result.first_arrival_s
    out = []
    for r in result.requests:
        rec = RequestRecord(r.index, r.prompt, r.true_output, start_s=r.arrival - t0)
        if r.error:
            rec.error = r.error
        else:
            rec.ttft_s = None if r.first_token is None else r.first_token - r.arrival
            rec.e2e_s = None if r.last_token is None else r.last_token - r.arrival
            rec.prompt_tokens = r.prompt
            rec.output_tokens = r.out
            rec.finish_reason = r.finish.name.lower()
            if with_itl:
                rec.itl_s = r.itl.tolist()
        out.append(rec)
    return out


def all_itl(result: SimResult) -> np.ndarray:
    arrays = [np.frombuffer(r.itl, dtype=np.float64) for r in result.requests
              if not r.error and len(r.itl)]
    return np.concatenate(arrays) if arrays else np.zeros(0)


def duration_s(result: SimResult) -> float:
    """From the first arrival to the last token (bench: first send to last finish)."""
    last = max((r.last_token for r in result.requests if r.last_token is not None),
               default=result.first_arrival_s)
    return max(last - result.first_arrival_s, 0.0)


def zero_stats(result: SimResult) -> ControllerStats:
    """The controller's stats before the run (every counter at zero)."""
    zero = ControllerMetrics(started=0.0, num_instances=result.cfg.instances).snapshot(
        0.0, policy=result.cfg.policy)
    return msgspec.structs.replace(zero, stages=[StageStats(instance=i, stage=s)
                                                 for (i, s) in sorted(result.stage_busy)])


def final_stats(result: SimResult) -> ControllerStats:
    """The controller's stats at the end of the run (what its StatusReply would carry)."""
    return result.metrics.snapshot(
        result.end_s, model=result.cfg.shape_name, policy=result.cfg.policy,
        pipeline_depth=result.cfg.num_stages,
        instances=[InstanceStats(instance=i["instance"], kv_total_blocks=i["kv_total_blocks"],
                                 kv_free_blocks=i["kv_total_blocks"])
                   for i in result.instances])


def stage_bubbles(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per stage index over every instance: busy, idle and pending seconds summed, and the
    bubble ratio of the sums (idle / pending). The one way this report, its compact table and
    its chart fold instances together."""
    sums: dict[int, list[float]] = {}
    for row in rows:
        acc = sums.setdefault(row["stage"], [0.0, 0.0, 0.0])
        acc[0] += row["busy_s"]
        acc[1] += row["idle_s"]
        acc[2] += row["pending_s"]
    return [{"stage": s, "busy_s": busy, "idle_s": idle, "pending_s": pending,
             "bubble_ratio": idle / pending if pending else None}
            for s, (busy, idle, pending) in sorted(sums.items())]


def summarize(result: SimResult, slo: dict[str, float] | None = None,
              records: list | None = None, stats: ControllerStats | None = None
              ) -> dict[str, Any]:
    """bench's summary of the run, plus the simulator's own section (`stats`: final_stats,
    when the caller has it already)."""
    from conveyor.bench.report import controller_window, distribution
    from conveyor.bench.report import summarize as bench_summarize

    recs = records if records is not None else request_records(result, with_itl=False)
    summary = bench_summarize(recs, duration_s(result), slo)
    summary["itl"] = distribution(all_itl(result))  # the same gaps, without a Python list
    ctl = controller_window(zero_stats(result), stats or final_stats(result))
    for row in ctl.get("instances") or []:
        inst = result.instances[row["instance"]]
        row["peak_waiting"] = inst["max_waiting"]
        row["peak_kv_used"] = inst["max_kv_used"]
    summary["controller"] = ctl
    summary["simulator"] = simulator_section(result, ctl.get("stages") or [])
    return summary


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def simulator_section(result: SimResult, stage_rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The simulator's own figures; `stage_rows` are the controller section's per-stage rows."""
    inst = result.instances
    count = sum(i["tokens_per_batch"]["count"] for i in inst)
    m = result.metrics
    total = sum(i["tokens_per_batch"]["sum"] for i in inst)
    sq = sum(i["tokens_per_batch"]["sumsq"] for i in inst)
    mean, std = mean_std(count, total, sq)
    wall = result.wall_s
    return {
        "simulated_s": result.end_s, "wall_s": wall, "workers": result.workers,
        "requests_per_wall_s": len(result.requests) / wall if wall > 0 else None,
        "events": result.events, "policy_calls": result.policy_calls,
        "cost_cache": result.cost_cache,
        "tokens_per_batch": {"count": count, "mean": mean, "std": std},
        "mean_waiting": _mean([i["mean_waiting"] for i in inst]),
        "max_waiting": max((i["max_waiting"] for i in inst), default=0),
        "mean_kv_used": _mean([i["mean_kv_used"] for i in inst]),
        "max_kv_used": max((i["max_kv_used"] for i in inst), default=0.0),
        "length_spread": _mean([i["length_spread"] for i in inst
                                if i.get("length_spread") is not None]),
        "preemptions": m.preemptions,
        "finished": {"stop": m.finished["stop"], "length": m.finished["length"]},
        "slo": msgspec.to_builtins(m.slo_attainment()),
        "stages": stage_bubbles(stage_rows),
        "instances": [{k: v for k, v in i.items() if k not in ("samples", "stage_samples")}
                      for i in inst],
        **({"cascade": result.cascade} if result.cascade is not None else {}),
    }


# ---- text ---------------------------------------------------------------------------------------

def _compact_controller(ctl: dict[str, Any], max_rows: int = 8) -> dict[str, Any]:
    """Per-stage and per-instance lines of a big cluster, folded into one line per stage index
    and one for all instances (the full rows stay in the JSON)."""
    out = dict(ctl)
    stages = ctl.get("stages") or []
    if len(stages) > max_rows:
        out["stages"] = [{"instance": "*", "stage": row["stage"],
                          "bubble_ratio": row["bubble_ratio"]} for row in stage_bubbles(stages)]
    instances = ctl.get("instances") or []
    if len(instances) > max_rows:
        out["instances"] = [{"instance": "max",
                             "peak_kv_used": max(i.get("peak_kv_used", 0.0) for i in instances),
                             "peak_waiting": max(i.get("peak_waiting", 0) for i in instances)}]
    return out


def format_summary(summary: dict[str, Any], title: str = " Simulation Result ") -> str:
    """bench's table, then the simulator's lines."""
    from conveyor.bench.report import WIDTH, format_table

    shown = dict(summary)
    shown["controller"] = _compact_controller(summary.get("controller") or {})
    text = format_table(shown, title).rstrip("=").rstrip()
    sim = summary.get("simulator") or {}
    tpb = sim.get("tokens_per_batch") or {}

    def line(label: str, value: Any, fmt: str = "") -> str:
        v = "n/a" if value is None else format(value, fmt)
        return f"{label:<40}{v:>{WIDTH - 40}}"

    lines = [text, f"{'Simulator':-^{WIDTH}}",
             line("Tokens/micro-batch (mean ± std):",
                  None if tpb.get("mean") is None else f"{tpb['mean']:.1f} ± {tpb['std']:.1f}"),
             line("Mean / max waiting per instance:",
                  f"{sim.get('mean_waiting') or 0:.1f} / {sim.get('max_waiting', 0)}"),
             line("Mean / max KV use (%):",
                  f"{100 * (sim.get('mean_kv_used') or 0):.1f} / "
                  f"{100 * (sim.get('max_kv_used') or 0):.1f}"),
             line("Preemptions:", sim.get("preemptions")),
             line("Decode length spread (longest - mean):", sim.get("length_spread"), ".0f"),
             line("Stopped at EOS / at max_tokens:",
                  f"{(sim.get('finished') or {}).get('stop', 0)} / "
                  f"{(sim.get('finished') or {}).get('length', 0)}"),
             *[line(f"SLO attainment, {label}:",
                    f"{100 * a['attainment']:.1f}% ({a['met']}/{a['met'] + a['missed']})")
               for label, a in (sim.get("slo") or {}).items()],
             *_cascade_lines(sim.get("cascade"), line),
             line("Simulated time (s):", sim.get("simulated_s"), ".2f"),
             line("Wall time (s):", sim.get("wall_s"), ".2f"),
             line("Simulated requests per wall second:", sim.get("requests_per_wall_s"), ".0f"),
             "=" * WIDTH]
    return "\n".join(lines)


def _cascade_lines(cascade: dict[str, Any] | None, line: Any) -> list[str]:
    """The groups' refinement, when the run had it (the migrations and the groups are the
    controller section's lines, conveyor/bench/groups_report.py)."""
    refined = (cascade or {}).get("refinements")
    if not refined:
        return []
    return [line("Refinement nudges / DP re-runs:",
                 f"{refined['nudges']} / {refined['replans']}")]


# ---- files --------------------------------------------------------------------------------------

def build_result(result: SimResult, config: dict[str, Any], workload: dict[str, Any],
                 slo: dict[str, float] | None = None, records: str = "auto"
                 ) -> tuple[dict[str, Any], list]:
    """The result file's content (bench's layout: config, summary, requests, plus cluster and
    simulator sections) and the records (for the charts)."""
    tokens = sum(r.out for r in result.requests)
    with_itl = records == "full" or (records == "auto" and tokens <= RECORDS_AUTO_TOKEN_LIMIT)
    recs = request_records(result, with_itl=with_itl)
    stats = final_stats(result)
    summary = summarize(result, slo, recs, stats)
    from dataclasses import asdict

    out = {"config": config, "cluster": result.cfg.describe(), "workload": workload,
           "summary": summary,
           "controller_snapshots": msgspec.to_builtins({"before": zero_stats(result),
                                                        "after": stats}),
           "gauge_samples": gauge_samples(result),
           "requests": [] if records == "none" else [asdict(r) for r in recs],
           "requests_itl": with_itl}
    return out, recs


def gauge_samples(result: SimResult) -> list[dict[str, Any]]:
    """Per instance, its (time, waiting, running, KV blocks in use) samples."""
    return [{"instance": i["instance"], "t": [s[0] for s in i["samples"]],
             "waiting": [s[1] for s in i["samples"]], "running": [s[2] for s in i["samples"]],
             "kv_used_blocks": [s[3] for s in i["samples"]]} for i in result.instances]


# ---- charts -------------------------------------------------------------------------------------

def _grid_mean(result: SimResult, column: int, points: int = 400,
               scale: list[float] | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mean and max over instances of a sampled gauge on a common time grid (each instance's
    samples held as a step function)."""
    end = result.end_s if result.end_s > 0 else 1.0
    grid = np.linspace(0.0, end, points)
    rows = []
    for k, inst in enumerate(result.instances):
        s = inst["samples"]
        if not s:
            continue
        t = np.array([x[0] for x in s])
        v = np.array([x[column] for x in s], dtype=float)
        if scale is not None:
            v = v * scale[k]
        idx = np.searchsorted(t, grid, side="right") - 1
        rows.append(np.where(idx >= 0, v[np.clip(idx, 0, None)], 0.0))
    if not rows:
        z = np.zeros_like(grid)
        return grid, z, z
    a = np.vstack(rows)
    return grid, a.mean(axis=0), a.max(axis=0)


def plot_run(result: SimResult, records: list, stem: Path, stage_rows: list[dict[str, Any]],
             title: str = "") -> list[Path]:
    """bench's latency CDFs, plus queue length and KV use over time and the bubble ratio of each
    stage (`stage_rows`: the summary's controller rows). Returns the files written."""
    from conveyor.bench.plots import plot_latency_cdfs

    written = [plot_latency_cdfs(records, stem.with_name(f"{stem.name}-cdf.png"), title)]
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 3, figsize=(15, 3.8))
    grid, mean_w, max_w = _grid_mean(result, 1)
    axes[0].plot(grid, mean_w, label="mean over instances")
    axes[0].plot(grid, max_w, label="max", alpha=0.6)
    axes[0].set(title="Waiting requests", xlabel="simulated time (s)", ylabel="requests")
    inv = [1.0 / i["kv_total_blocks"] if i["kv_total_blocks"] else 0.0
           for i in result.instances]
    grid, mean_kv, max_kv = _grid_mean(result, 3, scale=inv)
    axes[1].plot(grid, 100 * mean_kv, label="mean over instances")
    axes[1].plot(grid, 100 * max_kv, label="max", alpha=0.6)
    axes[1].set(title="KV cache use", xlabel="simulated time (s)", ylabel="% of blocks",
                ylim=(0, 102))
    bubbles = [row for row in stage_bubbles(stage_rows) if row["bubble_ratio"] is not None]
    axes[2].bar([str(row["stage"]) for row in bubbles], [row["bubble_ratio"] for row in bubbles])
    axes[2].set(title="Bubble ratio per stage (all instances)", xlabel="stage",
                ylabel="idle / pending", ylim=(0, 1))
    for ax in axes[:2]:
        ax.legend(fontsize=8)
    for ax in axes:
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path = stem.with_name(f"{stem.name}-pipeline.png")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    written.append(path)
    return written
