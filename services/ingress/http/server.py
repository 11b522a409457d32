"""The OpenAI-compatible HTTP endpoint: Starlette routes served by uvicorn as a task of the
ingress's event loop (no thread, so handlers call the ingress directly).

A generation goes through the ingress's own path (`Ingress.open_request`: the checks, the
queue bounds, admission, the controller) with a sink that hands the replies to its handler.
The handler waits for the first reply before it answers, so an error found before the first
token (a prompt too long, a full queue) gets its HTTP status; afterwards it streams. A client
that goes away, streaming or not, has its request cancelled: its KV is freed at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import socket
import time
import uuid
from collections.abc import AsyncIterator

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from common.log import get_logger
from common.ports import address_family
from common.runtime import StartupError
from common.wire.client_messages import ErrorReply, Finished, TokenDelta
from common.wire.framing import Message
from services.ingress.client_request import ControllerUnavailable
from services.ingress.http.openai_requests import BadField, HttpRequest, translate
from services.ingress.http.openai_responses import (DONE, ERROR_CODE, HTTP_STATUS,
                                                    ResponseShape, error_body, sse)
from services.ingress.prometheus import CONTENT_TYPE, render
from services.ingress.queue_bounds import Overloaded
from services.ingress.status import deployment_status
from services.ingress.validation import InvalidRequest

log = get_logger()
GRACEFUL_SHUTDOWN_S = 2
"""Once drained, how long uvicorn waits for idle keep-alive connections to close."""


class _Server(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self):
        """The ingress handles SIGTERM itself (it drains first: service.run), so uvicorn must
        not take the signals over."""
        yield


def _listen(host: str, port: int, backlog: int) -> socket.socket:
    """The listening socket, bound before serving: a port in use is then a start-up error that
    says which setting to change (uvicorn's own bind ends the process with status 3 and a bare
    errno)."""
    try:  # SO_REUSEADDR (set by create_server): a restart needs no wait for TIME_WAIT
        return socket.create_server((host, port), family=address_family(host),
                                    backlog=backlog)
    except OSError as e:
        raise StartupError(f"cannot listen for HTTP on {host}:{port} (http.host, http.port): "
                           f"{e.strerror or e}") from None


class HttpServer:
    def __init__(self, ingress):
        self.ingress = ingress
        cfg = ingress.cfg.http
        self.model = ingress.served_model_name
        self.created = int(time.time())
        self._ids = itertools.count(1)
        app = Starlette(routes=[
            Route("/v1/completions", self.completions, methods=["POST"]),
            Route("/v1/chat/completions", self.chat_completions, methods=["POST"]),
            Route("/v1/models", self.models, methods=["GET"]),
            Route("/v1/models/{model:path}", self.model_card, methods=["GET"]),
            Route("/health", self.health, methods=["GET"]),
            Route("/metrics", self.metrics, methods=["GET"]),
        ])
        config = uvicorn.Config(app, host=cfg.host, port=cfg.port, log_config=None,
                                access_log=False, lifespan="off",
                                timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S)
        self.server = _Server(config)
        self.url = f"http://{cfg.host}:{cfg.port}"
        self.socket = _listen(cfg.host, cfg.port, config.backlog)

    async def serve(self) -> None:
        log.info("http listening", url=self.url, model=self.model)
        await self.server.serve(sockets=[self.socket])

    async def stop(self) -> None:
        self.server.should_exit = True

    # ---- routes -------------------------------------------------------------------------

    async def completions(self, request: Request) -> Response:
        return await self._generate(request, chat=False)

    async def chat_completions(self, request: Request) -> Response:
        return await self._generate(request, chat=True)

    async def models(self, request: Request) -> Response:
        if (denied := self._denied(request)) is not None:
            return denied
        return JSONResponse({"object": "list", "data": [self._card()]})

    async def model_card(self, request: Request) -> Response:
        """GET /v1/models/{id}: the one model's card, or 404 for any other id."""
        if (denied := self._denied(request)) is not None:
            return denied
        model = request.path_params["model"]
        if model != self.model:
            return self._refused(404, f"the model `{model}` does not exist; this server serves "
                                 f"`{self.model}`", next(self._ids), "model", "model_not_found")
        return JSONResponse(self._card())

    def _card(self) -> dict:
        folder = self.ingress.tokenizer_folder
        return {"id": self.model, "object": "model", "created": self.created,
                "owned_by": "conveyor", "root": str(folder) if folder else None,
                "parent": None, "max_model_len": self.ingress.cfg.model.max_model_len}

    async def health(self, request: Request) -> Response:
        try:
            ready, detail, _ = await deployment_status(self.ingress)
        except ControllerUnavailable as e:
            ready, detail = False, str(e)
        return JSONResponse({"ready": ready, "detail": detail}, 200 if ready else 503)

    async def metrics(self, request: Request) -> Response:
        try:
            _, _, stats = await deployment_status(self.ingress)
        except ControllerUnavailable as e:
            return Response(f"{e}\n", 503, media_type="text/plain")
        return Response(render(stats, self.model), media_type=CONTENT_TYPE)

    # ---- generation ---------------------------------------------------------------------

    async def _generate(self, request: Request, chat: bool) -> Response:
        if (denied := self._denied(request)) is not None:
            return denied
        number = next(self._ids)
        try:
            body = json.loads(await request.body())
        except (ValueError, UnicodeDecodeError) as e:
            return self._refused(400, f"the request body is not valid JSON: {e}", number)
        try:
            req = translate(body, chat, number)
        except BadField as e:
            return self._refused(400, str(e), number, e.param)
        if req.model is not None and req.model != self.model:
            return self._refused(404, f"the model `{req.model}` does not exist; this server "
                                 f"serves `{self.model}`", number, "model", "model_not_found")
        replies: asyncio.Queue[Message] = asyncio.Queue()
        try:
            cr = self.ingress.open_request(b"http-%d" % number, req.generate,
                                           sink=replies.put_nowait)
        except (InvalidRequest, Overloaded) as e:
            code = self.ingress.count_refusal(e, number)
            return self._error(code, str(e))
        shape = ResponseShape(chat, f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}",
                              self.model, req.return_token_ids)
        first = await self._first_reply(replies, request, cr)
        if first is None:
            return Response(status_code=499)  # nobody reads it: the client is gone
        if isinstance(first, ErrorReply):
            return self._error(first.code, first.message)
        if not req.stream:
            return JSONResponse(shape.full(first))
        return StreamingResponse(self._events(first, replies, shape, req, cr),
                                 media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})

    async def _first_reply(self, replies: asyncio.Queue, request: Request, cr
                           ) -> Message | None:
        """The request's first reply, or None (and the request cancelled) if the client
        disconnects before it."""
        got = asyncio.ensure_future(replies.get())
        gone = asyncio.ensure_future(_disconnected(request))
        await asyncio.wait({got, gone}, return_when=asyncio.FIRST_COMPLETED)
        gone.cancel()
        if got.done():
            return got.result()
        got.cancel()
        self.ingress.cancel(cr, "the HTTP client disconnected", disconnected=True)
        return None

    async def _events(self, msg: Message, replies: asyncio.Queue, shape: ResponseShape,
                      req: HttpRequest, cr) -> AsyncIterator[bytes]:
        try:
            while True:
                if isinstance(msg, TokenDelta):
                    yield sse(shape.chunk(msg))
                elif isinstance(msg, Finished):
                    yield sse(shape.chunk(None, msg.finish_reason))
                    if req.include_usage:
                        yield sse(shape.usage_chunk(msg))
                    yield DONE
                    return
                elif isinstance(msg, ErrorReply):
                    status = HTTP_STATUS.get(msg.code, 500)
                    yield sse(error_body(status, msg.message, None, ERROR_CODE.get(msg.code)))
                    yield DONE
                    return
                msg = await replies.get()
        finally:
            # Starlette cancels the stream when the client disconnects; a request that ended
            # normally is closed already, and this does nothing.
            self.ingress.cancel(cr, "the HTTP client disconnected", disconnected=True)

    # ---- refusals -----------------------------------------------------------------------

    def _denied(self, request: Request) -> Response | None:
        """401 unless the request carries one of the API keys (when there are any)."""
        keys = self.ingress.api_keys
        if not keys.required:
            return None
        scheme, _, key = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() == "bearer" and keys.check(key.strip()):
            return None
        self.ingress.bounds.rejected["unauthorized"] += 1
        return JSONResponse(error_body(401, "invalid or missing API key: send Authorization: "
                                       "Bearer KEY", None, "invalid_api_key"), 401)

    def _refused(self, status: int, message: str, number: int, param: str | None = None,
                 code: str = "invalid_request") -> Response:
        reason = "not_found" if status == 404 else "invalid"
        self.ingress.bounds.rejected[reason] += 1
        log.info("request refused", client_id=number, reason=reason, detail=message)
        return JSONResponse(error_body(status, message, param, code), status)

    def _error(self, code: int, message: str) -> Response:
        status = HTTP_STATUS.get(code, 500)
        headers = {"Retry-After": str(self.ingress.cfg.ingress.retry_after_s)} \
            if status == 503 else None
        return JSONResponse(error_body(status, message, None, ERROR_CODE.get(code)), status,
                            headers=headers)


async def _disconnected(request: Request) -> None:
    """Returns once the client has gone (the body has been read, so the next ASGI message
    can only be the disconnect)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass

