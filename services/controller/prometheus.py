"""The controller's metrics in Prometheus text format (version 0.0.4), served over plain HTTP.

The page is rendered from the same stats dict the control plane's StatusQuery returns, so the
two can never disagree. The HTTP side is deliberately tiny (GET /metrics, anything else 404):
a scraper is the only client, and pulling in a web framework for one page is not worth it.
"""

from __future__ import annotations

import asyncio
from typing import Callable

from common.log import get_logger

log = get_logger()


def _line(name: str, value: float, labels: dict[str, object] | None = None) -> str:
    if labels:
        inner = ",".join(f'{k}="{v}"' for k, v in labels.items())
        return f"{name}{{{inner}}} {value}"
    return f"{name} {value}"


def render(stats: dict) -> str:
    out: list[str] = []

    def metric(name: str, kind: str, help_text: str, samples: list[str]) -> None:
        out.extend([f"# HELP {name} {help_text}", f"# TYPE {name} {kind}", *samples])

    metric("conveyor_uptime_seconds", "gauge", "Seconds since the controller started.",
           [_line("conveyor_uptime_seconds", stats["uptime_s"])])
    metric("conveyor_requests_finished_total", "counter", "Requests finished, by reason.",
           [_line("conveyor_requests_finished_total", n, {"reason": r})
            for r, n in sorted(stats["finished"].items())])
    for key, help_text in (("prompt_tokens", "Prompt tokens received."),
                           ("generated_tokens", "Tokens generated."),
                           ("micro_batches", "Micro-batches completed."),
                           ("preemptions", "Requests preempted (KV dropped, recomputed).")):
        name = f"conveyor_{key}_total"
        metric(name, "counter", help_text, [_line(name, stats[key])])

    stage_series = {
        "busy": ("conveyor_stage_busy_seconds_total", "Seconds a stage spent computing."),
        "idle": ("conveyor_stage_idle_seconds_total",
                 "Seconds a stage sat idle while its instance had unfinished requests."),
        "pending": ("conveyor_stage_pending_seconds_total",
                    "Wall seconds its instance had unfinished requests."),
    }
    for key, (name, help_text) in stage_series.items():
        metric(name, "counter", help_text,
               [_line(name, s[f"{key}_s"], {"instance": s["instance"], "stage": s["stage"]})
                for s in stats["stages"]])

    for kind in ("prefill", "decode"):
        m = stats["batch_tokens"][kind]
        name = f"conveyor_batch_{kind}_tokens"
        metric(name, "summary", f"{kind.capitalize()} tokens per micro-batch.",
               [_line(f"{name}_sum", m["sum"]), _line(f"{name}_count", m["count"])])

    gauges = {"waiting": "Requests waiting for KV (queue length).",
              "running": "Requests holding KV.",
              "inflight": "Micro-batches in the pipeline.",
              "kv_utilization": "Fraction of KV blocks in use."}
    for key, help_text in gauges.items():
        name = f"conveyor_{key}"
        metric(name, "gauge", help_text,
               [_line(name, inst[key], {"instance": inst["instance"]})
                for inst in stats["instances"]])

    for key, h in stats["latency"].items():
        name = f"conveyor_request_{key.removesuffix('_s')}_seconds"
        samples, cumulative = [], 0
        for bound, count in zip([*h["buckets"], "+Inf"], h["counts"]):
            cumulative += count
            samples.append(_line(f"{name}_bucket", cumulative, {"le": bound}))
        samples += [_line(f"{name}_sum", h["sum"]), _line(f"{name}_count", h["count"])]
        metric(name, "histogram", f"Per-request {key.removesuffix('_s').upper()} in seconds.",
               samples)
    return "\n".join(out) + "\n"


async def serve_metrics(host: str, port: int, stats: Callable[[], dict]) -> asyncio.Server:
    """Starts the HTTP endpoint; returns the server (its socket says the bound port)."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request_line = await asyncio.wait_for(reader.readline(), 5.0)
            while (await asyncio.wait_for(reader.readline(), 5.0)).strip():
                pass  # headers: nothing in them matters here
            parts = request_line.decode("latin-1").split()
            if len(parts) >= 2 and parts[0] == "GET" and parts[1].split("?")[0] == "/metrics":
                body, status = render(stats()).encode(), "200 OK"
                ctype = "text/plain; version=0.0.4; charset=utf-8"
            else:
                body, status, ctype = b"not found: try /metrics\n", "404 Not Found", "text/plain"
            writer.write(f"HTTP/1.0 {status}\r\nContent-Type: {ctype}\r\n"
                         f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
                         + body)
            await writer.drain()
        except (asyncio.TimeoutError, ConnectionError) as e:
            log.debug("metrics client dropped", error=str(e))
        finally:
            writer.close()

    return await asyncio.start_server(handle, host, port)


async def start_metrics_endpoint(address: str, stats: Callable[[], dict]
                                 ) -> asyncio.AbstractServer | None:
    """Serves /metrics on `address` (host:port); None when turned off or it cannot bind,
    which is logged: metrics are not worth refusing to serve requests over."""
    if not address:
        return None
    host, _, port = address.rpartition(":")
    try:
        server = await serve_metrics(host, int(port), stats)
    except (OSError, ValueError) as e:
        log.error("cannot serve Prometheus metrics", address=address, error=str(e))
        return None
    log.info("prometheus metrics", url=f"http://{address}/metrics")
    return server
