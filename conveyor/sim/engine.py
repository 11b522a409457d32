"""The event loop and the cluster driver.

`EventQueue` is a heap of (time, seq, handler, arg): events at the same time run in the order
they were pushed. The only events are micro-batch completions (pipeline.py explains why one per
micro-batch gives the same timings as one per stage; stages sharing a host's cores step stage by
stage, sharing.py). Request arrivals come from the workload,
already in time order, and the driver interleaves them: it runs every event up to a request's
arrival time (an arrival at the same time as a completion comes after it), routes the request,
and the instance's scheduling loop runs, as the controller's wakes on a submit. Requests
arriving at the very same instant (a burst; rate inf) are all queued first and the loop runs
once after them, as the controller reads the submits already waiting on its socket before its
scheduling task gets a turn.

Routing is the controller's (common/scheduling/routing.py): the instance with the least load
(tokens still to process, `Instance.load`, kept incrementally here), the lowest index on a
tie; round-robin; or CascadeInfer's length groups, routed by the request's length with its
output predicted first when a predictor runs (as the controller does). Length groups and
migration (cascade.py) run on one worker: the instances then interact beyond routing (requests
move between them, on a tick of their own).

Without them, instances interact only through routing. With `workers` > 1 the instances are
split between processes (forked), each running its instances' events; before every arrival each
process runs up to the arrival time and sends every other one its least-loaded instance (load,
index) over a pipe, so all agree on the winner, which takes the request. Results are identical
for any number of workers; the processes run in parallel between arrivals, so a burst (rate inf)
or sparse arrivals parallelize best.
"""

from __future__ import annotations

import heapq
import itertools
import math
import multiprocessing as mp
import os
import struct
import time
from collections.abc import Callable
from typing import Any

from common.instance.request import pool_misfit
from common.prediction.config import PredictorConfig, request_lengths
from common.scheduling.routing import arrival_length, make_router
from conveyor.sim.cluster import ClusterConfig
from conveyor.sim.pipeline import Pipeline, StepTimer
from conveyor.sim.results import SimResult, finalize, shard_results
from conveyor.sim.sharing import SharedHostPipeline
from conveyor.sim.requests import SimRequest
from conveyor.sim.state import SimInstance
from conveyor.sim.workload import Workload
from common.stats import ControllerMetrics


class EventQueue:
    """A heap of (time, seq, handler, arg); `handler(arg, time)` runs each event."""

    __slots__ = ("heap", "seq", "now", "processed")

    def __init__(self) -> None:
        self.heap: list[tuple[float, int, Callable[[Any, float], None], Any]] = []
        self.seq = 0
        self.now = 0.0
        self.processed = 0

    def push(self, t: float, handler: Callable[[Any, float], None], arg: Any = None) -> None:
        if t < self.now:
            raise ValueError(f"event at {t} is in the past (now {self.now})")
        heapq.heappush(self.heap, (t, self.seq, handler, arg))
        self.seq += 1

    def run_until(self, t: float) -> None:
        """Runs every event with time <= t (including those they push), in order."""
        heap = self.heap
        pop = heapq.heappop
        n = 0
        while heap and heap[0][0] <= t:
            when, _, handler, arg = pop(heap)
            self.now = when
            handler(arg, when)
            n += 1
        self.processed += n
        if t > self.now and not math.isinf(t):
            self.now = t

    def run(self) -> None:
        self.run_until(math.inf)

    def __len__(self) -> int:
        return len(self.heap)


# ---- one process's share of the cluster ---------------------------------------------------------

class Shard:
    """Instances `indices` of the cluster with their event queue, step timer and metrics."""

    def __init__(self, cfg: ClusterConfig, cost: Any, indices: list[int],
                 workload: Workload | None = None):
        self.cfg = cfg
        self.queue = EventQueue()
        self.timer = StepTimer.for_cluster(cfg, cost, indices[0] if indices else 0)
        self.metrics = ControllerMetrics(started=0.0, num_instances=cfg.instances)
        self.instances = [SimInstance(i, cfg, cfg.make_policy(), self.timer,
                                      self._pipeline(cfg), self.metrics, self.queue.push,
                                      cfg.sample_points) for i in indices]
        self.by_index = {inst.index: inst for inst in self.instances}
        # One predictor for the shard's instances: each learns from every request the shard
        # finishes at EOS, and only once it has finished (the policies never see true lengths).
        pc = cfg.predictor or PredictorConfig()
        lengths = request_lengths(pc, cfg.prediction_mode(), pc.state_file)
        for inst in self.instances:
            inst.lengths = lengths
        self.lengths = lengths
        self.cascade = None
        """Length groups and migration (cascade.py): the whole cluster in this one shard."""
        if cfg.uses_cascade:
            from conveyor.sim.cascade import SimCascade

            self.cascade = SimCascade(cfg, cost, self.instances, self.queue.push, workload,
                                      self.metrics)

    def _pipeline(self, cfg: ClusterConfig) -> Pipeline | SharedHostPipeline:
        if cfg.host_cores > 0 and cfg.num_stages > 1 and (cfg.host_cores < cfg.num_stages
                                                          or cfg.corun_slows):
            return SharedHostPipeline(cfg.num_stages, cfg.host_cores, self.queue.push)
        return Pipeline(cfg.num_stages, self.queue.push)


