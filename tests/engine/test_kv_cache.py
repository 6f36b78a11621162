"""Block pool invariants under random operation sequences, and prefix-cache behaviour."""
from collections import Counter

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from engine.kv_cache import KVCacheManager, hash_block
from engine.request import Request
from engine.sampling_params import SamplingParams

BLOCK = 4
NUM_BLOCKS = 12


def make_request(rid, tokens):
    return Request(rid, tokens, SamplingParams(max_tokens=64), set(), max_tokens=64)


class BlockPoolMachine(RuleBasedStateMachine):
    """Requests arrive (prompts over a tiny alphabet, so prefixes repeat), compute chunks, grow, and finish."""

    def __init__(self):
        super().__init__()
        self.kv = KVCacheManager(NUM_BLOCKS, BLOCK)
        self.live: dict[str, Request] = {}
        self.next_id = 0

    @rule(tokens=st.lists(st.integers(0, 2), min_size=1, max_size=20))
    def admit(self, tokens):
        req = make_request(str(self.next_id), tokens)
        self.next_id += 1
        req.num_computed_tokens = self.kv.admit_cached_prefix(req)
        assert req.num_computed_tokens < len(tokens)  # at least one token is left to compute
        if self.kv.allocate(req, len(tokens) - req.num_computed_tokens):
            self.live[req.request_id] = req
        else:
            self.kv.free(req)

    @precondition(lambda self: self.live)
    @rule(data=st.data())
    def compute(self, data):
        req = data.draw(st.sampled_from(sorted(self.live.values(), key=lambda r: r.request_id)))
        req.num_computed_tokens = req.num_tokens
        self.kv.cache_computed_blocks(req)
        req.output_token_ids.append(data.draw(st.integers(0, 2)))
        if not self.kv.allocate(req, 1):
            req.output_token_ids.pop()

    @precondition(lambda self: self.live)
    @rule(data=st.data())
    def finish(self, data):
        rid = data.draw(st.sampled_from(sorted(self.live)))
        self.kv.free(self.live.pop(rid))

    @invariant()
    def ref_counts_equal_holders(self):
        holders = Counter(b for r in self.live.values() for b in r.block_ids)
        for block in self.kv.pool.blocks:
            assert block.ref_count == holders.get(block.block_id, 0)
            assert (block.block_id in self.kv.pool.free_queue) == (block.ref_count == 0)
        for r in self.live.values():
            assert len(r.block_ids) * BLOCK >= r.num_tokens - 1

    @invariant()
    def cached_blocks_hold_their_tokens(self):
        for h, block in self.kv.pool.cached.items():
            assert block.hash == h and len(block.token_ids) == BLOCK

    def teardown(self):
        for req in self.live.values():
            self.kv.free(req)
        assert self.kv.pool.num_free == NUM_BLOCKS
        assert all(b.ref_count == 0 for b in self.kv.pool.blocks)


TestBlockPool = BlockPoolMachine.TestCase
TestBlockPool.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)


def test_hash_chain_depends_on_the_whole_prefix():
    a = hash_block(hash_block(None, [1, 2]), [3, 4])
    b = hash_block(hash_block(None, [9, 2]), [3, 4])
    assert a != b and a == hash_block(hash_block(None, [1, 2]), [3, 4])


def test_freed_blocks_stay_cached_until_reallocated_lru_first():
    kv = KVCacheManager(4, BLOCK)
    old = make_request("old", list(range(9)))  # two full blocks + 1
    assert kv.allocate(old, 9)
    old.num_computed_tokens = 9
    kv.cache_computed_blocks(old)
    kv.free(old)
    again = make_request("again", list(range(9)))
    assert kv.admit_cached_prefix(again) == 8  # both full blocks come back from the free queue
    kv.free(again)
    hog = make_request("hog", [7] * 12)
    assert kv.allocate(hog, 12)  # takes 3 of 4 blocks: the uncached one first, then the LRU cached tail
    assert len(kv.pool.cached) == 1
    probe = make_request("probe", list(range(9)))
    assert kv.admit_cached_prefix(probe) == 4  # the first block survived: the tail was evicted first


def test_a_hash_collision_is_not_a_hit():
    kv = KVCacheManager(4, BLOCK)
    req = make_request("a", [1, 2, 3, 4, 5])
    assert kv.allocate(req, 5)
    req.num_computed_tokens = 5
    kv.cache_computed_blocks(req)
    forged = make_request("b", [9, 9, 9, 9, 5])
    forged.block_hashes = list(req.block_hashes)  # pretend the hashes collided
    assert kv.admit_cached_prefix(forged) == 0
