"""The controller's block lease against a real kv-cache manager over a real socket: the pool's
first lease, dispatches that draw without asking, the manager's books following the
assignments, frees flowing back and the lease topped up from them, and a plan that needs more
than the lease holds waiting for a top-up."""

from __future__ import annotations

import asyncio
import contextlib

import zmq

from common.scheduling import make_policy
from common.stats import ControllerMetrics
from common.zmq_io import Endpoint, make_context, stop_tasks
from services.controller.instance import ServedInstance
from services.controller.kv_link import KVLink
from services.kvcache.service import KVCacheManager


async def _until(predicate, timeout: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        assert asyncio.get_running_loop().time() < deadline, "timed out"
        await asyncio.sleep(0.01)


@contextlib.asynccontextmanager
async def _controller_and_manager(tmp_path, on_rebuilt=lambda: None):
    """A kv-cache manager serving on an ipc socket and the controller's side of it (KVLink
    with an 8-block lease, its reply reader and pool watch) for one 20-block instance;
    yields (address, manager, link, inst, tasks), and stops `tasks` and the socket after."""
    address = f"ipc://{tmp_path}/kvcache"
    manager = KVCacheManager(address)
    server = asyncio.create_task(manager.serve())
    ctx = make_context()
    kv = Endpoint(ctx, zmq.DEALER, connect=address, identity=b"controller")
    link = KVLink(kv, lease_blocks=8)

    async def replies():
        while True:
            link.rpc.dispatch(await kv.recv())

    inst = ServedInstance.create(0, 2, 2, 16, make_policy("fcfs"),
                                 ControllerMetrics(started=0.0), None, None)
    tasks = [asyncio.create_task(replies()), server,
             asyncio.create_task(link.watch([inst], on_rebuilt))]
    try:
        yield address, manager, link, inst, tasks
    finally:
        await stop_tasks(tasks)
        kv.close()
        ctx.destroy(linger=0)


async def test_the_lease_serves_dispatches_and_refills_from_frees(tmp_path):
    async with _controller_and_manager(tmp_path) as (_, manager, link, inst, _):
        assert await link.init_pool(inst, 20)
        pool = manager.pools[0]
        assert len(inst.lease) == 8 and pool.leased_blocks == 8 and pool.free_blocks == 20
        # A dispatch draws from the lease; the manager learns of it afterwards.
        granted = inst.draw([(1, 3), (2, 2)])
        link.assigned(inst, granted)
        inst.core.free_blocks -= 5  # what the core's commit does
        await _until(lambda: pool.num_requests == 2)
        assert pool.table(1) == granted[1] and pool.table(2) == granted[2]
        assert len(inst.lease) == 3 and not set(inst.lease) & {b for g in granted.values()
                                                               for b in g}
        # The lease is topped up from the manager's free blocks, to its target.
        link.flush([inst])
        await _until(lambda: len(inst.lease) == 8)
        assert pool.free_blocks == 15 and pool.leased_blocks == 8
        # Frees go back to the manager, and nothing more is leased past the target.
        link.free(inst, 1)
        inst.core.free_blocks += 3
        link.flush([inst])
        await _until(lambda: pool.table(1) == [])
        assert len(inst.lease) == 8 and pool.free_blocks == 18
        # A plan needing more than the lease waits for a top-up of what it lacks.
        assert await link.top_up_for(inst, 12)
        assert len(inst.lease) == 12 and link.lease_waits == 1
        # ...and is refused, with the books left alone, when the manager has too few.
        assert not await link.top_up_for(inst, 40)
        assert len(inst.lease) == 18 and pool.free_blocks == 18


async def test_a_restarted_manager_is_rebuilt_from_the_controllers_books(tmp_path):
    """The manager dies with requests holding blocks; one freed meanwhile. The new manager's
    pool is the controller's books: the live request's table, the lease, the rest free."""
    rebuilt = asyncio.Event()
    async with _controller_and_manager(tmp_path, rebuilt.set) as (address, manager, link, inst,
                                                                  tasks):
        assert await link.init_pool(inst, 20)
        granted = inst.draw([(1, 3), (2, 2)])
        link.assigned(inst, granted)
        inst.core.free_blocks -= 5
        await _until(lambda: manager.pools[0].num_requests == 2)
        await stop_tasks([tasks[1]])  # the manager's process ends: its socket closes
        await _until(lambda: not link.usable.is_set())
        link.free(inst, 2)  # request 2 ends while the manager is away
        inst.core.free_blocks += 2
        link.flush([])
        successor = KVCacheManager(address)
        tasks.append(asyncio.create_task(successor.serve()))
        await asyncio.wait_for(rebuilt.wait(), 10)
        pool = successor.pools[0]
        assert pool.table(1) == granted[1] and pool.table(2) == []
        assert pool.num_requests == 1 and sorted(pool._leased) == sorted(inst.lease)
        assert pool.free_blocks == 20 - 3
        # It serves on: a top-up comes from the rebuilt pool's free blocks.
        assert await link.top_up_for(inst, len(inst.lease) + 4)
        assert len(inst.lease) == 8 and pool.leased_blocks == 8  # topped up to its target
        assert not set(inst.lease) & set(granted[1])
