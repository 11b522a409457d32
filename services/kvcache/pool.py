"""A paged KV block pool for one instance: the logical bookkeeping behind every stage's cache.

Every stage of an instance stores KV for the same tokens, so one block table per request serves
them all; the stages only ever see block ids handed out here (through the controller). The
controller holds a lease of free blocks and assigns them to requests without asking (it tells
the pool afterwards), so a dispatch costs no round trip; freed blocks come back here, and the
controller's lease is topped up from them.
"""

from __future__ import annotations


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
        self._leased: set[int] = set()
        """Handed to the controller, not yet in any table: free, as far as stats go."""

    @classmethod
    def rebuilt(cls, num_blocks: int, block_size: int, tables: list[tuple[int, list[int]]],
                leased: list[int]) -> "BlockPool":
        """A pool as a controller's books describe it (a restarted manager): these tables and
        this lease held, every other block free. Raises ValueError for a block id out of range
        or held twice, and nothing is built."""
        pool = cls(num_blocks, block_size)
        held = [b for _, blocks in tables for b in blocks] + list(leased)
        if len(set(held)) != len(held) or any(not 0 <= b < num_blocks for b in held):
            raise ValueError(f"the books name {len(held)} blocks, some out of range or held "
                             f"twice, for a pool of {num_blocks}")
        taken = set(held)
        pool._free = [b for b in pool._free if b not in taken]
        pool._leased = set(leased)
        pool._tables = {req_id: list(blocks) for req_id, blocks in tables if blocks}
        return pool

    @property
    def free_blocks(self) -> int:
        """Blocks in no request's table (leased ones included)."""
        return len(self._free) + len(self._leased)

    @property
    def leased_blocks(self) -> int:
        return len(self._leased)

    @property
    def num_requests(self) -> int:
        return len(self._tables)

    @property
    def utilization(self) -> float:
        return 1.0 - self.free_blocks / self.num_blocks

    def table(self, req_id: int) -> list[int]:
        return list(self._tables.get(req_id, ()))

    def lease(self, count: int) -> list[int]:
        """Up to `count` free blocks handed to the controller, which assigns them itself."""
        if count < 0:
            raise ValueError("cannot lease a negative number of blocks")
        n = min(count, len(self._free))
        blocks = [self._free.pop() for _ in range(n)]
        self._leased.update(blocks)
        return blocks

    def assign(self, req_id: int, blocks: list[int]) -> None:
        """Appends leased blocks to a request's table; all or nothing (a block that is not
        leased, or named twice, is a ValueError and nothing changes)."""
        if len(set(blocks)) != len(blocks) or not self._leased.issuperset(blocks):
            stray = sorted(set(blocks) - self._leased)[:8] or "repeated ids"
            raise ValueError(f"request {req_id}: blocks not leased: {stray}")
        self._leased.difference_update(blocks)
        self._tables.setdefault(req_id, []).extend(blocks)

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
