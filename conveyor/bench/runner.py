"""Sends a dataset through the SDK on an arrival schedule and times every streamed token.

Timing convention: the clock is `time.perf_counter` on this side of the wire, so the figures
include the network and the ingress, as a user sees them. TTFT runs from sending a request to
the first delta that carries tokens. A delta carrying k tokens counts as one inter-token gap
(since the previous delta) followed by k-1 gaps of zero: the tokens did arrive together, and
this keeps exactly one ITL sample per token after the first, so the mean ITL times the gap
count adds up to the decode time.
"""

from __future__ import annotations

import asyncio
import math
import random
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from conveyor.bench.arrivals import arrival_times
from conveyor.bench.datasets import Sample
from common.stats import ControllerStats
from conveyor.client import DEFAULT_ADDRESS, AsyncClient, ConveyorError
from conveyor.progress import Progress

WARMUP_MAX_TOKENS = 16
"""Warm-up requests only need to touch every code path once; long ones would just cost time."""

SNAPSHOT_ATTEMPTS = 4


@dataclass
class RunConfig:
    address: str = DEFAULT_ADDRESS
    request_rate: float = math.inf
    burstiness: float = 1.0
    max_concurrency: int | None = None
    num_warmups: int = 1
    seed: int = 0
    ignore_eos: bool = True
    temperature: float | None = 0.0
    """0 is greedy: cheaper than sampling and the same work for the pipeline."""
    request_timeout_s: float | None = 600.0
    ready_timeout_s: float = 60.0
    stats_interval_s: float = 1.0
    """How often the controller's gauges (queues, KV use) are sampled during the run; 0: never."""
    progress: bool = True
    slo_s: dict[str, float] = field(default_factory=dict)
    """The goodput SLO (ttft, tpot, e2e); its ttft and tpot travel with every request, so
    schedulers that plan by SLO see them and `conveyor stats` counts their attainment."""
    slo_classes: list[str] = field(default_factory=list)
    """Each request is given one of these classes (the deployment's [slo.classes]) at
    random, seeded by `seed`."""
    backend: str = "conveyor"
    """conveyor (the SDK over ZeroMQ at `address`), or openai / openai-chat (any
    OpenAI-compatible server at `base_url`, see openai_backend.py)."""
    base_url: str = "http://127.0.0.1:8000"
    model: str | None = None
    """The model the openai backends ask for (default: the server's first)."""


@dataclass
class RequestRecord:
    index: int
    prompt_len: int
    """The dataset's count of prompt tokens."""
    expected_output_len: int
    start_s: float = 0.0
    """When the request was sent, in seconds from the start of the measured window."""
    ttft_s: float | None = None
    e2e_s: float | None = None
    itl_s: list[float] = field(default_factory=list)
    prompt_tokens: int = 0
    """The server's count of prompt tokens."""
    output_tokens: int = 0
    finish_reason: str | None = None
    error: str | None = None
    slo_class: str = ""
    """The SLO class it was sent with (RunConfig.slo_classes), if any."""

    @property
    def ok(self) -> bool:
        return self.error is None


@dataclass
class RunResult:
    records: list[RequestRecord]
    duration_s: float
    """From the first request sent to the last one finished."""
    health: dict[str, Any]
    stats_before: ControllerStats | None
    stats_after: ControllerStats | None
    gauge_samples: list[dict[str, Any]]
    """{"t": seconds into the window, "instances": the controller's InstanceStats}."""
    warmup_failures: int = 0

    def records_json(self) -> list[dict[str, Any]]:
        return [asdict(r) for r in self.records]


async def _send(client: AsyncClient, sample: Sample, cfg: RunConfig, rec: RequestRecord,
                t0: float, max_tokens: int | None = None) -> None:
    """One streamed request, its timings written into `rec`; failures are recorded, not
    raised, so one bad request does not end the run."""
    from conveyor.bench.report import request_slo  # report imports this module

    slo = request_slo(cfg.slo_s)
    kwargs: dict[str, Any] = {"max_tokens": max_tokens or sample.output_len,
                              "ignore_eos": cfg.ignore_eos, "temperature": cfg.temperature,
                              "ttft_slo_s": slo.ttft_s if slo else None,
                              "tpot_slo_s": slo.tpot_s if slo else None,
                              **({"slo_class": rec.slo_class} if rec.slo_class else {})}
    if sample.prompt_token_ids is not None:
        prompt, kwargs["prompt_token_ids"] = None, sample.prompt_token_ids
    else:
        prompt, kwargs["raw"] = sample.prompt, True  # the dataset's text, no chat template
    sent = time.perf_counter()
    rec.start_s = sent - t0
    last: float | None = None
    if cfg.backend != "conveyor":
        try:
            await client.send(prompt, kwargs.get("prompt_token_ids"), kwargs["max_tokens"],
                              cfg, rec)
        except Exception as e:  # the server's refusal or a broken stream: this request's
            rec.error = f"{type(e).__name__}: {e}"
        return
    try:
        async with client.stream(prompt, timeout=cfg.request_timeout_s, **kwargs) as stream:
            async for delta in stream:
                now = time.perf_counter()
                k = len(delta.token_ids)
                if k == 0:  # text held back by the detokenizer, flushed without new tokens
                    continue
                if last is None:
                    rec.ttft_s = now - sent
                else:
                    rec.itl_s.append(now - last)
                rec.itl_s.extend([0.0] * (k - 1))
                last = now
        result = stream.result
        rec.e2e_s = time.perf_counter() - sent
        rec.prompt_tokens, rec.output_tokens = result.prompt_tokens, result.completion_tokens
        rec.finish_reason = result.finish_reason
        if rec.ttft_s is None:  # nothing streamed (no tokens generated): first == last
            rec.ttft_s = rec.e2e_s
    except ConveyorError as e:
        rec.error = f"{type(e).__name__}: {e}"
    except Exception as e:  # a broken socket or a bug of ours: still only this request
        rec.error = f"{type(e).__name__}: {e}"


