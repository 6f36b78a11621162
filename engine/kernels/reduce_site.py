"""The tensor-parallel all-reduce of a batch-1 decode step folded into its matrix-vector kernels (one node).

A row-parallel projection (o_proj, down_proj) leaves every rank a partial row. Instead of a separate all-reduce
kernel (7.4 us each on two H200s, 64 a step), the projection's gemv pushes its part into a `ReduceSite` on every
rank (stores into the peers' symmetric memory over NVLink), and the last of its programs counts the rank in on
every rank. The kernel that reads the sum (the next gemv, which reads all of x in every program anyway) waits
until every rank has counted in and adds the parts itself; a residual add reads the sum the same way. The sum is
rounded to the activation dtype, as the all-reduce's output was, and every rank adds the parts in rank order, so
all ranks see the same residual stream.

A site's count is reset by the kernel that reads the next site in the step's order (which every reader of this
site has finished by then); no rank can push to this site again before that reset, because its next push here
waits, through the sites in between, on pushes this rank makes only after it.
"""
from dataclasses import dataclass

import torch

from ._triton import tl, triton


@dataclass(eq=False)
class ReduceSite:
    """One all-reduce of the step: its parts and counters on this rank, and their addresses on every rank."""

    parts: torch.Tensor  # [world, N]: row r holds rank r's partial result
    count: torch.Tensor  # int32 [1]: ranks whose part has arrived here
    ticket: torch.Tensor  # int32 [1]: this rank's programs done pushing; the last counts the rank in everywhere
    peer_parts: torch.Tensor  # int64 [world]: the address of `parts` on each rank
    peer_counts: torch.Tensor  # int64 [world]: the address of `count` on each rank
    previous_count: torch.Tensor  # int32 [1]: the count of the site before this one, reset when this one is read
    rank: int

    @property
    def world(self) -> int:
        return self.parts.shape[0]

    def sum(self) -> torch.Tensor:
        """[1, N]: the all-reduced row (the torch reference of what the kernels read)."""
        return self.parts.float().sum(0, keepdim=True).to(self.parts.dtype)


@triton.jit
def wait_for_parts(count_ptr, previous_count_ptr, WORLD: tl.constexpr):
    """Spin until every rank's part has arrived; program 0 then resets the previous site's count."""
    arrived = tl.atomic_add(count_ptr, 0, sem="acquire", scope="sys")
    while arrived < WORLD:
        arrived = tl.atomic_add(count_ptr, 0, sem="acquire", scope="sys")
    tl.store(previous_count_ptr, 0, mask=tl.program_id(0) == 0)


@triton.jit
def load_part_sum(parts_ptr, part_stride, offs, mask, WORLD: tl.constexpr):
    """The ranks' parts at `offs`, summed in rank order in fp32 and rounded to their dtype (L2 reads: peers wrote
    them)."""
    total = tl.load(parts_ptr + offs, mask=mask, other=0.0, cache_modifier=".cg").to(tl.float32)
    for r in tl.static_range(1, WORLD):
        total += tl.load(parts_ptr + r * part_stride + offs, mask=mask, other=0.0, cache_modifier=".cg").to(tl.float32)
    return total.to(parts_ptr.dtype.element_ty)


@triton.jit
def push_part(value, offs, mask, part_stride, peer_parts_ptr, peer_counts_ptr, ticket_ptr, rank,
              WORLD: tl.constexpr):
    """Store this program's slice of the rank's part on every rank; the program that finishes last counts the
    rank in on every rank (its release covers the other programs' stores, which each released into the ticket)."""
    for r in tl.static_range(WORLD):
        dst = tl.load(peer_parts_ptr + r).to(tl.pointer_type(value.dtype))
        tl.store(dst + rank * part_stride + offs, value, mask=mask)
    tl.debug_barrier()  # every thread's stores before the ticket
    done = tl.atomic_add(ticket_ptr, 1, sem="acq_rel", scope="sys")
    if done == tl.num_programs(0) - 1:
        tl.store(ticket_ptr, 0)
        for r in tl.static_range(WORLD):
            count = tl.load(peer_counts_ptr + r).to(tl.pointer_type(tl.int32))
            tl.atomic_add(count, 1, sem="release", scope="sys")
