"""An FP8 (e4m3) KV cache: the kernels that write it (reshape_and_cache, rotary with its fused cache write) store
x / scale rounded like torch, and paged attention reads it back times the scales, against the references."""
import pytest
import torch

from engine.kernels.fp8 import FP8
from engine.kernels.paged_attention import paged_attention_ref, unified_attention
from engine.kernels.reshape_and_cache import cache_values, reshape_and_cache, reshape_and_cache_ref
from engine.kernels.rotary import rotary_embedding, rotary_embedding_ref
from tests.engine.kernels.test_paged_attention import MIXED, make_batch
from tests.engine.kernels.test_rotary import cos_sin_cache

SCALES = (0.05, 0.02)  # k_scale, v_scale: random inputs land in e4m3's range; past 448 * scale they saturate


def empty_fp8_caches(num_blocks, block_size, heads, head_dim, device):
    key_cache = torch.zeros(num_blocks, block_size, heads, head_dim, device=device).to(FP8)
    return key_cache, key_cache.clone()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_reshape_and_cache_stores_scaled_e4m3(device, dtype):
    torch.manual_seed(0)
    key = (torch.randn(7, 2, 40, device=device) * 4).to(dtype)
    value = (torch.randn(7, 2, 40, device=device) * 4).to(dtype)
    key[0, 0, :2] = torch.tensor([100.0, -30.0])  # past 448 * k_scale
    slots = torch.tensor([3, 9, -1, 0, 17, 30, 31], device=device)
    key_cache, value_cache = empty_fp8_caches(4, 8, 2, 40, device)
    key_ref, value_ref = key_cache.clone(), value_cache.clone()
    reshape_and_cache(key, value, key_cache, value_cache, slots, *SCALES)
    reshape_and_cache_ref(key, value, key_ref, value_ref, slots, *SCALES)
    assert torch.equal(key_cache.view(torch.uint8), key_ref.view(torch.uint8))
    assert torch.equal(value_cache.view(torch.uint8), value_ref.view(torch.uint8))
    assert key_ref.float().abs().max() == 448  # saturated, not NaN
    assert torch.equal(key_ref.view(-1, 2, 40)[9].float(), cache_values(key[1], FP8, SCALES[0]).float())


def test_rotary_fused_write_to_an_fp8_cache(device):
    torch.manual_seed(1)
    num_tokens, heads, kv_heads, head_dim, rot_dim = 9, 6, 2, 64, 32  # partial rotary: a tail stored as it is
    cache = cos_sin_cache(64, rot_dim).to(device)
    positions = torch.randint(0, 64, (num_tokens,), device=device)
    qkv = torch.randn(num_tokens, heads + 2 * kv_heads, head_dim, device=device) * 4
    q, k, v = qkv.split([heads, kv_heads, kv_heads], dim=1)
    slots = torch.randperm(24, device=device)[:num_tokens]
    slots[4] = -1
    key_cache, value_cache = empty_fp8_caches(6, 4, kv_heads, head_dim, device)
    key_ref, value_ref = key_cache.clone(), value_cache.clone()
    _, k_ref = rotary_embedding_ref(positions, q.clone(), k.clone(), cache, head_dim)
    reshape_and_cache_ref(k_ref, v.clone(), key_ref, value_ref, slots, *SCALES)
    rotary_embedding(positions, q, k, cache, head_dim, kv_write=(v, key_cache, value_cache, slots, *SCALES))
    # rotation in the kernel and in torch may differ in the last bit, which can move a value by one e4m3 step
    torch.testing.assert_close(key_cache.float(), key_ref.float(), atol=0, rtol=0.13)
    assert torch.equal(value_cache.view(torch.uint8), value_ref.view(torch.uint8))


@pytest.mark.parametrize("split_kv", [False, True])
@pytest.mark.parametrize("window_size,softcap", [((-1, -1), 0.0), ((6, 0), 2.0)])  # plain; Gemma 2's both
def test_paged_attention_reads_an_fp8_cache(device, split_kv, window_size, softcap):
    """Prefill, a chunk over a cached prefix and decodes in one batch, with or without split-KV, a sliding window
    and a soft-cap."""
    torch.manual_seed(2)
    q, key_cache, value_cache, query_start_loc, seq_lens, block_tables = make_batch(
        *MIXED, num_heads=4, num_kv_heads=2, head_dim=64, dtype=torch.float32, device=device)
    key_cache = cache_values(torch.nan_to_num(key_cache, 0.0), FP8, SCALES[0])  # NaN has no e4m3 byte that
    value_cache = cache_values(torch.nan_to_num(value_cache, 0.0), FP8, SCALES[1])  # a read would show
    out = unified_attention(q, key_cache, value_cache, torch.empty_like(q), query_start_loc, seq_lens, block_tables,
                            0.125, max(MIXED[0]), max(MIXED[1]), split_kv, window_size=window_size, softcap=softcap,
                            k_scale=SCALES[0], v_scale=SCALES[1])
    ref = paged_attention_ref(q, key_cache, value_cache, torch.empty_like(q), query_start_loc, seq_lens,
                              block_tables, 0.125, max(MIXED[0]), max(MIXED[1]), window_size=window_size,
                              softcap=softcap, k_scale=SCALES[0], v_scale=SCALES[1])
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
    # the reference is attention over the dequantized cache
    plain = paged_attention_ref(q, key_cache.float() * SCALES[0], value_cache.float() * SCALES[1],
                                torch.empty_like(q), query_start_loc, seq_lens, block_tables, 0.125, 0, 0,
                                window_size=window_size, softcap=softcap)
    torch.testing.assert_close(ref, plain)
