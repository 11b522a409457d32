"""Who is in the deployment, as the controller sees it: the ingress, each instance's stages and
the generation of the instance's torch.distributed group they are in; and what happens when a
stage dies.

A stage says Hello once it has loaded and warmed up; the controller answers JoinPipeline with
the instance's current generation, and the instance serves once every stage has reported
PipelineJoined for it (its pool is created the first time). A stage of the instance dying
ends the generation: the controller learns of it from the stage's dropped connection (a
Probe to each registered stage fails at once for a routing identity that is gone), from a
survivor whose send or receive broke (StepDone with `pipeline_lost`), or from the Hello of its
restarted process, whichever comes first; a stage that leaves a micro-batch unanswered for
`deployment.dead_after_s` is treated as dead the same way (`check_silence`). It then re-queues
the instance's requests for recompute, keeping their tokens (InstanceCore.reset_pipeline),
moving them to a ready instance when there is one (`deployment.move_on_recovery`), and tells
the stages still there to join a new generation, which the dead stage's successor joins once
it says Hello. No stage but the dead one restarts, whatever restarts it (`conveyor serve`,
systemd, supervisord): the survivors keep their weights and rejoin in-process.

A stage that dies more than `deployment.stage_restarts` times within `restart_window_s` is
given up on: every request of its instance fails with an error naming it, new requests go to
the other instances (or fail at once, naming it, when none is left), and health says so. The
instance comes back if every stage joins a generation again and stays up for restart_window_s
(an operator restarted it).
"""

from __future__ import annotations

import asyncio
import time

import zmq

from common.instance import Finish
from common.log import get_logger
from common.wire.client_messages import ErrorCode
from common.wire.internal_messages import (FinishReason, Hello, JoinPipeline, PipelineJoined,
                                           Probe, RequestOutput, StepDone)
from services.controller.instance import ServedInstance

log = get_logger()
PROBE_AGAIN_S = 0.5
"""A dropped connection is probed for again this much later (in case the first probe ran
before ZeroMQ had forgotten the routing identity)."""


