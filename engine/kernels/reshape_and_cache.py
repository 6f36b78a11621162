"""Write this step's keys/values into the paged KV cache at their slots (vLLM's reshape_and_cache)."""
import torch

from ._triton import next_pow2, tl, triton, use_triton


@triton.jit(do_not_specialize_on_alignment=["slot_mapping_ptr"])  # a view at a batch-dependent offset
def _reshape_and_cache_kernel(
    key_ptr, value_ptr, key_cache_ptr, value_cache_ptr, slot_mapping_ptr,
    key_stride_t, key_stride_h, value_stride_t, value_stride_h,
    kc_stride_b, kc_stride_s, kc_stride_h, vc_stride_b, vc_stride_s, vc_stride_h,
    block_size, num_kv_heads, head_dim,
    HEADS_P2: tl.constexpr, DIM_P2: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_mapping_ptr + token).to(tl.int64)
    if slot < 0:  # padding token
        return
    block, offset = slot // block_size, slot % block_size
    heads = tl.arange(0, HEADS_P2)[:, None]
    dims = tl.arange(0, DIM_P2)[None, :]
    mask = (heads < num_kv_heads) & (dims < head_dim)
    k = tl.load(key_ptr + token * key_stride_t + heads * key_stride_h + dims, mask=mask)
    v = tl.load(value_ptr + token * value_stride_t + heads * value_stride_h + dims, mask=mask)
    kc = key_cache_ptr + block * kc_stride_b + offset * kc_stride_s + heads * kc_stride_h + dims
    vc = value_cache_ptr + block * vc_stride_b + offset * vc_stride_s + heads * vc_stride_h + dims
    tl.store(kc, k, mask=mask)
    tl.store(vc, v, mask=mask)


def reshape_and_cache(key: torch.Tensor, value: torch.Tensor, key_cache: torch.Tensor,
                      value_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """key/value: [T, Hk, D] in the caches' dtype (last dim contiguous; views into a fused qkv tensor are fine);
    caches: [num_blocks, block_size, Hk, D] (last dim contiguous); slot_mapping: [T] int64, -1 = skip."""
    if not use_triton(key):
        return reshape_and_cache_ref(key, value, key_cache, value_cache, slot_mapping)
    num_tokens, num_kv_heads, head_dim = key.shape
    if num_tokens == 0:
        return
    assert key.stride(-1) == value.stride(-1) == key_cache.stride(-1) == value_cache.stride(-1) == 1
    assert key.dtype == value.dtype == key_cache.dtype == value_cache.dtype
    _reshape_and_cache_kernel[(num_tokens,)](
        key, value, key_cache, value_cache, slot_mapping,
        key.stride(0), key.stride(1), value.stride(0), value.stride(1),
        key_cache.stride(0), key_cache.stride(1), key_cache.stride(2),
        value_cache.stride(0), value_cache.stride(1), value_cache.stride(2),
        key_cache.shape[1], num_kv_heads, head_dim,
        HEADS_P2=next_pow2(num_kv_heads), DIM_P2=next_pow2(head_dim),
    )


def reshape_and_cache_ref(key: torch.Tensor, value: torch.Tensor, key_cache: torch.Tensor,
                          value_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    valid = slot_mapping >= 0
    slots = slot_mapping[valid]
    block_size = key_cache.shape[1]
    blocks, offsets = slots // block_size, slots % block_size
    key_cache[blocks, offsets] = key[valid]
    value_cache[blocks, offsets] = value[valid]
