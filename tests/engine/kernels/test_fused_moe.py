"""The MoE kernels (router top-k, token-to-expert alignment, the fused expert GEMMs) against their torch
references: experts that receive no token, one expert receiving every token, padded blocks, expert parallelism's
other-rank experts, and batch sizes from 1 to 300."""
import pytest
import torch
import torch.nn.functional as F

from engine.kernels.fused_moe import fused_experts, fused_experts_ref, moe_config, moe_sum
from engine.kernels.moe_gemv import MoeGemvConfig, fused_experts_gemv
from engine.kernels.moe_align import moe_align_block_size, moe_align_block_size_ref
from engine.kernels.moe_router import topk_route, topk_route_ref


@pytest.mark.parametrize("num_tokens,num_experts,top_k,scoring,renormalize", [
    (1, 5, 1, "softmax", False), (37, 7, 2, "softmax", True), (37, 7, 3, "softmax", False),
    (9, 64, 2, "sigmoid", True), (9, 6, 3, "sigmoid", False), (300, 20, 3, "softmax", True)])
def test_router_matches_reference(device, num_tokens, num_experts, top_k, scoring, renormalize):
    torch.manual_seed(num_tokens)
    logits = torch.randn(num_tokens, num_experts, device=device) * 3
    weights, ids = topk_route(logits, top_k, renormalize, scoring)
    ref_weights, ref_ids = topk_route_ref(logits, top_k, renormalize, scoring)
    assert ids.dtype == torch.int32 and weights.dtype == torch.float32
    assert torch.equal(ids, ref_ids)
    torch.testing.assert_close(weights, ref_weights, atol=1e-6, rtol=1e-5)
    if renormalize:
        torch.testing.assert_close(weights.sum(-1), torch.ones(num_tokens, device=device))


def test_router_reference_is_softmax_then_topk():
    logits = torch.tensor([[0.0, 2.0, 1.0, -1.0]])
    weights, ids = topk_route_ref(logits, 2, renormalize=False)
    probs = torch.softmax(logits, -1)[0]
    assert ids.tolist() == [[1, 2]] and weights[0].tolist() == pytest.approx([probs[1].item(), probs[2].item()])


