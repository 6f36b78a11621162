import pytest
import torch

from engine.kernels.reshape_and_cache import reshape_and_cache, reshape_and_cache_ref


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("num_kv_heads,head_dim", [(1, 64), (2, 128), (8, 64)])
def test_matches_reference_and_skips_padding(device, dtype, num_kv_heads, head_dim):
    torch.manual_seed(0)
    num_blocks, block_size, num_tokens = 6, 16, 23
    # key/value as strided views into a fused qkv projection, as a model produces them
    qkv = torch.randn(num_tokens, 4 + 2 * num_kv_heads, head_dim, dtype=dtype, device=device)
    key, value = qkv[:, 4:4 + num_kv_heads], qkv[:, 4 + num_kv_heads:]
    slots = torch.randperm(num_blocks * block_size, device=device)[:num_tokens]
    slots[[3, 10, 22]] = -1  # padding tokens
    caches = [torch.full((num_blocks, block_size, num_kv_heads, head_dim), float("nan"), dtype=dtype, device=device)
              for _ in range(4)]
    reshape_and_cache(key, value, caches[0], caches[1], slots)
    reshape_and_cache_ref(key, value, caches[2], caches[3], slots)
    for out, ref in [(caches[0], caches[2]), (caches[1], caches[3])]:
        torch.testing.assert_close(out, ref, equal_nan=True, atol=0, rtol=0)
    valid = slots[slots >= 0]
    flat_key = caches[0].view(-1, num_kv_heads, head_dim)
    torch.testing.assert_close(flat_key[valid], key[slots >= 0], atol=0, rtol=0)
    untouched = torch.ones(num_blocks * block_size, dtype=torch.bool, device=device)
    untouched[valid] = False
    assert flat_key[untouched].isnan().all() and caches[1].view(-1, num_kv_heads, head_dim)[untouched].isnan().all()

