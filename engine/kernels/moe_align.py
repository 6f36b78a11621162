"""Token-to-expert alignment for the fused-MoE GEMM (vLLM's moe_align_block_size).

The T x top_k (token, expert) pairs, as flat indices into topk_ids, grouped by expert and each expert's group
padded to a multiple of `block_size`, so that every GEMM block of rows belongs to one expert:
  sorted_ids [numel + E * (block_size - 1)]: the pair indices, expert by expert (in pair order inside one), the
      padding holding numel (past num_tokens_post_pad nothing is written: the GEMM stops there);
  expert_ids [cdiv(len(sorted_ids), block_size)]: each block's expert (its local index under expert parallelism,
      -1 for an expert on another rank and for the blocks past the end);
  num_tokens_post_pad [1]: the padded length actually used.
The sizes depend on T only, never on the routing, so the kernels run inside a CUDA graph. Three launches, with
no atomics (so the order is deterministic): per-chunk counts, one program for the offsets, then each chunk's
pairs placed in parallel; up to CHUNK pairs (decode of a few tokens), the one program does all three.
"""
import torch

from ._triton import next_pow2, tl, triton, use_triton

CHUNK = 128  # pairs per program of the counting and placing kernels
TABLE_ROWS = 16  # chunks per step of the offsets kernel


@triton.jit
def _count_kernel(ids_ptr, numel, table_ptr, BINS: tl.constexpr, CHUNK: tl.constexpr):
    """table[chunk, e]: the pairs of this chunk routed to expert e."""
    chunk = tl.program_id(0)
    offs = chunk * CHUNK + tl.arange(0, CHUNK)
    bins = tl.arange(0, BINS)
    e = tl.load(ids_ptr + offs, mask=offs < numel, other=-1)
    tl.store(table_ptr + chunk * BINS + bins, tl.sum((e[:, None] == bins[None, :]).to(tl.int32), axis=0))


