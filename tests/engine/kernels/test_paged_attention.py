import pytest
import torch

from engine.kernels.paged_attention import (TileConfig, paged_attention_ref, tile_config, unified_attention,
                                           use_split_kv)

TOL = {torch.float32: dict(atol=1e-4, rtol=1e-4), torch.float16: dict(atol=3e-3, rtol=3e-3),
       torch.bfloat16: dict(atol=3e-2, rtol=3e-2)}
BLOCK_SIZE = 16
# (query lens, context lens): a prompt from scratch, a chunk over 33 cached tokens (a partly filled block), a long
# decode, a decode at position 0, a short prompt, and a chunk ending on a block boundary.
MIXED = ([37, 20, 1, 1, 5, 16], [37, 53, 100, 1, 5, 48])


def make_batch(q_lens, seq_lens, num_heads, num_kv_heads, head_dim, dtype, device, pad_tokens=0):
    """Sequences scattered over a NaN-filled cache; only their real slots hold data, and unused block-table entries
    point far outside the cache, so reading anything else shows up as NaN or a crash."""
    blocks_per_seq = [-(-n // BLOCK_SIZE) for n in seq_lens]
    num_blocks = sum(blocks_per_seq) + 2
    key_cache = torch.full((num_blocks, BLOCK_SIZE, num_kv_heads, head_dim), float("nan"), dtype=dtype, device=device)
    value_cache = key_cache.clone()
    block_tables = torch.full((len(seq_lens), max(blocks_per_seq) + 1), 10**6, dtype=torch.int32, device=device)
    free_blocks = torch.randperm(num_blocks).tolist()
    for i, (seq_len, n) in enumerate(zip(seq_lens, blocks_per_seq)):
        table = torch.tensor([free_blocks.pop() for _ in range(n)], device=device)
        block_tables[i, :n] = table.int()
        positions = torch.arange(seq_len, device=device)
        slots = table[positions // BLOCK_SIZE] * BLOCK_SIZE + positions % BLOCK_SIZE
        key_cache.view(-1, num_kv_heads, head_dim)[slots] = torch.randn(seq_len, num_kv_heads, head_dim, device=device).to(dtype)
        value_cache.view(-1, num_kv_heads, head_dim)[slots] = torch.randn(seq_len, num_kv_heads, head_dim, device=device).to(dtype)
    q = torch.randn(sum(q_lens) + pad_tokens, num_heads, head_dim, device=device).to(dtype)
    query_start_loc = torch.tensor([0] + q_lens, device=device).cumsum(0).int()
    seq_lens_t = torch.tensor(seq_lens, dtype=torch.int32, device=device)
    return q, key_cache, value_cache, query_start_loc, seq_lens_t, block_tables


def check(q_lens, seq_lens, num_heads, num_kv_heads, head_dim, dtype, device, split_kv, pad_tokens=0, config=None,
          window_size=(-1, -1), softcap=0.0):
    torch.manual_seed(0)
    q, key_cache, value_cache, query_start_loc, seq_lens_t, block_tables = make_batch(
        q_lens, seq_lens, num_heads, num_kv_heads, head_dim, dtype, device, pad_tokens)
    args = (query_start_loc, seq_lens_t, block_tables, head_dim ** -0.5, max(q_lens), max(seq_lens))
    out = torch.full_like(q, float("nan"))  # poisoned: any row the kernel forgets stays NaN
    ref = torch.full_like(q, float("nan"))
    assert unified_attention(q, key_cache, value_cache, out, *args, split_kv=split_kv, config=config,
                             window_size=window_size, softcap=softcap) is out
    paged_attention_ref(q, key_cache, value_cache, ref, *args, window_size=window_size, softcap=softcap)
    num_real = sum(q_lens)
    assert not out[:num_real].isnan().any()
    assert out[num_real:].isnan().all()  # padding rows are left alone
    torch.testing.assert_close(out[:num_real], ref[:num_real], **TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("group", [1, 4, 8])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_mixed_batch(device, dtype, group, head_dim):
    check(*MIXED, 2 * group, 2, head_dim, dtype, device, split_kv=None)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("group,head_dim", [(1, 64), (4, 128), (8, 64)])
def test_split_kv_forced_on_mixed_batch(device, dtype, group, head_dim):
    check(*MIXED, 2 * group, 2, head_dim, dtype, device, split_kv=True)


def test_split_kv_prefill_rows_with_empty_splits(device):
    """Early query rows of a long chunk see no key at all in the later splits: those partials must weigh nothing."""
    check([70, 1], [130, 200], 8, 2, 64, torch.float32, device, split_kv=True)


def test_odd_group_and_head_dim(device):
    """GQA ratio 3 leaves rows of the 16-row tile unused; head_dim 80 pads to 128."""
    check(*MIXED, 6, 2, 80, torch.float32, device, split_kv=False)
    check(*MIXED, 6, 2, 80, torch.float32, device, split_kv=True)


@pytest.mark.parametrize("split_kv", [None, True, False])
def test_decode_batch_long_context(device, split_kv):
    q_lens, seq_lens = [1, 1, 1], [520, 77, 3]
    assert use_split_kv(len(seq_lens), 1, max(q_lens), max(seq_lens))  # the heuristic takes this batch
    check(q_lens, seq_lens, 4, 1, 64, torch.float32, device, split_kv=split_kv)


@pytest.mark.parametrize("split_kv", [False, True])
def test_padding_tokens_untouched(device, split_kv):
    check([3, 1], [40, 17], 8, 2, 64, torch.float32, device, split_kv=split_kv, pad_tokens=5)


@pytest.mark.parametrize("config", [TileConfig(128, 64, 8, 2, 128), TileConfig(128, 64, 8, 3), TileConfig(64, 32, 4, 2),
                                    TileConfig(32, 128, 4, 3)])
@pytest.mark.parametrize("split_kv", [False, True])
def test_forced_tile_configs(device, config, split_kv):
    """Every tile shape the heuristic or a benchmark may pick: a long prompt whose q-blocks see unmasked tiles
    before the causal diagonal, a chunk over a cached prefix ending mid-block, and a decode."""
    check([150, 37, 1], [150, 90, 75], 8, 2, 128, torch.bfloat16, device, split_kv=split_kv, config=config)


def test_tile_heuristic():
    assert tile_config(4, 1).block_m == 16 and tile_config(4, 100).block_m == 128 and tile_config(16, 1).block_m == 16
    assert tile_config(4, 100).maxnreg == 128 and tile_config(4, 100, head_dim=256) == (64, 64, 4, 2, None)
    assert tile_config(4, 1, split_kv=True).tile == 32 and tile_config(4, 1).tile == 64


def test_split_heuristic():
    assert not use_split_kv(num_seqs=4, num_kv_heads=8, max_query_len=2, max_seq_len=4096)  # not decode-only
    assert not use_split_kv(num_seqs=4, num_kv_heads=8, max_query_len=1, max_seq_len=100)  # short contexts
    assert not use_split_kv(num_seqs=64, num_kv_heads=8, max_query_len=1, max_seq_len=4096)  # enough programs


def test_reference_matches_sdpa():
    """The oracle itself: one prompt, contiguous blocks, against torch's causal SDPA with GQA."""
    torch.manual_seed(0)
    q, key_cache, value_cache, query_start_loc, seq_lens, block_tables = make_batch(
        [29], [29], 8, 2, 64, torch.float32, "cpu")
    out = paged_attention_ref(q, key_cache, value_cache, torch.empty_like(q), query_start_loc, seq_lens,
                              block_tables, 0.125, 29, 29)
    blocks = block_tables[0, :2].long()
    k = key_cache[blocks].flatten(0, 1)[:29].transpose(0, 1)
    v = value_cache[blocks].flatten(0, 1)[:29].transpose(0, 1)
    expected = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(0, 1), k, v, is_causal=True, scale=0.125, enable_gqa=True).transpose(0, 1)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("window,group", [(1, 8), (7, 1), (7, 2), (64, 8), (64, 1)])
def test_sliding_window(device, window, group):
    """Windows shorter than a tile, than a block and than most contexts, over the mixed batch: tiles wholly outside
    the window are skipped, the window's lower edge is masked inside a tile."""
    check(*MIXED, 2 * group, 2, 64, torch.float32, device, split_kv=False, window_size=(window - 1, 0))


@pytest.mark.parametrize("window", [1, 7, 64])
def test_sliding_window_split_kv(device, window):
    """Flash-decoding over a window: the splits cover the window's tiles only; a chunk's rows in the same batch."""
    check([1, 1, 1, 20], [300, 77, 3, 90], 8, 2, 64, torch.float32, device, split_kv=True,
          window_size=(window - 1, 0))


@pytest.mark.parametrize("softcap,group,split_kv,window", [(50.0, 1, None, 0), (0.5, 8, False, 0), (0.5, 2, True, 7)])
def test_softcap(device, softcap, group, split_kv, window):
    """A loose cap (Gemma 2's 50) and one far below the scores, which saturates tanh; also under a window."""
    check(*MIXED, 2 * group, 2, 64, torch.float16, device, split_kv=split_kv, softcap=softcap,
          window_size=(window - 1, 0))


def test_reference_window_and_softcap_match_a_dense_mask():
    """The oracle's window and soft-cap against SDPA with an explicit mask over soft-capped scores."""
    torch.manual_seed(0)
    q, key_cache, value_cache, query_start_loc, seq_lens, block_tables = make_batch(
        [29], [29], 4, 2, 64, torch.float32, "cpu")
    out = paged_attention_ref(q, key_cache, value_cache, torch.empty_like(q), query_start_loc, seq_lens,
                              block_tables, 0.125, 29, 29, window_size=(4, 0), softcap=2.0)
    blocks = block_tables[0, :2].long()
    k = key_cache[blocks].flatten(0, 1)[:29].transpose(0, 1).repeat_interleave(2, 0)
    v = value_cache[blocks].flatten(0, 1)[:29].transpose(0, 1).repeat_interleave(2, 0)
    scores = 2.0 * torch.tanh(q.transpose(0, 1) @ k.transpose(1, 2) * 0.125 / 2.0)
    i, j = torch.arange(29)[:, None], torch.arange(29)[None, :]
    scores = scores.masked_fill(~((j <= i) & (i - j <= 4)), float("-inf"))
    torch.testing.assert_close(out, (scores.softmax(-1) @ v).transpose(0, 1), atol=1e-5, rtol=1e-5)