def _done(finished: Any) -> int:
    """Requests served to the end (at EOS or at their cap)."""
    return finished["length"] + finished["stop"]


# ---- the driver ---------------------------------------------------------------------------------

def make_request(cfg: ClusterConfig, index: int, arrival: float, prompt: int, output: int,
                 max_tokens: int | None = None, slo: Any = None, oracle: bool = False
                 ) -> SimRequest:
    """A request as the ingress and controller take it. `output` is where it truly ends (its
    EOS); `max_tokens` the client's cap, None for bench's default (the output length, EOS
    ignored). The cap is clamped to the context left; requests that cannot run are failed up
    front (prompt beyond the context, or more KV than the whole pool)."""
    output = max(1, int(output))
    prompt = int(prompt)
    ignore_eos = max_tokens is None
    cap = output if ignore_eos else max(1, int(max_tokens))
    cap = max(min(cap, cfg.max_model_len - prompt), 1)
    req = SimRequest(index + 1, index, float(arrival), prompt, cap, output, cfg.max_model_len,
                     ignore_eos, slo)
    if oracle:  # the ablation that shows what prediction costs: policies see the truth
        req.predicted_output = req.predicted_high = output
    if prompt < 1:
        req.error = "empty prompt"
    elif prompt >= cfg.max_model_len:
        req.error = (f"prompt of {prompt} tokens leaves no room in the context "
                     f"(max_model_len {cfg.max_model_len})")
    else:
        req.error = pool_misfit(prompt, req.max_tokens, cfg.block_size, cfg.num_blocks)
    return req


ProgressFn = Callable[[float, int, int, int], None]
"""progress(simulated seconds, requests arrived, requests finished, total)."""

_MSG = struct.Struct("qqq")  # least load, its instance, requests finished


def _partition(num_instances: int, workers: int, w: int) -> list[int]:
    lo = num_instances * w // workers
    hi = num_instances * (w + 1) // workers
    return list(range(lo, hi))


def _run_part(cfg: ClusterConfig, cost: Any, workload: Workload, w: int, workers: int,
              links: list[tuple[int, int]], progress: ProgressFn | None,
              progress_every_s: float) -> tuple[dict[str, Any], list[SimRequest]]:
    """Worker `w` of `workers`: runs its instances' events and takes the arrivals routed to
    them. `links` are (read fd, write fd) pipes to every other worker, over which the workers
    agree on the least-loaded instance before each arrival."""
    shard = Shard(cfg, cost, _partition(cfg.instances, workers, w), workload)
    owned = set(shard.by_index)
    instances = shard.instances
    metrics = shard.metrics
    finished = metrics.finished
    requests: list[SimRequest] = []
    cascade = shard.cascade
    router = cascade.router if cascade is not None and cascade.router else \
        make_router(cfg.routing)
    lengths = shard.lengths
    all_instances = [0] * cfg.instances
    advance = shard.queue.run_until
    pack, unpack, size = _MSG.pack, _MSG.unpack, _MSG.size
    write, read = os.write, os.read
    n = len(workload)
    clock = time.perf_counter
    next_report = clock() + progress_every_s
    others_done = 0
    touched: list[SimInstance] = []  # got requests at instant `touched_t`, to schedule
    touched_t = 0.0
    ingress_s = cfg.ingress_s
    ingress_free = 0.0
    caps = workload.max_tokens or itertools.repeat(None)
    oracle = cfg.prediction_mode() == "oracle"
    for i, (sent, p, o, cap) in enumerate(zip(workload.arrival_s, workload.prompt_len,
                                              workload.output_len, caps)):
        # The controller gets the request once the ingress, one request at a time, is done
        # with it; its latencies still count from `sent`.
        if ingress_s:
            t = ingress_free = (sent if sent > ingress_free else ingress_free) + ingress_s
        else:
            t = sent
        if touched and t > touched_t:
            for inst in touched:
                inst.schedule(touched_t)
            touched.clear()
        advance(t)
        req = make_request(cfg, i, sent, p, o, cap, workload.slo_of(i), oracle)
        if req.error:
            if w == 0:
                requests.append(req)
                metrics.finished["error"] += 1
            continue
        if router.reads_length:  # one worker (simulate): predicted, then routed by length
            if lengths is not None:
                lengths.admit(req)
            target = router.route([inst.load for inst in instances], None,
                                  arrival_length(req.prompt, req.predicted_output,
                                                 req.max_tokens))
        elif not router.reads_loads:  # every worker sees every arrival: all agree
            target = router.route(all_instances)
        else:
            local = router.route([inst.load for inst in instances]) if instances else -1
            load, target = ((instances[local].load, instances[local].index) if local >= 0
                            else (1 << 62, 1 << 62))
            if links:  # a decomposable router: pick among the workers' picks
                msg = pack(load, target, _done(finished))
                for _, wfd in links:
                    write(wfd, msg)
                others_done = 0
                picks = [(target, load)] if local >= 0 else []
                for rfd, _ in links:
                    data = read(rfd, size)
                    if len(data) != size:
                        raise RuntimeError("a simulation worker stopped")
                    other = unpack(data)
                    others_done += other[2]
                    if other[1] != 1 << 62:
                        picks.append((other[1], other[0]))
                picks.sort()
                target = picks[router.route([p[1] for p in picks])][0]
        if target in owned:
            metrics.prompt_tokens += req.prompt
            requests.append(req)
            inst = shard.by_index[target]
            inst.add(req, t, schedule=False)
            touched_t = t
            if inst not in touched:
                touched.append(inst)
            if cascade is not None:
                cascade.arrived(t, target, req.prompt + req.max_tokens)
        if progress is not None and (i & 127) == 0:
            now = clock()
            if now >= next_report:
                next_report = now + progress_every_s
                progress(t, i + 1, _done(finished) + others_done, n)
    for inst in touched:
        inst.schedule(touched_t)
    shard.queue.run()
    for inst in instances:
        inst.close_gauges(shard.queue.now)
    if progress is not None:  # the other workers may still be draining theirs
        progress(shard.queue.now, n, _done(finished) + others_done, n)
    return shard_results(shard), requests


def simulate(cfg: ClusterConfig, cost: Any, workload: Workload, workers: int = 1,
             progress: ProgressFn | None = None, progress_every_s: float = 0.5) -> SimResult:
    """Runs `workload` on the cluster `cfg` with stage times from `cost`, on `workers`
    processes (0: one per CPU core, at most 8; results do not depend on the count)."""
    if workers <= 0:
        workers = min(os.cpu_count() or 1, 8)
    workers = max(1, min(int(workers), cfg.instances))
    if workers > 1 and cfg.uses_cascade:
        raise ValueError("length groups and migration move requests between instances: "
                         "simulate them with one worker")
    router = None if cfg.routing == "length-groups" else make_router(cfg.routing)
    if workers > 1 and router.reads_loads and not router.decomposable:
        raise ValueError(f"router {router.name!r} weighs every instance's load at once: "
                         f"simulate it with one worker")
    if workers > 1 and "fork" not in mp.get_all_start_methods():
        workers = 1
    t0 = time.perf_counter()
    if workers == 1:
        part, requests = _run_part(cfg, cost, workload, 0, 1, [], progress, progress_every_s)
        return finalize(cfg, requests, [part], time.perf_counter() - t0, 1)
    return _simulate_forked(cfg, cost, workload, workers, progress, progress_every_s, t0)


def _simulate_forked(cfg: ClusterConfig, cost: Any, workload: Workload, workers: int,
                     progress: ProgressFn | None, progress_every_s: float,
                     t0: float) -> SimResult:
    ctx = mp.get_context("fork")
    # pipes[a][b]: a writes, b reads
    pipes = {(a, b): os.pipe() for a in range(workers) for b in range(workers) if a != b}

    def links_of(w: int) -> list[tuple[int, int]]:
        return [(pipes[(o, w)][0], pipes[(w, o)][1]) for o in range(workers) if o != w]

    def close_others(w: int) -> None:
        mine = {fd for pair in links_of(w) for fd in pair}
        for r, wr in pipes.values():
            for fd in (r, wr):
                if fd not in mine:
                    os.close(fd)

    procs, conns = [], []
    try:
        for w in range(1, workers):
            parent_end, child_end = ctx.Pipe(duplex=False)
            proc = ctx.Process(target=_child_main, daemon=True,
                               args=(child_end, cfg, cost, workload, w, workers, links_of,
                                     close_others))
            proc.start()
            child_end.close()
            procs.append(proc)
            conns.append(parent_end)
        close_others(0)
        try:
            part, requests = _run_part(cfg, cost, workload, 0, workers, links_of(0), progress,
                                       progress_every_s)
        finally:
            for fd in {fd for pair in links_of(0) for fd in pair}:
                os.close(fd)
        parts = [part]
        for conn in conns:
            kind, payload = conn.recv()
            if kind == "error":
                raise RuntimeError(f"a simulation worker failed:\n{payload}")
            parts.append(payload[0])
            requests += payload[1]
    except (EOFError, OSError) as e:
        raise RuntimeError(f"a simulation worker died: {e}") from None
    finally:
        for proc in procs:
            proc.join(timeout=5)
            if proc.is_alive():
                proc.terminate()
    return finalize(cfg, requests, parts, time.perf_counter() - t0, workers)


def _child_main(conn: Any, cfg: ClusterConfig, cost: Any, workload: Workload, w: int,
                workers: int, links_of: Callable, close_others: Callable) -> None:
    close_others(w)
    try:
        result = _run_part(cfg, cost, workload, w, workers, links_of(w), None, 0.5)
    except BaseException:  # report it; closing the pipes wakes the other workers
        import traceback

        for fd in {fd for pair in links_of(w) for fd in pair}:
            try:
                os.close(fd)
            except OSError:
                pass
        conn.send(("error", traceback.format_exc()))
        return
    conn.send(("ok", result))