def next_generation(previous: int) -> int:
    """Generations grow, and a restarted controller's are new too (its wall clock in ms)."""
    return max(previous + 1, time.time_ns() // 1_000_000)


class Membership:
    def __init__(self, ctl):
        self.ctl = ctl
        """The Controller: its instances, socket, metrics, kv link, migrations and _end."""
        dep = ctl.cfg.deployment
        self.max_deaths, self.window_s = dep.stage_restarts, dep.restart_window_s

    # ---- hellos ------------------------------------------------------------------------

    def ingress_hello(self, msg: Hello, identity: bytes) -> None:
        ctl = self.ctl
        if ctl.ingress_identity is not None and not msg.again:
            ctl.metrics.restarts["ingress"] += 1
            if ctl.requests:
                # A new ingress process: the old one's clients were failed when it died, so
                # its requests serve nobody; they are aborted and their KV freed.
                log.warning("a new ingress connected: aborting the old one's requests",
                            requests=len(ctl.requests))
                now = time.monotonic()
                for req in list(ctl.requests.values()):
                    ctl._end(req, Finish.ABORT, now, "the ingress restarted")
        ctl.ingress_identity = identity
        log.info("ingress connected", again=msg.again)

    async def stage_hello(self, msg: Hello, identity: bytes) -> None:
        inst, s = self.ctl.instances[msg.instance], msg.stage
        known = s in inst.stage_identities
        inst.stage_identities[s] = identity
        inst.stage_blocks[s] = msg.kv_blocks
        inst.kv_endpoints.pop(s, None)  # its successor's KVEndpoint follows
        log.info("stage registered", instance=inst.index, stage=s, kv_blocks=msg.kv_blocks,
                 again=msg.again, **msg.detail)
        if known and not msg.again:
            self.ctl.metrics.restarts["stage"] += 1
        if inst.pool_ready and msg.kv_blocks < inst.core.total_blocks:
            inst.gone.add(s)  # not told to join: the pool's block ids do not fit its cache
            self._give_up(inst, f"stage {inst.index}.{s} came back holding {msg.kv_blocks} KV "
                                f"blocks, fewer than the pool's {inst.core.total_blocks}")
            return
        if known and not msg.again and s not in inst.gone:
            self._died(inst, s, "it restarted")  # unseen so far: this hello is the news
        inst.gone.discard(s)
        inst.silent.discard(s)
        if inst.generation and inst.told.get(s) == inst.generation:
            # This stage's previous process was in (or joining) the current generation.
            self._regroup(inst, f"stage {inst.index}.{s} said hello again")
        elif inst.generation:
            self._tell(inst, s)
        else:
            inst.generation = next_generation(0)
            self._tell(inst, s)

    # ---- generations -------------------------------------------------------------------

    async def joined(self, msg: PipelineJoined) -> None:
        inst = self.ctl.instances[msg.instance]
        if msg.generation != inst.generation:
            return  # an older generation's, overtaken meanwhile
        inst.joined.add(msg.stage)
        if len(inst.joined) < inst.core.depth:
            return
        log.info("pipeline formed", instance=inst.index, generation=inst.generation)
        if inst.given_up:
            self._revive_later(inst)
        elif not inst.pool_ready:
            await self.ctl.pool_ready(inst)
        else:
            log.info("instance serving again", instance=inst.index,
                     waiting=len(inst.core.waiting))
            inst.wake.set()

    def _revive_later(self, inst: ServedInstance) -> None:
        """A given-up instance whose stages all joined again (restarted by an operator, or by
        a service manager that kept trying) serves again once restart_window_s has passed
        since its last death with the same generation formed: a stage still crash-looping
        dies again first."""
        last = max((t for times in inst.deaths.values() for t in times), default=0.0)
        generation = inst.generation

        def revive() -> None:
            if inst.generation == generation and inst.given_up:
                log.warning("instance serving again after it was given up",
                            instance=inst.index, was=inst.given_up)
                inst.given_up = ""
                if not inst.pool_ready:  # given up before it ever served
                    asyncio.create_task(self.ctl.pool_ready(inst))
                inst.wake.set()

        delay = max(0.0, last + self.window_s - time.monotonic())
        asyncio.get_running_loop().call_later(delay, revive)

    def step_lost(self, msg: StepDone) -> None:
        """A stage's group broke under a micro-batch (a neighbour died)."""
        inst = self.ctl.instances[msg.instance]
        if msg.generation and msg.generation == inst.generation:
            self._regroup(inst, f"stage {inst.index}.{msg.stage}: {msg.error}")

    def _tell(self, inst: ServedInstance, stage: int) -> bool:
        """JoinPipeline to one stage; False if it is gone."""
        try:
            self.ctl.endpoint.send_nowait(JoinPipeline(inst.generation),
                                          inst.stage_identities[stage])
        except zmq.ZMQError:
            return False
        inst.told[stage] = inst.generation
        return True

    def _regroup(self, inst: ServedInstance, why: str, recovering: bool = True) -> None:
        """The instance's generation is over: its requests wait for recompute and its
        stages still there are told to join the next one."""
        ctl, now = self.ctl, time.monotonic()
        requeued = inst.core.reset_pipeline(now)
        ctl.migrations.pipeline_lost(inst, now)
        inst.liveness = inst.liveness.fresh()
        if recovering:
            ctl.metrics.pipeline_recoveries += 1
            ctl.metrics.requests_recovered += requeued
        inst.generation = next_generation(inst.generation)
        inst.joined.clear()
        log.warning("recovering the instance: its stages join a new generation",
                    instance=inst.index, why=why, generation=inst.generation,
                    requests_requeued=requeued)
        if recovering and ctl.cfg.deployment.move_on_recovery:
            moved = ctl.migrations.rehome(inst, now)
            if moved:
                log.info("requests of the recovering instance moved to ready ones",
                         instance=inst.index, moved=moved)
        ctl.kv_link.flush(ctl.instances)  # the requeued requests' blocks go back
        beyond = ""
        for s in sorted(inst.stage_identities):
            if s not in inst.gone and not self._tell(inst, s):
                inst.told.pop(s, None)
                beyond = self._count_death(inst, s, "its connection dropped") or beyond
        if beyond and not inst.given_up:
            self._give_up(inst, beyond)

    # ---- deaths ------------------------------------------------------------------------

    def probe(self, again: bool = True) -> None:
        """Some connection to the controller dropped: which stage's? A send to a routing
        identity that is gone fails at once."""
        for inst in self.ctl.instances:
            for s, identity in sorted(inst.stage_identities.items()):
                if s in inst.gone:
                    continue
                try:
                    self.ctl.endpoint.send_nowait(Probe(), identity)
                except zmq.ZMQError:
                    self._died(inst, s, "its connection dropped")
        if again:
            asyncio.get_running_loop().call_later(PROBE_AGAIN_S, self.probe, False)

    def check_silence(self, now: float) -> None:
        """A stage that has left a micro-batch unanswered past deployment.dead_after_s is dead
        to its instance, whatever its process does: stopped, wedged in a kernel, or cut off
        on a host that closed nothing. Its neighbours blocked on it are freed by their group's
        timeout (a quarter later), and the stage itself, if it ever runs on, either exits
        (services/stage/watchdog.py) or answers and is told to rejoin (`heard`)."""
        for inst in self.ctl.instances:
            found = inst.liveness.silent(inst.core.inflight.values(), now)
            if found is not None and found[0] not in inst.gone:
                stage, waited = found
                self.ctl.metrics.stages_silent += 1
                inst.silent.add(stage)
                self._died(inst, stage, f"it answered no micro-batch for {waited:.1f}s "
                                        f"(deployment.dead_after_s = "
                                        f"{inst.liveness.dead_after_s:g})")

    def heard(self, inst: ServedInstance, stage: int) -> None:
        """A message from a stage counted dead while its process lived on (it was silent, then
        ran on): it is back, and joins the current generation like a successor would."""
        if stage in inst.silent and stage in inst.gone and not inst.given_up \
                and self._tell(inst, stage):
            inst.gone.discard(stage)
            inst.silent.discard(stage)
            log.warning("a stage counted dead answered again: it rejoins", instance=inst.index,
                        stage=stage, generation=inst.generation)

    def unreachable(self, inst: ServedInstance, stage: int) -> None:
        """A send to a registered stage failed: it is gone."""
        if stage not in inst.gone:
            self._died(inst, stage, "it could not be reached")

    def _died(self, inst: ServedInstance, stage: int, why: str) -> None:
        member = inst.generation != 0 and inst.told.pop(stage, None) == inst.generation
        beyond = self._count_death(inst, stage, why)
        if beyond:
            self._give_up(inst, beyond)
        elif member:  # it was in (or joining) the current generation: that one is over
            self._regroup(inst, f"stage {inst.index}.{stage} died: {why}")

    def _count_death(self, inst: ServedInstance, stage: int, why: str) -> str:
        """Counts a death; returns why the instance is to be given up ("" if not yet)."""
        now = time.monotonic()
        inst.gone.add(stage)
        deaths = [t for t in inst.deaths.get(stage, []) if now - t < self.window_s] + [now]
        inst.deaths[stage] = deaths
        log.error("stage died", instance=inst.index, stage=stage, why=why,
                  deaths_in_window=len(deaths), window_s=self.window_s)
        if len(deaths) <= self.max_deaths:
            return ""
        return (f"stage {inst.index}.{stage} keeps dying ({len(deaths)} deaths in "
                f"{self.window_s:g}s, deployment.stage_restarts = {self.max_deaths})")

    def _give_up(self, inst: ServedInstance, why: str) -> None:
        """Every request of the instance fails naming the cause, and it takes no new ones; its
        stages still there wait in a new generation for a successor (an operator's restart)."""
        ctl, now = self.ctl, time.monotonic()
        if not inst.given_up:
            ctl.metrics.instances_given_up += 1
        inst.given_up = f"{why}: instance {inst.index} is given up"
        log.error("giving up on an instance", instance=inst.index, why=why)
        self._regroup(inst, why, recovering=False)
        for req in list(inst.core.by_id.values()):
            req.tag.error_code = ErrorCode.INTERNAL
            ctl._end(req, Finish.ERROR, now, inst.given_up)
        ctl.kv_link.flush(ctl.instances)

    # ---- routing and health ------------------------------------------------------------

    def routable(self) -> list[bool]:
        """Which instances a new request may go to: the ready ones, or while none is, those
        not given up (they are starting or recovering)."""
        ready = [i.ready for i in self.ctl.instances]
        return ready if any(ready) else [not i.given_up for i in self.ctl.instances]

    def refuse_if_given_up(self, inst: ServedInstance, req_id: int) -> bool:
        if inst.given_up:
            self.ctl.outputs.append(RequestOutput(req_id, [], FinishReason.ERROR,
                                                  inst.given_up, ErrorCode.INTERNAL))
        return bool(inst.given_up)

    def health(self, kv_usable: bool, now: float) -> tuple[bool, str]:
        """(ready, detail): ready when every instance serves and no micro-batch is overdue;
        an instance given up on while another serves is named in the detail but does not
        make the deployment unready (it serves, on the others)."""
        instances = self.ctl.instances
        serving = any(i.ready for i in instances)
        problems, notes = [], []
        for inst in instances:
            why = self.problem(inst)
            if why:
                (notes if inst.given_up and serving else problems).append(why)
        if not kv_usable:
            problems.append("the kv-cache manager is away (its pools are rebuilt when it is "
                            "back)")
        problems += [f"degraded: instance {i.index}: {why}" for i in instances
                     if i.ready and (why := i.liveness.overdue(i.core.inflight.values(), now))]
        return not problems, "; ".join(problems) or "; ".join(["ready", *notes])

    @staticmethod
    def problem(inst: ServedInstance) -> str:
        """Why an instance is not ready ("" when it is)."""
        if inst.given_up:
            return f"instance {inst.index}: {inst.given_up}"
        registered = len(inst.stage_identities) - len(inst.gone)
        if registered < inst.core.depth:
            return f"instance {inst.index}: {registered}/{inst.core.depth} stages"
        if len(inst.joined) < inst.core.depth:
            return (f"instance {inst.index}: {len(inst.joined)}/{inst.core.depth} stages in "
                    f"pipeline generation {inst.generation}")
        return "" if inst.pool_ready else f"instance {inst.index}: pool pending"
