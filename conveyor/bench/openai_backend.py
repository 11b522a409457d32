"""`conveyor bench --backend openai|openai-chat --base-url URL`: the same harness against any
OpenAI-compatible server (vLLM, SGLang, Conveyor's own HTTP endpoint), through the `openai`
client, sending what `vllm bench serve` sends (streaming, `stream_options.include_usage`,
`ignore_eos`, chat content as a list of text parts) and timing it the way it does: TTFT at
the first chunk with choices, one inter-token gap per later chunk, the completion's token count
from the usage chunk. A server other than Conveyor has no controller, so the result has no
controller section.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Any

from conveyor.client import ConnectionFailed, ConveyorError

BACKENDS = ("conveyor", "openai", "openai-chat")


@dataclass
class ServerInfo:
    """What the runner records as the run's `health` (Conveyor's own has more)."""

    model: str
    backend: str
    base_url: str
    ready: bool = True
    policy: str | None = None
    stages: int | None = None
    max_model_len: int | None = None


class OpenAIBackend:
    """Duck-types the parts of AsyncClient the runner uses (wait_ready, stats, close) and
    sends one timed request (`send`)."""

    def __init__(self, base_url: str, chat: bool, model: str | None, timeout: float | None):
        try:
            import openai
        except ImportError:
            raise ConnectionFailed("--backend openai needs the openai package "
                                   "(pip install conveyor-serve[bench])") from None
        self.base_url = base_url.rstrip("/")
        api_base = self.base_url if self.base_url.endswith("/v1") else self.base_url + "/v1"
        key = os.environ.get("OPENAI_API_KEY") or \
            os.environ.get("CONVEYOR_API_KEY", "").split(",")[0] or "none"
        self.api = openai.AsyncOpenAI(base_url=api_base, api_key=key, max_retries=0,
                                      timeout=timeout)
        self.chat, self.model = chat, model
        self._errors = openai.OpenAIError

    async def __aenter__(self) -> OpenAIBackend:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self.api.close()

    async def wait_ready(self, timeout: float = 60.0) -> ServerInfo:
        """The served model (the first of /v1/models unless --model names one)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                models = (await self.api.models.list()).data
                break
            except self._errors as e:
                if time.monotonic() > deadline:
                    raise ConnectionFailed(f"no OpenAI-compatible server answered at "
                                           f"{self.base_url}: {e}") from None
                await _sleep(0.5)
        if self.model is None:
            if not models:
                raise ConnectionFailed(f"{self.base_url} serves no model")
            self.model = models[0].id
        info = next((m for m in models if m.id == self.model), None)
        max_len = getattr(info, "max_model_len", None) if info is not None else None
        return ServerInfo(self.model, "openai-chat" if self.chat else "openai", self.base_url,
                          max_model_len=max_len)

    async def stats(self, timeout: float = 10.0) -> dict[str, Any]:
        raise ConveyorError("an OpenAI-compatible server reports no controller statistics")

    async def send(self, prompt: str | None, token_ids: list[int] | None, max_tokens: int,
                   cfg: Any, rec: Any) -> None:
        """One streamed request, timed into `rec` (a bench RequestRecord)."""
        extra = {"ignore_eos": cfg.ignore_eos}
        common = {"model": self.model, "temperature": cfg.temperature, "stream": True,
                  "stream_options": {"include_usage": True}, "extra_body": extra}
        # Timed from before the call: it returns once the response starts, which a server
        # (Conveyor's among them) may delay until the first token.
        sent = time.perf_counter()
        if self.chat:
            if prompt is None:
                raise ValueError("--backend openai-chat needs text prompts "
                                 "(--random-prompt words, or sharegpt)")
            stream = await self.api.chat.completions.create(
                messages=[{"role": "user", "content": [{"type": "text", "text": prompt}]}],
                max_completion_tokens=max_tokens, **common)
        else:
            stream = await self.api.completions.create(
                prompt=prompt if prompt is not None else token_ids, max_tokens=max_tokens,
                **common)
        last = None
        async for chunk in stream:
            now = time.perf_counter()
            if chunk.choices:
                if last is None:
                    rec.ttft_s = now - sent
                else:
                    rec.itl_s.append(now - last)
                last = now
                rec.finish_reason = chunk.choices[0].finish_reason or rec.finish_reason
            elif chunk.usage is not None:
                rec.prompt_tokens = chunk.usage.prompt_tokens
                rec.output_tokens = chunk.usage.completion_tokens
        rec.e2e_s = time.perf_counter() - sent
        if rec.ttft_s is None:
            rec.ttft_s = rec.e2e_s


async def _sleep(seconds: float) -> None:
    import asyncio

    await asyncio.sleep(seconds)
