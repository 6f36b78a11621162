"""Paged attention over vLLM's KV cache layout, after vLLM's triton_unified_attention.

One launch serves a mixed batch: prefills, chunked prefills over cached prefix blocks and decodes. A program
handles one (q-block, kv head): BLOCK_Q query tokens times the GROUP query heads sharing that kv head, so each K/V
tile is loaded once for the whole GQA group. Queries of a sequence are the last q_len tokens of its context.
The split-KV (flash-decoding) path splits each context into up to MAX_SPLITS ranges and merges the partial softmaxes
by log-sum-exp in a second kernel; it pays off when (sequence, kv head) programs alone cannot fill the GPU.
A sliding window (vLLM's window_size = (left, 0): each query sees itself and the `left` keys before it) skips the
tiles wholly outside it; a soft-cap bounds the scaled scores as softcap * tanh(score / softcap) (Gemma 2).
"""
from typing import NamedTuple

import torch

from ._triton import interpreting, next_pow2, pdl_args, tl, triton, use_triton, wait_for_previous_kernel

MAX_SPLITS = 64
LOG2_E = 1.4426950408889634


@triton.jit
def _find_seq(query_start_loc_ptr, q_block, num_seqs, BLOCK_Q: tl.constexpr):
    """The sequence owning global q-block `q_block`; sequence i's q-blocks start at query_start_loc[i] // BLOCK_Q + i."""
    lo: tl.int32 = 0
    hi = num_seqs
    while lo < hi:
        mid = (lo + hi) // 2
        if tl.load(query_start_loc_ptr + mid) // BLOCK_Q + mid <= q_block:
            lo = mid + 1
        else:
            hi = mid
    return lo - 1


@triton.jit
def _dot(a, b, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    if UPCAST:  # Triton's interpreter multiplies bf16 operands as their raw uint16 bits
        return tl.dot(a.to(tl.float32), b.to(tl.float32))
    return tl.dot(a, b, input_precision=PRECISION)


@triton.jit
def _softcap(s, cap):
    """cap * tanh(s / cap), written with one exp2 that saturates to +-cap instead of overflowing to NaN."""
    return cap - 2.0 * cap / (tl.exp2(s * (2.0 * 1.4426950408889634 / cap)) + 1.0)


@triton.jit
def _attend_tile(q, m, l, acc, tile, kv_end, q_abs, seq, kv_head, dims, dim_mask, qk_scale, softcap,
                 key_cache_ptr, value_cache_ptr, block_tables_ptr, bt_stride, kc_stride_b, kc_stride_s, kc_stride_h,
                 vc_stride_b, vc_stride_s, vc_stride_h, k_scale, v_scale, BLOCK_SIZE: tl.constexpr,
                 TILE: tl.constexpr, MASKED: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
                 SLIDING_WINDOW: tl.constexpr, USE_SOFTCAP: tl.constexpr, FP8_CACHE: tl.constexpr):
    """One online-softmax step over keys [tile * TILE, (tile + 1) * TILE), in base 2 (qk_scale holds log2(e), and
    so does softcap)."""
    kv_pos = tile * TILE + tl.arange(0, TILE)
    kv_mask = kv_pos < kv_end
    if MASKED:
        block = tl.load(block_tables_ptr + seq * bt_stride + kv_pos // BLOCK_SIZE, mask=kv_mask, other=0)
        k_mask = dim_mask[:, None] & kv_mask[None, :]
        v_mask = kv_mask[:, None] & dim_mask[None, :]
    else:
        block = tl.load(block_tables_ptr + seq * bt_stride + kv_pos // BLOCK_SIZE)
        k_mask = dim_mask[:, None]
        v_mask = dim_mask[None, :]
    block = block.to(tl.int64)
    in_block = kv_pos % BLOCK_SIZE
    k = tl.load(key_cache_ptr + block[None, :] * kc_stride_b + in_block[None, :] * kc_stride_s
                + kv_head * kc_stride_h + dims[:, None], mask=k_mask, other=0.0)
    v = tl.load(value_cache_ptr + block[:, None] * vc_stride_b + in_block[:, None] * vc_stride_s
                + kv_head * vc_stride_h + dims[None, :], mask=v_mask, other=0.0)
    if FP8_CACHE:  # e4m3 keys/values times their per-tensor scales
        k = k.to(tl.float32) * k_scale
        v = v.to(tl.float32) * v_scale
    s = _dot(q, k.to(q.dtype), UPCAST, PRECISION) * qk_scale
    if USE_SOFTCAP:
        s = _softcap(s, softcap)
    if MASKED:
        visible = kv_mask[None, :] & (kv_pos[None, :] <= q_abs[:, None])
        if SLIDING_WINDOW > 0:
            visible = visible & (q_abs[:, None] - kv_pos[None, :] < SLIDING_WINDOW)
        s = tl.where(visible, s, float("-inf"))
    m_new = tl.maximum(m, tl.max(s, 1))
    shift = tl.where(m_new == float("-inf"), 0.0, m_new)  # keeps exp2() NaN-free for fully masked rows
    p = tl.exp2(s - shift[:, None])
    alpha = tl.exp2(m - shift)
    l = l * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + _dot(p.to(q.dtype), v.to(q.dtype), UPCAST, PRECISION)
    return m_new, l, acc


# Batch-dependent ints and index pointers (views at batch-dependent offsets into one staging tensor) are not
# specialized on: otherwise each new batch shape can compile another variant in the middle of serving.
@triton.jit(do_not_specialize=["num_seqs", "bt_stride"],
            do_not_specialize_on_alignment=["block_tables_ptr", "seq_lens_ptr", "query_start_loc_ptr"])
def _attention_kernel(
    out_ptr, part_out_ptr, part_max_ptr, part_sum_ptr,
    q_ptr, key_cache_ptr, value_cache_ptr, block_tables_ptr, seq_lens_ptr, query_start_loc_ptr,
    qk_scale, softcap, num_seqs, head_dim,
    q_stride_t, q_stride_h, out_stride_t, out_stride_h,
    kc_stride_b, kc_stride_s, kc_stride_h, vc_stride_b, vc_stride_s, vc_stride_h, bt_stride, k_scale, v_scale,
    NUM_HEADS: tl.constexpr, GROUP: tl.constexpr, BLOCK_SIZE: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_Q: tl.constexpr, TILE: tl.constexpr, DIM_P2: tl.constexpr, NUM_SPLITS: tl.constexpr,
    SPLIT: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr, SLIDING_WINDOW: tl.constexpr,
    USE_SOFTCAP: tl.constexpr, FP8_CACHE: tl.constexpr, PDL: tl.constexpr = False,
):
    wait_for_previous_kernel(PDL)
    # The last q-blocks of a prompt attend to the most keys: launching them first shortens the tail.
    q_block, kv_head, split = tl.num_programs(0) - 1 - tl.program_id(0), tl.program_id(1), tl.program_id(2)
    seq = _find_seq(query_start_loc_ptr, q_block, num_seqs, BLOCK_Q)
    q_start = tl.load(query_start_loc_ptr + seq)
    q_len = tl.load(query_start_loc_ptr + seq + 1) - q_start
    q_block_local = q_block - (q_start // BLOCK_Q + seq)
    if q_block_local * BLOCK_Q >= q_len:  # the grid is an upper bound on the number of q-blocks
        return
    seq_len = tl.load(seq_lens_ptr + seq)
    context_len = seq_len - q_len

    # Row r of the tile is query token r // GROUP of this q-block, query head r % GROUP of this kv head.
    rows = tl.arange(0, BLOCK_M)
    q_pos = q_block_local * BLOCK_Q + rows // GROUP
    head = kv_head * GROUP + rows % GROUP
    row_mask = (rows < BLOCK_Q * GROUP) & (q_pos < q_len)
    q_token = q_start + q_pos
    dims = tl.arange(0, DIM_P2)
    dim_mask = dims < head_dim
    q = tl.load(q_ptr + q_token[:, None] * q_stride_t + head[:, None] * q_stride_h + dims[None, :],
                mask=row_mask[:, None] & dim_mask[None, :], other=0.0)
    q_abs = context_len + q_pos  # each row's position in the context

    kv_end = tl.minimum(context_len + (q_block_local + 1) * BLOCK_Q, seq_len)  # causal bound of the last row
    tile_lo = 0
    if SLIDING_WINDOW > 0:  # the first row's oldest visible key
        tile_lo = tl.maximum(context_len + q_block_local * BLOCK_Q - SLIDING_WINDOW + 1, 0) // TILE
    tile_hi = tl.cdiv(kv_end, TILE)
    if SPLIT:
        tiles_per_split = tl.cdiv(tl.cdiv(seq_len, TILE) - tile_lo, NUM_SPLITS)
        tile_lo = tile_lo + split * tiles_per_split
        tile_hi = tl.minimum(tile_hi, tile_lo + tiles_per_split)

    m = tl.full([BLOCK_M], float("-inf"), tl.float32)  # running max (log2 units); -inf while a row has seen no key
    l = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, DIM_P2], tl.float32)
    # Tiles wholly before the first row's position need no mask; only the last few (the causal diagonal) do, and
    # under a sliding window the first few, which the last row no longer sees whole.
    unmasked_lo = tile_lo
    if SLIDING_WINDOW > 0:
        unmasked_lo = tl.minimum(tl.maximum(tl.cdiv(tl.maximum(kv_end - SLIDING_WINDOW, 0), TILE), tile_lo), tile_hi)
    unmasked_hi = tl.minimum(tl.maximum((context_len + q_block_local * BLOCK_Q + 1) // TILE, unmasked_lo), tile_hi)
    for tile in range(tile_lo, unmasked_lo):
        m, l, acc = _attend_tile(q, m, l, acc, tile, kv_end, q_abs, seq, kv_head, dims, dim_mask, qk_scale, softcap,
                                 key_cache_ptr, value_cache_ptr, block_tables_ptr, bt_stride, kc_stride_b,
                                 kc_stride_s, kc_stride_h, vc_stride_b, vc_stride_s, vc_stride_h, k_scale, v_scale,
                                 BLOCK_SIZE, TILE, True, UPCAST, PRECISION, SLIDING_WINDOW, USE_SOFTCAP, FP8_CACHE)
    for tile in range(unmasked_lo, unmasked_hi):
        m, l, acc = _attend_tile(q, m, l, acc, tile, kv_end, q_abs, seq, kv_head, dims, dim_mask, qk_scale, softcap,
                                 key_cache_ptr, value_cache_ptr, block_tables_ptr, bt_stride, kc_stride_b,
                                 kc_stride_s, kc_stride_h, vc_stride_b, vc_stride_s, vc_stride_h, k_scale, v_scale,
                                 BLOCK_SIZE, TILE, False, UPCAST, PRECISION, SLIDING_WINDOW, USE_SOFTCAP, FP8_CACHE)
    for tile in range(unmasked_hi, tile_hi):
        m, l, acc = _attend_tile(q, m, l, acc, tile, kv_end, q_abs, seq, kv_head, dims, dim_mask, qk_scale, softcap,
                                 key_cache_ptr, value_cache_ptr, block_tables_ptr, bt_stride, kc_stride_b,
                                 kc_stride_s, kc_stride_h, vc_stride_b, vc_stride_s, vc_stride_h, k_scale, v_scale,
                                 BLOCK_SIZE, TILE, True, UPCAST, PRECISION, SLIDING_WINDOW, USE_SOFTCAP, FP8_CACHE)

    if SPLIT:  # unnormalized partials; empty splits store m=-inf, l=0, acc=0 and weigh nothing in the merge
        part = (q_token.to(tl.int64) * NUM_HEADS + head) * NUM_SPLITS + split
        tl.store(part_max_ptr + part, m, mask=row_mask)
        tl.store(part_sum_ptr + part, l, mask=row_mask)
        tl.store(part_out_ptr + part[:, None] * DIM_P2 + dims[None, :], acc, mask=row_mask[:, None])
    else:
        out = acc / l[:, None]
        tl.store(out_ptr + q_token[:, None] * out_stride_t + head[:, None] * out_stride_h + dims[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=row_mask[:, None] & dim_mask[None, :])


@triton.jit(do_not_specialize=["num_seqs"], do_not_specialize_on_alignment=["query_start_loc_ptr"])
def _merge_splits_kernel(
    out_ptr, part_out_ptr, part_max_ptr, part_sum_ptr, query_start_loc_ptr, num_seqs, head_dim,
    out_stride_t, out_stride_h,
    NUM_HEADS: tl.constexpr, NUM_SPLITS: tl.constexpr, DIM_P2: tl.constexpr, PDL: tl.constexpr = False,
):
    wait_for_previous_kernel(PDL)
    token, head = tl.program_id(0), tl.program_id(1)
    if token >= tl.load(query_start_loc_ptr + num_seqs):  # padding past the last sequence's queries
        return
    part = (token.to(tl.int64) * NUM_HEADS + head) * NUM_SPLITS + tl.arange(0, NUM_SPLITS)
    dims = tl.arange(0, DIM_P2)
    m = tl.load(part_max_ptr + part)
    weight = tl.exp2(m - tl.max(m, 0))  # some split holds the token's own key, so the max is finite
    l = tl.sum(tl.load(part_sum_ptr + part) * weight, 0)
    acc = tl.sum(tl.load(part_out_ptr + part[:, None] * DIM_P2 + dims[None, :]) * weight[:, None], 0)
    tl.store(out_ptr + token * out_stride_t + head * out_stride_h + dims, (acc / l).to(out_ptr.dtype.element_ty),
             mask=dims < head_dim)


class TileConfig(NamedTuple):
    block_m: int  # query rows per program: BLOCK_M // GROUP tokens times the GROUP heads of one kv head
    tile: int  # keys per step
    num_warps: int
    num_stages: int
    maxnreg: int | None = None  # registers per thread the compiler may use (None: its choice)


def tile_config(group: int, max_query_len: int, split_kv: bool = False, head_dim: int = 128) -> TileConfig:
    """Decode-only batches take 16-row q-tiles (their rows are mostly empty), split ones 32-key tiles. Prefills
    take 128-row tiles over 8 warps capped at 128 registers a thread, so two programs share an SM: the compiler's
    own choice (191 registers) leaves one 4-warp program of 64 rows per SM half, 12.5% occupancy and most cycles
    without an eligible warp (benchmarks/ncu_attention.sh). H100, Llama-8B heads (benchmarks/kernel_tuning.py):
    causal 4k prompt 400 us against 440 for 64 x 64 tiles on 4 warps uncapped, 4 prompts of 1k 139 against 157;
    decode 64 x 2k 188 us (three stages: 225 us); split decode 1 x 384 6.7 us (64-key tiles: 7.1 us)."""
    if max_query_len < 32:  # tl.dot wants >= 16 rows
        return TileConfig(max(16, next_pow2(group)), 32 if split_kv else 64, 4, 2)
    if head_dim > 128:
        return TileConfig(max(64, next_pow2(group)), 64, 4, 2)
    return TileConfig(max(128, next_pow2(group)), 64, 8, 2, 128)


def _num_splits(num_programs: int, max_seq_len: int, tile: int) -> int:
    """Enough splits for ~4 programs per SM, no more than the longest context has tiles; a power of two."""
    return min(MAX_SPLITS, next_pow2(triton.cdiv(512, num_programs)), next_pow2(triton.cdiv(max_seq_len, tile)))


def use_split_kv(num_seqs: int, num_kv_heads: int, max_query_len: int, max_seq_len: int) -> bool:
    """Flash-decoding for decode-only batches over long contexts whose (sequence, kv head) programs cannot fill
    the GPU. H100, 8 kv heads, in a CUDA graph: 1 x 8k context 15us split vs 221us; 16 x 2k 56 vs 75us;
    32 x 2k even; 64 x 2k 190 vs 185us."""
    return max_query_len == 1 and max_seq_len >= 512 and num_seqs * num_kv_heads <= 128


def unified_attention(q: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor, out: torch.Tensor,
                      query_start_loc: torch.Tensor, seq_lens: torch.Tensor, block_tables: torch.Tensor,
                      scale: float, max_query_len: int, max_seq_len: int,
                      split_kv: bool | None = None, config: TileConfig | None = None,
                      window_size: tuple[int, int] = (-1, -1), softcap: float = 0.0, k_scale: float = 1.0,
                      v_scale: float = 1.0) -> torch.Tensor:
    """q/out: [T, Hq, D]; caches: [num_blocks, block_size, Hk, D]; query_start_loc: int32 [S + 1];
    seq_lens: int32 [S]; block_tables: int32 [S, max_blocks]. max_query_len/max_seq_len are host ints that
    only choose the path, tiles and split count (results never depend on them); split_kv=None picks by the
    heuristic, True/False forces; `config` overrides tile_config() (benchmarks sweep it).
    window_size: vLLM's (left, right) with right 0 (causal): (-1, -1) for none. softcap: 0 for none.
    FP8 caches hold keys / k_scale and values / v_scale in e4m3.
    Rows of tokens past query_start_loc[-1] (padding) are left untouched. Returns out."""
    if not use_triton(q):
        return paged_attention_ref(q, key_cache, value_cache, out, query_start_loc, seq_lens, block_tables,
                                   scale, max_query_len, max_seq_len, split_kv, window_size, softcap, k_scale,
                                   v_scale)
    num_tokens, num_heads, head_dim = q.shape
    num_seqs, num_kv_heads, block_size = seq_lens.shape[0], key_cache.shape[2], key_cache.shape[1]
    assert num_heads % num_kv_heads == 0 and key_cache.dtype == value_cache.dtype
    assert q.stride(-1) == out.stride(-1) == key_cache.stride(-1) == value_cache.stride(-1) == 1
    if num_tokens == 0 or num_seqs == 0:
        return out
    group = num_heads // num_kv_heads
    if split_kv is None:
        split_kv = use_split_kv(num_seqs, num_kv_heads, max_query_len, max_seq_len)
    block_m, tile, num_warps, num_stages, maxnreg = config or tile_config(group, max_query_len, split_kv, head_dim)
    block_q = block_m // group
    dim_p2 = next_pow2(head_dim)
    num_splits = _num_splits(num_seqs * num_kv_heads, max_seq_len, tile) if split_kv else 1
    if split_kv:
        part_out = torch.empty(num_tokens, num_heads, num_splits, dim_p2, dtype=torch.float32, device=q.device)
        part_max = torch.empty(num_tokens, num_heads, num_splits, dtype=torch.float32, device=q.device)
        part_sum = torch.empty_like(part_max)
    else:
        part_out = part_max = part_sum = out  # never dereferenced
    grid = (num_tokens // block_q + num_seqs, num_kv_heads, num_splits)
    _attention_kernel[grid](
        out, part_out, part_max, part_sum,
        q, key_cache, value_cache, block_tables, seq_lens, query_start_loc,
        scale * LOG2_E, softcap * LOG2_E, num_seqs, head_dim,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        key_cache.stride(0), key_cache.stride(1), key_cache.stride(2),
        value_cache.stride(0), value_cache.stride(1), value_cache.stride(2), block_tables.stride(0), k_scale, v_scale,
        NUM_HEADS=num_heads, GROUP=group, BLOCK_SIZE=block_size, BLOCK_M=block_m, BLOCK_Q=block_q, TILE=tile,
        DIM_P2=dim_p2, NUM_SPLITS=num_splits, SPLIT=split_kv, SLIDING_WINDOW=window_size[0] + 1,
        USE_SOFTCAP=softcap > 0,
        UPCAST=interpreting() and q.dtype == torch.bfloat16,
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32", FP8_CACHE=key_cache.dtype == torch.float8_e4m3fn,
        num_warps=num_warps, num_stages=num_stages, **({"maxnreg": maxnreg} if maxnreg and not interpreting() else {}),
        **pdl_args(q),
    )
    if split_kv:
        _merge_splits_kernel[(num_tokens, num_heads)](
            out, part_out, part_max, part_sum, query_start_loc, num_seqs, head_dim, out.stride(0), out.stride(1),
            NUM_HEADS=num_heads, NUM_SPLITS=num_splits, DIM_P2=dim_p2, **pdl_args(q),
        )
    return out


def paged_attention_ref(q: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor, out: torch.Tensor,
                        query_start_loc: torch.Tensor, seq_lens: torch.Tensor, block_tables: torch.Tensor,
                        scale: float, max_query_len: int, max_seq_len: int,
                        split_kv: bool | None = None, window_size: tuple[int, int] = (-1, -1),
                        softcap: float = 0.0, k_scale: float = 1.0, v_scale: float = 1.0) -> torch.Tensor:
    """Per sequence: gather its blocks, causal softmax in fp32. The split/max arguments are ignored."""
    block_size, group = key_cache.shape[1], q.shape[1] // key_cache.shape[2]
    starts, lens = query_start_loc.tolist(), seq_lens.tolist()
    for i, seq_len in enumerate(lens):
        start, end = starts[i], starts[i + 1]
        if end == start:
            continue
        blocks = block_tables[i, :-(-seq_len // block_size)].long()
        k = key_cache[blocks].flatten(0, 1)[:seq_len].float() * k_scale  # [L, Hk, D]
        v = value_cache[blocks].flatten(0, 1)[:seq_len].float() * v_scale
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)  # [L, Hq, D]
        scores = torch.einsum("qhd,khd->hqk", q[start:end].float(), k) * scale
        if softcap > 0:
            scores = softcap * torch.tanh(scores / softcap)
        q_pos = torch.arange(seq_len - (end - start), seq_len, device=q.device)
        distance = q_pos[:, None] - torch.arange(seq_len, device=q.device)[None, :]
        visible = (distance >= 0) & ((distance <= window_size[0]) if window_size[0] >= 0 else True)
        scores = scores.masked_fill(~visible, float("-inf"))
        out[start:end] = torch.einsum("hqk,khd->qhd", scores.softmax(-1), v).to(out.dtype)
    return out
