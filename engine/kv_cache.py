"""Paged KV-cache bookkeeping: a block pool with reference counts and a hash-chained prefix cache.

Blocks whose reference count drops to zero go to the tail of an LRU free queue but keep their
contents and hash, so a later request with the same prefix can take them back. A cached block is
evicted only when the pool hands it out again (from the head of the queue, least recently freed).
"""
from __future__ import annotations

import itertools
from collections import OrderedDict

import xxhash

from engine.request import Request


def hash_block(parent_hash: int | None, token_ids: list[int] | tuple[int, ...]) -> int:
    h = xxhash.xxh3_64()
    h.update((parent_hash or 0).to_bytes(8, "little"))
    h.update(b"".join(t.to_bytes(4, "little", signed=True) for t in token_ids))
    return h.intdigest()


class Block:
    __slots__ = ("block_id", "ref_count", "hash", "token_ids")

    def __init__(self, block_id: int):
        self.block_id = block_id
        self.ref_count = 0
        self.hash: int | None = None
        self.token_ids: tuple[int, ...] | None = None  # kept for an exact match on a hash hit


class BlockPool:
    def __init__(self, num_blocks: int):
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.free_queue: OrderedDict[int, Block] = OrderedDict((b.block_id, b) for b in self.blocks)
        self.cached: dict[int, Block] = {}  # hash -> block holding that prefix block

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def num_free(self) -> int:
        return len(self.free_queue)

    def allocate(self, n: int) -> list[Block]:
        if n > len(self.free_queue):
            raise MemoryError(f"asked for {n} KV blocks, {len(self.free_queue)} free")
        out = []
        for _ in range(n):
            _, block = self.free_queue.popitem(last=False)
            if block.hash is not None:  # evict: its contents are about to be overwritten
                if self.cached.get(block.hash) is block:
                    del self.cached[block.hash]
                block.hash = block.token_ids = None
            block.ref_count = 1
            out.append(block)
        return out

    def touch(self, block: Block) -> None:
        """Take a reference on a block found in the prefix cache (it may sit in the free queue)."""
        if block.ref_count == 0:
            del self.free_queue[block.block_id]
        block.ref_count += 1

    def free(self, block_ids: list[int]) -> None:
        # Free the tail first so that, of one sequence, its last blocks are evicted first.
        for bid in reversed(block_ids):
            block = self.blocks[bid]
            block.ref_count -= 1
            assert block.ref_count >= 0, f"block {bid} freed more often than taken"
            if block.ref_count == 0:
                self.free_queue[bid] = block

    def lookup(self, block_hash: int, token_ids: tuple[int, ...]) -> Block | None:
        block = self.cached.get(block_hash)
        if block is not None and block.token_ids == token_ids:
            return block
        return None

    def publish(self, block_id: int, block_hash: int, token_ids: tuple[int, ...]) -> None:
        block = self.blocks[block_id]
        if block.hash is not None:
            return
        block.hash, block.token_ids = block_hash, token_ids
        self.cached.setdefault(block_hash, block)


class KVCacheManager:
    """Gives requests the blocks their tokens need, and serves prompt prefixes from the cache."""

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        self.block_size = block_size
        self.pool = BlockPool(num_blocks)
        self.enable_prefix_caching = enable_prefix_caching
        self.prefix_queries = 0  # prompt tokens looked up
        self.prefix_hits = 0  # of those, tokens found cached

    @property
    def num_used(self) -> int:
        return self.pool.num_blocks - self.pool.num_free

    def usage(self) -> float:
        return self.num_used / self.pool.num_blocks

    def _full_block_hashes(self, req: Request, num_tokens: int) -> list[int]:
        """Hashes of the request's full blocks among its first `num_tokens` tokens (memoised on the request)."""
        bs = self.block_size
        while len(req.block_hashes) < num_tokens // bs:
            i = len(req.block_hashes)
            parent = req.block_hashes[-1] if i else None
            req.block_hashes.append(hash_block(parent, req.token_slice(i * bs, (i + 1) * bs)))
        return req.block_hashes[: num_tokens // bs]

    def admit_cached_prefix(self, req: Request, count_stats: bool = True) -> int:
        """Attach cached blocks of the request's prompt prefix; returns the number of tokens they cover.

        At least one prompt token is always left to compute, so the step that finishes the prompt yields logits.
        """
        assert not req.block_ids
        if not self.enable_prefix_caching or req.params.prompt_logprobs is not None:
            return 0  # prompt logprobs need every prompt position computed
        bs = self.block_size
        hashes = self._full_block_hashes(req, req.num_tokens - 1)
        hits = []
        for i, h in enumerate(hashes):
            block = self.pool.lookup(h, tuple(req.token_slice(i * bs, (i + 1) * bs)))
            if block is None:
                break
            hits.append(block)
        for block in hits:
            self.pool.touch(block)
        req.block_ids = [b.block_id for b in hits]
        num_hit = len(hits) * bs
        if count_stats:
            self.prefix_queries += req.num_prompt_tokens
            self.prefix_hits += min(num_hit, req.num_prompt_tokens)
        return num_hit

    def share_prefix(self, child: Request, parent: Request) -> int:
        """Give a sibling completion (n > 1) the parent's full prompt blocks; returns tokens covered."""
        n_full = min(parent.num_prompt_tokens - 1, parent.num_computed_tokens) // self.block_size
        child.block_ids = list(parent.block_ids[:n_full])
        for bid in child.block_ids:
            self.pool.touch(self.pool.blocks[bid])
        return n_full * self.block_size

    def allocate(self, req: Request, num_new_tokens: int) -> bool:
        """Make room for `num_new_tokens` more tokens of KV; False (nothing changed) if the pool is short."""
        need = -(-(req.num_computed_tokens + num_new_tokens) // self.block_size) - len(req.block_ids)
        if need > self.pool.num_free:
            return False
        if need > 0:
            req.block_ids.extend(b.block_id for b in self.pool.allocate(need))
        return True

    def can_allocate(self, num_blocks: int) -> bool:
        return num_blocks <= self.pool.num_free

    def cache_computed_blocks(self, req: Request) -> None:
        """Publish the request's full, computed blocks in the prefix cache."""
        if not self.enable_prefix_caching:
            return
        bs = self.block_size
        # Computed may run ahead of known tokens (a placeholder decoded before its token came back).
        computed = min(req.num_computed_tokens, req.num_tokens)
        if computed // bs <= req.num_published_blocks:  # most steps: no block filled since the last one
            return
        hashes = self._full_block_hashes(req, computed)
        for i in range(req.num_published_blocks, len(hashes)):
            self.pool.publish(req.block_ids[i], hashes[i], tuple(req.token_slice(i * bs, (i + 1) * bs)))
        req.num_published_blocks = len(hashes)

    def free(self, req: Request) -> None:
        self.pool.free(req.block_ids)
        req.block_ids = []
        req.num_published_blocks = 0

    def cached_hashes(self, limit: int = 1024) -> list[int]:
        """Recently cached block hashes (most recent last), for prefix-aware routing."""
        # Called after every step (stats): walk only the newest `limit` entries, not the whole cache.
        return list(itertools.islice(reversed(self.pool.cached), limit))[::-1]
