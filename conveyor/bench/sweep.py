"""`conveyor bench --sweep`: the same prompts over stage counts x policies x request rates.

Each (stages, policy) pair gets a fresh local deployment (so counters, caches and warm-up do
not leak from one policy into the next), which then serves every rate in turn. A deployment
that fails to start, or a run that fails, is reported and recorded, and the sweep goes on with
the next one: a long sweep should not be lost to one bad configuration.
"""

from __future__ import annotations

import asyncio
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from conveyor.bench.arrivals import rate_text
from conveyor.bench.datasets import Sample
from conveyor.bench.report import build_result, result_filename, save_result
from conveyor.bench.runner import RunConfig, run_benchmark


@dataclass
class SweepConfig:
    policies: list[str]
    rates: list[float]
    stages: list[int]
    sets: tuple[str, ...] = ()
    """Extra `section.key=value` settings for every deployment."""
    instances: int = 1
    out_dir: Path = Path("bench-results")
    plots: bool = True
    start_timeout_s: float = 300.0


def short_error(error: str) -> str:
    """One line of a failure: a deployment's log tail ends with the line that says why."""
    lines = [ln.strip() for ln in error.splitlines() if ln.strip()]
    errors = [ln for ln in lines if "error" in ln.lower()]
    return (errors or lines or ["failed"])[-1].replace("|", "/")


def one_line(summary: dict[str, Any]) -> str:
    ttft, tpot = summary.get("ttft") or {}, summary.get("tpot") or {}
    bubble = (summary.get("controller") or {}).get("mean_bubble_ratio")
    parts = [f"{summary['completed']} ok, {summary['failed']} failed",
             f"{summary['request_throughput']:.2f} req/s",
             f"{summary['output_throughput']:.1f} tok/s"]
    if "p99" in ttft:
        parts.append(f"p99 TTFT {1e3 * ttft['p99']:.0f} ms")
    if "p99" in tpot:
        parts.append(f"p99 TPOT {1e3 * tpot['p99']:.0f} ms")
    if bubble is not None:
        parts.append(f"bubble {bubble:.3f}")
    slo = slo_text(summary)
    if slo:
        parts.append(f"SLO attained {slo}")
    return ", ".join(parts)


def slo_text(summary: dict[str, Any]) -> str:
    """The controller's SLO attainment per class over the run, e.g. "batch 100%, interactive
    82%" ("" without SLOs)."""
    slo = (summary.get("controller") or {}).get("slo") or {}
    return ", ".join(f"{label} {100 * a['attainment']:.0f}%" for label, a in slo.items())


def run_sweep(samples: list[Sample], base: RunConfig, sweep: SweepConfig,
              config: dict[str, Any], slo: dict[str, float] | None = None,
              say: Callable[[str], None] = print) -> dict[str, Any]:
    """Runs the sweep and writes sweep.json, sweep.md and the charts into a new folder under
    `sweep.out_dir`; returns the comparison (also what sweep.json holds)."""
    from conveyor.local_deployment import start_deployment, stop_deployment

    folder = sweep.out_dir / f"sweep-{time.strftime('%Y%m%d-%H%M%S')}"
    folder.mkdir(parents=True, exist_ok=True)
    total = len(sweep.stages) * len(sweep.policies) * len(sweep.rates)
    runs: list[dict[str, Any]] = []
    step = 0
    for stages in sweep.stages:
        for policy in sweep.policies:
            entry = {"stages": stages, "policy": policy}
            say(f"starting a deployment: stages={stages} policy={policy}")
            try:
                dep = start_deployment(stages=stages, instances=sweep.instances,
                                       sets=(f"scheduler.policy={policy}", *sweep.sets),
                                       timeout_s=sweep.start_timeout_s)
            except Exception as e:  # a bad policy name, a crash on load: skip its rates
                error = f"deployment did not start: {e}".strip()
                say(f"  deployment did not start: {short_error(error)}")
                for rate in sweep.rates:
                    step += 1
                    say(f"[{step}/{total}] stages={stages} policy={policy} "
                        f"rate={rate_text(rate)} skipped")
                    runs.append({**entry, "rate": rate, "summary": None, "error": error})
                continue
            try:
                for rate in sweep.rates:
                    step += 1
                    say(f"[{step}/{total}] stages={stages} policy={policy} "
                        f"rate={rate_text(rate)} ...")
                    runs.append({**entry, "rate": rate,
                                 **_one_run(samples, replace(base, address=dep.address,
                                                             request_rate=rate),
                                            {**config, **entry, "request_rate": rate}, slo,
                                            folder, say)})
                    if not dep.alive():
                        say(f"  the deployment died:\n{dep.log_tail(20)}")
                        break
            finally:
                stop_deployment(dep)
                # The deployment's log beside its results (with --set logging.level=debug and
                # logging.format=json it is what scripts/step_timeline.py reads).
                shutil.copyfile(dep.log_path, folder / f"serve-{policy}-s{stages}.log")
    comparison = {"config": config, "runs": runs}
    save_result(comparison, folder / "sweep.json")
    (folder / "sweep.md").write_text(markdown_table(runs))
    if sweep.plots:
        from conveyor.bench.plots import plot_sweep

        comparison["plots"] = [str(p) for p in plot_sweep(runs, folder)]
    comparison["folder"] = str(folder)
    return comparison