async def _safe_stats(client: AsyncClient, attempts: int = 1, timeout_s: float = 10.0
                      ) -> ControllerStats | None:
    """The controller's stats, or None. A busy controller can miss the ingress's deadline for
    a status query (NotReadyError) or a reply can be late (ConnectionFailed); the window's
    snapshots are worth a few tries, a gauge sample is not."""
    for attempt in range(attempts):
        try:
            return ControllerStats.from_builtins(await client.stats(timeout=timeout_s))
        except ConveyorError:
            if attempt + 1 < attempts:
                await asyncio.sleep(0.5)
    return None


async def _sample_gauges(client: AsyncClient, interval_s: float, t0: float,
                         out: list[dict[str, Any]]) -> None:
    """Polls the controller's gauges: the before/after snapshots are taken when the pipeline is
    idle, so the peaks of queues and KV use are only seen while the load is on."""
    while True:
        stats = await _safe_stats(client, timeout_s=max(2.0, 4 * interval_s))
        if stats is not None:
            out.append({"t": round(time.perf_counter() - t0, 3), "instances": stats.instances})
        await asyncio.sleep(interval_s)


async def _warm_up(client: AsyncClient, samples: list[Sample], cfg: RunConfig) -> int:
    """Sends `num_warmups` short requests (outside the measured window); returns failures."""
    if cfg.num_warmups <= 0 or not samples:
        return 0
    recs = [RequestRecord(-1, 0, 0) for _ in range(cfg.num_warmups)]
    t0 = time.perf_counter()
    await asyncio.gather(*(
        _send(client, samples[i % len(samples)], cfg, rec, t0,
              max_tokens=min(samples[i % len(samples)].output_len, WARMUP_MAX_TOKENS))
        for i, rec in enumerate(recs)))
    return sum(not r.ok for r in recs)


async def run_benchmark(samples: list[Sample], cfg: RunConfig) -> RunResult:
    """Runs the whole benchmark against `cfg.address`: waits for the deployment, warms it up,
    snapshots the controller's counters, sends every sample on schedule, snapshots again.
    Raises ConveyorError (ConnectionFailed) only when the deployment cannot be reached."""
    offsets = arrival_times(len(samples), cfg.request_rate, cfg.burstiness, cfg.seed)
    records = [RequestRecord(i, s.prompt_len, s.output_len) for i, s in enumerate(samples)]
    if cfg.slo_classes:  # its own generator: the arrival times stay what they were
        rng = random.Random(cfg.seed)
        for rec in records:
            rec.slo_class = rng.choice(cfg.slo_classes)
    sem = asyncio.Semaphore(cfg.max_concurrency) if cfg.max_concurrency else None
    async with _client(cfg) as client:
        health = await client.wait_ready(timeout=cfg.ready_timeout_s)
        warmup_failures = await _warm_up(client, samples, cfg)
        stats_before = await _safe_stats(client, attempts=SNAPSHOT_ATTEMPTS)
        gauges: list[dict[str, Any]] = []
        bar = Progress(len(samples), "requests", "req", cfg.progress)

        async def one(sample: Sample, rec: RequestRecord) -> None:
            if sem is None:
                await _send(client, sample, cfg, rec, t0)
            else:
                async with sem:  # queued here, not at the server: timed from the real send
                    await _send(client, sample, cfg, rec, t0)
            bar.update(1)

        t0 = time.perf_counter()
        poller = (asyncio.create_task(_sample_gauges(client, cfg.stats_interval_s, t0, gauges))
                  if cfg.stats_interval_s > 0 and cfg.backend == "conveyor" else None)
        tasks = []
        try:
            for sample, rec, offset in zip(samples, records, offsets):
                delay = t0 + offset - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                tasks.append(asyncio.create_task(one(sample, rec)))
            await asyncio.gather(*tasks)
            duration = time.perf_counter() - t0
        finally:
            bar.close()
            if poller is not None:
                poller.cancel()
            for task in tasks:
                task.cancel()
        stats_after = await _safe_stats(client, attempts=SNAPSHOT_ATTEMPTS)
    return RunResult(records, duration, asdict(health), stats_before, stats_after, gauges,
                     warmup_failures)


def _client(cfg: RunConfig):
    """The SDK's client, or for the openai backends their client (the same methods)."""
    if cfg.backend == "conveyor":
        return AsyncClient(cfg.address, timeout=cfg.request_timeout_s)
    from conveyor.bench.openai_backend import OpenAIBackend

    return OpenAIBackend(cfg.base_url, cfg.backend == "openai-chat", cfg.model,
                         cfg.request_timeout_s)
