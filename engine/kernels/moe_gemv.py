"""Fused MoE experts for a few tokens (decode): matrix-vector products straight from the router's top-k.

At one token the grouped GEMM (fused_moe.py) needs the token-to-expert alignment first, multiplies 16-row tiles
that hold one real row, and runs the activation and the top-k sum as kernels of their own. Here two kernels read
each routed expert's weights once, along K, as gemv.py reads a dense layer's:
- gate/up: a program per (token, slot) pair and BLOCK_N intermediate rows, SiLU-and-mul folded in;
- down: a program per token and BLOCK_N hidden rows, looping over the token's top_k experts, each product scaled
  by its router weight and added up (moe_sum folded in).
Rounding follows the grouped path's (gate/up, the activation and each weighted expert output rounded to the
model dtype, the sum in float32), so either path gives the same tokens. Buffers depend on T and top_k only: CUDA
graphs capture it. Two tokens that pick one expert read its weights twice, which is why it is for few tokens.
"""
from typing import NamedTuple

import torch

from ._triton import pdl_args, tl, triton, wait_for_previous_kernel
from .gemv_parts import add_products, load_rows, load_vector

MAX_TOKENS = 4  # above this the grouped GEMM, which reads an expert shared by several tokens once, takes over


class MoeGemvConfig(NamedTuple):
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int


@triton.jit
def _local_expert(ids_ptr, expert_map_ptr, pair, HAS_MAP: tl.constexpr):
    expert = tl.load(ids_ptr + pair).to(tl.int64)
    if HAS_MAP:
        expert = tl.load(expert_map_ptr + expert).to(tl.int64)
    return expert


