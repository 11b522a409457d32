"""The ingress process: the front door for the client SDK.

Clients speak the public protocol (common.wire.client_messages) to a ROUTER socket over TCP.
The ingress validates and tokenizes requests, forwards them to the controller, and streams the
detokenized text back. Cheap checks run on receipt; tokenizing runs in a worker thread
(admission.py), so a long prompt never stalls other clients' streams. A client that vanishes
is noticed when a send to it fails (ROUTER in mandatory mode, probed with Ping while its
requests run) and its requests are aborted, so their KV is freed and nobody else waits behind
them.

The OpenAI-compatible HTTP endpoint (services/ingress/http/) runs in this same event loop and
goes through the same path: `open_request` checks and queues a request whose replies (the
public messages) go to a sink of the HTTP handler's instead of the ZeroMQ socket. Admission
control (queue_bounds.py) refuses what would queue beyond the bounds; on SIGTERM the ingress
drains (`drain`): it admits nothing new and lets what runs finish.
"""

from __future__ import annotations

import asyncio
import errno
import itertools
import signal
import time
import traceback
from collections.abc import Callable

import zmq

from common import sd_notify
from common.config import ConveyorConfig
from common.log import get_logger
from common.model import resolve_model
from common.wire.client_messages import (NO_REQUEST_ID, CancelRequest, ErrorCode, ErrorReply,
                                         Finished, GenerateRequest, HealthRequest, Ping,
                                         StatsRequest)
from common.wire.framing import Message
from common.wire.internal_messages import (AbortRequests, FinishReason, Hello, RequestOutput,
                                           RequestOutputs, RequestSampling, SubmitRequest)
from common.runtime import until_one_ends
from common.zmq_io import Endpoint, Incoming, RpcClient, make_context, stop_tasks
from common.security import INGRESS_IDENTITY, Security
from services.ingress.admission import Admission
from services.ingress.api_keys import ApiKeys
from services.ingress.detokenizer import IncrementalDetokenizer
from services.ingress.client_request import ClientRequest, Draining, Unauthorized, refusal
from services.ingress.queue_bounds import Overloaded, QueueBounds
from services.ingress.status import report_ready, status_reply
from services.ingress.tokenizer import load_tokenizer, tokenizer_folder
from services.ingress.validation import (InvalidRequest, Limits, ValidRequest,
                                         check, finalize, tokenize)

log = get_logger()
_FINISH_NAMES = {FinishReason.STOP: "stop", FinishReason.LENGTH: "length",
                 FinishReason.ABORT: "cancelled"}


