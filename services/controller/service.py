"""The controller process: owns request state and drives every instance's pipeline.

One ROUTER socket takes the ingress and the stage workers; a DEALER reaches the kv-cache
manager. Each instance's state machine is the instance core (common/instance), shared with
the simulator; this module is its socket wrapper: wire messages in, the core's decisions out.
Per instance, a scheduling task drives its pipeline (pipeline.py: micro-batches out, their
completions in).
"""

from __future__ import annotations

import asyncio
import time

import zmq

from common import sd_notify
from common.config import ConveyorConfig
from common.instance import CoreRequest, Finish, pool_misfit
from common.log import get_logger
from common.model import resolve_model
from common.scheduling.routing import arrival_length, make_router
from common.scheduling.types import SLO
from common.security import Security, log_handshake_failures
from common.stats import ControllerMetrics, ControllerStats
from common.wire.client_messages import ErrorCode
from common.wire.internal_messages import (AbortRequests, FinishReason, Hello, KVEndpoint,
                                           KVMoved, PipelineJoined, RequestOutput,
                                           RequestOutputs, StatusQuery, StatusReply, StepDone,
                                           SubmitRequest)
from common.runtime import until_one_ends
from common.zmq_io import Endpoint, Incoming, make_context, stop_tasks
from services.controller.instance import Served, ServedInstance
from services.controller.kv_link import KVLink
from services.controller.membership import Membership
from services.controller.length_groups import live_groups
from services.controller.migration import Migrations
from services.controller.pipeline import WIRE_FINISH, PipelineDriver
from services.controller.peers import from_ingress, from_stage, hello_allowed
from services.controller.prediction import ControllerLengths

log = get_logger()


