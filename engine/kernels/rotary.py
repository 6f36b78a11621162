"""Rotary position embedding applied in place to q and k, indexing vLLM's cos_sin_cache by position.

cos_sin_cache: [max_pos, rot_dim] = cat(cos, sin) with rot_dim // 2 frequencies each, any rope scaling already
folded in. Only the first rot_dim dims of each head rotate (partial rotary); the rest pass through.
Neox style rotates the halves (x[:r/2], x[r/2:r]); GPT-J style rotates interleaved pairs (x[2i], x[2i+1]).
Given the KV cache, the same kernel also stores the rotated keys and the values at their slots (vLLM's
reshape_and_cache folded in: one launch per layer instead of two), and Qwen3's per-head q/k RMSNorm can fold in
before the rotation (two launches fewer again).
"""
import torch

from ._triton import next_pow2, pdl_args, tl, triton, use_triton, wait_for_previous_kernel
from .fp8 import FP8
from .reshape_and_cache import reshape_and_cache_ref, to_cache
from .rms_norm import rms_norm_ref


@triton.jit
def _rotate_heads(x_ptr, token, stride_t, stride_h, num_heads, cos, sin, pairs, pair_mask, cache_ptr,
                  cache_stride_h, head_dim, cache_scale, norm_w_ptr, eps, IS_NEOX: tl.constexpr,
                  ROT_HALF: tl.constexpr, HEADS_P2: tl.constexpr, TO_CACHE: tl.constexpr, DIM_P2: tl.constexpr,
                  FP8_CACHE: tl.constexpr, NORM: tl.constexpr):
    """Rotate in place; TO_CACHE also stores the rotated heads (and any unrotated tail dims) at cache_ptr. NORM
    (whole-head rotary only): each head is RMS-normalized with norm_w first, rounded as rms_norm rounds it."""
    heads = tl.arange(0, HEADS_P2)[:, None]
    mask = (heads < num_heads) & pair_mask[None, :]
    if IS_NEOX:
        first, second = pairs, pairs + ROT_HALF
    else:
        first, second = 2 * pairs, 2 * pairs + 1
    base = x_ptr + token * stride_t + heads * stride_h
    x1 = tl.load(base + first[None, :], mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(base + second[None, :], mask=mask, other=0.0).to(tl.float32)
    if NORM:
        inv_rms = tl.rsqrt((tl.sum(x1 * x1, 1) + tl.sum(x2 * x2, 1)) / (2 * ROT_HALF) + eps)[:, None]
        w1 = tl.load(norm_w_ptr + first, mask=pair_mask, other=0.0).to(tl.float32)[None, :]
        w2 = tl.load(norm_w_ptr + second, mask=pair_mask, other=0.0).to(tl.float32)[None, :]
        x1 = (x1 * inv_rms * w1).to(x_ptr.dtype.element_ty).to(tl.float32)
        x2 = (x2 * inv_rms * w2).to(x_ptr.dtype.element_ty).to(tl.float32)
    y1 = (x1 * cos - x2 * sin).to(x_ptr.dtype.element_ty)
    y2 = (x2 * cos + x1 * sin).to(x_ptr.dtype.element_ty)
    tl.store(base + first[None, :], y1, mask=mask)
    tl.store(base + second[None, :], y2, mask=mask)
    if TO_CACHE:
        cache = cache_ptr + heads * cache_stride_h
        tl.store(cache + first[None, :], to_cache(y1, cache_scale, FP8_CACHE), mask=mask)
        tl.store(cache + second[None, :], to_cache(y2, cache_scale, FP8_CACHE), mask=mask)
        tail = 2 * ROT_HALF + tl.arange(0, DIM_P2)[None, :]  # partial rotary: dims past rot_dim pass through
        tail_mask = (heads < num_heads) & (tail < head_dim)
        tl.store(cache + tail, to_cache(tl.load(base + tail, mask=tail_mask), cache_scale, FP8_CACHE), mask=tail_mask)


@triton.jit(do_not_specialize_on_alignment=["positions_ptr", "slot_mapping_ptr"])  # views at batch-dependent offsets
def _rotary_kernel(positions_ptr, q_ptr, k_ptr, cache_ptr, q_stride_t, q_stride_h, k_stride_t, k_stride_h,
                   cache_stride, num_q_heads, num_k_heads,
                   v_ptr, key_cache_ptr, value_cache_ptr, slot_mapping_ptr, v_stride_t, v_stride_h,
                   kc_stride_b, kc_stride_s, kc_stride_h, vc_stride_b, vc_stride_s, vc_stride_h, block_size, head_dim,
                   k_scale, v_scale, q_norm_ptr, k_norm_ptr, eps, IS_NEOX: tl.constexpr, ROT_HALF: tl.constexpr,
                   HALF_P2: tl.constexpr, Q_HEADS_P2: tl.constexpr, K_HEADS_P2: tl.constexpr, DIM_P2: tl.constexpr,
                   WRITE_KV: tl.constexpr, FP8_CACHE: tl.constexpr, QK_NORM: tl.constexpr, PDL: tl.constexpr = False):
    wait_for_previous_kernel(PDL)
    token = tl.program_id(0).to(tl.int64)
    pos = tl.load(positions_ptr + token).to(tl.int64)
    pairs = tl.arange(0, HALF_P2)
    pair_mask = pairs < ROT_HALF
    cos = tl.load(cache_ptr + pos * cache_stride + pairs, mask=pair_mask, other=0.0).to(tl.float32)[None, :]
    sin = tl.load(cache_ptr + pos * cache_stride + ROT_HALF + pairs, mask=pair_mask, other=0.0).to(tl.float32)[None, :]
    _rotate_heads(q_ptr, token, q_stride_t, q_stride_h, num_q_heads, cos, sin, pairs, pair_mask, q_ptr, 0, head_dim,
                  1.0, q_norm_ptr, eps, IS_NEOX, ROT_HALF, Q_HEADS_P2, False, DIM_P2, False, QK_NORM)
    if WRITE_KV:
        slot = tl.load(slot_mapping_ptr + token).to(tl.int64)
    else:
        slot = tl.full([], -1, tl.int64)
    if slot >= 0:  # not a padding token: keys (rotated) and values go to the cache too
        block, offset = slot // block_size, slot % block_size
        _rotate_heads(k_ptr, token, k_stride_t, k_stride_h, num_k_heads, cos, sin, pairs, pair_mask,
                      key_cache_ptr + block * kc_stride_b + offset * kc_stride_s, kc_stride_h, head_dim,
                      k_scale, k_norm_ptr, eps, IS_NEOX, ROT_HALF, K_HEADS_P2, True, DIM_P2, FP8_CACHE, QK_NORM)
        heads = tl.arange(0, K_HEADS_P2)[:, None]
        dims = tl.arange(0, DIM_P2)[None, :]
        mask = (heads < num_k_heads) & (dims < head_dim)
        v = tl.load(v_ptr + token * v_stride_t + heads * v_stride_h + dims, mask=mask)
        tl.store(value_cache_ptr + block * vc_stride_b + offset * vc_stride_s + heads * vc_stride_h + dims,
                 to_cache(v, v_scale, FP8_CACHE), mask=mask)
    else:
        _rotate_heads(k_ptr, token, k_stride_t, k_stride_h, num_k_heads, cos, sin, pairs, pair_mask, k_ptr, 0,
                      head_dim, 1.0, k_norm_ptr, eps, IS_NEOX, ROT_HALF, K_HEADS_P2, False, DIM_P2, False, QK_NORM)


def rotary_embedding(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, cos_sin_cache: torch.Tensor,
                     head_dim: int, is_neox: bool = True,
                     kv_write: tuple | None = None,
                     qk_norm: tuple[torch.Tensor, torch.Tensor, float] | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """positions: [T] int (int64 or int32); q: [T, Hq, head_dim], k: [T, Hk, head_dim], last dim contiguous
    (views into a fused qkv tensor are fine). Rotates q and k in place and returns them.
    kv_write = (v, key_cache, value_cache, slot_mapping[, k_scale, v_scale]), as reshape_and_cache takes them: also
    stores the rotated keys and the values at their slots (slot -1 = padding, skipped).
    qk_norm = (q_weight, k_weight, eps): RMS-normalize each head first (Qwen3's q/k norm; whole-head rotary only),
    which saves the two norm kernels."""
    if not use_triton(q):
        if qk_norm is not None:
            q.copy_(rms_norm_ref(q, qk_norm[0], qk_norm[2]))
            k.copy_(rms_norm_ref(k, qk_norm[1], qk_norm[2]))
        q, k = rotary_embedding_ref(positions, q, k, cos_sin_cache, head_dim, is_neox)
        if kv_write is not None:
            reshape_and_cache_ref(k, *kv_write)
        return q, k
    num_tokens, rot_half = q.shape[0], cos_sin_cache.shape[1] // 2
    assert q.shape[-1] == k.shape[-1] == head_dim and 2 * rot_half <= head_dim
    assert qk_norm is None or 2 * rot_half == head_dim, "q/k norm folds into whole-head rotary only"
    assert q.stride(-1) == k.stride(-1) == cos_sin_cache.stride(-1) == 1
    if num_tokens == 0:
        return q, k
    if kv_write is not None:
        v, key_cache, value_cache, slot_mapping, *scales = kv_write
        assert v.stride(-1) == key_cache.stride(-1) == value_cache.stride(-1) == 1
        assert k.dtype == v.dtype and key_cache.dtype == value_cache.dtype in (k.dtype, FP8)
        cache_args = (v, key_cache, value_cache, slot_mapping, v.stride(0), v.stride(1), *key_cache.stride()[:3],
                      *value_cache.stride()[:3], key_cache.shape[1])
    else:
        cache_args, scales = (k, k, k, positions, 0, 0, 0, 0, 0, 0, 0, 0, 1), ()  # never dereferenced
    k_scale, v_scale = scales or (1.0, 1.0)
    _rotary_kernel[(num_tokens,)](
        positions, q, k, cos_sin_cache, q.stride(0), q.stride(1), k.stride(0), k.stride(1),
        cos_sin_cache.stride(0), q.shape[1], k.shape[1], *cache_args, head_dim, k_scale, v_scale,
        *(qk_norm or (q, q, 0.0)), IS_NEOX=is_neox, ROT_HALF=rot_half, HALF_P2=next_pow2(rot_half),
        Q_HEADS_P2=next_pow2(q.shape[1]), K_HEADS_P2=next_pow2(k.shape[1]), DIM_P2=next_pow2(head_dim),
        WRITE_KV=kv_write is not None, FP8_CACHE=kv_write is not None and kv_write[1].dtype == FP8,
        QK_NORM=qk_norm is not None, **pdl_args(positions),
    )
    return q, k


def rotary_embedding_ref(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, cos_sin_cache: torch.Tensor,
                         head_dim: int, is_neox: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    cos, sin = cos_sin_cache[positions.long()].float().unsqueeze(1).chunk(2, dim=-1)  # [T, 1, rot_dim / 2]
    rot_dim = cos_sin_cache.shape[1]
    for x in (q, k):
        rot = x[..., :rot_dim].float()
        if is_neox:
            x1, x2 = rot.chunk(2, dim=-1)
            x[..., :rot_dim] = torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)
        else:
            x1, x2 = rot[..., 0::2], rot[..., 1::2]
            x[..., :rot_dim] = torch.stack([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).flatten(-2).to(x.dtype)
    return q, k
