"""An MoE router's top-k: each token's k best experts over the softmax (or sigmoid) of its router logits, with
their weights renormalized to sum to 1 if asked, in one kernel (vLLM's topk_softmax / fused_topk)."""
import torch

from ._triton import next_pow2, pdl_args, tl, triton, use_triton, wait_for_previous_kernel


@triton.jit
def _topk_route_kernel(logits_ptr, weights_ptr, ids_ptr, logits_stride, num_experts, TOP_K: tl.constexpr,
                       SIGMOID: tl.constexpr, RENORMALIZE: tl.constexpr, BLOCK_E: tl.constexpr,
                       BLOCK_K: tl.constexpr, PDL: tl.constexpr = False):
    wait_for_previous_kernel(PDL)
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_E)
    mask = cols < num_experts
    logits = tl.load(logits_ptr + row * logits_stride + cols, mask=mask, other=-float("inf")).to(tl.float32)
    if SIGMOID:
        scores = tl.sigmoid(logits)
    else:
        exp = tl.exp(logits - tl.max(logits, axis=0))
        scores = exp / tl.sum(exp, axis=0)
    scores = tl.where(mask, scores, -1.0)  # below any score, so padding is never picked
    ks = tl.arange(0, BLOCK_K)
    weights = tl.zeros([BLOCK_K], dtype=tl.float32)
    ids = tl.zeros([BLOCK_K], dtype=tl.int32)
    for k in tl.static_range(TOP_K):
        best = tl.max(scores, axis=0)
        idx = tl.min(tl.where(scores == best, cols, BLOCK_E), axis=0)  # the lowest index among ties, as torch.topk
        weights = tl.where(ks == k, best, weights)
        ids = tl.where(ks == k, idx, ids)
        scores = tl.where(cols == idx, -2.0, scores)
    if RENORMALIZE:
        weights = weights / tl.sum(weights, axis=0)
    tl.store(weights_ptr + row * TOP_K + ks, weights, mask=ks < TOP_K)
    tl.store(ids_ptr + row * TOP_K + ks, ids, mask=ks < TOP_K)


def topk_route(logits: torch.Tensor, top_k: int, renormalize: bool, scoring: str = "softmax"):
    """logits [T, E] -> (weights fp32 [T, top_k], expert ids int32 [T, top_k]), best first."""
    if not use_triton(logits):
        return topk_route_ref(logits, top_k, renormalize, scoring)
    num_tokens, num_experts = logits.shape
    weights = torch.empty(num_tokens, top_k, dtype=torch.float32, device=logits.device)
    ids = torch.empty(num_tokens, top_k, dtype=torch.int32, device=logits.device)
    if num_tokens:
        _topk_route_kernel[(num_tokens,)](logits, weights, ids, logits.stride(0), num_experts, TOP_K=top_k,
                                          SIGMOID=scoring == "sigmoid", RENORMALIZE=renormalize,
                                          BLOCK_E=next_pow2(num_experts), BLOCK_K=next_pow2(top_k), **pdl_args(logits))
    return weights, ids


def topk_route_ref(logits: torch.Tensor, top_k: int, renormalize: bool, scoring: str = "softmax"):
    scores = logits.float().sigmoid() if scoring == "sigmoid" else torch.softmax(logits.float(), dim=-1)
    weights, ids = torch.topk(scores, top_k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, ids.to(torch.int32)
