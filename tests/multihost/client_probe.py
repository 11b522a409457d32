"""The SDK client of a multi-host test, run on the client host (its own network namespace):

    python -m tests.multihost.client_probe ADDRESS wait-ready SECONDS
    python -m tests.multihost.client_probe ADDRESS generate REQUESTS.json [TIMEOUT_S]

`wait-ready` prints {"ready", "detail", "waited_s"} once the deployment is ready (or the time
is up); `generate` sends every request of the file (a list of `generate` keyword arguments)
at once and prints {"results": [...], "wall_s"}, each result the request's token ids, finish
reason and e2e time, or its error (type and message) when it failed.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time

from conveyor.client import AsyncClient, ConnectionFailed, ConveyorError


async def wait_ready(address: str, timeout_s: float) -> dict:
    t0 = time.monotonic()
    detail = "the ingress did not answer"
    async with AsyncClient(address, connect_timeout=2.0) as client:
        while time.monotonic() - t0 < timeout_s:
            try:
                health = await client.health(timeout=2.0)
                if health.ready:
                    return {"ready": True, "detail": health.detail,
                            "waited_s": time.monotonic() - t0}
                detail = health.detail
            except (ConnectionFailed, ConveyorError) as e:
                detail = str(e)
            await asyncio.sleep(0.5)
    return {"ready": False, "detail": detail, "waited_s": time.monotonic() - t0}


async def _one(client: AsyncClient, kwargs: dict) -> dict:
    try:
        r = await client.generate(**kwargs)
    except ConveyorError as e:
        return {"error": str(e), "type": type(e).__name__}
    return {"token_ids": r.token_ids, "finish_reason": r.finish_reason,
            "prompt_tokens": r.prompt_tokens, "e2e_s": r.e2e_s}


async def generate(address: str, requests: list[dict], timeout_s: float) -> dict:
    t0 = time.monotonic()
    async with AsyncClient(address, timeout=timeout_s) as client:
        results = await asyncio.gather(*(_one(client, kw) for kw in requests))
    return {"results": results, "wall_s": time.monotonic() - t0}


def main(argv: list[str]) -> None:
    address, command, *rest = argv
    if command == "wait-ready":
        out = asyncio.run(wait_ready(address, float(rest[0])))
    elif command == "generate":
        with open(rest[0]) as f:
            requests = json.load(f)
        out = asyncio.run(generate(address, requests, float(rest[1]) if len(rest) > 1 else 300))
    else:
        raise SystemExit(f"unknown command {command!r}")
    print(json.dumps(out))


if __name__ == "__main__":
    main(sys.argv[1:])
