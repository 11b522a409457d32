"""Many streams at once through one SDK client, for the tests that disturb a deployment while
requests are in flight (a stage killed, restarted, rejoining)."""

from __future__ import annotations

import threading
import time


def start_streams(client, prompts: list[str], params: dict, wait_s: float
                  ) -> tuple[list[threading.Thread], list]:
    """Streams each prompt with `params` on a thread of its own; returns (threads, results)
    once every stream has its first token (or has ended). results[i] ends as the token ids,
    or the exception the stream ended with (for the caller to assert on)."""
    results: list = [None] * len(prompts)
    started = [threading.Event() for _ in prompts]

    def run(i: int) -> None:
        ids: list[int] = []
        try:
            for delta in client.stream(prompts[i], **params):
                ids += delta.token_ids
                started[i].set()
            results[i] = ids
        except Exception as e:  # asserted by the caller
            results[i] = e
        started[i].set()

    threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for ev in started:
        assert ev.wait(wait_s), "a stream never started"
    return threads, results


def served_within(client, seconds: float, since: float | None = None) -> None:
    """A new request, sent now, completes within `seconds` of `since` (default: now): how a
    test shows a disturbed deployment serves again."""
    t0 = time.monotonic() if since is None else since
    result = client.generate("Say hi.", max_tokens=4, temperature=0, ignore_eos=True,
                             timeout=seconds + 50)
    assert result.completion_tokens == 4
    took = time.monotonic() - t0
    print(f"served_within: {took:.2f}s of {seconds:g}s")  # the margin, in a run's output (-s)
    assert took < seconds, f"served {took:.1f}s after"