class Controller:
    def __init__(self, cfg: ConveyorConfig):
        self.cfg = cfg
        src = resolve_model(cfg.model.source, cfg.model.load_format, cfg.model.tokenizer)
        self.model_name = src.display_name
        self.eos_token_ids = tuple(src.shape.eos_token_ids)
        self.max_model_len = cfg.model.max_model_len
        self.metrics = ControllerMetrics(started=time.monotonic(),
                                         num_instances=cfg.deployment.instances)
        # One policy object per instance: policies may keep private state between calls.
        self.instances = [
            ServedInstance.create(i, cfg.deployment.stages, cfg.max_inflight,
                                  cfg.kvcache.block_size, cfg.scheduler.build_policy(),
                                  self.metrics, self._on_release, self._on_finish,
                                  cfg.deployment.step_timeout_s, cfg.deployment.dead_after_s)
            for i in range(cfg.deployment.instances)]
        self.router = make_router(cfg.deployment.routing, cfg.deployment.length_groups())
        self.migrations = Migrations(cfg.migration, self.instances, self.metrics,
                                     cfg.migration.build_planner(cfg.deployment),
                                     send=self._send_to_stage, assign=self._assign_blocks,
                                     free=self._free_blocks,
                                     end=lambda r, why, error: self._end(r, why,
                                                                         time.monotonic(), error))
        self.groups = live_groups(cfg, [self.router, self.migrations.planner], self.metrics)
        """The length groups' refinement (None when off)."""
        # Output lengths predicted at admission (InstanceCore.add) and learned at EOS, one
        # predictor for every instance.
        self.predictor = ControllerLengths(cfg)
        for inst in self.instances:
            inst.core.lengths = self.predictor.lengths
        self.requests: dict[int, CoreRequest] = {}
        """Live requests by id (finished ones leave at once, even with a batch in flight)."""
        self._ctx = ctx = make_context()
        self.security = Security.for_role(cfg, "controller")
        self.auth = self.security.start_authenticator(ctx)  # before bind: no unchecked peer
        self.endpoint = Endpoint(ctx, zmq.ROUTER, bind=cfg.endpoints.controller,
                                 router_mandatory=True, security=self.security.server())
        self.kv = Endpoint(ctx, zmq.DEALER, connect=cfg.endpoints.kvcache, identity=b"controller",
                           security=self.security.client("kvcache"))
        self.kv_link = KVLink(self.kv, cfg.kvcache.lease_blocks)
        self.ingress_identity: bytes | None = None
        self.outputs: list[RequestOutput] = []
        self.membership = Membership(self)
        self.pipeline = PipelineDriver(self)

    # ---- main loops ---------------------------------------------------------------------

    async def serve(self) -> None:
        log.info("controller listening", address=self.endpoint.address,
                 policy=self.cfg.scheduler.policy, instances=len(self.instances),
                 stages=self.cfg.deployment.stages)
        tasks = {"kv-cache watch": asyncio.create_task(
                     self.kv_link.watch(self.instances, self._kv_rebuilt)),
                 "connection watch": asyncio.create_task(log_handshake_failures(
                     self.endpoint.sock, "controller", on_disconnect=self.membership.probe))}
        try:
            # Started before its kv-cache manager (another host's part, any order): wait for
            # it, saying so, before taking stages' hellos, whose pools it must create; what
            # peers send meanwhile waits in the socket.
            await until_connected(self.kv_link.rpc, tasks)
            tasks.update({"messages": asyncio.create_task(self._messages()),
                          "kv-cache replies": asyncio.create_task(self._kv_replies())})
            tasks.update({f"scheduler of instance {inst.index}": asyncio.create_task(
                self.pipeline.schedule_loop(inst)) for inst in self.instances})
            if self.cfg.migration.enabled and self.cfg.migration.mode == "live":
                tasks["live copies' deadlines"] = asyncio.create_task(self._copy_deadlines())
            if self.cfg.deployment.dead_after_s:
                tasks["silent stages"] = asyncio.create_task(self._silent_stages())
            sd_notify.ready("controller listening")
            await until_one_ends(tasks)
        finally:
            await stop_tasks(list(tasks.values()))
            if self.auth is not None:
                self.auth.stop()
            self.predictor.save()
            self.endpoint.close()
            self.kv.close()
            self._ctx.destroy(linger=0)

    async def _messages(self) -> None:
        while True:
            inc = await self.endpoint.recv()
            try:
                await self.handle(inc)
            except Exception:  # one bad message must not stop the controller
                log.exception("failed to handle a message", type=type(inc.message).__name__)
            finally:
                self.kv_link.flush(self.instances)
                await self._flush_outputs()

    async def _kv_replies(self) -> None:
        while True:
            inc = await self.kv.recv()
            if inc.message is None:
                log.error("undecodable frame from kv-cache manager", error=inc.error)
            elif not self.kv_link.rpc.dispatch(inc) and getattr(inc.message, "call_id", 0) != 0:
                log.warning("unexpected kv-cache reply", type=type(inc.message).__name__)

    async def handle(self, inc: Incoming) -> None:
        msg = inc.message
        if msg is None:
            log.warning("dropped undecodable frame", peer=inc.identity, error=inc.error)
        elif isinstance(msg, StepDone):
            if from_stage(inc, self.instances, msg.instance, msg.stage):
                self.membership.heard(self.instances[msg.instance], msg.stage)
                if msg.pipeline_lost:
                    self.membership.step_lost(msg)
                else:
                    self.pipeline.step_done(msg)
        elif isinstance(msg, PipelineJoined):
            if from_stage(inc, self.instances, msg.instance, msg.stage):
                await self.membership.joined(msg)
        elif isinstance(msg, SubmitRequest):
            if from_ingress(inc):
                self._on_submit(msg)
        elif isinstance(msg, AbortRequests):
            if from_ingress(inc):
                self._on_abort(msg)
        elif isinstance(msg, KVMoved):
            if from_stage(inc, self.instances, msg.instance, msg.stage):
                self.migrations.kv_moved(msg, time.monotonic())
        elif isinstance(msg, KVEndpoint):
            if from_stage(inc, self.instances, msg.instance, msg.stage):
                self.instances[msg.instance].kv_endpoints[msg.stage] = (msg.host, msg.port)
        elif isinstance(msg, StatusQuery):
            try:
                await self.endpoint.send(self._status(msg.call_id), inc.identity)
            except zmq.ZMQError as e:  # the asker went away meanwhile (an ingress stopping)
                log.warning("status asked by a peer now gone", peer=inc.identity, error=str(e))
        elif isinstance(msg, Hello):
            if not hello_allowed(inc):
                pass
            elif msg.role == "ingress":
                self.membership.ingress_hello(msg, inc.identity)
            elif (msg.role == "stage" and 0 <= msg.instance < len(self.instances)
                  and 0 <= msg.stage < self.cfg.deployment.stages):
                await self.membership.stage_hello(msg, inc.identity)
            else:
                log.warning("ignored hello", role=msg.role, instance=msg.instance,
                            stage=msg.stage)
        else:
            log.warning("unexpected message", type=type(msg).__name__, peer=inc.identity)

    # ---- requests -----------------------------------------------------------------------

    def _on_submit(self, msg: SubmitRequest) -> None:
        if msg.req_id in self.requests or any(msg.req_id in i.core.by_id
                                              for i in self.instances):
            self.outputs.append(RequestOutput(msg.req_id, [], FinishReason.ERROR,
                                              f"duplicate request id {msg.req_id}",
                                              ErrorCode.INVALID_REQUEST))
            return
        now = time.monotonic()
        stops = set(msg.stop_token_ids)
        if not msg.ignore_eos:
            stops.update(self.eos_token_ids)
        slo = None
        if msg.slo_class or msg.ttft_slo_s is not None or msg.tpot_slo_s is not None:
            slo = SLO(msg.ttft_slo_s, msg.tpot_slo_s, msg.slo_class)
        req = CoreRequest(msg.req_id, now, len(msg.prompt_token_ids), msg.max_tokens,
                          self.max_model_len, stops, list(msg.prompt_token_ids), slo,
                          tag=Served(msg.sampling, msg.arrival))
        length = None
        if self.router.reads_length:  # predicted before routing (add's admit then keeps it)
            if self.predictor.lengths is not None:
                self.predictor.lengths.admit(req)
            length = arrival_length(req.prompt, req.predicted_output, req.max_tokens)
        inst = self.instances[self.router.route([i.core.load for i in self.instances],
                                                self.membership.routable(), length)]
        if self.membership.refuse_if_given_up(inst, req.req_id):
            return
        self.requests[req.req_id] = req
        inst.core.add(req, now)
        if self.groups is not None:
            self.groups.routed(inst.index, req.prompt + req.max_tokens)
            self.groups.tick(now)
        if inst.pool_ready and not self._fits(inst, req, now):
            return
        inst.wake.set()
        self.migrations.round(now)  # one waiting outside its instance's range moves now

    def _on_abort(self, msg: AbortRequests) -> None:
        now = time.monotonic()
        for req_id in msg.req_ids:
            req = self.requests.get(req_id)
            if req is not None:
                self._end(req, Finish.ABORT, now, msg.reason)

    def _fits(self, inst: ServedInstance, req: CoreRequest, now: float) -> bool:
        """A request that could not finish even alone in the pool is refused up front."""
        misfit = pool_misfit(req.prompt, req.max_tokens, inst.core.block_size,
                             inst.core.total_blocks)
        if misfit:
            req.tag.error_code = ErrorCode.INVALID_REQUEST
            self._end(req, Finish.ERROR, now, misfit)
        return not misfit

    def _end(self, req: CoreRequest, reason: Finish, now: float, error: str = "") -> None:
        if self.migrations.cancel(req, reason, error):
            return  # in no core (its last KV copy in flight): it ends once adopted
        inst = self.instances[req.instance]
        if inst.core.finish(req, reason, now, error):
            inst.wake.set()

    def _on_finish(self, req: CoreRequest) -> None:
        """The core ended a request: tell the ingress of an abort or error (a stop condition
        travels with the request's last token) and log it."""
        self.requests.pop(req.req_id, None)
        self.predictor.learned()
        if self.groups is not None:
            self.groups.finished(time.monotonic(), req.prompt, req.out)
        self.migrations.ended(req, time.monotonic())
        if req.finish in (Finish.ABORT, Finish.ERROR):
            self.outputs.append(RequestOutput(req.req_id, [], WIRE_FINISH[req.finish],
                                              req.error, req.tag.error_code))
        timings = {k: round(v, 6) for k, v in req.timings().items()}
        log.info("request finished", req_id=req.req_id, finish=req.finish.name.lower(),
                 prompt_tokens=req.prompt, output_tokens=req.out, preemptions=req.preemptions,
                 instance=req.instance, **timings, **({"error": req.error} if req.error else {}),
                 **({"predicted_output": req.predicted_output}
                    if req.predicted_output is not None else {}),
                 **({"slo": req.slo.label, "slo_met": req.slo_met()} if req.slo else {}))

    def _on_release(self, req: CoreRequest) -> None:
        """The core took a request's blocks back (finished, or preempted for recompute)."""
        self._free_blocks(self.instances[req.instance], req.req_id)

    def _free_blocks(self, inst: ServedInstance, req_id: int) -> None:
        """A request's blocks on `inst` go back: the manager frees them with the next flush,
        the stages forget its table with the next StepPlan."""
        inst.to_release.append(req_id)
        self.kv_link.free(inst, req_id)

    def _assign_blocks(self, inst: ServedInstance, granted: dict[int, list[int]]) -> None:
        self.kv_link.assigned(inst, granted)

    def _send_to_stage(self, inst: ServedInstance, stage: int, msg) -> None:
        """A migration's message to a stage; a stage gone fails the copy by its silence."""
        try:
            self.endpoint.send_nowait(msg, inst.stage_identities[stage])
        except (KeyError, zmq.ZMQError) as e:
            log.warning("cannot reach a stage for a migration", instance=inst.index,
                        stage=stage, error=repr(e))

    # ---- stages ----------------------------------------------------------------------

    async def pool_ready(self, inst: ServedInstance) -> None:
        """Every stage of `inst` joined its first generation: its pool is created (the
        smallest stage's KV), and the requests that waited for it are checked and served."""
        num_blocks = min(inst.stage_blocks.values())
        if not await self.kv_link.init_pool(inst, num_blocks):
            return
        log.info("instance ready", instance=inst.index, kv_blocks=num_blocks,
                 kv_tokens=num_blocks * inst.core.block_size)
        now = time.monotonic()
        for req in list(inst.core.waiting):
            self._fits(inst, req, now)
        inst.wake.set()

    def _kv_rebuilt(self) -> None:
        """The kv-cache manager is back (restarted) with its pools rebuilt: what waited on it
        goes on, and an instance whose pool could not be created meanwhile gets it now."""
        self.metrics.restarts["kvcache"] += 1
        self.kv_link.flush(self.instances)
        for inst in self.instances:
            if len(inst.joined) == inst.core.depth and not inst.pool_ready:
                asyncio.create_task(self.pool_ready(inst))
            inst.wake.set()

    # ---- scheduling ---------------------------------------------------------------------

    async def _copy_deadlines(self) -> None:
        """A live copy whose stages stopped answering is aborted at its deadline (twice
        migration.timeout_s after its round went out) even while no micro-batch completes."""
        while True:
            await asyncio.sleep(self.cfg.migration.timeout_s / 2)
            self.migrations.check_copies(time.monotonic())

    async def _silent_stages(self) -> None:
        """A stage silent past deployment.dead_after_s is dead (Membership.check_silence),
        declared within an eighth of it: before its neighbours' group times out (a quarter
        past it), so that the death is the silent stage's, not a broken group's."""
        period = min(1.0, self.cfg.deployment.dead_after_s / 8)
        while True:
            await asyncio.sleep(period)
            self.membership.check_silence(time.monotonic())
            await self._flush_outputs()  # a give-up's failed requests

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
        now = time.monotonic()
        ready, detail = self.membership.health(self.kv_link.usable.is_set(), now)
        return StatusReply(call_id, ready, detail, self._stats(now))

    def _stats(self, now: float) -> ControllerStats:
        """Everything the controller measures (cumulative; common/stats) plus live state."""
        return self.metrics.snapshot(
            now, model=self.model_name, policy=self.cfg.scheduler.policy,
            pipeline_depth=self.cfg.deployment.stages,
            instances=[i.stats() for i in self.instances],
            kv_lease_waits=self.kv_link.lease_waits)


async def until_connected(rpc, tasks: dict[str, asyncio.Task]) -> None:
    """Returns once the RpcClient's peer is connected; raises as until_one_ends does if one of
    the tasks (its watch among them) ends first."""
    connected = asyncio.create_task(rpc.connected.wait())
    await asyncio.wait({connected, *tasks.values()}, return_when=asyncio.FIRST_COMPLETED)
    if not connected.done():
        connected.cancel()
        await until_one_ends(tasks)


async def run(cfg: ConveyorConfig) -> None:
    await Controller(cfg).serve()
