"""Write this step's keys/values into the paged KV cache at their slots (vLLM's reshape_and_cache). An FP8 cache
stores x / scale in e4m3 (vLLM's kv_cache_dtype fp8, per-tensor k/v scales)."""
import torch

from ._triton import next_pow2, pdl_args, tl, triton, use_triton, wait_for_previous_kernel
from .fp8 import FP8, quantize_fp8, to_fp8


@triton.jit
def to_cache(x, scale, FP8_CACHE: tl.constexpr):
    """A key/value as the cache stores it."""
    if FP8_CACHE:  # one return: compiled Triton types every return of a function alike, constexpr branches too
        stored = to_fp8(x.to(tl.float32), scale)
    else:
        stored = x
    return stored


@triton.jit(do_not_specialize_on_alignment=["slot_mapping_ptr"])  # a view at a batch-dependent offset
def _reshape_and_cache_kernel(
    key_ptr, value_ptr, key_cache_ptr, value_cache_ptr, slot_mapping_ptr,
    key_stride_t, key_stride_h, value_stride_t, value_stride_h,
    kc_stride_b, kc_stride_s, kc_stride_h, vc_stride_b, vc_stride_s, vc_stride_h,
    block_size, num_kv_heads, head_dim, k_scale, v_scale,
    HEADS_P2: tl.constexpr, DIM_P2: tl.constexpr, FP8_CACHE: tl.constexpr, PDL: tl.constexpr = False,
):
    wait_for_previous_kernel(PDL)
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
    tl.store(kc, to_cache(k, k_scale, FP8_CACHE), mask=mask)
    tl.store(vc, to_cache(v, v_scale, FP8_CACHE), mask=mask)


def reshape_and_cache(key: torch.Tensor, value: torch.Tensor, key_cache: torch.Tensor,
                      value_cache: torch.Tensor, slot_mapping: torch.Tensor, k_scale: float = 1.0,
                      v_scale: float = 1.0) -> None:
    """key/value: [T, Hk, D] in the caches' dtype or FP8 caches (last dim contiguous; views into a fused qkv
    tensor are fine); caches: [num_blocks, block_size, Hk, D] (last dim contiguous); slot_mapping: [T] int64,
    -1 = skip. k_scale/v_scale: an FP8 cache's scales."""
    if not use_triton(key):
        return reshape_and_cache_ref(key, value, key_cache, value_cache, slot_mapping, k_scale, v_scale)
    num_tokens, num_kv_heads, head_dim = key.shape
    if num_tokens == 0:
        return
    assert key.stride(-1) == value.stride(-1) == key_cache.stride(-1) == value_cache.stride(-1) == 1
    assert key.dtype == value.dtype and key_cache.dtype == value_cache.dtype in (key.dtype, FP8)
    _reshape_and_cache_kernel[(num_tokens,)](
        key, value, key_cache, value_cache, slot_mapping,
        key.stride(0), key.stride(1), value.stride(0), value.stride(1),
        key_cache.stride(0), key_cache.stride(1), key_cache.stride(2),
        value_cache.stride(0), value_cache.stride(1), value_cache.stride(2),
        key_cache.shape[1], num_kv_heads, head_dim, k_scale, v_scale,
        HEADS_P2=next_pow2(num_kv_heads), DIM_P2=next_pow2(head_dim), FP8_CACHE=key_cache.dtype == FP8,
        **pdl_args(key),
    )


def reshape_and_cache_ref(key: torch.Tensor, value: torch.Tensor, key_cache: torch.Tensor,
                          value_cache: torch.Tensor, slot_mapping: torch.Tensor, k_scale: float = 1.0,
                          v_scale: float = 1.0) -> None:
    valid = slot_mapping >= 0
    slots = slot_mapping[valid]
    block_size = key_cache.shape[1]
    blocks, offsets = slots // block_size, slots % block_size
    key_cache[blocks, offsets] = cache_values(key[valid], key_cache.dtype, k_scale)
    value_cache[blocks, offsets] = cache_values(value[valid], value_cache.dtype, v_scale)


def cache_values(x: torch.Tensor, cache_dtype: torch.dtype, scale: float) -> torch.Tensor:
    """x as a cache of `cache_dtype` stores it: an FP8 cache holds x / scale, saturated."""
    if cache_dtype != FP8:
        return x
    return quantize_fp8(x, scale)


def cached_values(x: torch.Tensor, dtype: torch.dtype, scale: float) -> torch.Tensor:
    """What a cache's stored values read as in `dtype`."""
    return (x.float() * scale).to(dtype) if x.dtype == FP8 else x.to(dtype)