@triton.jit
def _moe_gate_up_kernel(x_ptr, w_ptr, ids_ptr, expert_map_ptr, act_ptr, I, K, x_stride, w_stride_e, w_stride_n,
                        act_stride, TOP_K: tl.constexpr, HAS_MAP: tl.constexpr, BLOCK_N: tl.constexpr,
                        BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr, PDL: tl.constexpr = False):
    """act[pair, n] = silu(x[token] . gate[e, n]) * (x[token] . up[e, n]) for this program's rows n, with
    w [E, 2I, K] holding each expert's gate rows then its up rows. A pair whose expert is on another rank (-1)
    writes nothing: the down kernel skips it."""
    wait_for_previous_kernel(PDL)
    pair = tl.program_id(0).to(tl.int64)
    expert = _local_expert(ids_ptr, expert_map_ptr, pair, HAS_MAP)
    if expert >= 0:
        rows = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        row_mask = rows < I
        cols = tl.arange(0, BLOCK_K)
        gate_row = w_ptr + expert * w_stride_e + rows.to(tl.int64)[:, None] * w_stride_n
        up_row = gate_row + I * w_stride_n
        x_row = x_ptr + (pair // TOP_K) * x_stride
        gate = tl.zeros([BLOCK_N, BLOCK_K], tl.float32)
        up = tl.zeros([BLOCK_N, BLOCK_K], tl.float32)
        for k0 in range(0, K, BLOCK_K):
            x = load_vector(x_row, k0 + cols, K, EVEN_K)[None, :]
            gate = add_products(gate, x, load_rows(gate_row, k0 + cols, K, row_mask, EVEN_K))
            up = add_products(up, x, load_rows(up_row, k0 + cols, K, row_mask, EVEN_K))
        dtype = act_ptr.dtype.element_ty
        gate = tl.sum(gate, 1)[None, :].to(dtype).to(tl.float32)
        up = tl.sum(up, 1)[None, :].to(dtype).to(tl.float32)
        act = gate * tl.sigmoid(gate) * up
        tl.store(act_ptr + pair * act_stride + rows[None, :], act.to(dtype), mask=row_mask[None, :])


@triton.jit
def _moe_down_kernel(act_ptr, w_ptr, ids_ptr, weights_ptr, expert_map_ptr, out_ptr, H, I, act_stride, w_stride_e,
                     w_stride_n, out_stride, TOP_K: tl.constexpr, HAS_MAP: tl.constexpr, BLOCK_N: tl.constexpr,
                     BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr, ADD_RESIDUAL: tl.constexpr,
                     PDL: tl.constexpr = False):
    """out[token, n] = sum over the token's local experts e of weight * (act[pair] . down[e, n]), w [E, H, I].
    ADD_RESIDUAL: out[token, n] += that sum, rounded first as the unfused add would take it."""
    wait_for_previous_kernel(PDL)
    token = tl.program_id(0).to(tl.int64)
    rows = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < H
    cols = tl.arange(0, BLOCK_K)
    dtype = out_ptr.dtype.element_ty
    total = tl.zeros([1, BLOCK_N], tl.float32)
    for slot in tl.static_range(TOP_K):
        pair = token * TOP_K + slot
        expert = _local_expert(ids_ptr, expert_map_ptr, pair, HAS_MAP)
        if expert >= 0:
            w_row = w_ptr + expert * w_stride_e + rows.to(tl.int64)[:, None] * w_stride_n
            act_row = act_ptr + pair * act_stride
            acc = tl.zeros([BLOCK_N, BLOCK_K], tl.float32)
            for k0 in range(0, I, BLOCK_K):
                act = load_vector(act_row, k0 + cols, I, EVEN_K)[None, :]
                acc = add_products(acc, act, load_rows(w_row, k0 + cols, I, row_mask, EVEN_K))
            weight = tl.load(weights_ptr + pair).to(tl.float32)
            total += (tl.sum(acc, 1)[None, :] * weight).to(dtype).to(tl.float32)
    out_ptrs = out_ptr + token * out_stride + rows[None, :]
    if ADD_RESIDUAL:
        total = total.to(dtype).to(tl.float32) + tl.load(out_ptrs, mask=row_mask[None, :], other=0.0).to(tl.float32)
    tl.store(out_ptrs, total.to(dtype), mask=row_mask[None, :])


def moe_gemv_config(k: int, num_tokens: int = 1) -> MoeGemvConfig:
    """A K tile of up to 1024 (masked where K is not a multiple), two weight rows a program at one token (more
    programs for the few experts' rows) and four above: the fastest of benchmarks/moe.py's sweep on an H200 for
    Qwen3-30B-A3B (1 token: 43.1 us against 56.2 with four rows and 256-wide down tiles; 4 tokens 101.7 us)."""
    return MoeGemvConfig(2 if num_tokens == 1 else 4, min(1024, triton.next_power_of_2(k)), 4, 2)


def fused_experts_gemv(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
                       topk_ids: torch.Tensor, expert_map: torch.Tensor | None = None,
                       configs: tuple[MoeGemvConfig, MoeGemvConfig] | None = None,
                       residual: torch.Tensor | None = None) -> torch.Tensor:
    """fused_experts' contract (x [T, H], w13 [E_local, 2I, H], w2 [E_local, H, I], topk_weights/ids [T, top_k])
    on the Triton path, for T up to MAX_TOKENS or so. `configs`: the gate/up and down kernels' tiles.
    residual [T, H] (contiguous rows): the result is added to it in place, and it is returned."""
    num_tokens, top_k = topk_ids.shape
    hidden, inter = w2.shape[1], w2.shape[2]
    assert x.stride(-1) == 1 and w13.stride(-1) == 1 and w2.stride(-1) == 1
    assert residual is None or (residual.shape == (num_tokens, hidden) and residual.stride(-1) == 1)
    out = torch.empty(num_tokens, hidden, dtype=x.dtype, device=x.device) if residual is None else residual
    if num_tokens == 0:
        return out
    ids = topk_ids.contiguous()
    weights = topk_weights.float().contiguous()
    emap = expert_map if expert_map is not None else ids  # unused pointer without a map
    gate_up_config, down_config = configs or (moe_gemv_config(w13.shape[2], num_tokens),
                                              moe_gemv_config(inter, num_tokens))
    act = torch.empty(num_tokens * top_k, inter, dtype=x.dtype, device=x.device)
    block_n, block_k, warps, stages = gate_up_config
    _moe_gate_up_kernel[(num_tokens * top_k, triton.cdiv(inter, block_n))](
        x, w13, ids, emap, act, inter, w13.shape[2], x.stride(0), w13.stride(0), w13.stride(1), act.stride(0),
        TOP_K=top_k, HAS_MAP=expert_map is not None, BLOCK_N=block_n, BLOCK_K=block_k,
        EVEN_K=w13.shape[2] % block_k == 0, num_warps=warps, num_stages=stages, **pdl_args(x, "moe"))
    block_n, block_k, warps, stages = down_config
    _moe_down_kernel[(num_tokens, triton.cdiv(hidden, block_n))](
        act, w2, ids, weights, emap, out, hidden, inter, act.stride(0), w2.stride(0), w2.stride(1), out.stride(0),
        TOP_K=top_k, HAS_MAP=expert_map is not None, BLOCK_N=block_n, BLOCK_K=block_k, EVEN_K=inter % block_k == 0,
        ADD_RESIDUAL=residual is not None, num_warps=warps, num_stages=stages, **pdl_args(x, "moe"))
    return out
