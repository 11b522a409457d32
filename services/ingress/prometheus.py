"""The deployment's metrics as a Prometheus page (GET /metrics on the HTTP port).

A prometheus-client collector over one `ControllerStats` snapshot (the controller's counters
plus the ingress's section): the page and `conveyor stats` are the same figures, so they can
never disagree. Names follow vLLM's after `conveyor_` (`conveyor_num_requests_waiting`,
`conveyor_time_to_first_token_seconds`, ...) so its dashboards can be reused; every series
carries a `model_name` label. The per-stage busy, idle and pending series are Conveyor's own.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (CounterMetricFamily, GaugeMetricFamily,
                                    HistogramMetricFamily, Metric, SummaryMetricFamily)
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4

from common.scheduling.length_groups import UNBOUNDED, LengthGroups
from common.stats import ControllerStats, HistogramStats, MomentsStats

CONTENT_TYPE = CONTENT_TYPE_PLAIN_0_0_4

LATENCY_SERIES = {
    "queue_s": ("conveyor_request_queue_time_seconds", "Seconds a request waited before its "
                "first scheduling."),
    "prefill_s": ("conveyor_request_prefill_time_seconds", "Seconds from a request's first "
                  "scheduling to its first token."),
    "decode_s": ("conveyor_request_decode_time_seconds", "Seconds from a request's first "
                 "token to its last."),
    "ttft_s": ("conveyor_time_to_first_token_seconds", "Time to first token, seconds."),
    "tpot_s": ("conveyor_time_per_output_token_seconds", "Mean seconds per output token after "
               "the first, per request."),
    "e2e_s": ("conveyor_e2e_request_latency_seconds", "Seconds from arrival to the last "
              "token."),
}
LENGTH_SERIES = {
    "prompt": ("conveyor_request_prompt_tokens", "Prompt tokens per finished request."),
    "generation": ("conveyor_request_generation_tokens", "Generated tokens per finished "
                   "request."),
}


def render(stats: ControllerStats, model_name: str) -> bytes:
    """The Prometheus text page (format 0.0.4) of one snapshot."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_StatsCollector(stats, model_name))
    return generate_latest(registry)


