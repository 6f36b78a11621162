"""Fused MoE experts: a grouped GEMM over the token-to-expert alignment (vLLM's fused_moe_kernel) for prefill and
larger batches, the matrix-vector kernels of moe_gemv.py for a few tokens.

fused_experts runs gate/up for every (token, expert) pair, SiLU-and-mul, then down weighted by the router, and
sums each token's top_k rows. Its buffers are sized by T and top_k only (no host sync), so it is captured in
CUDA graphs. The torch reference loops over the experts; it is the CPU path.
"""
import functools

import torch
import torch.nn.functional as F

from ._triton import interpreting, tl, triton, use_triton
from .activation import silu_and_mul
from .moe_align import moe_align_block_size
from .moe_gemv import MAX_TOKENS as GEMV_MAX_TOKENS, fused_experts_gemv
from .moe_tile_configs import moe_config


@triton.jit
def fused_moe_kernel(a_ptr, b_ptr, c_ptr, topk_weights_ptr, sorted_token_ids_ptr, expert_ids_ptr,
                     num_tokens_post_padded_ptr, N, K, EM, num_valid_tokens, stride_am, stride_ak, stride_be,
                     stride_bn, stride_bk, stride_cm, stride_cn, BLOCK_SIZE_M: tl.constexpr,
                     BLOCK_SIZE_N: tl.constexpr, BLOCK_SIZE_K: tl.constexpr, GROUP_SIZE_M: tl.constexpr,
                     MUL_ROUTED_WEIGHT: tl.constexpr, top_k: tl.constexpr, FP32_DOT: tl.constexpr):
    """C[pair] = A[pair // top_k] @ B[expert]^T (times the pair's router weight) for the pairs of each M block,
    B [E, N, K]. Blocks of an expert on another rank (-1) write zeros."""
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(EM, BLOCK_SIZE_M)
    num_pid_n = tl.cdiv(N, BLOCK_SIZE_N)
    num_pid_in_group = GROUP_SIZE_M * num_pid_n  # grouped ordering: neighbouring programs share B tiles in L2
    group_id = pid // num_pid_in_group
    first_pid_m = group_id * GROUP_SIZE_M
    group_size_m = min(num_pid_m - first_pid_m, GROUP_SIZE_M)
    pid_m = first_pid_m + ((pid % num_pid_in_group) % group_size_m)
    pid_n = (pid % num_pid_in_group) // group_size_m

    num_tokens_post_padded = tl.load(num_tokens_post_padded_ptr)
    if pid_m * BLOCK_SIZE_M >= num_tokens_post_padded:
        return
    offs_token_id = pid_m * BLOCK_SIZE_M + tl.arange(0, BLOCK_SIZE_M).to(tl.int64)
    offs_token = tl.load(sorted_token_ids_ptr + offs_token_id).to(tl.int64)
    token_mask = offs_token < num_valid_tokens
    offs_cn = pid_n * BLOCK_SIZE_N + tl.arange(0, BLOCK_SIZE_N).to(tl.int64)
    c_ptrs = c_ptr + stride_cm * offs_token[:, None] + stride_cn * offs_cn[None, :]
    c_mask = token_mask[:, None] & (offs_cn[None, :] < N)
    expert = tl.load(expert_ids_ptr + pid_m).to(tl.int64)
    if expert == -1:
        tl.store(c_ptrs, tl.zeros([BLOCK_SIZE_M, BLOCK_SIZE_N], dtype=c_ptr.dtype.element_ty), mask=c_mask)
        return

    offs_bn = offs_cn % N
    offs_k = tl.arange(0, BLOCK_SIZE_K)
    a_ptrs = a_ptr + (offs_token[:, None] // top_k * stride_am + offs_k[None, :] * stride_ak)
    b_ptrs = b_ptr + expert * stride_be + (offs_k[:, None] * stride_bk + offs_bn[None, :] * stride_bn)
    acc = tl.zeros((BLOCK_SIZE_M, BLOCK_SIZE_N), dtype=tl.float32)
    for k in range(0, tl.cdiv(K, BLOCK_SIZE_K)):
        k_left = K - k * BLOCK_SIZE_K
        a = tl.load(a_ptrs, mask=token_mask[:, None] & (offs_k[None, :] < k_left), other=0.0)
        b = tl.load(b_ptrs, mask=offs_k[:, None] < k_left, other=0.0)
        if FP32_DOT:
            acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
        else:
            acc = tl.dot(a, b, acc)
        a_ptrs += BLOCK_SIZE_K * stride_ak
        b_ptrs += BLOCK_SIZE_K * stride_bk
    if MUL_ROUTED_WEIGHT:
        weight = tl.load(topk_weights_ptr + offs_token, mask=token_mask, other=0.0)
        acc = acc * weight[:, None]
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=c_mask)


@triton.jit
def _moe_sum_kernel(x_ptr, out_ptr, hidden, TOP_K: tl.constexpr, BLOCK: tl.constexpr):
    """out[t] = sum over k of x[t, k], in fp32, rounded once (as torch's sum over that dimension)."""
    token = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < hidden
    acc = tl.zeros([BLOCK], tl.float32)
    for k in tl.static_range(TOP_K):
        acc += tl.load(x_ptr + (token * TOP_K + k) * hidden + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + token * hidden + cols, acc.to(out_ptr.dtype.element_ty), mask=mask)


