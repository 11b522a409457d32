"""The stage worker process: runs its layer slice on every micro-batch the controller plans.

A plain synchronous loop, on purpose: a stage does one thing at a time, in the order the
controller dispatched the micro-batches, which is also the order activations arrive in. The
plan arrives ahead of the activations, so a stage builds its inputs (positions, slot mapping,
block tables) while the previous stage is still computing, then blocks on the activations.

Its pipeline group is joined when the controller says which generation (JoinPipeline, after the
stage's Hello), and left when it breaks (a neighbour died: the micro-batch is reported lost,
not failed, and the controller re-queues the instance's requests) or when the connection to
the controller drops (a new controller knows nothing of the micro-batches in flight, so the
group's state is void; the stage says hello again once a controller is back). The process
itself lives on through both: only a dead stage is restarted (by `conveyor serve`, systemd or
supervisord), and the others rejoin with it.
"""

from __future__ import annotations

import os
import signal
import time
import traceback

import torch
import zmq

from common import sd_notify
from common.addresses import source_address_towards
from common.config import ConveyorConfig
from common.log import get_logger
from common.model import PagedKVCache, SeqSpec, StageModel, StepBatch, resolve_model
from common.model.decode_graphs import DecodeGraphs, graph_capture
from common.model.placement import deployment_layout
from common.peer_wait import is_handshake, wait_connected, watch_connection
from common.security import Security, stage_identity
from common.wire import ProtocolError, decode, encode
from common.wire.internal_messages import (Hello, JoinPipeline, KVEndpoint, KVMoved, MoveKV,
                                           PipelineJoined, Probe, StepDone, StepPlan)
from services.stage.devices import StagePlacement, place_stage
from services.stage.isolation import IsolatedStep
from services.stage.kv_mover import KVMover
from services.stage.transport import ActivationLink
from services.stage.watchdog import StepWatchdog

log = get_logger()
JOIN_POLL_MS = 50
"""While joining a generation: how often the stage looks whether its peers have all come."""


