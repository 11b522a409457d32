"""Drain: SIGTERM to `conveyor serve` while 8 streaming requests run lets all of them finish,
a request arriving meanwhile is refused with 503, and then every process exits cleanly."""

from __future__ import annotations

import json
import signal
import threading
import time

from conveyor.local_deployment import start_deployment, stop_deployment
from tests.e2e.http_client import open_stream, request, sse_events

STREAMS = 8
MAX_TOKENS = 48


def test_sigterm_drains_streams_and_refuses_newcomers():
    dep = start_deployment(stages=2, sets=("ingress.shutdown_timeout_s=60",))
    try:
        results: list[list[bytes] | None] = [None] * STREAMS
        started = threading.Barrier(STREAMS + 1, timeout=120)

        def stream(i: int) -> None:
            conn, response = open_stream(dep.http_url, "/v1/completions", {
                "prompt": f"Tell a story about the number {i}.", "max_tokens": MAX_TOKENS,
                "ignore_eos": True, "temperature": 0, "stream": True,
                "stream_options": {"include_usage": True}})
            first = response.readline()  # streaming has begun
            started.wait()
            results[i] = [first.strip().removeprefix(b"data: "), *sse_events(response)]
            conn.close()

        threads = [threading.Thread(target=stream, args=(i,)) for i in range(STREAMS)]
        for t in threads:
            t.start()
        started.wait()
        dep.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 30
        while request(dep.http_url, "GET", "/health").status == 200:
            assert time.monotonic() < deadline, "the ingress never started draining"
            time.sleep(0.05)
        late = request(dep.http_url, "POST", "/v1/completions", {"prompt": "x",
                                                                "max_tokens": 1})
        assert late.status == 503 and "retry-after" in late.headers
        assert "shutting down" in late.json()["error"]["message"]
        for t in threads:
            t.join(timeout=120)
        for events in results:
            assert events is not None and events[-1] == b"[DONE]"
            usage = json.loads(events[-2])["usage"]
            assert usage["completion_tokens"] == MAX_TOKENS
        assert dep.proc.wait(timeout=60) == 0
    finally:
        stop_deployment(dep)