def routed_ids(num_tokens, num_experts, top_k, case, device):
    g = torch.Generator().manual_seed(num_tokens * 7 + top_k)
    if case == "one_expert_takes_all":  # expert 2 in every token's top-k, the rest spread over experts 0 and 1
        ids = torch.stack([torch.full((num_tokens,), 2)] + [torch.randint(0, 2, (num_tokens,), generator=g)
                                                           for _ in range(top_k - 1)], dim=1)
    elif case == "idle_experts":  # only the even experts receive tokens
        ids = torch.stack([torch.randperm((num_experts + 1) // 2, generator=g)[:top_k] * 2 for _ in range(num_tokens)])
    else:
        ids = torch.stack([torch.randperm(num_experts, generator=g)[:top_k] for _ in range(num_tokens)])
    return ids.to(torch.int32).to(device)


@pytest.mark.parametrize("num_tokens,num_experts,top_k,block_size", [(1, 5, 1, 16), (45, 7, 2, 16), (16, 128, 8, 16),
                                                                       (130, 9, 3, 64), (300, 16, 2, 64)])
@pytest.mark.parametrize("case", ["random", "idle_experts", "one_expert_takes_all"])
def test_align_matches_reference(device, num_tokens, num_experts, top_k, block_size, case):
    ids = routed_ids(num_tokens, num_experts, top_k, case, device)
    sorted_ids, expert_ids, post_pad = moe_align_block_size(ids, block_size, num_experts)
    ref_sorted, ref_experts, ref_post_pad = moe_align_block_size_ref(ids, block_size, num_experts)
    assert sorted_ids.shape == ref_sorted.shape and expert_ids.shape == ref_experts.shape
    used = int(ref_post_pad)
    assert int(post_pad) == used and used % block_size == 0
    assert torch.equal(sorted_ids[:used], ref_sorted[:used])
    assert torch.equal(expert_ids[: used // block_size], ref_experts[: used // block_size])
    # every pair once, padding marked with numel, each block's pairs routed to its expert
    numel = ids.numel()
    real = sorted_ids[:used][sorted_ids[:used] < numel].long()
    assert sorted(real.tolist()) == list(range(numel))
    block_of = torch.arange(used, device=device) // block_size
    valid = sorted_ids[:used] < numel
    assert torch.equal(ids.reshape(-1)[sorted_ids[:used][valid].long()], expert_ids[block_of[valid]])


def test_align_of_more_chunks_than_the_offsets_kernel_takes_at_once(device):
    """300 tokens x top-8 = 2400 pairs: 19 chunks of 128, over two steps of the offsets kernel's 16 rows."""
    ids = routed_ids(300, 64, 8, "random", device)
    sorted_ids, expert_ids, post_pad = moe_align_block_size(ids, 16, 64)
    ref_sorted, ref_experts, ref_post_pad = moe_align_block_size_ref(ids, 16, 64)
    used = int(ref_post_pad)
    assert int(post_pad) == used
    assert torch.equal(sorted_ids[:used], ref_sorted[:used]) and torch.equal(expert_ids, ref_experts)


def test_align_reference_pads_each_expert_to_whole_blocks():
    ids = torch.tensor([[1], [1], [3]], dtype=torch.int32)  # experts 0 and 2 idle
    sorted_ids, expert_ids, post_pad = moe_align_block_size_ref(ids, 4, 4)
    assert int(post_pad) == 8
    assert sorted_ids[:8].tolist() == [0, 1, 3, 3, 2, 3, 3, 3] and expert_ids[:2].tolist() == [1, 3]


def test_align_maps_other_ranks_experts_to_minus_one(device):
    ids = routed_ids(50, 6, 2, "random", device)
    expert_map = torch.tensor([-1, -1, -1, 0, 1, 2], dtype=torch.int32, device=device)  # this rank: experts 3-5
    _, expert_ids, post_pad = moe_align_block_size(ids, 16, 6, expert_map)
    _, global_ids, _ = moe_align_block_size_ref(ids, 16, 6)
    blocks = int(post_pad) // 16
    assert torch.equal(expert_ids[:blocks], expert_map[global_ids[:blocks].long()])


def expert_weights(num_experts, hidden, inter, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    w13 = torch.randn(num_experts, 2 * inter, hidden, generator=g) / hidden ** 0.5
    w2 = torch.randn(num_experts, hidden, inter, generator=g) / inter ** 0.5
    return w13.to(device, dtype), w2.to(device, dtype)


def run_experts(path, x, w13, w2, weights, ids, expert_map=None):
    """The grouped GEMM (tiles given, so it runs at any size) or the few-token matrix-vector kernels."""
    if path == "gemv":
        return fused_experts_gemv(x, w13, w2, weights, ids, expert_map)
    num_experts = expert_map.shape[0] if expert_map is not None else w13.shape[0]
    return fused_experts(x, w13, w2, weights, ids, expert_map, config=moe_config(len(x), num_experts, ids.shape[1]))


PATHS = ["grouped_gemm", "gemv"]


SIZES = [(1, 5, 1, "random"), (3, 7, 2, "idle_experts"), (4, 6, 3, "one_expert_takes_all"),
         (64, 8, 2, "one_expert_takes_all"), (300, 9, 3, "random")]


# the matrix-vector kernels are for a few tokens: 64 covers the same code as 300 would, in less interpreter time
@pytest.mark.parametrize("path,num_tokens,num_experts,top_k,case",
                         [(path, *size) for path in PATHS for size in SIZES if path == "grouped_gemm" or size[0] < 300])
def test_fused_experts_match_reference(device, path, num_tokens, num_experts, top_k, case):
    """Sizes on both sides of the decode/prefill tile switch; hidden 80 and intermediate 48 leave partial tiles."""
    hidden, inter = 80, 48
    w13, w2 = expert_weights(num_experts, hidden, inter, torch.float32, device)
    x = torch.randn(num_tokens, hidden, generator=torch.Generator().manual_seed(1)).to(device)
    ids = routed_ids(num_tokens, num_experts, top_k, case, device)
    weights = torch.rand(num_tokens, top_k, generator=torch.Generator().manual_seed(2)).to(device)
    out = run_experts(path, x, w13, w2, weights, ids)
    torch.testing.assert_close(out, fused_experts_ref(x, w13, w2, weights, ids), atol=1e-4, rtol=1e-4)


def test_few_tokens_take_the_matrix_vector_kernels_and_more_the_grouped_gemm(device):
    """fused_experts' own choice, checked by the results each path gives bit for bit."""
    w13, w2 = expert_weights(6, 64, 32, torch.bfloat16, device)
    for num_tokens, expected in ((1, "gemv"), (4, "gemv"), (5, "grouped_gemm")):
        x = torch.randn(num_tokens, 64, generator=torch.Generator().manual_seed(num_tokens)).to(device, torch.bfloat16)
        ids = routed_ids(num_tokens, 6, 2, "random", device)
        weights = torch.rand(num_tokens, 2, generator=torch.Generator().manual_seed(8)).to(device)
        assert torch.equal(fused_experts(x, w13, w2, weights, ids), run_experts(expected, x, w13, w2, weights, ids))


def test_matrix_vector_kernels_over_several_k_tiles_with_a_ragged_last_one(device):
    """hidden 80 in K tiles of 32 (the last half empty), intermediate 48 in tiles of 16; output rows in blocks of
    8 that do not divide 80 or 48 evenly either way."""
    w13, w2 = expert_weights(7, 80, 48, torch.float32, device)
    x = torch.randn(3, 80, generator=torch.Generator().manual_seed(9)).to(device)
    ids = routed_ids(3, 7, 3, "random", device)
    weights = torch.rand(3, 3, generator=torch.Generator().manual_seed(10)).to(device)
    configs = (MoeGemvConfig(8, 32, 4, 1), MoeGemvConfig(8, 16, 4, 1))
    out = fused_experts_gemv(x, w13, w2, weights, ids, configs=configs)
    torch.testing.assert_close(out, fused_experts_ref(x, w13, w2, weights, ids), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("path", PATHS)
def test_fused_experts_of_one_rank_sum_to_all_experts(device, path):
    """Expert parallelism: each rank's experts (the others -1 in its map) give a part; the parts sum to the whole."""
    num_experts, hidden, inter = 5, 64, 32
    num_tokens = 4 if path == "gemv" else 20
    w13, w2 = expert_weights(num_experts, hidden, inter, torch.float32, device)
    x = torch.randn(num_tokens, hidden, generator=torch.Generator().manual_seed(3)).to(device)
    ids = routed_ids(num_tokens, num_experts, 2, "random", device)
    weights = torch.rand(num_tokens, 2, generator=torch.Generator().manual_seed(4)).to(device)
    parts = []
    for local in (range(0, 3), range(3, 5)):
        expert_map = torch.full((num_experts,), -1, dtype=torch.int32)
        expert_map[list(local)] = torch.arange(len(local), dtype=torch.int32)
        expert_map = expert_map.to(device)
        rank_w13, rank_w2 = w13[local.start: local.stop], w2[local.start: local.stop]
        part = run_experts(path, x, rank_w13, rank_w2, weights, ids, expert_map)
        ref = fused_experts_ref(x, rank_w13, rank_w2, weights, ids, expert_map)
        torch.testing.assert_close(part, ref, atol=1e-4, rtol=1e-4)
        parts.append(part)
    torch.testing.assert_close(parts[0] + parts[1], fused_experts_ref(x, w13, w2, weights, ids), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("path", PATHS)
def test_fused_experts_in_bfloat16(device, path):
    num_tokens = 4 if path == "gemv" else 40
    w13, w2 = expert_weights(6, 64, 32, torch.bfloat16, device)
    x = torch.randn(num_tokens, 64, generator=torch.Generator().manual_seed(5)).to(device, torch.bfloat16)
    ids = routed_ids(num_tokens, 6, 2, "random", device)
    weights = torch.rand(num_tokens, 2, generator=torch.Generator().manual_seed(6)).to(device)
    out = run_experts(path, x, w13, w2, weights, ids)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), fused_experts_ref(x, w13, w2, weights, ids).float(), atol=3e-2, rtol=3e-2)
    if path == "gemv":  # rounded where the grouped path rounds: at most a bfloat16 ulp apart
        other = run_experts("grouped_gemm", x, w13, w2, weights, ids)
        torch.testing.assert_close(out.float(), other.float(), atol=1e-2, rtol=2 ** -7)


def test_reference_is_the_weighted_sum_of_each_tokens_experts():
    w13, w2 = expert_weights(3, 8, 4, torch.float32, "cpu")
    x, ids, weights = torch.randn(2, 8), torch.tensor([[0, 2], [1, 0]]), torch.tensor([[0.25, 0.75], [0.5, 0.5]])

    def expert(e, v):
        gate, up = (w13[e] @ v).chunk(2)
        return w2[e] @ (F.silu(gate) * up)

    expected = torch.stack([sum(weights[t, s] * expert(ids[t, s], x[t]) for s in range(2)) for t in range(2)])
    torch.testing.assert_close(fused_experts_ref(x, w13, w2, weights, ids), expected)


def test_decode_and_prefill_tiles():
    assert moe_config(1, 128, 8)["BLOCK_SIZE_M"] == 16 and moe_config(4096, 128, 8)["BLOCK_SIZE_M"] == 64


def test_tuned_tiles_come_from_the_file_for_the_shape_and_gpu():
    """The H100 file for Qwen3-30B-A3B's experts, entry nearest the token count; another GPU gets the defaults."""
    import json

    from engine.kernels.moe_tile_configs import CONFIG_DIR, config_file_name

    h100 = "NVIDIA H100 80GB HBM3"
    tuned = json.loads((CONFIG_DIR / config_file_name(128, 768, h100)).read_text())
    assert moe_config(4000, 128, 8, (128, 768), h100) == tuned["4096"]
    assert moe_config(3, 128, 8, (128, 768), h100) in (tuned["2"], tuned["4"])
    assert moe_config(4000, 128, 8, (128, 768), "NVIDIA B200") == moe_config(4000, 128, 8)
    assert moe_config(4000, 128, 8, (64, 768), h100) == moe_config(4000, 128, 8)


def test_routed_experts_match_reference(device):
    """The MoE layer's Triton path end to end (router kernel into the fused experts) against its torch path."""
    num_experts, hidden, inter = 7, 64, 32
    w13, w2 = expert_weights(num_experts, hidden, inter, torch.float32, device)
    g = torch.Generator().manual_seed(7)
    x = torch.randn(23, hidden, generator=g).to(device)
    logits = x @ torch.randn(num_experts, hidden, generator=g).to(device).T
    out = fused_experts(x, w13, w2, *topk_route(logits, 2, True))
    torch.testing.assert_close(out, fused_experts_ref(x, w13, w2, *topk_route_ref(logits, 2, True)),
                               atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("num_tokens,top_k,hidden", [(1, 8, 2048), (3, 1, 100), (5, 3, 1500)])
def test_moe_sum_adds_each_tokens_rows_in_fp32(device, num_tokens, top_k, hidden):
    """One rounding of the fp32 sum, as torch's sum; a hidden size past one block and a ragged last block."""
    torch.manual_seed(5)
    x = torch.randn(num_tokens, top_k, hidden, device=device).bfloat16()
    torch.testing.assert_close(moe_sum(x), x.float().sum(dim=1).bfloat16(), atol=0, rtol=2 ** -7)


def test_matrix_vector_kernels_add_the_sum_to_a_residual_in_place(device):
    """The batch-1 decode layer's form: residual += the experts' sum (rounded first, as the separate add would take
    it), written in place; with expert parallelism's map too (other ranks' experts add nothing)."""
    w13, w2 = expert_weights(6, 64, 32, torch.bfloat16, device)
    x = torch.randn(2, 64, generator=torch.Generator().manual_seed(11)).to(device, torch.bfloat16)
    ids = routed_ids(2, 6, 3, "random", device)
    weights = torch.rand(2, 3, generator=torch.Generator().manual_seed(12)).to(device)
    for expert_map in (None, torch.tensor([0, 1, 2, -1, -1, -1], dtype=torch.int32, device=device)):
        rank_w13, rank_w2 = (w13, w2) if expert_map is None else (w13[:3], w2[:3])
        residual = torch.randn(2, 64, generator=torch.Generator().manual_seed(13)).to(device, torch.bfloat16)
        expected = (residual.float() + fused_experts_gemv(x, rank_w13, rank_w2, weights, ids, expert_map).float())
        out = fused_experts_gemv(x, rank_w13, rank_w2, weights, ids, expert_map, residual=residual)
        assert out.data_ptr() == residual.data_ptr()
        torch.testing.assert_close(out.float(), expected, atol=1e-6, rtol=2 ** -7)  # one rounding of the add