class Ingress:
    def __init__(self, cfg: ConveyorConfig):
        self.cfg = cfg
        src = resolve_model(cfg.model.source, cfg.model.load_format, cfg.model.tokenizer)
        self.model_name = src.display_name
        self.served_model_name = cfg.http.served_model_name or src.display_name
        t0 = time.perf_counter()
        self.tokenizer = load_tokenizer(src)
        self.tokenizer_folder = tokenizer_folder(src)
        log.info("tokenizer loaded", model=self.model_name,
                 has_tokenizer=self.tokenizer is not None,
                 load_s=round(time.perf_counter() - t0, 2))
        self.limits = Limits(cfg.model.max_model_len, src.shape.vocab_size,
                             cfg.ingress.default_max_tokens, cfg.ingress.max_stop_strings,
                             cfg.max_prompt_bytes,
                             {name: (c.ttft_s, c.tpot_s) for name, c in cfg.slo.classes.items()},
                             cfg.slo.default_class)
        self._ctx = ctx = make_context()
        self.clients = Endpoint(ctx, zmq.ROUTER, bind=cfg.endpoints.ingress,
                                router_mandatory=True, max_frame_bytes=cfg.ingress.max_frame_bytes)
        self.ctrl = Endpoint(ctx, zmq.DEALER, connect=cfg.endpoints.controller,
                             identity=INGRESS_IDENTITY,
                             security=Security.for_role(cfg, "ingress").client("controller"))
        self.ctrl_rpc = RpcClient(self.ctrl)
        self.active: dict[int, ClientRequest] = {}
        self.by_client: dict[tuple[bytes, int], ClientRequest] = {}
        # Ids start from this start's clock (ms << 20), so a restarted ingress never reuses
        # an id the controller may still hold from before.
        self._req_ids = itertools.count((time.time_ns() // 1_000_000) << 20)
        self.admission: Admission[ClientRequest, ValidRequest] = Admission(
            self._prepare, self._submit, self._refuse)
        self.api_keys = ApiKeys(cfg.ingress.api_keys)
        self.bounds = QueueBounds(cfg.ingress.max_queued_requests,
                                  cfg.ingress.max_queued_prompt_tokens)
        self.disconnects = 0
        self.draining = False
        self.http = None

    async def serve(self) -> None:
        tasks: dict[str, asyncio.Task] = {}
        try:
            if self.cfg.http.enabled:  # first: a port in use ends the start (StartupError)
                from services.ingress.http.server import HttpServer  # starlette: when used
                self.http = HttpServer(self)
            await self.ctrl.send(Hello("ingress"))
            log.info("ingress listening", address=self.clients.address,
                     api_keys=self.api_keys.required)
            tasks = {"client messages": asyncio.create_task(self._client_loop()),
                     "controller messages": asyncio.create_task(self._controller_loop()),
                     "keepalive": asyncio.create_task(self._keepalive_loop()),
                     "admission": asyncio.create_task(self.admission.run()),
                     "controller watch": asyncio.create_task(self.ctrl_rpc.fail_on_disconnect(
                         "controller", self._controller_lost,
                         on_reconnect=self._controller_back))}
            if sd_notify.expected():
                tasks["readiness report"] = asyncio.create_task(report_ready(self))
            if self.http is not None:
                tasks["http"] = asyncio.create_task(self._serve_http())
            await until_one_ends(tasks)
        finally:
            await stop_tasks(list(tasks.values()))
            if self.http is not None:
                self.http.socket.close()
            self.clients.close()
            self.ctrl.close()
            self._ctx.destroy(linger=0)

    # ---- clients ------------------------------------------------------------------------

    async def _serve_http(self) -> None:
        await self.http.serve()
        if self.draining:  # stopped by the drain, which ends the process itself when done
            await asyncio.Future()

    async def _client_loop(self) -> None:
        while True:
            inc = await self.clients.recv()
            try:
                await self._on_client(inc)
            except Exception as e:  # a bug met by one message must not stop the ingress
                log.error("failed to handle a client message", error=repr(e),
                          traceback=traceback.format_exc())
                rid = getattr(inc.message, "id", NO_REQUEST_ID)
                self._send(inc.identity, ErrorReply(rid, ErrorCode.INTERNAL, repr(e)))

    async def _on_client(self, inc: Incoming) -> None:
        msg = inc.message
        if msg is None:
            log.warning("bad frame from client", error=inc.error, client_id=inc.request_id)
            if inc.request_id is not None:  # a request with a bad field: refuse it alone
                self._send(inc.identity, ErrorReply(inc.request_id, ErrorCode.INVALID_REQUEST,
                                                    inc.error))
            else:
                self._send(inc.identity, ErrorReply(NO_REQUEST_ID, ErrorCode.PROTOCOL,
                                                    inc.error))
        elif isinstance(msg, GenerateRequest):
            self._on_generate(inc.identity, msg)
        elif isinstance(msg, CancelRequest):
            cr = self.by_client.get((inc.identity, msg.id))
            if cr is not None:  # unknown ids are fine: the request may just have finished
                self._abort([cr], "cancelled by the client")
                self._finish(cr, FinishReason.ABORT)
        elif isinstance(msg, (HealthRequest, StatsRequest)):
            asyncio.create_task(self._answer_status(inc.identity, msg))
        else:
            self._send(inc.identity, ErrorReply(getattr(msg, "id", NO_REQUEST_ID),
                                                ErrorCode.PROTOCOL,
                                                f"{type(msg).__name__} is not a client request"))

    def _on_generate(self, identity: bytes, msg: GenerateRequest) -> None:
        try:
            if not self.api_keys.check(msg.api_key):
                raise Unauthorized("invalid or missing API key (api_key)")
            self.open_request(identity, msg)
        except (InvalidRequest, Unauthorized, Overloaded) as e:
            self._send(identity, ErrorReply(msg.id, self.count_refusal(e, msg.id), str(e)))

    def open_request(self, identity: bytes, msg: GenerateRequest,
                     sink: Callable[[Message], None] | None = None) -> ClientRequest:
        """Checks a request and queues it for admission; its replies go to `sink` (or to the
        ZeroMQ client `identity`). Raises InvalidRequest or Overloaded (nothing is queued)."""
        if (identity, msg.id) in self.by_client:
            raise InvalidRequest(f"request id {msg.id} is already in flight")
        if self.draining:
            raise Draining("the server is shutting down and admits no new requests")
        checked = check(msg, self.tokenizer, self.limits)
        self.bounds.enter()
        # Known from now on, so that a cancel, a duplicate id or the client's loss finds it
        # while it waits for admission.
        cr = ClientRequest(identity, msg.id, next(self._req_ids), msg.stream, checked,
                           IncrementalDetokenizer(self.tokenizer, checked.params.stop),
                           sink=sink)
        self.active[cr.req_id] = cr
        self.by_client[(identity, msg.id)] = cr
        self.admission.put(cr)
        return cr

    def count_refusal(self, error: Exception, client_id: int) -> ErrorCode:
        """Counts and logs a refusal; returns its error code."""
        code, reason = refusal(error)
        self.bounds.rejected[reason] += 1
        log.info("request refused", client_id=client_id, reason=reason, detail=str(error))
        return code

    def cancel(self, cr: ClientRequest, reason: str, disconnected: bool = False) -> None:
        """Ends a request whose client no longer wants it (an HTTP client that went away),
        without a reply: its KV is freed, and it is never submitted if it still waits."""
        if cr.closed:
            return
        self.disconnects += disconnected
        self._abort([cr], reason)
        self._forget(cr)

    def _prepare(self, cr: ClientRequest) -> ValidRequest:
        """In the admission thread: reads only `cr.checked`, which nothing else changes."""
        return finalize(cr.checked, tokenize(cr.checked, self.tokenizer), self.limits)

    def _submit(self, cr: ClientRequest, valid: ValidRequest) -> None:
        p = valid.params
        cr.prompt_tokens = len(valid.prompt_token_ids)
        self.bounds.add_prompt(cr.prompt_tokens)  # raises Overloaded: refused below
        cr.queued_tokens = cr.prompt_tokens
        self.ctrl.send_nowait(SubmitRequest(
            cr.req_id, valid.prompt_token_ids, valid.max_tokens,
            RequestSampling(p.temperature, p.top_p, p.top_k, p.seed), p.stop_token_ids,
            p.ignore_eos, cr.received, *valid.slo))
        cr.submitted = True

    def _refuse(self, cr: ClientRequest, error: Exception) -> None:
        if refusal(error) is not None:
            code, text = self.count_refusal(error, cr.client_id), str(error)
        else:
            log.error("preparing a request failed", client_id=cr.client_id, error=repr(error))
            code, text = ErrorCode.INTERNAL, f"preparing the request failed: {error!r}"
        self._reply(cr, ErrorReply(cr.client_id, code, text))
        self._forget(cr)

    async def _answer_status(self, identity: bytes, msg: HealthRequest | StatsRequest) -> None:
        self._send(identity, await status_reply(self, msg))

    def _reply(self, cr: ClientRequest, msg: Message) -> None:
        if cr.sink is not None:
            cr.sink(msg)
        else:
            self._send(cr.identity, msg)

    def _send(self, identity: bytes, msg: Message) -> bool:
        """Sends without blocking; a client that is gone or not reading loses its requests."""
        try:
            self.clients.send_nowait(msg, identity)
            return True
        except zmq.Again:
            self._client_gone(identity, "client is not reading its replies")
        except zmq.ZMQError as e:
            if e.errno != errno.EHOSTUNREACH:
                raise
            self._client_gone(identity, "client disconnected")
        return False

    def _client_gone(self, identity: bytes, reason: str) -> None:
        victims = [cr for cr in self.active.values() if cr.identity == identity]
        if victims:
            log.warning("aborting requests of a lost client", reason=reason,
                        req_ids=[cr.req_id for cr in victims])
            self.disconnects += len(victims)
            self._abort(victims, reason)
            for cr in victims:
                self._forget(cr)

    async def _keepalive_loop(self) -> None:
        while True:
            await asyncio.sleep(self.cfg.ingress.keepalive_s)
            for identity in {cr.identity for cr in self.active.values() if cr.sink is None}:
                self._send(identity, Ping())

    # ---- controller ---------------------------------------------------------------------

    async def _controller_loop(self) -> None:
        while True:
            inc = await self.ctrl.recv()
            if inc.message is None:
                log.error("undecodable frame from the controller", error=inc.error)
            elif isinstance(inc.message, RequestOutputs):
                for out in inc.message.outputs:
                    self._on_output(out)
            elif not self.ctrl_rpc.dispatch(inc):
                log.warning("unexpected message from the controller",
                            type=type(inc.message).__name__)

    def _controller_lost(self) -> None:
        """The controller's process went away: its state, and with it every request it held,
        is gone. Each is failed at once (a client would otherwise wait out its own timeout);
        requests still being tokenized go on to a controller that is back by then, or fail."""
        lost = [cr for cr in self.active.values() if cr.submitted]
        if lost:
            log.error("the controller went away: failing its requests", requests=len(lost))
            # Queued for whichever controller comes back: a restarted one knows none of them,
            # the same one (its link dropped) must not run them for nobody.
            self._abort(lost, "the controller went away")
        for cr in lost:
            self._reply(cr, ErrorReply(cr.client_id, ErrorCode.INTERNAL,
                                       "the controller went away while serving this request; "
                                       "it was lost (retry once the deployment is back)"))
            self._forget(cr)

    def _controller_back(self) -> None:
        """A controller is back (restarted, knowing nobody): the ingress registers again, so
        it may submit and gets its outputs."""
        log.info("controller back: registering again")
        self.ctrl.send_nowait(Hello("ingress", again=True))

    def _on_output(self, out: RequestOutput) -> None:
        cr = self.active.get(out.req_id)
        if cr is None:
            return  # cancelled or lost client: late tokens are dropped
        if out.finish == FinishReason.ERROR:
            code = out.error_code or ErrorCode.INTERNAL
            self._reply(cr, ErrorReply(cr.client_id, code, out.error))
            self._forget(cr)
            return
        if out.token_ids and cr.first_token is None:
            cr.first_token = time.time()
            self._dequeue(cr)
        cr.detok.push(out.token_ids)
        if cr.detok.stopped:
            # A stop string ended it: the controller keeps going until told otherwise.
            self._abort([cr], "stop string")
            self._finish(cr, FinishReason.STOP)
        elif out.finish:
            cr.detok.finish()
            self._finish(cr, FinishReason(out.finish))
        elif cr.stream:
            delta = cr.stream_delta()
            if delta is not None:
                self._reply(cr, delta)

    def _finish(self, cr: ClientRequest, reason: FinishReason) -> None:
        now = time.time()
        d = cr.detok
        delta = cr.stream_delta(final=True) if cr.stream else None
        if delta is not None:
            self._reply(cr, delta)
        self._reply(cr, Finished(
            cr.client_id, d.text, list(d.token_ids), _FINISH_NAMES[reason], cr.prompt_tokens,
            len(d.token_ids), round((cr.first_token or now) - cr.received, 6),
            round(now - cr.received, 6)))
        self._forget(cr)

    def _abort(self, crs: list[ClientRequest], reason: str) -> None:
        req_ids = [cr.req_id for cr in crs if cr.submitted]  # the others never reached it
        if req_ids:
            self.ctrl.send_nowait(AbortRequests(req_ids, reason))

    def _dequeue(self, cr: ClientRequest) -> None:
        if cr.queued:
            cr.queued = False
            self.bounds.leave(cr.queued_tokens)

    def _forget(self, cr: ClientRequest) -> None:
        cr.closed = True
        self._dequeue(cr)
        self.active.pop(cr.req_id, None)
        if self.by_client.get((cr.identity, cr.client_id)) is cr:  # the id may be reused since
            del self.by_client[(cr.identity, cr.client_id)]


    # ---- shutdown -----------------------------------------------------------------------

    async def drain(self) -> None:
        """Stops admitting (health says not ready, new requests are refused as overloaded)
        and waits for the requests in flight, at most `ingress.shutdown_timeout_s`; those
        still running then end with an error reply, so none is dropped silently."""
        self.draining = True
        timeout = self.cfg.ingress.shutdown_timeout_s
        log.info("draining", requests=len(self.active), timeout_s=timeout)
        deadline = time.monotonic() + timeout
        while self.active and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        left = list(self.active.values())
        if left:
            log.warning("shutdown timeout: ending requests still running", count=len(left))
            self._abort(left, "the server shut down")
            for cr in left:
                self._reply(cr, ErrorReply(cr.client_id, ErrorCode.INTERNAL,
                                           f"the server shut down before the request finished "
                                           f"(ingress.shutdown_timeout_s = {timeout:g})"))
                self._forget(cr)
        await asyncio.sleep(0.05)  # the last replies leave before the sockets close
        if self.http is not None:
            await self.http.stop()
        log.info("drained")


async def run(cfg: ConveyorConfig) -> None:
    """Serves until SIGTERM or SIGINT, then drains and exits; a second signal exits at once.
    (These handlers replace run_service's plain cancel for this process.)"""
    ingress = Ingress(cfg)
    main = asyncio.current_task()
    loop = asyncio.get_running_loop()

    def on_signal() -> None:
        if ingress.draining:
            main.cancel()
            return
        task = asyncio.create_task(ingress.drain())
        task.add_done_callback(lambda _: main.cancel())

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal)
    await ingress.serve()