def moe_sum(x: torch.Tensor) -> torch.Tensor:
    """x [T, top_k, H] contiguous -> [T, H]: each token's weighted expert outputs added up (vLLM's moe_sum). One
    launch; torch's reduction took 5 us at one token of Qwen3-30B-A3B on an H100."""
    if not use_triton(x):
        return x.sum(dim=1)
    num_tokens, top_k, hidden = x.shape
    out = torch.empty(num_tokens, hidden, dtype=x.dtype, device=x.device)
    if num_tokens:
        block = min(1024, triton.next_power_of_2(hidden))
        _moe_sum_kernel[(num_tokens, triton.cdiv(hidden, block))](x, out, hidden, TOP_K=top_k, BLOCK=block)
    return out


def invoke_fused_moe_kernel(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor, topk_weights: torch.Tensor | None,
                            sorted_token_ids: torch.Tensor, expert_ids: torch.Tensor,
                            num_tokens_post_padded: torch.Tensor, mul_routed_weight: bool, top_k: int,
                            config: dict) -> None:
    """c [T * top_k, N] from a [T or T * top_k, K] and b [E, N, K]."""
    em = sorted_token_ids.shape[0]
    grid = (triton.cdiv(em, config["BLOCK_SIZE_M"]) * triton.cdiv(b.shape[1], config["BLOCK_SIZE_N"]),)
    fused_moe_kernel[grid](
        a, b, c, topk_weights if topk_weights is not None else c, sorted_token_ids, expert_ids,
        num_tokens_post_padded, b.shape[1], b.shape[2], em, c.shape[0], a.stride(0), a.stride(1), b.stride(0),
        b.stride(1), b.stride(2), c.stride(0), c.stride(1), MUL_ROUTED_WEIGHT=mul_routed_weight, top_k=top_k,
        FP32_DOT=_fp32_dot(b.dtype), **config)


@functools.lru_cache(maxsize=None)
def _device_name(device: torch.device) -> str | None:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else None


def _fp32_dot(dtype: torch.dtype) -> bool:
    """float32 weights multiply in full precision (not TF32), as the torch path does. Triton's interpreter gets
    bfloat16 tl.dot wrong (3.9), so there bfloat16 tiles are widened first."""
    return dtype == torch.float32 or (dtype == torch.bfloat16 and interpreting())


def fused_experts(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
                  topk_ids: torch.Tensor, expert_map: torch.Tensor | None = None,
                  config: dict | None = None, residual: torch.Tensor | None = None) -> torch.Tensor:
    """x [T, H], w13 [E_local, 2I, H] (gate rows then up rows), w2 [E_local, H, I], topk_weights/ids [T, top_k]
    (global expert ids; `expert_map`: global -> local, -1 elsewhere) -> [T, H], this rank's experts' sum.
    Up to GEMV_MAX_TOKENS tokens take the matrix-vector kernels (moe_gemv.py) unless `config` is given: the
    grouped GEMM's tile sizes (default: moe_config's). residual [T, H]: the sum is added to it in place (by the last
    matrix-vector kernel where those run) and it is returned."""
    if not use_triton(x):
        out = fused_experts_ref(x, w13, w2, topk_weights, topk_ids, expert_map)
        return out if residual is None else residual.add_(out)
    num_tokens, top_k = topk_ids.shape
    if config is None and num_tokens <= GEMV_MAX_TOKENS:
        return fused_experts_gemv(x, w13, w2, topk_weights, topk_ids, expert_map, residual=residual)
    num_experts = expert_map.shape[0] if expert_map is not None else w13.shape[0]
    config = config or moe_config(num_tokens, num_experts, top_k, (w2.shape[0], w2.shape[2]),
                                  _device_name(x.device))
    sorted_ids, expert_ids, post_pad = moe_align_block_size(topk_ids, config["BLOCK_SIZE_M"], num_experts, expert_map)
    gate_up = torch.empty(num_tokens * top_k, w13.shape[1], dtype=x.dtype, device=x.device)
    invoke_fused_moe_kernel(x, w13, gate_up, None, sorted_ids, expert_ids, post_pad, False, top_k, config)
    act = silu_and_mul(gate_up)
    down = torch.empty(num_tokens * top_k, w2.shape[1], dtype=x.dtype, device=x.device)
    invoke_fused_moe_kernel(act, w2, down, topk_weights.float().contiguous(), sorted_ids, expert_ids, post_pad,
                            True, 1, config)
    out = moe_sum(down.view(num_tokens, top_k, -1))
    return out if residual is None else residual.add_(out)


def fused_experts_ref(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
                      topk_ids: torch.Tensor, expert_map: torch.Tensor | None = None) -> torch.Tensor:
    out = torch.zeros_like(x)
    local_ids = topk_ids.long() if expert_map is None else expert_map.long()[topk_ids.long()]
    for e in local_ids.unique().tolist():
        if e < 0:
            continue
        token, slot = torch.where(local_ids == e)
        gate, up = F.linear(x[token], w13[e]).chunk(2, dim=-1)
        y = F.linear(F.silu(gate) * up, w2[e])
        out.index_add_(0, token, (y * topk_weights[token, slot, None]).to(x.dtype))
    return out
