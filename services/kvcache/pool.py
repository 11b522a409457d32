"""A paged KV block pool for one instance: the logical bookkeeping behind every stage's cache.

Every stage of an instance stores KV for the same tokens, so one block table per request serves
them all; the stages only ever see block ids handed out here (through the controller).
"""

from __future__ import annotations


class PoolExhausted(Exception):
    pass


class BlockPool:
    def __init__(self, num_blocks: int, block_size: int):
        if num_blocks < 1:
            raise ValueError(f"a block pool needs at least one block, got {num_blocks}")
        if block_size < 1:
            raise ValueError(f"a block holds at least one token, got block_size={block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        # A stack: recently freed blocks are reused first, which keeps the working set warm.
        self._free: list[int] = list(range(num_blocks - 1, -1, -1))
        self._tables: dict[int, list[int]] = {}

    @property
    def free_blocks(self) -> int:
        return len(self._free)

    @property
    def num_requests(self) -> int:
        return len(self._tables)

    @property
    def utilization(self) -> float:
        return 1.0 - self.free_blocks / self.num_blocks

    def table(self, req_id: int) -> list[int]:
        return list(self._tables.get(req_id, ()))

    def allocate(self, wants: list[tuple[int, int]]) -> list[list[int]]:
        """Appends blocks to each request's table; all or nothing (raises PoolExhausted)."""
        needed = sum(n for _, n in wants)
        if any(n < 0 for _, n in wants):
            raise ValueError("cannot allocate a negative number of blocks")
        if needed > len(self._free):
            raise PoolExhausted(f"{needed} blocks wanted, {len(self._free)} free")
        granted = []
        for req_id, n in wants:
            blocks = [self._free.pop() for _ in range(n)]
            self._tables.setdefault(req_id, []).extend(blocks)
            granted.append(blocks)
        return granted

    def free(self, req_ids: list[int]) -> int:
        """Returns every block of these requests to the pool; unknown ids are ignored (a free
        may race with a request that never got blocks). Returns the number of blocks freed."""
        released = 0
        for req_id in req_ids:
            blocks = self._tables.pop(req_id, None)
            if blocks:
                self._free.extend(reversed(blocks))
                released += len(blocks)
        return released
