"""Rotary position embedding applied in place to q and k, indexing vLLM's cos_sin_cache by position.

cos_sin_cache: [max_pos, rot_dim] = cat(cos, sin) with rot_dim // 2 frequencies each, any rope scaling already
folded in. Only the first rot_dim dims of each head rotate (partial rotary); the rest pass through.
Neox style rotates the halves (x[:r/2], x[r/2:r]); GPT-J style rotates interleaved pairs (x[2i], x[2i+1]).
"""
import torch

from ._triton import next_pow2, tl, triton, use_pdl, use_triton, wait_for_previous


@triton.jit
def _rotate_heads(x_ptr, token, stride_t, stride_h, num_heads, cos, sin, pairs, pair_mask,
                  IS_NEOX: tl.constexpr, ROT_HALF: tl.constexpr, HEADS_P2: tl.constexpr):
    heads = tl.arange(0, HEADS_P2)[:, None]
    mask = (heads < num_heads) & pair_mask[None, :]
    if IS_NEOX:
        first, second = pairs, pairs + ROT_HALF
    else:
        first, second = 2 * pairs, 2 * pairs + 1
    base = x_ptr + token * stride_t + heads * stride_h
    x1 = tl.load(base + first[None, :], mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(base + second[None, :], mask=mask, other=0.0).to(tl.float32)
    tl.store(base + first[None, :], (x1 * cos - x2 * sin).to(x_ptr.dtype.element_ty), mask=mask)
    tl.store(base + second[None, :], (x2 * cos + x1 * sin).to(x_ptr.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize_on_alignment=["positions_ptr"])  # a view at a batch-dependent offset
def _rotary_kernel(positions_ptr, q_ptr, k_ptr, cache_ptr, q_stride_t, q_stride_h, k_stride_t, k_stride_h,
                   cache_stride, num_q_heads, num_k_heads,
                   IS_NEOX: tl.constexpr, ROT_HALF: tl.constexpr, HALF_P2: tl.constexpr,
                   Q_HEADS_P2: tl.constexpr, K_HEADS_P2: tl.constexpr, USE_PDL: tl.constexpr):
    wait_for_previous(USE_PDL)
    token = tl.program_id(0).to(tl.int64)
    pos = tl.load(positions_ptr + token).to(tl.int64)
    pairs = tl.arange(0, HALF_P2)
    pair_mask = pairs < ROT_HALF
    cos = tl.load(cache_ptr + pos * cache_stride + pairs, mask=pair_mask, other=0.0).to(tl.float32)[None, :]
    sin = tl.load(cache_ptr + pos * cache_stride + ROT_HALF + pairs, mask=pair_mask, other=0.0).to(tl.float32)[None, :]
    _rotate_heads(q_ptr, token, q_stride_t, q_stride_h, num_q_heads, cos, sin, pairs, pair_mask,
                  IS_NEOX, ROT_HALF, Q_HEADS_P2)
    _rotate_heads(k_ptr, token, k_stride_t, k_stride_h, num_k_heads, cos, sin, pairs, pair_mask,
                  IS_NEOX, ROT_HALF, K_HEADS_P2)


def rotary_embedding(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, cos_sin_cache: torch.Tensor,
                     head_dim: int, is_neox: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """positions: [T] int (int64 or int32); q: [T, Hq, head_dim], k: [T, Hk, head_dim], last dim contiguous
    (views into a fused qkv tensor are fine). Rotates q and k in place and returns them."""
    if not use_triton(q):
        return rotary_embedding_ref(positions, q, k, cos_sin_cache, head_dim, is_neox)
    num_tokens, rot_half = q.shape[0], cos_sin_cache.shape[1] // 2
    assert q.shape[-1] == k.shape[-1] == head_dim and 2 * rot_half <= head_dim
    assert q.stride(-1) == k.stride(-1) == cos_sin_cache.stride(-1) == 1
    if num_tokens == 0:
        return q, k
    _rotary_kernel[(num_tokens,)](
        positions, q, k, cos_sin_cache, q.stride(0), q.stride(1), k.stride(0), k.stride(1),
        cos_sin_cache.stride(0), q.shape[1], k.shape[1],
        IS_NEOX=is_neox, ROT_HALF=rot_half, HALF_P2=next_pow2(rot_half),
        Q_HEADS_P2=next_pow2(q.shape[1]), K_HEADS_P2=next_pow2(k.shape[1]), USE_PDL=use_pdl(q), launch_pdl=use_pdl(q),
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
