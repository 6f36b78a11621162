"""PrefixAwareRouter: picks the engine replica for each request, inside the ingress's DeploymentHandle.

Three steps, each narrowing the choice:
1. Load gate: drop replicas whose load is more than `imbalance_threshold` requests above the least loaded,
   so a popular prefix cannot pile everything onto one replica.
2. Prefix affinity: among the rest, prefer the replica that holds the most leading KV blocks of the prompt.
3. Power of two choices: otherwise (or to break ties) two random replicas; Serve sends to the shorter queue.

What a replica holds is known two ways: the block hashes the replica's engine reports (`record_routing_stats`,
pulled by the Serve controller every `routing_stats_period_s` and broadcast to routers), and the prompts this
router sent there itself (instant, so a follow-up request finds its prefix before the next report). Block
hashes are the engine's own (`engine.kv_cache.hash_block`, chained over full blocks of the prompt's token ids).

Load is the replica's ongoing requests from Serve's queue-length cache (fresh: updated on every send and
completion), else the waiting + running sequences the engine last reported.
"""
from __future__ import annotations

import random
from collections import OrderedDict
from dataclasses import dataclass

from ray.serve.request_router import PendingRequest, ReplicaID, ReplicaResult, RequestRouter, RunningReplica

from engine.kv_cache import hash_block

ROUTED_PREFIX_MEMORY = 200_000  # block hashes this router remembers having sent somewhere


def prefix_block_hashes(token_ids: list[int], block_size: int, max_blocks: int = 256) -> list[int]:
    """Chained hashes of the prompt's full blocks, as the engine's prefix cache computes them.

    Like the engine, only blocks inside the first len - 1 tokens count (the last prompt token is always computed).
    """
    hashes: list[int] = []
    parent = None
    for i in range(min((len(token_ids) - 1) // block_size, max_blocks)):
        try:
            parent = hash_block(parent, token_ids[i * block_size:(i + 1) * block_size])
        except OverflowError:  # ids no vocabulary has: the replica turns the request away with a 400
            return []
        hashes.append(parent)
    return hashes


@dataclass
class ReplicaView:
    """What the router knows of one replica when choosing."""

    key: object
    load: float
    prefix_blocks: int  # leading blocks of this prompt the replica holds


def rank_replicas(views: list[ReplicaView], imbalance_threshold: float, rng: random.Random) -> list[list[object]]:
    """Ranks of replica keys, most preferred first (Serve tries each rank, shortest queue first within it)."""
    if not views:
        return []
    least = min(v.load for v in views)
    eligible = [v for v in views if v.load <= least + imbalance_threshold]
    ranks: list[list[object]] = []
    best = max(v.prefix_blocks for v in eligible)
    if best > 0:
        ranks.append([v.key for v in eligible if v.prefix_blocks == best])
    rest = [v for v in eligible if not ranks or v.key not in ranks[0]]
    pair = rng.sample(rest, 2) if len(rest) > 2 else rest
    if pair:
        ranks.append([v.key for v in pair])
    tried = {k for rank in ranks for k in rank}
    leftover = [v.key for v in sorted(views, key=lambda v: v.load) if v.key not in tried]
    if leftover:  # everything else, so a full preferred replica never stalls the request
        ranks.append(leftover)
    return ranks


class PrefixAwareRouter(RequestRouter):
    """A Serve RequestRouter; configure with request_router_kwargs={"block_size", "imbalance_threshold"}."""

    def initialize_state(self, block_size: int = 16, imbalance_threshold: float = 8, max_prefix_blocks: int = 256):
        self.block_size = block_size
        self.imbalance_threshold = imbalance_threshold
        self.max_prefix_blocks = max_prefix_blocks
        self.rng = random.Random()
        self.reported: dict[ReplicaID, tuple[dict, frozenset[int]]] = {}  # replica -> (its stats, their hashes)
        self.routed: OrderedDict[int, ReplicaID] = OrderedDict()  # block hash -> replica we last sent it to
        # id(pending request) -> (that request, its hashes); computed once however often the request is retried
        self.pending_hashes: OrderedDict[int, tuple[PendingRequest, list[int]]] = OrderedDict()

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        if pending_request is not None:
            pending_request.routing_context.should_backoff = True  # every candidate is in the ranks below
        hashes = self._request_hashes(pending_request)
        views = [ReplicaView(r, self._load(r), self._prefix_blocks(r, hashes)) for r in candidate_replicas]
        return rank_replicas(views, self.imbalance_threshold, self.rng)

    def on_request_routed(self, pending_request: PendingRequest, replica_id: ReplicaID,
                          result: ReplicaResult) -> None:
        entry = self.pending_hashes.pop(id(pending_request), None)
        hashes = entry[1] if entry is not None and entry[0] is pending_request else ()
        for h in hashes:
            self.routed[h] = replica_id
            self.routed.move_to_end(h)
        while len(self.routed) > ROUTED_PREFIX_MEMORY:
            self.routed.popitem(last=False)

    def update_replicas(self, replicas: list[RunningReplica]) -> None:
        super().update_replicas(replicas)
        live = {r.replica_id for r in replicas}
        for rid in [rid for rid in self.reported if rid not in live]:
            del self.reported[rid]

    # -- what the router knows ------------------------------------------------------------------------------
    def _request_hashes(self, pending_request: PendingRequest | None) -> list[int]:
        if pending_request is None:
            return []
        entry = self.pending_hashes.get(id(pending_request))
        if entry is None or entry[0] is not pending_request:
            request = next((a for a in pending_request.args if hasattr(a, "prompt_token_ids")), None)
            ids = request.prompt_token_ids if request is not None else []
            entry = (pending_request, prefix_block_hashes(ids, self.block_size, self.max_prefix_blocks))
            self.pending_hashes[id(pending_request)] = entry
            while len(self.pending_hashes) > 10_000:  # requests cancelled before routing leave entries behind
                self.pending_hashes.popitem(last=False)
        return entry[1]

    def _reported_hashes(self, replica: RunningReplica) -> frozenset[int]:
        stats = replica.routing_stats or {}
        cached = self.reported.get(replica.replica_id)
        if cached is None or cached[0] is not stats:
            cached = (stats, frozenset(stats.get("cached_block_hashes") or ()))
            self.reported[replica.replica_id] = cached
        return cached[1]

    def _prefix_blocks(self, replica: RunningReplica, hashes: list[int]) -> int:
        if not hashes:
            return 0
        reported = self._reported_hashes(replica)
        n = 0
        for h in hashes:
            if h not in reported and self.routed.get(h) != replica.replica_id:
                break
            n += 1
        return n

    def _load(self, replica: RunningReplica) -> float:
        queue_len = self.replica_queue_len_cache.get(replica.replica_id)
        if queue_len is not None:
            return queue_len
        stats = replica.routing_stats or {}
        return stats.get("waiting", 0) + stats.get("running", 0)