class _StatsCollector:
    def __init__(self, stats: ControllerStats, model_name: str):
        self.stats, self.model = stats, model_name

    def collect(self) -> Iterator[Metric]:
        s, m = self.stats, self.model
        yield _gauge("conveyor_uptime_seconds", "Seconds since the controller started.",
                     s.uptime_s, m)
        yield _counter_by("conveyor_request_success", "Requests finished, by reason.",
                          "finished_reason", s.finished, m)
        yield _counter_by("conveyor_process_restarts", "Processes the controller saw come "
                          "back as a new process, by role.", "role", s.restarts, m)
        for name, value, help_text in (
                ("conveyor_prompt_tokens", s.prompt_tokens, "Prompt tokens received."),
                ("conveyor_generation_tokens", s.generated_tokens, "Tokens generated."),
                ("conveyor_micro_batches", s.micro_batches, "Micro-batches completed."),
                ("conveyor_num_preemptions", s.preemptions,
                 "Requests preempted (KV dropped, recomputed)."),
                ("conveyor_pipeline_recoveries", s.pipeline_recoveries,
                 "Times an instance's pipeline broke (a stage died) and its requests were "
                 "taken back."),
                ("conveyor_requests_recovered", s.requests_recovered,
                 "Requests re-queued for recompute by pipeline recoveries."),
                ("conveyor_instances_given_up", s.instances_given_up,
                 "Times an instance was given up on (a stage that kept dying)."),
                ("conveyor_stages_silent", s.stages_silent,
                 "Stages treated as dead for answering no micro-batch within "
                 "deployment.dead_after_s."),
                ("conveyor_migrations", s.migrations,
                 "Requests moved to another instance."),
                ("conveyor_migrations_waiting", s.migrations_waiting,
                 "Of the migrations, requests moved while waiting (no KV to move)."),
                ("conveyor_migrations_aborted", s.migrations_aborted,
                 "Migrations whose request ended before its first token at the destination."),
                ("conveyor_migrations_refused", s.migrations_refused,
                 "Moves the controller refused (request in flight, destination not ready or "
                 "short of blocks)."),
                ("conveyor_migration_recomputed_tokens", s.migration_recomputed_tokens,
                 "Tokens re-prefilled at the destinations of migrations."),
                ("conveyor_migration_kv_bytes", s.migration_kv_bytes,
                 "KV bytes received by the destinations of committed live migrations."),
                ("conveyor_kv_lease_waits", s.kv_lease_waits,
                 "Dispatches that waited for the KV lease to be topped up."),
                ("conveyor_length_group_changes", s.length_group_changes,
                 "Times the length groups' boundaries moved.")):
            yield _counter(name, help_text, value, m)
        yield _counter_by("conveyor_migrations_by_reason", "Migrations by the planner's "
                          "reason.", "reason", s.migration_reasons, m)
        yield from self._length_groups()
        yield from self._instances()
        yield from self._stages()
        for phase in ("prefill", "decode"):
            yield _summary(f"conveyor_batch_{phase}_tokens",
                           f"{phase.capitalize()} tokens per micro-batch.",
                           getattr(s.batch_tokens, phase), m)
        yield _summary("conveyor_migration_pause_seconds", "A running request's stop at the "
                       "source to its first token at the destination.", s.migration_pause_s, m)
        yield _summary("conveyor_migration_copy_seconds", "A live migration's start to its "
                       "commit (every copy round).", s.migration_copy_s, m)
        for key, (name, help_text) in LATENCY_SERIES.items():
            if key in s.latency:
                yield _histogram(name, help_text, s.latency[key], m)
        for key, (name, help_text) in LENGTH_SERIES.items():
            if key in s.lengths:
                yield _histogram(name, help_text, s.lengths[key], m)
        for attr in ("met", "missed"):
            c = CounterMetricFamily(f"conveyor_slo_{attr}", f"Requests that {attr} their SLO, "
                                    "by class.", labels=["model_name", "slo_class"])
            for label, a in sorted(s.slo.items()):
                c.add_metric([m, label], getattr(a, attr))
            yield c
        if s.ingress is not None:
            yield from self._ingress()

    def _instances(self) -> Iterator[Metric]:
        series = (("conveyor_num_requests_waiting", "waiting", "Requests waiting for KV."),
                  ("conveyor_num_requests_running", "running", "Requests holding KV."),
                  ("conveyor_num_micro_batches_inflight", "inflight",
                   "Micro-batches in the pipeline."),
                  ("conveyor_kv_cache_usage_ratio", "kv_utilization",
                   "Fraction of KV blocks in use."))
        for name, attr, help_text in series:
            g = GaugeMetricFamily(name, help_text, labels=["model_name", "instance"])
            for inst in self.stats.instances:
                g.add_metric([self.model, str(inst.instance)], getattr(inst, attr))
            yield g
        g = GaugeMetricFamily("conveyor_num_micro_batches_allowed", "Micro-batches the policy "
                              "allows in flight now.", labels=["model_name", "instance"])
        for inst in self.stats.instances:
            g.add_metric([self.model, str(inst.instance)], inst.inflight_allowed)
        yield g
        stage_series = (("conveyor_stage_queue_micro_batches", "queue",
                         "Micro-batches a stage has received and not finished."),
                        ("conveyor_stage_step_seconds", "step_s",
                         "Recent mean compute time of a stage's steps."),
                        ("conveyor_stage_slo_budget_seconds", "budget_s",
                         "A stage's SLO budget for its tightest micro-batch (Planck)."),
                        ("conveyor_stage_target_queue_micro_batches", "target_queue",
                         "The stage controller's target queue (Planck)."))
        for name, attr, help_text in stage_series:
            g = GaugeMetricFamily(name, help_text, labels=["model_name", "instance", "stage"])
            for inst in self.stats.instances:
                for st in inst.stages:
                    value = getattr(st, attr)
                    if value is not None:
                        g.add_metric([self.model, str(inst.instance), str(st.stage)], value)
            yield g

    def _length_groups(self) -> Iterator[Metric]:
        """Each instance's decode length spread, and the length groups now."""
        spread = SummaryMetricFamily("conveyor_decode_length_spread_tokens", "Per micro-batch "
                                     "of two decodes or more: the longest decode context less "
                                     "the mean one.", labels=["model_name", "instance"])
        for i, moments in enumerate(self.stats.length_spread):
            spread.add_metric([self.model, str(i)], moments.count, moments.sum)
        yield spread
        if not self.stats.length_groups:
            return
        groups = LengthGroups.parse(self.stats.length_groups[-1].groups).groups
        for name, help_text, values in (
                ("conveyor_length_group_upper_bound_tokens", "First context length a length "
                 "group no longer serves (its lower bound is the previous group's).",
                 [math.inf if g.hi == UNBOUNDED else g.hi for g in groups]),
                ("conveyor_length_group_instances", "Instances serving a length group.",
                 [len(g.instances) for g in groups])):
            g = GaugeMetricFamily(name, help_text, labels=["model_name", "group"])
            for k, value in enumerate(values):
                g.add_metric([self.model, str(k)], value)
            yield g

    def _stages(self) -> Iterator[Metric]:
        series = (("conveyor_stage_busy_seconds", "busy_s", "Seconds a stage spent computing."),
                  ("conveyor_stage_idle_seconds", "idle_s",
                   "Seconds a stage sat idle while its instance had unfinished requests."),
                  ("conveyor_stage_pending_seconds", "pending_s",
                   "Wall seconds its instance had unfinished requests."))
        for name, attr, help_text in series:
            c = CounterMetricFamily(name, help_text, labels=["model_name", "instance", "stage"])
            for st in self.stats.stages:
                c.add_metric([self.model, str(st.instance), str(st.stage)], getattr(st, attr))
            yield c

    def _ingress(self) -> Iterator[Metric]:
        ing, m = self.stats.ingress, self.model
        yield _gauge("conveyor_num_requests_queued", "Requests received and not yet given "
                     "their first token (bounded by ingress.max_queued_requests).",
                     ing.queued_requests, m)
        yield _gauge("conveyor_num_prompt_tokens_queued", "Prompt tokens of the queued "
                     "requests.", ing.queued_prompt_tokens, m)
        yield _counter_by("conveyor_request_rejected", "Requests refused before they were "
                          "served, by reason.", "reason", ing.rejected, m)
        yield _counter("conveyor_request_disconnected", "Requests aborted because their "
                       "client went away.", ing.disconnects, m)
        yield _gauge("conveyor_draining", "1 while the ingress drains before exiting.",
                     int(ing.draining), m)


