"""The controller process: owns request state and drives every instance's pipeline.

One ROUTER socket takes the ingress and the stage workers; a DEALER reaches the kv-cache
manager. Per instance, a scheduling task keeps up to `max_inflight` micro-batches in the
pipeline: whenever a micro-batch completes or requests arrive it asks the policy for the next
one, gets its blocks from the kv-cache manager and sends the plan to every stage at once (the
stages prepare their inputs while earlier stages still compute, as gLLM does).
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import asdict

import zmq

from common.config import ConveyorConfig
from common.costmodel import BatchShape
from common.log import debug_enabled, get_logger
from common.model import resolve_model
from common.scheduling import make_policy_from
from common.scheduling.types import MicroBatchPlan
from common.wire.client_messages import ErrorCode
from common.wire.internal_messages import (AbortRequests, Allocate, FinishReason, FreeBlocks,
                                           Hello, PoolInit, PoolReply, RequestOutput,
                                           RequestOutputs, StatusQuery, StatusReply, StepDone,
                                           SubmitRequest)
from common.zmq_io import Endpoint, Incoming, RpcClient, make_context
from services.controller.instance import Instance
from common.stats import ControllerMetrics
from services.controller.prometheus import start_metrics_endpoint
from services.controller.requests import Request, Status

log = get_logger()
KV_TIMEOUT_S = 30.0


class Controller:
    def __init__(self, cfg: ConveyorConfig):
        self.cfg = cfg
        src = resolve_model(cfg.model.source, cfg.model.load_format, cfg.model.tokenizer)
        self.model_name = src.display_name
        self.eos_token_ids = tuple(src.shape.eos_token_ids)
        self.max_model_len = cfg.model.max_model_len
        sc = cfg.scheduler
        self.instances = [Instance(i, cfg.deployment.stages, cfg.max_inflight,
                                   cfg.kvcache.block_size)
                          for i in range(cfg.deployment.instances)]
        # One policy object per instance: policies may keep private state between calls.
        self.policies = [make_policy_from(sc.policy, sc) for _ in self.instances]
        self.wake = [asyncio.Event() for _ in self.instances]
        self.requests: dict[int, Request] = {}
        self.metrics = ControllerMetrics(started=time.monotonic(),
                                         num_instances=len(self.instances))
        ctx = make_context()
        self.endpoint = Endpoint(ctx, zmq.ROUTER, bind=cfg.endpoints.controller,
                                 router_mandatory=True)
        self.kv = Endpoint(ctx, zmq.DEALER, connect=cfg.endpoints.kvcache, identity=b"controller")
        self.kv_rpc = RpcClient(self.kv)
        self.ingress_identity: bytes | None = None
        self.outputs: list[RequestOutput] = []

    # ---- main loops ---------------------------------------------------------------------

    async def serve(self) -> None:
        log.info("controller listening", address=self.endpoint.address,
                 policy=self.cfg.scheduler.policy, instances=len(self.instances),
                 stages=self.cfg.deployment.stages)
        tasks = [asyncio.create_task(self._kv_replies())]
        metrics_server = await start_metrics_endpoint(
            self.cfg.endpoints.metrics_http, lambda: self._stats(time.monotonic()))
        tasks += [asyncio.create_task(self._schedule_loop(inst)) for inst in self.instances]
        try:
            while True:
                inc = await self.endpoint.recv()
                try:
                    await self.handle(inc)
                finally:
                    await self._flush_outputs()
        finally:
            for t in tasks:
                t.cancel()
            if metrics_server is not None:
                metrics_server.close()
            self.endpoint.close()
            self.kv.close()

    async def _kv_replies(self) -> None:
        while True:
            inc = await self.kv.recv()
            if inc.message is None:
                log.error("undecodable frame from kv-cache manager", error=inc.error)
            elif not self.kv_rpc.dispatch(inc) and getattr(inc.message, "call_id", 0) != 0:
                log.warning("unexpected kv-cache reply", type=type(inc.message).__name__)

    async def handle(self, inc: Incoming) -> None:
        msg = inc.message
        if msg is None:
            log.warning("dropped undecodable frame", peer=inc.identity, error=inc.error)
        elif isinstance(msg, StepDone):
            self._on_step_done(msg)
        elif isinstance(msg, SubmitRequest):
            self._on_submit(msg)
        elif isinstance(msg, AbortRequests):
            for req_id in msg.req_ids:
                req = self.requests.get(req_id)
                if req is not None and not req.finished:
                    self._finish(req, FinishReason.ABORT, msg.reason)
        elif isinstance(msg, StatusQuery):
            await self.endpoint.send(self._status(msg.call_id), inc.identity)
        elif isinstance(msg, Hello):
            await self._on_hello(msg, inc.identity)
        else:
            log.warning("unexpected message", type=type(msg).__name__, peer=inc.identity)

    # ---- requests -----------------------------------------------------------------------

    def _on_submit(self, msg: SubmitRequest) -> None:
        if msg.req_id in self.requests:
            self._reject(msg.req_id, f"duplicate request id {msg.req_id}")
            return
        req = Request.from_wire(msg, time.monotonic(), self.eos_token_ids)
        inst = min(self.instances, key=lambda i: (not i.ready, i.load))
        self.requests[req.req_id] = req
        self.metrics.prompt_tokens += len(req.prompt_token_ids)
        inst.add(req)
        self.metrics.pending[inst.index].update(True, req.arrival)
        if inst.pool_ready and not self._fits(inst, req):
            return
        self.wake[inst.index].set()

    def _fits(self, inst: Instance, req: Request) -> bool:
        """A request that could not finish even alone in the pool is refused up front."""
        need = -(-(len(req.prompt_token_ids) + req.max_tokens) // inst.block_size)
        if need <= inst.total_blocks:
            return True
        self._finish(req, FinishReason.ERROR,
                     f"request needs {need} KV blocks ({len(req.prompt_token_ids)} prompt + "
                     f"{req.max_tokens} max_tokens) but the pool holds {inst.total_blocks}; "
                     f"lower max_tokens or give the KV cache more memory",
                     ErrorCode.INVALID_REQUEST)
        return False

    def _reject(self, req_id: int, error: str) -> None:
        self.outputs.append(RequestOutput(req_id, [], FinishReason.ERROR, error,
                                          ErrorCode.INVALID_REQUEST))

    def _finish(self, req: Request, reason: FinishReason, error: str = "",
                error_code: int = ErrorCode.INTERNAL) -> None:
        """Ends a request. Its blocks are freed now, or when its last micro-batch returns."""
        if req.status is not Status.FINISHED:
            req.status = Status.FINISHED
            req.finish = reason
            req.error = error
            self.metrics.finished[reason.name.lower()] += 1
            timings = req.timings()
            if reason in (FinishReason.ABORT, FinishReason.ERROR):
                self.outputs.append(RequestOutput(req.req_id, [], reason, error, error_code))
            else:
                self.metrics.record_request(timings)
            log.info("request finished", req_id=req.req_id, finish=reason.name.lower(),
                     prompt_tokens=len(req.prompt_token_ids),
                     output_tokens=len(req.output_token_ids), preemptions=req.preemptions,
                     instance=req.instance, **timings, **({"error": error} if error else {}))
        inst = self.instances[req.instance]
        blocks_held = req.num_blocks > 0
        if inst.remove(req):
            self.metrics.pending[inst.index].update(bool(inst.waiting or inst.running),
                                                    time.monotonic())
            self.requests.pop(req.req_id, None)
            if blocks_held:
                self._send_free(inst, [req.req_id])
            self.wake[inst.index].set()

    def _send_free(self, inst: Instance, req_ids: list[int]) -> None:
        # Fire and forget (call_id 0): the manager handles messages in order, so a later
        # Allocate already sees these blocks free.
        self.kv.send_nowait(FreeBlocks(0, inst.index, req_ids))

    # ---- stages -------------------------------------------------------------------------

    async def _on_hello(self, msg: Hello, identity: bytes) -> None:
        if msg.role == "ingress":
            self.ingress_identity = identity
            log.info("ingress connected")
            return
        if msg.role != "stage" or not 0 <= msg.instance < len(self.instances):
            log.warning("ignored hello", role=msg.role, instance=msg.instance)
            return
        inst = self.instances[msg.instance]
        inst.stage_identities[msg.stage] = identity
        inst.stage_blocks[msg.stage] = msg.kv_blocks
        log.info("stage registered", instance=msg.instance, stage=msg.stage,
                 kv_blocks=msg.kv_blocks, **msg.detail)
        if inst.all_stages_registered and not inst.pool_ready:
            num_blocks = min(inst.stage_blocks.values())
            reply = await self.kv_rpc.call(
                lambda cid: PoolInit(cid, inst.index, num_blocks, inst.block_size), KV_TIMEOUT_S)
            inst.total_blocks = inst.free_blocks = reply.free_blocks
            inst.pool_ready = True
            log.info("instance ready", instance=inst.index, kv_blocks=num_blocks,
                     kv_tokens=num_blocks * inst.block_size)
            for req in list(inst.waiting):
                self._fits(inst, req)
            self.wake[inst.index].set()

    def _on_step_done(self, msg: StepDone) -> None:
        self.metrics.record_step(msg.instance, msg.stage, msg.compute_s, msg.wait_s)
        if debug_enabled():
            log.debug("step done", instance=msg.instance, stage=msg.stage, mb_id=msg.mb_id,
                      compute_s=round(msg.compute_s, 6), wait_s=round(msg.wait_s, 6))
        inst = self.instances[msg.instance]
        if msg.error:
            log.error("stage failed a micro-batch", instance=msg.instance, stage=msg.stage,
                      mb_id=msg.mb_id, error=msg.error)
        if msg.stage != inst.num_stages - 1:
            if msg.error:  # the micro-batch is lost: fail its requests now
                batch = inst.inflight.get(msg.mb_id)
                for req in batch.requests if batch else ():
                    self._finish(req, FinishReason.ERROR, f"stage {msg.stage}: {msg.error}")
            return
        batch = inst.complete(msg.mb_id)
        if batch is None:
            log.warning("completion of an unknown micro-batch", mb_id=msg.mb_id)
            return
        self.metrics.micro_batches += 1
        now = time.monotonic()
        if msg.error or len(msg.sampled) != len(batch.sampling):
            error = msg.error or f"stage returned {len(msg.sampled)} tokens for " \
                                 f"{len(batch.sampling)} sequences"
            for req in batch.requests:
                self._finish(req, FinishReason.ERROR, error)
        else:
            for req, token in zip(batch.sampling, msg.sampled):
                if req.finished:
                    continue  # aborted while in flight: drop its token
                if req.first_token is None:
                    req.first_token = now
                req.last_token = now
                req.append_token(token, self.max_model_len)
                self.metrics.generated_tokens += 1
                self.outputs.append(RequestOutput(req.req_id, [token], req.finish))
                if req.finish:
                    self._finish(req, req.finish)
        for req in batch.requests:  # requests aborted while in flight can let go now
            if req.finished and req.inflight == 0 and req.req_id in self.requests:
                self._finish(req, req.finish)
        self.wake[inst.index].set()

    # ---- scheduling ---------------------------------------------------------------------

    async def _schedule_loop(self, inst: Instance) -> None:
        policy = self.policies[inst.index]
        wake = self.wake[inst.index]
        while True:
            await wake.wait()
            wake.clear()
            while inst.ready and len(inst.inflight) < inst.max_inflight:
                plan = policy.schedule(inst.snapshot(time.monotonic()))
                if plan.preempt:
                    victims = inst.preempt(plan.preempt)
                    self.metrics.preemptions += len(victims)
                    if victims:
                        self._send_free(inst, [r.req_id for r in victims])
                        log.info("preempted", instance=inst.index,
                                 req_ids=[r.req_id for r in victims])
                if not plan.chunks:
                    if not plan.preempt:
                        break
                    continue
                if not await self._dispatch(inst, plan):
                    break

    async def _dispatch(self, inst: Instance, plan: MicroBatchPlan) -> bool:
        wants = inst.block_wants(plan, self.requests)
        granted: dict[int, list[int]] = {}
        if wants:
            reply: PoolReply = await self.kv_rpc.call(
                lambda cid: Allocate(cid, inst.index, wants), KV_TIMEOUT_S)
            if not reply.ok:
                log.error("kv-cache manager refused an allocation the controller counted as "
                          "free; resynchronizing", error=reply.error, free=reply.free_blocks)
                inst.free_blocks = reply.free_blocks
                return False
            granted = {req_id: blocks for (req_id, _), blocks in zip(wants, reply.granted)}
        # Requests may have ended while we awaited the blocks: drop their chunks and blocks.
        live = tuple(c for c in plan.chunks if not self.requests.get(c.req_id, _GONE).finished)
        gone = [c.req_id for c in plan.chunks if c.req_id in granted and
                self.requests.get(c.req_id, _GONE).finished]
        if gone:
            self._send_free(inst, gone)
        if not live:
            return True
        first, rest = inst.commit(MicroBatchPlan(live), self.requests, granted, time.monotonic())
        batch = inst.inflight[first.mb_id]
        self.metrics.record_batch(batch.num_prefill_tokens, batch.num_decode_tokens)
        if debug_enabled():  # the micro-batch's shape, for scripts/step_timeline.py
            shape = BatchShape.of_chunks(((c.start, c.num_new) for c in first.chunks),
                                         len(batch.sampling))
            log.debug("dispatched", instance=inst.index, mb_id=first.mb_id,
                      requests=len(batch.requests), **asdict(shape))
        for stage, identity in sorted(inst.stage_identities.items()):
            await self.endpoint.send(first if stage == 0 else rest, identity)
        return True

    # ---- outputs and status -------------------------------------------------------------

    async def _flush_outputs(self) -> None:
        if not self.outputs:
            return
        outputs, self.outputs = self.outputs, []
        if self.ingress_identity is None:
            log.error("outputs with no ingress connected", count=len(outputs))
            return
        try:
            await self.endpoint.send(RequestOutputs(outputs), self.ingress_identity)
        except zmq.ZMQError as e:
            log.error("cannot reach the ingress", error=str(e))

    def _status(self, call_id: int) -> StatusReply:
        ready = all(i.ready for i in self.instances)
        missing = [f"instance {i.index}: {len(i.stage_identities)}/{i.num_stages} stages"
                   + ("" if i.pool_ready else ", pool pending")
                   for i in self.instances if not i.ready]
        return StatusReply(call_id, ready, "; ".join(missing) or "ready",
                           self._stats(time.monotonic()))

    def _stats(self, now: float) -> dict:
        """Everything the controller measures (cumulative; see metrics.py) plus live state."""
        stats = self.metrics.as_dict(now)
        stats["model"] = self.model_name
        stats["policy"] = self.cfg.scheduler.policy
        stats["pipeline_depth"] = self.cfg.deployment.stages
        stats["metrics_http"] = self.cfg.endpoints.metrics_http
        stats["instances"] = [i.stats() for i in self.instances]
        return stats


class _Gone:
    finished = True


_GONE = _Gone()


async def run(cfg: ConveyorConfig) -> None:
    await Controller(cfg).serve()
