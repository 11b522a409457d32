"""Plain HTTP for the e2e tests, with the standard library: bodies sent exactly as given and
streams read line by line (the way `vllm bench serve` reads them), which the openai client
would hide."""

from __future__ import annotations

import http.client
import json
from dataclasses import dataclass
from urllib.parse import urlsplit


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self):
        return json.loads(self.body)


def connect(base_url: str, timeout: float = 120.0) -> http.client.HTTPConnection:
    url = urlsplit(base_url)
    return http.client.HTTPConnection(url.hostname, url.port, timeout=timeout)


def request(base_url: str, method: str, path: str, body: dict | None = None,
            key: str | None = None, timeout: float = 120.0) -> Reply:
    conn = connect(base_url, timeout)
    try:
        conn.request(method, path, None if body is None else json.dumps(body), _headers(key))
        r = conn.getresponse()
        return Reply(r.status, {k.lower(): v for k, v in r.getheaders()}, r.read())
    finally:
        conn.close()


def open_stream(base_url: str, path: str, body: dict, key: str | None = None,
                timeout: float = 120.0) -> tuple[http.client.HTTPConnection,
                                                 http.client.HTTPResponse]:
    conn = connect(base_url, timeout)
    conn.request("POST", path, json.dumps(body), _headers(key))
    return conn, conn.getresponse()


def sse_events(response: http.client.HTTPResponse) -> list[bytes]:
    """The data of every event, as `vllm bench serve` cuts them: line by line, stripped, the
    `data: ` prefix removed (b"[DONE]" included)."""
    events = []
    for line in response:
        line = line.strip()
        if line:
            assert line.startswith(b"data: "), line
            events.append(line.removeprefix(b"data: "))
    return events


def _headers(key: str | None) -> dict[str, str]:
    headers = {"Content-Type": "application/json"}
    if key is not None:
        headers["Authorization"] = f"Bearer {key}"
    return headers
