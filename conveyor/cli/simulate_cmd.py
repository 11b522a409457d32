"""`conveyor simulate`: run a workload on a simulated cluster, driving Conveyor's own
scheduling policies with stage times from a cost model (see conveyor/sim), and report the
figures `conveyor bench` reports, by the same definitions. --sweep repeats it over policies and
request rates."""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any, Optional

import typer

from common.placement_config import PlacementConfig, field_help
from conveyor.bench.arrivals import rate_text
from conveyor.cli.params import bad, comma_list, rate_list, rate_option
from conveyor.progress import Progress


def _note(text: str) -> None:
    typer.secho(f"conveyor simulate: {text}", dim=True, err=True)


def _fail(message: str) -> None:
    typer.secho(f"conveyor simulate: error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(1)


class _SimProgress:
    """The simulator's progress callback on the one progress style: finished requests of the
    total, with the simulated time and arrivals beside them."""

    def __init__(self, label: str, enabled: bool):
        self.label, self.enabled = label, enabled
        self.bar: Progress | None = None

    def __call__(self, sim_s: float, arrived: int, finished: int, total: int) -> None:
        if not self.enabled:
            return
        if self.bar is None:
            self.bar = Progress(total, self.label, "req")
        self.bar.advance_to(finished, simulated=f"{sim_s:.2f}s", arrived=arrived)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def simulate(
    config: Path = typer.Option(..., "--config", exists=True, dir_okay=False,
                                help="Cluster file (TOML): model shape, instances, stages, "
                                     "layer split, KV pool, policy and its parameters, links. "
                                     "See deploy/clusters/."),
    profile: Optional[Path] = typer.Option(None, help="Stage-time profile from `conveyor "
                                           "profile` (JSON). Default: the cost section of "
                                           "the cluster file."),
    device: Optional[str] = typer.Option(None, help="Roofline cost model of this device "
                                         "instead of a profile: h100, h100-pcie, h200, a100. "
                                         "Default: the cost section of the cluster file."),
    workload: str = typer.Option("sharegpt", help="sharegpt (bench's ShareGPT lengths), "
                                 "random (bench's --random-* lengths) or trace (--trace FILE)."),
    trace: Optional[Path] = typer.Option(None, help="trace: JSON lines of {arrival_s, "
                                         "prompt_len, output_len}, or a `conveyor bench` "
                                         "result JSON (its per-request records)."),
    num_prompts: int = typer.Option(1000, min=1, help="Requests to simulate (trace: at most "
                                    "this many of the file's)."),
    request_rate: str = typer.Option("inf", help="Requests per second, or inf (all at t=0), "
                                     "as `conveyor bench`; ignored for trace."),
    burstiness: float = typer.Option(1.0, help="Gamma shape of the arrival gaps: 1 is Poisson, "
                                     "<1 burstier, >1 more regular."),
    seed: int = typer.Option(0, help="Seeds the dataset sampling and the arrival times (the "
                             "same seed as bench gives the same requests)."),
    policy: Optional[str] = typer.Option(None, help="Scheduling policy (default: the cluster "
                                         "file's): fcfs, sarathi, throttle, or any registered."),
    placement: Optional[str] = typer.Option(None, help="model.placement: "
                                            + field_help(PlacementConfig, "placement") + "."),
    devices: Optional[str] = typer.Option(None, help="model.devices, comma-separated: "
                                          + field_help(PlacementConfig, "devices") + ". Each "
                                          "stage is then timed by its own device's roofline; "
                                          "cluster.stages follows the placement unless --set "
                                          "gives it."),
    routing: Optional[str] = typer.Option(None, help="cluster.routing: least-loaded, "
                                          "round-robin or length-groups (with --groups)."),
    groups: Optional[str] = typer.Option(None, help="cluster.groups: length groups as "
                                         "LO-HI:INSTANCES ranges (0-512:2,512-:1) or auto (the "
                                         "range DP on the workload)."),
    set_: list[str] = typer.Option([], "--set", help="Override a cluster setting, "
                                   "section.key=value (repeatable), e.g. "
                                   "scheduler.max_num_seqs=64 or cluster.instances=8."),
    slo: Optional[str] = typer.Option(None, help="Goodput SLO in seconds, e.g. "
                                      "ttft=0.5,tpot=0.1 (metrics: ttft, tpot, e2e); every "
                                      "request carries its ttft and tpot, as bench sends them."),
    max_tokens: Optional[int] = typer.Option(None, min=1, help="Cap every request at this "
                                             "many tokens and stop it at its EOS (its "
                                             "dataset length); default: bench's, the dataset "
                                             "length with EOS ignored."),
    sharegpt_max_len: int = typer.Option(2048, min=8, help="sharegpt: skip conversations "
                                         "whose prompt plus reply exceed this many tokens."),
    tokenizer: str = typer.Option("smollm2", help="sharegpt: tokenizer that counts the "
                                  "lengths (as bench), or none for bench's 4-characters-a-token "
                                  "estimate. Counted once, then cached."),
    random_input_len: int = typer.Option(1024, min=1, help="random: mean prompt tokens."),
    random_output_len: int = typer.Option(128, min=1, help="random: mean output tokens."),
    random_range_ratio: float = typer.Option(0.0, help="random: lengths uniform between "
                                             "len*(1-r) and len*(1+r); 0 <= r < 1."),
    workers: int = typer.Option(1, min=0, help="Processes sharing the instances (0: one per "
                                "core). Results are identical for any count; more helps big "
                                "clusters on an otherwise idle machine."),
    result_dir: Path = typer.Option(Path("sim-results"), help="Where result JSON and charts "
                                    "go."),
    result_file: Optional[Path] = typer.Option(None, help="Result JSON path (default: RESULT_DIR"
                                               "/sim-POLICY-IxS-rateRATE-TIME.json)."),
    records: str = typer.Option("auto", help="Per-request records in the JSON: full (with "
                                "every inter-token gap), lite (without), none, or auto (full "
                                "up to 1M generated tokens)."),
    save_trace: Optional[Path] = typer.Option(None, help="Also write the workload as a trace "
                                              "(JSON lines) to replay here or elsewhere."),
    plots: bool = typer.Option(True, "--plots/--no-plots", help="Write PNG charts."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Progress on stderr."),
    sweep: bool = typer.Option(False, "--sweep", help="Run every --policies x --rates "
                               "combination on the same requests."),
    policies: str = typer.Option("fcfs,sarathi,throttle", help="--sweep: policies."),
    rates: str = typer.Option("1,2,4,inf", help="--sweep: request rates."),
) -> None:
    """Simulate a cluster serving a workload with Conveyor's own scheduling policies and a cost
    model of the stages: TTFT, TPOT, ITL, E2E, throughput, goodput, bubble ratio, queues and KV
    use, as `conveyor bench` reports them."""
    from common.config import ConfigError, parse_override
    from conveyor.bench.report import parse_slo, request_slo
    from conveyor.sim.cluster import ClusterError, build_cost_model, load_cluster
    from conveyor.sim.workload import WORKLOADS, WorkloadError, make_workload, save_trace as save

    if workload not in WORKLOADS:
        raise bad("--workload", f"unknown workload {workload!r} ({', '.join(WORKLOADS)})")
    if workload == "trace" and trace is None:
        raise bad("--trace", "--workload trace needs --trace FILE")
    if records not in ("auto", "full", "lite", "none"):
        raise bad("--records", f"{records!r} is not auto, full, lite or none")
    if not (burstiness > 0 and math.isfinite(burstiness)):
        raise bad("--burstiness", f"must be > 0, got {burstiness}")
    if not 0.0 <= random_range_ratio < 1.0:
        raise bad("--random-range-ratio", f"must be in [0, 1), got {random_range_ratio}")
    if profile is not None and device is not None:
        raise bad("--profile/--device", "give one cost model, not both")
    rate = rate_option(request_rate, "--request-rate")
    try:
        slo_s = parse_slo(slo)
    except ValueError as e:
        raise bad("--slo", str(e)) from None
    try:
        overrides = dict(parse_override(s) for s in set_)
    except ConfigError as e:
        raise bad("--set", str(e)) from None
    if policy:
        overrides["scheduler.policy"] = policy
    if placement:
        overrides["model.placement"] = placement
    if devices:
        overrides["model.devices"] = comma_list(devices, "--devices")
        overrides.setdefault("cluster.stages", 0)  # as many as the placement uses
    if routing:
        overrides["cluster.routing"] = routing
    if groups:
        overrides["cluster.groups"] = groups
    sweep_rates = rate_list(rates) if sweep else [rate]
    sweep_policies = comma_list(policies, "--policies") if sweep else []
    try:
        cfg = load_cluster(config, overrides)
        for name in sweep_policies:
            cfg.with_policy(name)
        cost = build_cost_model(cfg, profile, device)
    except ClusterError as e:
        _fail(str(e))
    tok = None if tokenizer.lower() in ("none", "") else tokenizer
    try:
        rates = sweep_rates if workload != "trace" else [rate]
        first = make_workload(workload, num_prompts, rates[0], burstiness, seed, trace,
                              sharegpt_max_len, tok, random_input_len, random_output_len,
                              random_range_ratio, say=_note)
        if max_tokens is not None:
            first = first.with_max_tokens(max_tokens)
        first = first.with_slo(request_slo(slo_s))
        reqs = [first] + [first.at_rate(r, burstiness, seed) for r in rates[1:]]
    except WorkloadError as e:
        _fail(str(e))
    if workload != "trace" and len(reqs[0]) < num_prompts:
        _note(f"only {len(reqs[0])} requests in the workload (asked for {num_prompts})")
    if save_trace is not None:
        _note(f"workload trace: {save(reqs[0], save_trace)}")
    cost_name = f"profile {profile}" if profile else (f"roofline {device}" if device else
                                                      f"cluster file cost section {cfg.cost}")
    config_doc = {"cluster_file": str(config), "overrides": overrides, "cost_model": cost_name,
                  "workload": workload, "num_prompts": num_prompts, "burstiness": burstiness,
                  "seed": seed, "ignore_eos": max_tokens is None, "max_tokens": max_tokens,
                  "slo_s": slo_s, "workers": workers}
    if sweep:
        _run_sweep(cfg, cost, reqs, sweep_rates, sweep_policies, config_doc, slo_s, workers,
                   result_dir, plots, progress)
        return
    wl = reqs[0]
    _run_once(cfg, cost, wl, {**config_doc, "request_rate": rate}, slo_s, workers, result_dir,
              result_file, records, plots, progress, rate)


def _result_name(policy: str, rate: float, cfg: Any) -> str:
    from conveyor.bench.report import result_filename

    return result_filename(policy, rate, kind="sim", shape=f"{cfg.instances}x{cfg.num_stages}")


def _simulate(cfg: Any, cost: Any, wl: Any, workers: int, progress: bool, label: str) -> Any:
    from conveyor.sim.engine import simulate as run
    from conveyor.sim.requests import SimulationError

    bar = _SimProgress(label, progress)
    try:
        return run(cfg, cost, wl, workers=workers, progress=bar)
    except SimulationError as e:
        _fail(f"the simulation stopped: {e}")
    finally:
        bar.close()


def _run_once(cfg: Any, cost: Any, wl: Any, config_doc: dict[str, Any], slo_s: dict,
              workers: int, result_dir: Path, result_file: Optional[Path], records: str,
              plots: bool, progress: bool, rate: float) -> None:
    from conveyor.bench.report import save_result
    from conveyor.sim.report import build_result, format_summary, plot_run

    _note(f"{len(wl)} requests on {cfg.instances} x {cfg.num_stages}-stage {cfg.shape_name} "
          f"({cfg.policy}), rate {rate:g}/s")
    result = _simulate(cfg, cost, wl, workers, progress, "simulating")
    doc, recs = build_result(result, config_doc, wl.summary(), slo_s, records)
    typer.echo(format_summary(doc["summary"]))
    path = result_file or result_dir / _result_name(cfg.policy, rate, cfg)
    save_result(doc, path)
    _note(f"results: {path}")
    if plots:
        title = (f"{cfg.policy}, {cfg.instances}x{cfg.num_stages} {cfg.shape_name}, "
                 f"rate {rate:g}/s, {len(wl)} requests (simulated)")
        stage_rows = doc["summary"]["controller"].get("stages") or []
        for chart in plot_run(result, recs, path.with_suffix(""), stage_rows, title):
            _note(f"chart: {chart}")
    failed = [r.error for r in result.requests if r.error]
    if failed:
        _note(f"{len(failed)} request(s) failed; the first: {failed[0]}")


def _run_sweep(cfg: Any, cost: Any, workloads: list, rates: list[float], policies: list[str],
               config_doc: dict[str, Any], slo_s: dict, workers: int, result_dir: Path,
               plots: bool, progress: bool) -> None:
    from conveyor.bench.sweep import markdown_table
    from conveyor.bench.sweep import one_line
    from conveyor.bench.report import save_result
    from conveyor.sim.report import build_result

    folder = result_dir / f"sim-sweep-{time.strftime('%Y%m%d-%H%M%S')}"
    folder.mkdir(parents=True, exist_ok=True)
    runs = []
    total = len(policies) * len(rates)
    step = 0
    for name in policies:
        pcfg = cfg.with_policy(name)
        for rate, wl in zip(rates, workloads if len(workloads) == len(rates)
                            else workloads * len(rates)):
            step += 1
            label = f"[{step}/{total}] {name} rate={rate_text(rate)}"
            result = _simulate(pcfg, cost, wl, workers, progress, label)
            doc, _ = build_result(result, {**config_doc, "policy": name, "request_rate": rate},
                                  wl.summary(), slo_s, "lite")
            path = save_result(doc, folder / _result_name(name, rate, cfg))
            typer.echo(f"{label}: {one_line(doc['summary'])}", err=True)
            runs.append({"stages": cfg.num_stages, "policy": name, "rate": rate,
                         "summary": doc["summary"], "error": None, "file": str(path)})
    save_result({"config": config_doc, "cluster": cfg.describe(), "runs": runs},
              folder / "sweep.json")
    table = markdown_table(runs).replace("# Conveyor benchmark sweep",
                                         "# Conveyor simulation sweep", 1)
    (folder / "sweep.md").write_text(table)
    if plots:
        from conveyor.bench.plots import plot_sweep

        for chart in plot_sweep(runs, folder):
            _note(f"chart: {chart}")
    typer.echo(table)
    _note(f"sweep results: {folder}")


def register(app: typer.Typer) -> None:
    app.command()(simulate)
