"""API keys: what a client must present when the deployment has any (`ingress.api_keys`, plus
CONVEYOR_API_KEY, comma-separated). One check for both protocols: HTTP's `Authorization:
Bearer KEY` on /v1/* and the ZeroMQ GenerateRequest's `api_key`."""

from __future__ import annotations

import hmac
import os

ENV_VAR = "CONVEYOR_API_KEY"


class ApiKeys:
    def __init__(self, configured: list[str], env: str | None = None):
        env = os.environ.get(ENV_VAR, "") if env is None else env
        keys = [*configured, *(k.strip() for k in env.split(","))]
        self._keys = [k.encode() for k in dict.fromkeys(keys) if k]

    @property
    def required(self) -> bool:
        return bool(self._keys)

    def check(self, presented: str | None) -> bool:
        """Whether `presented` is one of the keys (always true without keys). Compares with
        every key, in constant time for each, so the answer's timing tells nothing."""
        if not self._keys:
            return True
        given = (presented or "").encode()
        ok = False
        for key in self._keys:
            ok |= hmac.compare_digest(key, given)
        return ok