def _gauge(name: str, help_text: str, value: float, model: str) -> GaugeMetricFamily:
    g = GaugeMetricFamily(name, help_text, labels=["model_name"])
    g.add_metric([model], value)
    return g


def _counter(name: str, help_text: str, value: float, model: str) -> CounterMetricFamily:
    c = CounterMetricFamily(name, help_text, labels=["model_name"])
    c.add_metric([model], value)
    return c


def _counter_by(name: str, help_text: str, label: str, counts: dict[str, int], model: str
                ) -> CounterMetricFamily:
    """One series per key of `counts`, labelled `label`."""
    c = CounterMetricFamily(name, help_text, labels=["model_name", label])
    for key, n in sorted(counts.items()):
        c.add_metric([model, key], n)
    return c


def _summary(name: str, help_text: str, moments: MomentsStats, model: str
             ) -> SummaryMetricFamily:
    summary = SummaryMetricFamily(name, help_text, labels=["model_name"])
    summary.add_metric([model], moments.count, moments.sum)
    return summary


def _histogram(name: str, help_text: str, h: HistogramStats, model: str
               ) -> HistogramMetricFamily:
    buckets, cumulative = [], 0
    for bound, count in zip([*map(_bound_text, h.buckets), "+Inf"], h.counts):
        cumulative += count
        buckets.append((bound, cumulative))
    hist = HistogramMetricFamily(name, help_text, labels=["model_name"])
    hist.add_metric([model], buckets, h.sum)
    return hist


def _bound_text(bound: float) -> str:
    return repr(float(bound))