def _one_run(samples: list[Sample], cfg: RunConfig, config: dict[str, Any],
             slo: dict[str, float] | None, folder: Path, say: Callable[[str], None]
             ) -> dict[str, Any]:
    try:
        run = asyncio.run(run_benchmark(samples, cfg))
    except Exception as e:
        say(f"  failed: {type(e).__name__}: {e}")
        return {"summary": None, "error": f"{type(e).__name__}: {e}"}
    result = build_result(run, {**config, "address": cfg.address}, slo)
    path = save_result(result, folder / result_filename(config["policy"], cfg.request_rate,
                                                        config["stages"]))
    say(f"  {one_line(result['summary'])}")
    return {"summary": result["summary"], "error": None, "file": str(path)}


def _fmt(value: Any, scale: float = 1.0, digits: int = 1) -> str:
    return "n/a" if value is None else f"{scale * value:.{digits}f}"


def markdown_table(runs: list[dict[str, Any]]) -> str:
    """Best throughput per (stages, policy), then every run."""
    best_rows = ["| stages | policy | max out tok/s | at rate | max req/s | p99 TTFT ms "
                 "| p99 TPOT ms | mean bubble ratio |", "|---|---|---|---|---|---|---|---|"]
    groups: dict[tuple[int, str], list[dict[str, Any]]] = {}
    for run in runs:
        groups.setdefault((run["stages"], run["policy"]), []).append(run)
    for (stages, policy), group in groups.items():
        done = [r for r in group if r["summary"]]
        if not done:
            best_rows.append(f"| {stages} | {policy} | failed: "
                             f"{short_error(group[0].get('error') or '')} | | | | | |")
            continue
        best = max(done, key=lambda r: r["summary"]["output_throughput"])
        s = best["summary"]
        bubbles = [r["summary"].get("controller", {}).get("mean_bubble_ratio") for r in done]
        bubbles = [b for b in bubbles if b is not None]
        best_rows.append(
            f"| {stages} | {policy} | {_fmt(s['output_throughput'])} | "
            f"{rate_text(best['rate'])} | "
            f"{_fmt(max(r['summary']['request_throughput'] for r in done), digits=2)} | "
            f"{_fmt((s.get('ttft') or {}).get('p99'), 1e3)} | "
            f"{_fmt((s.get('tpot') or {}).get('p99'), 1e3)} | "
            f"{_fmt(sum(bubbles) / len(bubbles) if bubbles else None, digits=3)} |")
    all_rows = ["| stages | policy | rate | completed | failed | req/s | out tok/s | p99 TTFT ms "
                "| p99 TPOT ms | mean bubble ratio | SLO attained |",
                "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in runs:
        s = r["summary"]
        if not s:
            all_rows.append(f"| {r['stages']} | {r['policy']} | {rate_text(r['rate'])} | "
                            f"failed | | | | | | | |")
            continue
        all_rows.append(
            f"| {r['stages']} | {r['policy']} | {rate_text(r['rate'])} | {s['completed']} | "
            f"{s['failed']} | {_fmt(s['request_throughput'], digits=2)} | "
            f"{_fmt(s['output_throughput'])} | {_fmt((s.get('ttft') or {}).get('p99'), 1e3)} | "
            f"{_fmt((s.get('tpot') or {}).get('p99'), 1e3)} | "
            f"{_fmt((s.get('controller') or {}).get('mean_bubble_ratio'), digits=3)} | "
            f"{slo_text(s)} |")
    return ("# Conveyor benchmark sweep\n\n## Best throughput per configuration\n\n"
            + "\n".join(best_rows) + "\n\n## Every run\n\n" + "\n".join(all_rows) + "\n")
