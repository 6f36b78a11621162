"""Token-to-expert alignment for the fused-MoE GEMM (vLLM's moe_align_block_size).

The T x top_k (token, expert) pairs, as flat indices into topk_ids, grouped by expert and each expert's group
padded to a multiple of `block_size`, so that every GEMM block of rows belongs to one expert:
  sorted_ids [numel + E * (block_size - 1)]: the pair indices, expert by expert (in pair order inside one), the
      padding and the unused tail holding numel;
  expert_ids [cdiv(len(sorted_ids), block_size)]: each block's expert (its local index under expert parallelism,
      -1 for an expert on another rank and for the blocks past the end);
  num_tokens_post_pad [1]: the padded length actually used.
The sizes depend on T only, never on the routing, so the kernel runs inside a CUDA graph.
"""
import torch

from ._triton import next_pow2, tl, triton, use_triton

CHUNK = 64


@triton.jit
def _moe_align_kernel(ids_ptr, numel, expert_map_ptr, sorted_ptr, expert_ids_ptr, post_pad_ptr, num_experts,
                      max_padded, num_blocks, BLOCK_SIZE: tl.constexpr, HAS_MAP: tl.constexpr,
                      BINS: tl.constexpr, CHUNK: tl.constexpr):
    # One program: counts per expert, their padded prefix sums, then each pair's slot (deterministic, no atomics).
    bins = tl.arange(0, BINS)
    lane = tl.arange(0, CHUNK)
    counts = tl.zeros([BINS], dtype=tl.int32)
    for start in range(0, numel, CHUNK):
        offs = start + lane
        e = tl.load(ids_ptr + offs, mask=offs < numel, other=-1)
        counts += tl.sum((e[:, None] == bins[None, :]).to(tl.int32), axis=0)
    padded = tl.where(bins < num_experts, (counts + BLOCK_SIZE - 1) // BLOCK_SIZE * BLOCK_SIZE, 0)
    ends = tl.cumsum(padded, axis=0)
    total = tl.sum(padded, axis=0)
    tl.store(post_pad_ptr, total)

    for b0 in range(0, num_blocks, CHUNK):
        blocks = b0 + lane
        first_row = blocks * BLOCK_SIZE
        used = first_row < total
        expert = tl.sum((ends[None, :] <= first_row[:, None]).to(tl.int32), axis=1)  # experts wholly before it
        if HAS_MAP:
            expert = tl.load(expert_map_ptr + expert, mask=used, other=-1)
        tl.store(expert_ids_ptr + blocks, tl.where(used, expert, -1), mask=blocks < num_blocks)

    for p0 in range(0, max_padded, CHUNK):
        offs = p0 + lane
        tl.store(sorted_ptr + offs, numel, mask=offs < max_padded)
    tl.debug_barrier()  # the padding before the slots that overwrite it

    cursor = ends - padded  # the next free slot of each expert
    for start in range(0, numel, CHUNK):
        offs = start + lane
        valid = offs < numel
        e = tl.load(ids_ptr + offs, mask=valid, other=-1)
        onehot = e[:, None] == bins[None, :]
        base = tl.sum(tl.where(onehot, cursor[None, :], 0), axis=1)
        earlier_same = (e[:, None] == e[None, :]) & (lane[None, :] < lane[:, None])
        rank = tl.sum(earlier_same.to(tl.int32), axis=1)
        tl.store(sorted_ptr + base + rank, offs, mask=valid)
        cursor += tl.sum(onehot.to(tl.int32), axis=0)


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
    _moe_align_kernel[(1,)](topk_ids.reshape(-1), numel, expert_map if expert_map is not None else topk_ids,
                            sorted_ids, expert_ids, post_pad, num_experts, max_padded, num_blocks,
                            BLOCK_SIZE=block_size, HAS_MAP=expert_map is not None, BINS=next_pow2(num_experts),
                            CHUNK=CHUNK, num_warps=8)
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