class StageWorker:
    def __init__(self, cfg: ConveyorConfig, instance: int, stage: int):
        self.cfg = cfg
        self.instance = instance
        self.stage = stage
        self.num_stages = cfg.deployment.stages
        src = resolve_model(cfg.model.source, cfg.model.load_format, cfg.model.tokenizer)
        self.shape = src.shape
        layout = deployment_layout(cfg, src.shape)
        self.layers = layout.bounds[stage]
        self.placement: StagePlacement = place_stage(cfg, instance, stage, layout)
        self.device, self.dtype = self.placement.device, self.placement.dtype
        self.is_first, self.is_last = stage == 0, stage == self.num_stages - 1
        t0 = time.perf_counter()
        self.model = StageModel.from_source(src, *self.layers, self.is_first, self.is_last,
                                            self.dtype, self.device, seed=cfg.model.seed,
                                            attention=cfg.model.attention)
        self.capture = graph_capture(cfg.model.cuda_graphs, self.model)  # None: no decode graphs
        self.graphs: DecodeGraphs | None = None  # built after the warm-up
        self.block_size = cfg.kvcache.block_size
        self.num_blocks = self.placement.kv_blocks(self.shape, self.layers, self.block_size)
        """The blocks reported to the controller; with decode graphs the cache holds one more,
        the scratch block their padding rows write to, which no request is ever given."""
        self.kv = PagedKVCache.for_stage(self.shape, self.layers[1] - self.layers[0],
                                         self.num_blocks + (self.capture is not None),
                                         self.block_size, self.dtype, self.device)
        log.info("model slice loaded", layers=f"{self.layers[0]}..{self.layers[1] - 1}",
                 device=str(self.device), dtype=str(self.dtype).removeprefix("torch."),
                 attention=type(self.model.attention).__name__,
                 cuda_graphs={None: "off", True: "on", False: "eager"}[self.capture],
                 kv_blocks=self.num_blocks, load_s=round(time.perf_counter() - t0, 2))
        ep = cfg.endpoints
        # The group's timeout frees a stage blocked on a neighbour the controller counts dead;
        # a quarter longer, so that the controller has counted the silent one dead first and
        # the report of the broken group names no one (services/stage/watchdog.py).
        dead_after_s = cfg.deployment.dead_after_s
        self.link = ActivationLink(stage, self.num_stages, *ep.rendezvous(instance),
                                   self.device, self.placement.shares_device,
                                   timeout_s=1.25 * dead_after_s if dead_after_s else 1800.0)
        self.watchdog = StepWatchdog.for_deployment(dead_after_s)
        self.tables: dict[int, list[int]] = {}
        self.ready_said = False
        mig = cfg.migration
        # The migration store listens where this stage's gloo does: the address its host
        # reaches the instance's rendezvous host from (loopback on one machine).
        self.mover = (KVMover(self.kv, instance, stage,
                              source_address_towards(ep.rendezvous(instance)[0]), mig.timeout_s)
                      if mig.enabled and mig.mode == "live" and cfg.deployment.instances > 1
                      else None)
        self.ctx = zmq.Context()  # its own, as every service's (never Context.instance())
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.ROUTING_ID, stage_identity(instance, stage))
        curve = Security.for_role(cfg, "stage").client("controller")
        if curve is not None:
            curve.apply(self.sock)
        self.controller_events = watch_connection(self.sock)  # before connect: none missed
        self.sock.connect(ep.controller)

    def warm_up(self) -> None:
        """One micro-batch of the largest size the controller plans (one prompt of the
        policy's largest prefill chunk, written to blocks no request holds yet), before this
        stage reports ready: the first big prefill of a fresh process ran up to 50% slower than
        later ones (allocator growth, first-touch memory, lazy kernel set-up on a GPU), and that
        cost belonged to the first requests' TTFT."""
        tokens = min(self.cfg.scheduler.build_policy().largest_prefill_chunk(),
                     self.cfg.model.max_model_len,
                     self.num_blocks * self.block_size)
        if tokens < 2:
            return
        t0 = time.perf_counter()
        table = list(range(-(-tokens // self.block_size)))
        batch = StepBatch.build([SeqSpec(0, tokens, table, True)], self.block_size, self.device)
        x = (torch.zeros(tokens, dtype=torch.long, device=self.device) if self.is_first else
             torch.zeros((tokens, self.shape.hidden_size), dtype=self.dtype, device=self.device))
        with torch.inference_mode():
            self.model(batch, self.kv, x)
            # Two decodes over that prompt's blocks: a compiling attention backend (flex)
            # builds its decode kernel now, not on the first request's first token.
            decodes = StepBatch.build([SeqSpec(tokens - 1, 1, table, True)] * 2,
                                      self.block_size, self.device)
            self.model(decodes, self.kv, x[:2])
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        log.info("warmed up", tokens=tokens, seconds=round(time.perf_counter() - t0, 3))

    def serve(self) -> None:
        self.warm_up()
        if self.capture is not None:  # after the warm-up, which compiled the kernels
            self.graphs = DecodeGraphs(self.model, self.kv, self.cfg.model.graph_sizes,
                                       self.capture)
        try:
            # Its hello would wait in the socket for a controller not up yet; say that it waits.
            wait_connected(self.controller_events, "controller", self.cfg.endpoints.controller)
            self._hello(again=False)
            log.info("stage registered; waiting for its pipeline generation",
                     controller=self.cfg.endpoints.controller)
            poller = zmq.Poller()
            poller.register(self.sock, zmq.POLLIN)
            poller.register(self.controller_events, zmq.POLLIN)
            if self.mover is not None:  # a KV copy round done in the background
                poller.register(self.mover.wake_r, zmq.POLLIN)
            while True:
                events = dict(poller.poll(JOIN_POLL_MS if self.link.target else None))
                if self.controller_events in events:
                    self._controller_connection()
                if self.mover is not None and self.mover.wake_r in events:
                    for done in self.mover.drain():
                        self.sock.send_multipart(encode(done))
                if self.sock in events:
                    self._handle()
                if self.link.target:
                    self._try_join()
        finally:
            if self.mover is not None:
                self.mover.close()
            self.link.close()
            self.sock.disable_monitor()
            self.controller_events.close(linger=0)
            self.sock.close(linger=0)
            self.ctx.term()

    def _hello(self, again: bool) -> None:
        detail = {"layers": list(self.layers), "device": str(self.device), "pid": os.getpid()}
        self.sock.send_multipart(encode(Hello("stage", self.instance, self.stage,
                                              self.num_blocks, detail, again)))
        if self.mover is not None:
            self.sock.send_multipart(encode(KVEndpoint(self.instance, self.stage,
                                                       self.mover.host, self.mover.port)))

    def _controller_connection(self) -> None:
        """The controller went away (its state, and the micro-batches it had in flight, with
        it: the group is left, so a neighbour blocked on a micro-batch this stage never got is
        freed) or came back (hello again: it knows nobody)."""
        if is_handshake(self.controller_events.recv_multipart()):
            log.info("controller back: registering again")
            self._hello(again=True)
            return
        log.warning("controller connection lost: leaving the pipeline group until it is back",
                    generation=self.link.generation or self.link.target)
        self.link.leave()
        self.tables.clear()

    def _try_join(self) -> None:
        try:
            joined = self.link.try_join()
        except Exception as e:  # a peer died meanwhile: the controller hands out another
            log.error("joining the pipeline failed; waiting for the next generation",
                      generation=self.link.target, error=repr(e))
            self.link.leave()
            return
        if joined:
            # Before the controller hears of it: once it does, the deployment may be ready,
            # and the service manager must have heard from this stage first (once).
            if not self.ready_said:
                sd_notify.ready(f"stage {self.instance}.{self.stage} warmed up and joined")
                self.ready_said = True
            self.sock.send_multipart(encode(PipelineJoined(self.instance, self.stage,
                                                           self.link.generation)))

    def _handle(self) -> None:
        try:
            msg = decode(self.sock.recv_multipart())
        except ProtocolError as e:
            log.error("dropped undecodable frame from the controller", error=str(e))
            return
        if isinstance(msg, StepPlan):
            self.watchdog.begin(msg.mb_id)
            try:
                done = (self.step(msg) if self.link.joined else
                        self._lost(msg, "this stage is in no pipeline group (it is being "
                                        "rebuilt)"))
            finally:
                self.watchdog.end()
            self.sock.send_multipart(encode(done))
        elif isinstance(msg, JoinPipeline):
            if msg.generation in (self.link.generation, self.link.target):
                return  # already in it (or joining): counting in twice would be wrong
            self.tables.clear()  # the controller re-queues every request: all start afresh
            self.link.start_join(msg.generation)
            self._try_join()
        elif isinstance(msg, MoveKV):
            if self.mover is not None:
                self.mover.submit(msg, self.tables)
            else:
                self.sock.send_multipart(encode(KVMoved(
                    msg.mig_id, self.instance, self.stage, msg.round, 0, 0.0,
                    "live migration is off on this stage")))
        elif not isinstance(msg, Probe):
            log.warning("unexpected message from the controller", type=type(msg).__name__)

    def _lost(self, plan: StepPlan, why: str, generation: int = 0) -> StepDone:
        return StepDone(plan.mb_id, self.instance, self.stage, 0.0, 0.0, [], why,
                        pipeline_lost=True, generation=generation)

    def step(self, plan: StepPlan) -> StepDone:
        t_start = time.perf_counter()
        error = ""
        work = None
        try:  # each chunk on its own: one that cannot be prepared fails alone (isolation.py)
            work = IsolatedStep.prepare(plan, self.tables, self.num_blocks, self.is_first,
                                        self.block_size, self.device)
        except Exception as e:  # a plan this stage cannot read at all
            error = f"bad plan: {e!r}"
        num_tokens = sum(c.num_new for c in plan.chunks)
        wait_s = 0.0
        generation = self.link.generation
        x = None
        if not self.is_first:
            t_wait = time.perf_counter()
            try:
                x = self.link.recv((num_tokens, self.shape.hidden_size), self.dtype)
            except RuntimeError as e:  # the previous stage is gone
                return self._broken(plan, generation, e)
            wait_s = time.perf_counter() - t_wait
        out, sampled = None, []
        if work is not None:
            try:
                with torch.inference_mode():
                    out, sampled = work.run(self._forward, x, self.is_first, self.is_last,
                                            self.shape.hidden_size, self.dtype)
            except Exception as e:
                error = f"{type(e).__name__}: {e}"
                log.error("micro-batch failed", mb_id=plan.mb_id,
                          traceback=traceback.format_exc())
            if work.failed:
                log.error("sequences failed alone; the rest of the micro-batch goes on",
                          mb_id=plan.mb_id, failed=work.failed)
        if not self.is_last:
            # Downstream stages wait for exactly one tensor per micro-batch; on failure they get
            # zeros and the controller, told of the error, discards the result.
            if out is None:
                out = torch.zeros((num_tokens, self.shape.hidden_size), dtype=self.dtype,
                                  device=self.device)
            try:
                self.link.send(out)
            except RuntimeError as e:  # the next stage is gone (an earlier send failed)
                return self._broken(plan, generation, e)
        elif self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        compute_s = time.perf_counter() - t_start - wait_s
        return StepDone(plan.mb_id, self.instance, self.stage, compute_s, wait_s,
                        sampled if not error else [], error,
                        failed=work.failed if work is not None and not error else {})

    def _forward(self, batch: StepBatch, x: torch.Tensor) -> torch.Tensor:
        """A decode-only step through its graph, any other eagerly. A captured graph's output
        is its own buffer, rewritten by the next replay: the last stage samples it at once
        (waiting for it), a send through the host copies it before returning, and a send
        over NCCL, which reads it later, gets a copy."""
        if self.graphs is None or self.graphs.size_for(batch) is None:
            return self.model(batch, self.kv, x)
        out = self.graphs.run(batch, x)
        over_nccl = not self.is_last and self.link.wire_device.type == "cuda"
        return out.clone() if self.capture and over_nccl else out

    def _broken(self, plan: StepPlan, generation: int, error: Exception) -> StepDone:
        """A neighbour died: the group is left, and the micro-batch reported lost with it (the
        controller takes the requests back and hands out the next generation)."""
        log.error("pipeline group broken: a neighbouring stage is gone", mb_id=plan.mb_id,
                  generation=generation, error=str(error).splitlines()[0][:300])
        self.link.leave()
        self.tables.clear()
        return self._lost(plan, f"the pipeline broke: {str(error).splitlines()[0][:200]}",
                          generation)


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def run(cfg: ConveyorConfig, instance: int, stage: int) -> None:
    # SIGTERM ends the loop through the same path as Ctrl-C, so the link and socket close.
    signal.signal(signal.SIGTERM, _interrupt)
    worker = StageWorker(cfg, instance, stage)
    try:
        worker.serve()
    except KeyboardInterrupt:
        pass
    peak = ({"peak_gib": round(torch.cuda.max_memory_allocated(worker.device) / 1024**3, 2)}
            if worker.device.type == "cuda" else {})
    graphs = worker.graphs
    replays = ({"graph_steps": graphs.replays, "graph_decodes": graphs.decodes,
                "graph_padding_rows": graphs.padding_rows} if graphs is not None else {})
    log.info("stopped", **peak, **replays)
