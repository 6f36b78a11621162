import pytest
import torch

from engine.kernels.reshape_and_cache import reshape_and_cache_ref
from engine.kernels.rotary import rotary_embedding, rotary_embedding_ref

TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}


def cos_sin_cache(max_pos: int, rot_dim: int) -> torch.Tensor:
    inv_freq = 1.0 / 10000 ** (torch.arange(0, rot_dim, 2, dtype=torch.float) / rot_dim)
    freqs = torch.outer(torch.arange(max_pos, dtype=torch.float), inv_freq)
    return torch.cat([freqs.cos(), freqs.sin()], dim=-1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("is_neox", [True, False])
@pytest.mark.parametrize("num_heads,num_kv_heads,head_dim,rot_dim", [(4, 4, 64, 64), (8, 2, 128, 128), (6, 2, 64, 32)])
def test_matches_reference_in_place(device, dtype, is_neox, num_heads, num_kv_heads, head_dim, rot_dim):
    torch.manual_seed(0)
    num_tokens, max_pos = 11, 300
    cache = cos_sin_cache(max_pos, rot_dim).to(device)
    positions = torch.randint(0, max_pos, (num_tokens,), device=device)
    qkv = torch.randn(num_tokens, num_heads + 2 * num_kv_heads, head_dim, dtype=dtype, device=device)
    q, k = qkv[:, :num_heads], qkv[:, num_heads:num_heads + num_kv_heads]  # strided views, as a model has them
    before = qkv.clone()
    q_ref, k_ref = rotary_embedding_ref(positions, q.clone(), k.clone(), cache, head_dim, is_neox)
    q_out, k_out = rotary_embedding(positions, q, k, cache, head_dim, is_neox)
    assert q_out.data_ptr() == q.data_ptr() and k_out.data_ptr() == k.data_ptr()
    torch.testing.assert_close(q, q_ref, atol=TOL[dtype], rtol=TOL[dtype])
    torch.testing.assert_close(k, k_ref, atol=TOL[dtype], rtol=TOL[dtype])
    assert torch.equal(qkv[:, num_heads + num_kv_heads:], before[:, num_heads + num_kv_heads:])  # v untouched
    assert torch.equal(qkv[..., rot_dim:], before[..., rot_dim:])  # partial rotary leaves the tail alone
    assert not qkv.isnan().any()


def test_reference_matches_complex_rotation():
    """GPT-J style is multiplication of (x[2i] + i x[2i+1]) by e^(i pos theta_i); neox is the same on halves."""
    torch.manual_seed(0)
    cache, positions = cos_sin_cache(50, 64), torch.tensor([0, 7, 49])
    x = torch.randn(3, 2, 64)
    angle = torch.polar(torch.ones(3, 32), torch.atan2(*cache[positions].chunk(2, -1)[::-1]))[:, None]
    gptj = torch.view_as_real(torch.view_as_complex(x.view(3, 2, 32, 2).contiguous()) * angle).flatten(-2)
    torch.testing.assert_close(rotary_embedding_ref(positions, x.clone(), x.clone(), cache, 64, False)[0], gptj,
                               atol=1e-5, rtol=1e-5)
    halves = torch.complex(*x.chunk(2, -1)) * angle
    neox = torch.cat([halves.real, halves.imag], -1)
    torch.testing.assert_close(rotary_embedding_ref(positions, x.clone(), x.clone(), cache, 64, True)[0], neox,
                               atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("num_heads,num_kv_heads,head_dim,rot_dim", [(8, 2, 128, 128), (6, 2, 64, 32)])
def test_fused_kv_cache_write(device, dtype, num_heads, num_kv_heads, head_dim, rot_dim):
    """With kv_write the kernel also stores rotated keys (their unrotated tail too) and values at their slots,
    as rotary then reshape_and_cache would; padding tokens (slot -1) rotate but write nothing."""
    torch.manual_seed(0)
    num_tokens, block_size, num_blocks = 9, 4, 6
    cache = cos_sin_cache(64, rot_dim).to(device)
    positions = torch.randint(0, 64, (num_tokens,), device=device)
    qkv = torch.randn(num_tokens, num_heads + 2 * num_kv_heads, head_dim, dtype=dtype, device=device)
    q, k, v = qkv.split([num_heads, num_kv_heads, num_kv_heads], dim=1)
    slots = torch.randperm(num_blocks * block_size, device=device)[:num_tokens]
    slots[[2, 7]] = -1
    key_cache = torch.full((num_blocks, block_size, num_kv_heads, head_dim), float("nan"), dtype=dtype, device=device)
    value_cache = key_cache.clone()
    key_ref, value_ref = key_cache.clone(), value_cache.clone()
    q_ref, k_ref = rotary_embedding_ref(positions, q.clone(), k.clone(), cache, head_dim)
    reshape_and_cache_ref(k_ref, v.clone(), key_ref, value_ref, slots)
    rotary_embedding(positions, q, k, cache, head_dim, kv_write=(v, key_cache, value_cache, slots))
    tol = dict(atol=TOL[dtype], rtol=TOL[dtype])
    torch.testing.assert_close(q, q_ref, **tol)
    torch.testing.assert_close(k, k_ref, **tol)  # padding tokens' keys rotate in place too
    torch.testing.assert_close(key_cache, key_ref, equal_nan=True, **tol)
    torch.testing.assert_close(value_cache, value_ref, equal_nan=True, **tol)
    assert key_cache.isnan().sum() == key_ref.isnan().sum() == (num_blocks * block_size - 7) * num_kv_heads * head_dim


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("is_neox", [True, False])
@pytest.mark.parametrize("write_kv", [False, True])
def test_qk_norm_folded_in_equals_the_norms_then_rotary(device, dtype, is_neox, write_kv):
    """Qwen3's per-head q/k RMSNorm inside the rotary kernel: as rms_norm on q and on k (each with its own weight),
    then rotary, then the cache write; GQA 3 (6 q heads, 2 kv heads) and padding tokens."""
    from engine.kernels.rms_norm import rms_norm_ref

    torch.manual_seed(1)
    num_tokens, num_heads, num_kv_heads, head_dim, block_size, num_blocks = 7, 6, 2, 64, 4, 4
    cache = cos_sin_cache(64, head_dim).to(device)
    positions = torch.randint(0, 64, (num_tokens,), device=device)
    qkv = torch.randn(num_tokens, num_heads + 2 * num_kv_heads, head_dim, dtype=dtype, device=device) * 3
    q, k, v = qkv.split([num_heads, num_kv_heads, num_kv_heads], dim=1)
    q_weight = (torch.rand(head_dim, device=device) + 0.5).to(dtype)
    k_weight = (torch.rand(head_dim, device=device) + 0.5).to(dtype)
    q_ref, k_ref = rotary_embedding_ref(positions, rms_norm_ref(q, q_weight, 1e-6), rms_norm_ref(k, k_weight, 1e-6),
                                        cache, head_dim, is_neox)
    kv_write = None
    if write_kv:
        slots = torch.randperm(num_blocks * block_size, device=device)[:num_tokens]
        slots[3] = -1
        key_cache = torch.zeros(num_blocks, block_size, num_kv_heads, head_dim, dtype=dtype, device=device)
        value_cache, key_ref, value_ref = key_cache.clone(), key_cache.clone(), key_cache.clone()
        reshape_and_cache_ref(k_ref, v.clone(), key_ref, value_ref, slots)
        kv_write = (v, key_cache, value_cache, slots)
    rotary_embedding(positions, q, k, cache, head_dim, is_neox, kv_write, qk_norm=(q_weight, k_weight, 1e-6))
    tol = dict(atol=TOL[dtype], rtol=TOL[dtype])
    torch.testing.assert_close(q, q_ref, **tol)
    torch.testing.assert_close(k, k_ref, **tol)
    if write_kv:
        torch.testing.assert_close(key_cache, key_ref, **tol)
        torch.testing.assert_close(value_cache, value_ref, **tol)


def test_qk_norm_needs_whole_head_rotary(device):
    q, k = torch.randn(2, 4, 64, device=device), torch.randn(2, 2, 64, device=device)
    weight = torch.ones(64, device=device)
    with pytest.raises(AssertionError, match="whole-head"):
        rotary_embedding(torch.arange(2, device=device), q, k, cos_sin_cache(8, 32).to(device), 64,
                         qk_norm=(weight, weight, 1e-6))