@triton.jit
def _offsets_kernel(table_ptr, num_chunks, num_experts, expert_map_ptr, sorted_ptr, expert_ids_ptr, post_pad_ptr,
                    numel, num_blocks, ids_ptr, BLOCK_SIZE: tl.constexpr, HAS_MAP: tl.constexpr, BINS: tl.constexpr,
                    ROWS: tl.constexpr, LANES: tl.constexpr, ONE_CHUNK: tl.constexpr, CHUNK: tl.constexpr):
    """One program: each expert's padded range, the blocks' experts, the padding slots, and table[chunk, e]
    turned into the first slot of that chunk's pairs of expert e. ONE_CHUNK (at most CHUNK pairs: a few tokens'
    decode): the counting and the placing too, so the whole alignment is this one launch."""
    bins = tl.arange(0, BINS)
    rows = tl.arange(0, ROWS)
    if ONE_CHUNK:
        lane = tl.arange(0, CHUNK)
        e = tl.load(ids_ptr + lane, mask=lane < numel, other=-1)
        counts = tl.sum((e[:, None] == bins[None, :]).to(tl.int32), axis=0)
    else:
        counts = tl.zeros([BINS], dtype=tl.int32)
        for c0 in range(0, num_chunks, ROWS):
            r = c0 + rows
            counts += tl.sum(tl.load(table_ptr + r[:, None] * BINS + bins[None, :], mask=(r < num_chunks)[:, None],
                                     other=0), axis=0)
    padded = tl.where(bins < num_experts, (counts + BLOCK_SIZE - 1) // BLOCK_SIZE * BLOCK_SIZE, 0)
    ends = tl.cumsum(padded, axis=0)
    starts = ends - padded
    total = tl.sum(padded, axis=0)
    tl.store(post_pad_ptr, total)

    pad = tl.arange(0, BLOCK_SIZE)
    tl.store(sorted_ptr + (starts + counts)[:, None] + pad[None, :], numel,
             mask=pad[None, :] < (padded - counts)[:, None])

    if ONE_CHUNK:
        _place(e, lane, lane < numel, num_experts, starts, sorted_ptr, bins)
    else:
        running = starts
        for c0 in range(0, num_chunks, ROWS):
            r = c0 + rows
            mask = (r < num_chunks)[:, None]
            ptrs = table_ptr + r[:, None] * BINS + bins[None, :]
            part = tl.load(ptrs, mask=mask, other=0)
            tl.store(ptrs, running[None, :] + tl.cumsum(part, axis=0) - part, mask=mask)
            running += tl.sum(part, axis=0)

    lane = tl.arange(0, LANES)
    for b0 in range(0, num_blocks, LANES):
        blocks = b0 + lane
        first_row = blocks * BLOCK_SIZE
        used = first_row < total
        expert = tl.sum((ends[None, :] <= first_row[:, None]).to(tl.int32), axis=1)  # experts wholly before it
        if HAS_MAP:
            expert = tl.load(expert_map_ptr + expert, mask=used, other=-1)
        tl.store(expert_ids_ptr + blocks, tl.where(used, expert, -1), mask=blocks < num_blocks)


@triton.jit
def _place_kernel(ids_ptr, numel, num_experts, table_ptr, sorted_ptr, BINS: tl.constexpr, CHUNK: tl.constexpr):
    """Each pair of this chunk to its slot: its expert's first slot for the chunk plus the pairs of that expert
    before it in the chunk."""
    chunk = tl.program_id(0)
    lane = tl.arange(0, CHUNK)
    offs = chunk * CHUNK + lane
    e = tl.load(ids_ptr + offs, mask=offs < numel, other=-1)
    bins = tl.arange(0, BINS)
    _place(e, offs, offs < numel, num_experts, tl.load(table_ptr + chunk * BINS + bins), sorted_ptr, bins)


@triton.jit
def _place(e, offs, in_range, num_experts, firsts, sorted_ptr, bins):
    """Pairs `offs` (routed to experts `e`) to their slots: firsts[e] plus the pairs of e before each."""
    lane = tl.arange(0, e.shape[0])
    valid = in_range & (e >= 0) & (e < num_experts)
    base = tl.sum(tl.where(e[:, None] == bins[None, :], firsts[None, :], 0), axis=1)
    rank = tl.sum(((e[:, None] == e[None, :]) & (lane[None, :] < lane[:, None])).to(tl.int32), axis=1)
    tl.store(sorted_ptr + base + rank, offs, mask=valid)


def moe_align_sizes(numel: int, num_experts: int, block_size: int) -> tuple[int, int]:
    max_padded = numel + num_experts * (block_size - 1)
    return max_padded, -(-max_padded // block_size)


def moe_align_block_size(topk_ids: torch.Tensor, block_size: int, num_experts: int,
                         expert_map: torch.Tensor | None = None):
    """topk_ids [T, top_k] (global expert ids) -> (sorted_ids, expert_ids, num_tokens_post_pad), all int32.
    `expert_map` [num_experts]: global expert -> local index, -1 where another rank holds it."""
    if not use_triton(topk_ids):
        return moe_align_block_size_ref(topk_ids, block_size, num_experts, expert_map)
    numel = topk_ids.numel()
    max_padded, num_blocks = moe_align_sizes(numel, num_experts, block_size)
    dev = topk_ids.device
    sorted_ids = torch.empty(max_padded, dtype=torch.int32, device=dev)
    expert_ids = torch.empty(num_blocks, dtype=torch.int32, device=dev)
    post_pad = torch.empty(1, dtype=torch.int32, device=dev)
    bins, num_chunks = next_pow2(num_experts), triton.cdiv(numel, CHUNK)
    table = torch.empty(max(num_chunks, 1), bins, dtype=torch.int32, device=dev)
    flat = topk_ids.reshape(-1)
    one_chunk = num_chunks <= 1
    if not one_chunk:
        _count_kernel[(num_chunks,)](flat, numel, table, BINS=bins, CHUNK=CHUNK)
    _offsets_kernel[(1,)](table, num_chunks, num_experts, expert_map if expert_map is not None else flat,
                          sorted_ids, expert_ids, post_pad, numel, num_blocks, flat, BLOCK_SIZE=block_size,
                          HAS_MAP=expert_map is not None, BINS=bins, ROWS=TABLE_ROWS, LANES=64, ONE_CHUNK=one_chunk,
                          CHUNK=CHUNK, num_warps=8)
    if not one_chunk:
        _place_kernel[(num_chunks,)](flat, numel, num_experts, table, sorted_ids, BINS=bins, CHUNK=CHUNK,
                                     num_warps=8)
    return sorted_ids, expert_ids, post_pad


def moe_align_block_size_ref(topk_ids: torch.Tensor, block_size: int, num_experts: int,
                             expert_map: torch.Tensor | None = None):
    flat = topk_ids.reshape(-1).long()
    numel = flat.numel()
    max_padded, num_blocks = moe_align_sizes(numel, num_experts, block_size)
    dev = topk_ids.device
    sorted_ids = torch.full((max_padded,), numel, dtype=torch.int32, device=dev)
    expert_ids = torch.full((num_blocks,), -1, dtype=torch.int32, device=dev)
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=num_experts).tolist()
    row = taken = 0
    for e, n in enumerate(counts):
        sorted_ids[row: row + n] = order[taken: taken + n].to(torch.int32)
        blocks = -(-n // block_size)
        expert_ids[row // block_size: row // block_size + blocks] = e if expert_map is None else int(expert_map[e])
        row, taken = row + blocks * block_size, taken + n
    return sorted_ids, expert_ids, torch.tensor([row], dtype=torch.int32, device=dev)
