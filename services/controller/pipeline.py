"""The controller's side of each instance's pipeline: micro-batches out, their completions in.

Per instance, a scheduling task (`schedule_loop`) keeps up to `max_inflight` micro-batches in
the pipeline: whenever one completes or requests arrive it asks the instance core for the next
plan, draws its blocks from the lease (topping the lease up from the kv-cache manager when a
plan needs more) and sends the plan to every stage at once (the stages prepare their inputs
while earlier stages still compute, as gLLM does). Each stage's StepDone comes back through
`step_done`: the stage feedback, the requests a stage failed alone, and on the last stage the
sampled tokens, which go to the ingress.
"""

from __future__ import annotations

import time
from dataclasses import asdict

import zmq

from common.costmodel import BatchShape
from common.instance import CoreBatch, CoreRequest, Finish
from common.log import debug_enabled, get_logger
from common.scheduling.types import MicroBatchPlan
from common.wire.internal_messages import FinishReason, RequestOutput, StepDone
from services.controller.instance import ServedInstance

log = get_logger()
WIRE_FINISH = {f: FinishReason[f.name] for f in Finish}


class PipelineDriver:
    def __init__(self, ctl):
        self.ctl = ctl
        """The Controller: its instances, endpoint, kv link, membership, migrations, outputs
        and _end."""

    # ---- completions ---------------------------------------------------------------------

    def step_done(self, msg: StepDone) -> None:
        """A StepDone from a registered stage (the controller's handle checked the sender:
        peers.from_stage)."""
        ctl = self.ctl
        ctl.metrics.record_step(msg.instance, msg.stage, msg.compute_s, msg.wait_s)
        if debug_enabled():
            log.debug("step done", instance=msg.instance, stage=msg.stage, mb_id=msg.mb_id,
                      compute_s=round(msg.compute_s, 6), wait_s=round(msg.wait_s, 6))
        inst = ctl.instances[msg.instance]
        core = inst.core
        core.stage_done(msg.mb_id, msg.stage, msg.compute_s, msg.wait_s)  # the stage feedback
        batch = core.inflight.get(msg.mb_id)
        if msg.error:
            log.error("stage failed a micro-batch", instance=msg.instance, stage=msg.stage,
                      mb_id=msg.mb_id, error=msg.error)
        now = time.monotonic()
        inst.liveness.answered(msg.stage, now)
        if msg.failed and batch is not None:  # only these requests fail; the batch goes on
            self._fail_alone(batch, msg, now)
        if msg.stage != core.depth - 1:
            if msg.error and batch is not None:  # the micro-batch is lost: fail its requests
                for req in batch.requests:
                    ctl._end(req, Finish.ERROR, now, f"stage {msg.stage}: {msg.error}")
            return
        if batch is None:
            log.warning("completion of an unknown micro-batch", mb_id=msg.mb_id)
            return
        if msg.error or len(msg.sampled) != len(batch.sampling):
            error = msg.error or f"stage returned {len(msg.sampled)} tokens for " \
                                 f"{len(batch.sampling)} sequences"
            core.fail_batch(msg.mb_id, error, now)
        else:
            live = [r for r in batch.sampling if not r.finished]
            core.complete(msg.mb_id, msg.sampled, now)
            for req in live:
                ctl.outputs.append(RequestOutput(req.req_id, [req.output_token_ids[-1]],
                                                  WIRE_FINISH[req.finish]))
                ctl.migrations.took_token(req, now)
            # Between micro-batches, before this instance schedules again: this batch's
            # requests hold no token in flight, so they may move.
            if ctl.groups is not None:
                ctl.groups.tick(now)
            ctl.migrations.round(now)
        inst.wake.set()

    def _fail_alone(self, batch: CoreBatch, msg: StepDone, now: float) -> None:
        """The requests a stage could not run end with its error; their slots in the batch
        (zeros downstream, a placeholder token at the end) are dropped with them."""
        mine = {r.req_id: r for r in batch.requests}
        for req_id, error in msg.failed.items():
            req = mine.get(req_id)
            if req is None:
                log.warning("a stage failed a request that is not in the micro-batch",
                            instance=msg.instance, stage=msg.stage, mb_id=msg.mb_id,
                            req_id=req_id)
            elif not req.finished:
                log.error("a stage failed one request of a micro-batch", req_id=req_id,
                          instance=msg.instance, stage=msg.stage, mb_id=msg.mb_id,
                          error=error)
                self.ctl._end(req, Finish.ERROR, now, f"stage {msg.stage}: {error}")

    # ---- dispatch -------------------------------------------------------------------------

    async def schedule_loop(self, inst: ServedInstance) -> None:
        ctl = self.ctl
        while True:
            await inst.wake.wait()
            inst.wake.clear()
            plan = None
            try:
                while inst.ready:
                    plan = inst.core.next_plan(inst.policy, time.monotonic())
                    ctl.kv_link.flush([])  # a preemption's frees reach the manager first
                    if plan is None or not await self._dispatch(inst, plan):
                        break
                    plan = None
            except Exception as e:  # never let the instance's only scheduler die silently
                log.exception("scheduling failed", instance=inst.index)
                self._fail_plan(inst, plan, f"the controller could not schedule it: {e}")
                ctl.kv_link.flush(ctl.instances)
                await ctl._flush_outputs()
                inst.wake.set()

    def _fail_plan(self, inst: ServedInstance, plan: MicroBatchPlan | None, error: str) -> None:
        now = time.monotonic()
        for c in plan.chunks if plan is not None else ():
            req = inst.core.by_id.get(c.req_id)
            if req is not None:
                self.ctl._end(req, Finish.ERROR, now, error)

    async def _dispatch(self, inst: ServedInstance, plan: MicroBatchPlan) -> bool:
        ctl = self.ctl
        core = inst.core
        wants = core.block_wants(plan)
        need = sum(n for _, n in wants)
        if need > len(inst.lease):  # rare: the plan counts blocks freed a moment ago
            if not await ctl.kv_link.top_up_for(inst, need):
                return False
            # Requests may have ended while we waited: drop their chunks.
            plan = MicroBatchPlan(tuple(c for c in plan.chunks
                                        if not _ended(core.by_id.get(c.req_id))))
            if not plan.chunks:
                return True
            wants = core.block_wants(plan)
        granted = inst.draw(wants)  # no round trip: the manager learns of it afterwards
        batch = core.commit(plan, time.monotonic(), inst.policy)
        ctl.kv_link.assigned(inst, granted)
        first, rest = inst.step_plans(batch, granted)
        if debug_enabled():  # the micro-batch's shape, for scripts/step_timeline.py
            shape = BatchShape.of_chunks(((c.start, c.num_new) for c in first.chunks),
                                         len(batch.sampling))
            log.debug("dispatched", instance=inst.index, mb_id=first.mb_id,
                      requests=len(batch.chunks), **asdict(shape))
        for stage, identity in sorted(inst.stage_identities.items()):
            try:
                await ctl.endpoint.send(first if stage == 0 else rest, identity)
            except zmq.ZMQError:  # gone: its death ends the generation, the batch with it
                ctl.membership.unreachable(inst, stage)
                return False
        return True


def _ended(req: CoreRequest | None) -> bool:
    return req is None or req.finished
