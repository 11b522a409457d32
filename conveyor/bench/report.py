"""Figures of a run: latency distributions, throughput, goodput under SLOs, and what the
controller's counters say about the pipeline over the measured window.

Times are seconds everywhere in the data (and so in the JSON files); only the printed table
shows milliseconds. Percentiles interpolate linearly between samples (numpy's default), as
vLLM's do.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import msgspec
import numpy as np

from conveyor.bench import groups_report
from conveyor.bench.arrivals import rate_text
from conveyor.bench.runner import RequestRecord, RunResult
from common.scheduling.types import SLO
from common.stats import ControllerStats

SLO_METRICS = ("ttft", "tpot", "e2e")
PERCENTILES = (50, 90, 99)
WIDTH = 50


# ---- per-request metrics --------------------------------------------------------------------

def parse_slo(text: str | None) -> dict[str, float]:
    """`ttft=0.5,tpot=0.1` (seconds; any of ttft, tpot, e2e) as a dict; "" or None: no SLO."""
    slo: dict[str, float] = {}
    for part in (text or "").split(","):
        if not part.strip():
            continue
        name, eq, value = part.partition("=")
        name = name.strip().lower()
        if not eq or name not in SLO_METRICS:
            raise ValueError(f"bad SLO {part.strip()!r}: expected metric=seconds with metric "
                             f"one of {', '.join(SLO_METRICS)}, e.g. ttft=0.5,tpot=0.1")
        try:
            seconds = float(value)
        except ValueError:
            raise ValueError(f"bad SLO {part.strip()!r}: {value.strip()!r} is not a number "
                             f"of seconds") from None
        if not (seconds > 0 and math.isfinite(seconds)):
            raise ValueError(f"bad SLO {part.strip()!r}: the bound must be > 0 seconds")
        if name in slo:
            raise ValueError(f"bad SLO: {name} is given twice")
        slo[name] = seconds
    return slo


def request_slo(slo_s: dict[str, float]) -> SLO | None:
    """The per-request SLO a goodput SLO implies (its ttft and tpot; e2e is bench's own)."""
    if "ttft" not in slo_s and "tpot" not in slo_s:
        return None
    return SLO(slo_s.get("ttft"), slo_s.get("tpot"))


def tpot(rec: RequestRecord) -> float | None:
    """Time per output token after the first; None for requests with a single token."""
    if not rec.ok or rec.output_tokens < 2 or rec.e2e_s is None or rec.ttft_s is None:
        return None
    return (rec.e2e_s - rec.ttft_s) / (rec.output_tokens - 1)


def distribution(values: Sequence[float]) -> dict[str, float] | None:
    """Mean, std, p50, p90 and p99 of `values`; None when there are none."""
    if len(values) == 0:
        return None
    a = np.asarray(values, dtype=float)
    out = {"mean": float(a.mean()), "std": float(a.std())}
    out.update({f"p{p}": float(np.percentile(a, p)) for p in PERCENTILES})
    return out


def meets_slo(rec: RequestRecord, slo: dict[str, float]) -> bool:
    """Whether a completed request is within every given bound. A one-token request has no
    TPOT to violate, so it passes a TPOT bound."""
    if not rec.ok:
        return False
    t = tpot(rec)
    measured = {"ttft": rec.ttft_s, "tpot": 0.0 if t is None else t, "e2e": rec.e2e_s}
    return all(measured[m] is not None and measured[m] <= bound for m, bound in slo.items())


def summarize(records: Sequence[RequestRecord], duration_s: float,
              slo: dict[str, float] | None = None) -> dict[str, Any]:
    ok = [r for r in records if r.ok]
    n_in = sum(r.prompt_tokens for r in ok)
    n_out = sum(r.output_tokens for r in ok)
    per_s = (lambda x: x / duration_s) if duration_s > 0 else (lambda x: 0.0)
    summary: dict[str, Any] = {
        "completed": len(ok), "failed": len(records) - len(ok), "duration_s": duration_s,
        "total_input_tokens": n_in, "total_output_tokens": n_out,
        "request_throughput": per_s(len(ok)), "output_throughput": per_s(n_out),
        "total_token_throughput": per_s(n_in + n_out),
        "ttft": distribution([r.ttft_s for r in ok if r.ttft_s is not None]),
        "tpot": distribution([t for t in map(tpot, ok) if t is not None]),
        "itl": distribution([gap for r in ok for gap in r.itl_s]),
        "e2e": distribution([r.e2e_s for r in ok if r.e2e_s is not None]),
    }
    if slo:
        good = sum(meets_slo(r, slo) for r in records)
        summary["goodput"] = {"slo_s": dict(slo), "requests": good,
                              "request_goodput": per_s(good),
                              "fraction": good / len(records) if records else 0.0}
    classes = sorted({r.slo_class for r in records if r.slo_class})
    if classes:  # latency per SLO class (the controller's window has their attainment)
        summary["by_slo_class"] = {c: _class_latency([r for r in records if r.slo_class == c])
                                   for c in classes}
    return summary


def _class_latency(records: Sequence[RequestRecord]) -> dict[str, Any]:
    ok = [r for r in records if r.ok]
    return {"requests": len(records), "completed": len(ok),
            "ttft": distribution([r.ttft_s for r in ok if r.ttft_s is not None]),
            "tpot": distribution([t for t in map(tpot, ok) if t is not None]),
            "e2e": distribution([r.e2e_s for r in ok if r.e2e_s is not None])}


# ---- controller counters over the window ----------------------------------------------------

def stage_window(window: ControllerStats) -> list[dict[str, Any]]:
    """Per stage over the window (`ControllerStats.since`): steps, busy/pending/idle seconds
    and the bubble ratio, the share of the time a stage had unfinished requests that it
    nevertheless sat idle."""
    return [{"instance": s.instance, "stage": s.stage, "steps": s.steps, "busy_s": s.busy_s,
             "pending_s": s.pending_s, "idle_s": s.idle_s, "bubble_ratio": s.bubble_ratio}
            for s in window.stages]


def batch_tokens_window(window: ControllerStats) -> dict[str, dict[str, Any]]:
    """Micro-batch count and mean/std of tokens per micro-batch, per phase, from the
    window's count, sum and sum of squares (std is the population one)."""
    out = {}
    for phase in ("prefill", "decode"):
        m = getattr(window.batch_tokens, phase)
        mean, std = m.mean_std()
        out[phase] = {"count": m.count, "mean": mean, "std": std}
    return out


def instance_gauges(after: ControllerStats, samples: Iterable[dict[str, Any]]
                    ) -> list[dict[str, Any]]:
    """Per instance: its gauges at the end and their peaks among the samples taken during the
    run (`{"t", "instances": [InstanceStats]}`; KV use as a fraction of the instance's
    blocks)."""
    rows: dict[int, dict[str, Any]] = {}
    for inst in after.instances:
        rows[inst.instance] = {"instance": inst.instance, "waiting": inst.waiting,
                               "running": inst.running, "inflight": inst.inflight,
                               "kv_total_blocks": inst.kv_total_blocks,
                               "kv_free_blocks": inst.kv_free_blocks}
    for sample in samples:
        for inst in sample["instances"]:
            row = rows.setdefault(inst.instance, {"instance": inst.instance})
            for k in ("waiting", "running", "inflight"):
                row[f"peak_{k}"] = max(row.get(f"peak_{k}", 0), getattr(inst, k))
            if inst.kv_total_blocks > 0:
                used = 1 - inst.kv_free_blocks / inst.kv_total_blocks
                row["peak_kv_used"] = max(row.get("peak_kv_used", 0.0), used)
    return list(rows.values())


def controller_window(before: ControllerStats | None, after: ControllerStats | None,
                      samples: Iterable[dict[str, Any]] = ()) -> dict[str, Any]:
    """What the controller saw during the window; without both snapshots only what the last
    one says (or nothing without it)."""
    if after is None:
        return {}
    out: dict[str, Any] = {"policy": after.policy} if after.policy else {}
    window = after.since(before) if before is not None else None
    if window is not None:
        out["counters"] = {k: getattr(window, k) for k in
                           ("prompt_tokens", "generated_tokens", "micro_batches", "preemptions")}
        if window.slo:
            out["slo"] = {label: msgspec.to_builtins(a)
                          for label, a in sorted(window.slo.items())}
        migrations = groups_report.migration_counters(window)
        if migrations:
            out["migrations"] = migrations
        stages = stage_window(window)
        if stages:
            out["stages"] = stages
            ratios = [s["bubble_ratio"] for s in stages if s["bubble_ratio"] is not None]
            out["mean_bubble_ratio"] = sum(ratios) / len(ratios) if ratios else None
        out["batch_tokens"] = batch_tokens_window(window)
    instances = instance_gauges(after, samples)
    spreads = groups_report.length_spreads(window) if window is not None else {}
    for row in instances:
        if row["instance"] in spreads:
            row["length_spread"] = spreads[row["instance"]]
    if instances:
        out["instances"] = instances
    groups = groups_report.groups_section(after, window)
    if groups:
        out["length_groups"] = groups
    return out


# ---- output ---------------------------------------------------------------------------------

VLLM_NAMES = {"ttft": "ttft", "tpot": "tpot", "itl": "itl", "e2e": "e2el"}
VLLM_STATS = {"mean": "mean", "std": "std", "p50": "median", "p90": "p90", "p99": "p99"}


def vllm_keys(summary: dict[str, Any]) -> dict[str, Any]:
    """The summary under the flat names of `vllm bench serve`'s result JSON (mean_ttft_ms,
    p99_tpot_ms, request_throughput, ...), so vLLM's tooling reads a Conveyor result."""
    out = {k: summary[k] for k in ("completed", "total_input_tokens", "total_output_tokens",
                                    "request_throughput", "output_throughput",
                                    "total_token_throughput")}
    out["duration"] = summary["duration_s"]
    if "goodput" in summary:
        out["request_goodput"] = summary["goodput"]["request_goodput"]
    for ours, theirs in VLLM_NAMES.items():
        dist = summary.get(ours) or {}
        for stat, name in VLLM_STATS.items():
            if dist.get(stat) is not None:
                out[f"{name}_{theirs}_ms"] = 1e3 * dist[stat]
    return out


def build_result(run: RunResult, config: dict[str, Any],
                 slo: dict[str, float] | None = None) -> dict[str, Any]:
    summary = summarize(run.records, run.duration_s, slo)
    summary["controller"] = controller_window(run.stats_before, run.stats_after,
                                              run.gauge_samples)
    return {**vllm_keys(summary), "config": config, "health": run.health, "summary": summary,
            "warmup_failures": run.warmup_failures,
            "controller_snapshots": msgspec.to_builtins({"before": run.stats_before,
                                                         "after": run.stats_after}),
            "gauge_samples": msgspec.to_builtins(run.gauge_samples),
            "requests": run.records_json()}


def result_filename(policy: str, rate: float, stages: int | None = None, kind: str = "bench",
                    shape: str = "") -> str:
    """KIND-POLICY-SHAPE-rateRATE-TIME.json; SHAPE defaults to sSTAGES (bench's deployments),
    the simulator passes INSTANCESxSTAGES."""
    shape = shape or (f"s{stages}" if stages else "")
    shape_text = f"-{shape}" if shape else ""
    return f"{kind}-{policy}{shape_text}-rate{rate_text(rate)}-{time.strftime('%Y%m%d-%H%M%S')}.json"


def jsonable(obj: Any) -> Any:
    """`obj` with infinite or NaN floats (an infinite request rate) written as strings, which
    strict JSON readers accept, unlike Python's bare Infinity."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    if isinstance(obj, dict):
        return {k: jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    return obj


def save_result(result: dict[str, Any], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(jsonable(result), indent=1, allow_nan=False, default=str))
    return path


def _line(label: str, value: Any, fmt: str = "") -> str:
    text = "n/a" if value is None else format(value, fmt)
    return f"{label:<40}{text:>{WIDTH - 40}}"


def _rule(title: str, fill: str = "-") -> str:
    return f"{title:{fill}^{WIDTH}}"


def format_table(summary: dict[str, Any], title: str = " Serving Benchmark Result ") -> str:
    """A vLLM-style text summary (milliseconds for latencies)."""
    lines = [_rule(title, "="), _line("Successful requests:", summary["completed"]),
             _line("Failed requests:", summary["failed"]),
             _line("Benchmark duration (s):", summary["duration_s"], ".2f"),
             _line("Total input tokens:", summary["total_input_tokens"]),
             _line("Total generated tokens:", summary["total_output_tokens"]),
             _line("Request throughput (req/s):", summary["request_throughput"], ".2f"),
             _line("Output token throughput (tok/s):", summary["output_throughput"], ".2f"),
             _line("Total token throughput (tok/s):", summary["total_token_throughput"], ".2f")]
    if "goodput" in summary:
        g = summary["goodput"]
        slo = ",".join(f"{k}={v:g}" for k, v in g["slo_s"].items())
        lines += [_line("Goodput SLO (s):", slo),
                  _line("Request goodput (req/s):", g["request_goodput"], ".2f"),
                  _line("Requests within SLO (%):", 100 * g["fraction"], ".1f")]
    for key, name, heading in (("ttft", "TTFT", "Time to First Token"),
                               ("tpot", "TPOT", "Time per Output Token (excl. 1st token)"),
                               ("itl", "ITL", "Inter-token Latency"),
                               ("e2e", "E2E", "End-to-end Latency")):
        lines.append(_rule(heading))
        dist = summary.get(key) or {}
        for stat, label in (("mean", "Mean"), ("std", "Std"), ("p50", "Median"),
                            ("p90", "P90"), ("p99", "P99")):
            value = dist.get(stat)
            lines.append(_line(f"{label} {name} (ms):", None if value is None else 1e3 * value,
                               ".2f"))
    for label, c in (summary.get("by_slo_class") or {}).items():
        lines.append(_rule(f"SLO class {label}"))
        for key, name in (("ttft", "TTFT"), ("e2e", "E2E")):
            p99 = (c.get(key) or {}).get("p99")
            lines.append(_line(f"P99 {name} (ms):", None if p99 is None else 1e3 * p99, ".2f"))
    lines += _controller_lines(summary.get("controller") or {})
    lines.append("=" * WIDTH)
    return "\n".join(lines)


def _controller_lines(ctl: dict[str, Any]) -> list[str]:
    if not ctl:
        return []
    lines = [_rule("Controller")]
    if "policy" in ctl:
        lines.append(_line("Policy:", ctl["policy"]))
    for k, v in (ctl.get("counters") or {}).items():
        lines.append(_line(f"{k.replace('_', ' ').capitalize()}:", v, "g"))
    for s in ctl.get("stages") or []:
        lines.append(_line(f"Bubble ratio, stage {s['instance']}.{s['stage']}:",
                           s["bubble_ratio"], ".3f"))
    if "mean_bubble_ratio" in ctl:
        lines.append(_line("Mean bubble ratio:", ctl["mean_bubble_ratio"], ".3f"))
    for phase, b in (ctl.get("batch_tokens") or {}).items():
        text = "n/a" if b["mean"] is None else f"{b['mean']:.1f} ± {b['std']:.1f}"
        lines.append(_line(f"{phase.capitalize()} tokens/micro-batch:", text))
    for label, a in (ctl.get("slo") or {}).items():
        lines.append(_line(f"SLO attainment, {label} (%):",
                           f"{100 * a['attainment']:.1f} ({a['met']}/{a['met'] + a['missed']})"))
    lines += groups_report.lines(ctl, _line)
    for i in ctl.get("instances") or []:
        if "length_spread" in i:
            lines.append(_line(f"Length spread, instance {i['instance']} (tokens):",
                               i["length_spread"], ".0f"))
        if "peak_kv_used" in i:
            lines.append(_line(f"Peak KV use, instance {i['instance']} (%):",
                               100 * i["peak_kv_used"], ".1f"))
        if "peak_waiting" in i:
            lines.append(_line(f"Peak waiting, instance {i['instance']}:", i["peak_waiting"]))
    return lines
