"""Matrix-vector product for batch-1 decode: out[M, N] = x[M, K] @ weight[N, K]^T (+ bias), M = 1 in the engine.

cuBLAS reads the weights below copy bandwidth at M = 1 (H100, Llama-8B shapes, benchmarks/kernel_tuning.py:
qkv 2.34 TB/s, the LM head 2.39). Here each program streams BLOCK_N whole weight rows along K and keeps x in
registers: the weights are read once, coalesced, with no split-K reduction pass (LM head 3.11 TB/s; all of one
decode step's matmuls 5.5 ms against cuBLAS's 5.8). It handles a few rows of x too, but from M = 2 cuBLAS wins.

FP8 weight-only layers (e4m3, one scale per output channel, x in the model dtype) take the same kernel; INT4
weights packed along K (compressed-tensors pack-quantized) take gemv_int4.py's, with the same folds and arguments.
Norm, gate and residual fold in as for 16-bit weights. W8A8 layers with dynamic per-token activations
(quant_x) quantize x inside each program, as fp8.per_token_quant_fp8 would after the RMSNorm: passes over x before
the product find 1/rms and the FP8 scale, and each K tile is quantized as it is read. That repeats the
quantization N / BLOCK_N times (an IEEE division and a rounding an element of x a program), which wide row tiles
amortize; it saves the quantization kernel before each projection that takes it (a shape whose tuned tile is a
tensor-core one takes fp8_one_row.py instead).
"""
from typing import NamedTuple

import torch

from ._triton import next_pow2, pdl_args, prefetch_args, tl, triton, use_triton
from .fp8 import FP8, fp8_scale, fp8_value, per_token_quant_fp8_ref
from .fp8_one_row import fp8_one_row_in_tiles
from .gemv_int4 import launch_int4_gemv
from .gemv_parts import (accumulator_width, add_products, dot_rows, finish_rows, load_rows, load_vector, load_x,
                         start_rows)
from .int4 import dequantize_packed_ref
from .quant_tile_configs import TileConfig, default_config, tile_config, tuned_tile
from .reduce_site import ReduceSite
from .rms_norm import rms_norm

MAX_ROWS = 8  # x stays in registers


class GemvConfig(NamedTuple):
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int


@triton.jit(do_not_specialize=["M", "rank"])
def _gemv_kernel(x_ptr, w_ptr, w_scale_ptr, bias_ptr, out_ptr, norm_w_ptr, residual_ptr, M, N, K, x_stride, w_stride,
                 out_stride, residual_stride, eps, x_count_ptr, previous_count_ptr, peer_parts_ptr, peer_counts_ptr,
                 ticket_ptr, rank, HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 BLOCK_K: tl.constexpr, ACC_K: tl.constexpr, EVEN_K: tl.constexpr, GATED: tl.constexpr,
                 NORM: tl.constexpr, ADD_RESIDUAL: tl.constexpr, X_PARTS: tl.constexpr, RESIDUAL_PARTS: tl.constexpr,
                 PUSH: tl.constexpr, W_SCALE: tl.constexpr, GELU_TANH: tl.constexpr, PDL: tl.constexpr = False,
                 PREFETCH_LINES: tl.constexpr = 0, LINE: tl.constexpr = 64, QUANT_X: tl.constexpr = False):
    """GATED: weight rows [0, N) are the gate and [N, 2N) the up projection; out = silu(gate) * up, or with
    GELU_TANH gelu_tanh(gate) * up (Gemma's GeGLU).
    NORM: x is RMS-normalized (times norm_w) first; every program reads all of x anyway, so the sum of squares
    comes with the product and 1/rms scales the result. ADD_RESIDUAL: out = residual + result (residual may be out
    itself: each element is read and written by the one program that owns its row).
    X_PARTS / RESIDUAL_PARTS (ranks, M = 1): x / the residual is the sum of a ReduceSite's parts (rows of x_ptr /
    residual_ptr), x waited for first. PUSH (ranks): the result is this rank's part of a ReduceSite, pushed to
    every rank instead of stored at out_ptr (which is the site's parts here).
    W_SCALE: FP8 weights, w_scale_ptr one float32 scale per weight row. QUANT_X (W_SCALE): x (normalized and
    rounded to its dtype, with NORM) is quantized to FP8 per row first, as the FP8 quantization kernels do.
    PREFETCH_LINES (PDL): the first PREFETCH_LINES lines of LINE elements of each weight row are asked into L2
    before the kernel before this one has finished."""
    pid = tl.program_id(0)
    rows_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = rows_n < N
    start_rows(w_ptr, rows_n, n_mask, w_stride, N, x_count_ptr, previous_count_ptr, GATED, X_PARTS, PDL,
               PREFETCH_LINES, LINE)
    rows_m = tl.arange(0, BLOCK_M)
    m_mask = rows_m < M
    cols = tl.arange(0, ACC_K)
    w_row = w_ptr + rows_n.to(tl.int64)[:, None] * w_stride
    up_row = w_row + N * w_stride
    x_row = x_ptr + rows_m[:, None] * x_stride
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    acc_up = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    ONE_ROW: tl.constexpr = BLOCK_M == 1
    products = tl.zeros([BLOCK_N, ACC_K if ONE_ROW else 1], tl.float32)  # ONE_ROW: summed along K after the loop
    products_up = tl.zeros([BLOCK_N, ACC_K if ONE_ROW else 1], tl.float32)
    sum_sq = tl.zeros([BLOCK_M, ACC_K], tl.float32)  # reduced once after the loop, not per tile
    if QUANT_X:
        x_scale, inv_rms = _quant_scale(x_ptr, x_row, x_stride, norm_w_ptr, K, m_mask, eps, BLOCK_M, ACC_K, EVEN_K,
                                        NORM, X_PARTS)
    for k0 in range(0, K, BLOCK_K):
        for part in tl.static_range(BLOCK_K // ACC_K):  # a K tile in parts of ACC_K columns, the loads all issued
            k = k0 + part * ACC_K + cols
            if QUANT_X:
                x = fp8_value(_quant_input(x_ptr, x_row, x_stride, norm_w_ptr, k, K, m_mask, inv_rms, EVEN_K, NORM,
                                           X_PARTS), x_scale[:, None])
            else:
                x = load_x(x_ptr, x_row, x_stride, k, K, m_mask, EVEN_K, NORM, X_PARTS)
                if NORM:
                    sum_sq += x * x
                    x = x * load_vector(norm_w_ptr, k, K, EVEN_K).to(tl.float32)[None, :]
            if ONE_ROW:
                products = add_products(products, x, load_rows(w_row, k, K, n_mask, EVEN_K))
                if GATED:
                    products_up = add_products(products_up, x, load_rows(up_row, k, K, n_mask, EVEN_K))
            else:
                acc += dot_rows(x, load_rows(w_row, k, K, n_mask, EVEN_K))
                if GATED:
                    acc_up += dot_rows(x, load_rows(up_row, k, K, n_mask, EVEN_K))
    if ONE_ROW:
        acc = tl.sum(products, 1)[None, :]
        acc_up = tl.sum(products_up, 1)[None, :]
    if NORM and not QUANT_X:
        inv_rms = tl.rsqrt(tl.sum(sum_sq, 1) / K + eps)[:, None]
        acc = acc * inv_rms
        acc_up = acc_up * inv_rms
    if W_SCALE:
        x_scales = x_scale[:, None] if QUANT_X else tl.full([BLOCK_M, 1], 1.0, tl.float32)
        acc = acc * (x_scales * tl.load(w_scale_ptr + rows_n, mask=n_mask, other=0.0)[None, :])
        if GATED:
            acc_up = acc_up * (x_scales * tl.load(w_scale_ptr + N + rows_n, mask=n_mask, other=0.0)[None, :])
    finish_rows(acc, acc_up, rows_m, rows_n, m_mask, n_mask, N, bias_ptr, residual_ptr, residual_stride, out_ptr,
                out_stride, peer_parts_ptr, peer_counts_ptr, ticket_ptr, rank, HAS_BIAS, GATED, GELU_TANH, ADD_RESIDUAL,
                RESIDUAL_PARTS, PUSH)


@triton.jit
def _quant_input(x_ptr, x_row, x_stride, norm_w_ptr, k, K, m_mask, inv_rms, EVEN_K: tl.constexpr, NORM: tl.constexpr,
                 X_PARTS: tl.constexpr):
    """x's columns k as the FP8 quantization after an RMSNorm sees them (rms_norm.py: normalized, times the norm's
    weight, rounded to x's dtype), or as they are; float32."""
    x = load_x(x_ptr, x_row, x_stride, k, K, m_mask, EVEN_K, True, X_PARTS)
    if NORM:
        w = load_vector(norm_w_ptr, k, K, EVEN_K).to(tl.float32)[None, :]
        x = (x * inv_rms[:, None] * w).to(x_ptr.dtype.element_ty).to(tl.float32)
    return x


@triton.jit
def _quant_scale(x_ptr, x_row, x_stride, norm_w_ptr, K, m_mask, eps, BLOCK_M: tl.constexpr, ACC_K: tl.constexpr,
                 EVEN_K: tl.constexpr, NORM: tl.constexpr, X_PARTS: tl.constexpr):
    """QUANT_X's passes over x before the product: 1/rms (NORM; else 1), then the per-token FP8 scale of x as
    _quant_input gives it."""
    cols = tl.arange(0, ACC_K)
    inv_rms = tl.full([BLOCK_M], 1.0, tl.float32)
    if NORM:
        sum_sq = tl.zeros([BLOCK_M, ACC_K], tl.float32)
        for k0 in range(0, K, ACC_K):
            x = load_x(x_ptr, x_row, x_stride, k0 + cols, K, m_mask, EVEN_K, True, X_PARTS)
            sum_sq += x * x
        inv_rms = tl.rsqrt(tl.sum(sum_sq, 1) / K + eps)
    abs_max = tl.zeros([BLOCK_M, ACC_K], tl.float32)
    for k0 in range(0, K, ACC_K):
        x = _quant_input(x_ptr, x_row, x_stride, norm_w_ptr, k0 + cols, K, m_mask, inv_rms, EVEN_K, NORM, X_PARTS)
        abs_max = tl.maximum(abs_max, tl.abs(x))
    return fp8_scale(tl.max(abs_max, 1)), inv_rms


def gemv_config(m: int, norm: bool = False, gated: bool = False) -> GemvConfig:
    """Within 6% of each Llama-8B shape's best at M = 1, TP 1 and 2 (H100 sweep). A folded RMSNorm loads x and the
    norm weight in every program: longer K tiles (and for qkv 8 rows a program) amortize that (qkv 20.2 us
    against 23.3 with the plain tiles, gate/up 79.3 against 84.8; benchmarks/kernel_tuning.py --only fusions)."""
    if m > 1:
        return GemvConfig(16, 256, 4, 3)
    if norm:
        return GemvConfig(4, 2048, 4, 2) if gated else GemvConfig(8, 2048, 8, 2)
    return GemvConfig(4, 1024, 4, 2)


def gemv(x: torch.Tensor | ReduceSite, weight: torch.Tensor, bias: torch.Tensor | None = None,
         config: GemvConfig | TileConfig | None = None, gated: bool = False,
         norm: tuple[torch.Tensor, float] | None = None, residual: torch.Tensor | ReduceSite | None = None,
         out: torch.Tensor | None = None, push: ReduceSite | None = None, weight_scale: torch.Tensor | None = None,
         int4_group: int = 0, gelu_tanh: bool = False, quant_x: bool = False) -> torch.Tensor | ReduceSite:
    """x: [M, K] (M <= MAX_ROWS, last dim contiguous); weight: [N, K] contiguous; bias: [N] or None.
    weight_scale: [N] float32 with an FP8 weight (w = weight * weight_scale per row; weight-only, W8A16).
    quant_x (FP8 weight): x, normalized first with norm, is quantized to FP8 per token (W8A8, dynamic per-token
    activations, as fp8.per_token_quant_fp8).
    config: the tiles, or a quantized weight's TileConfig (quant_tile_configs; by default its tuned entry for the
    shape): a tensor-core entry (block_m >= 16) sends W8A8 with x a tensor to fp8_one_row.py, which quantizes x
    and adds the folds as kernels of their own.
    int4_group > 0 (a multiple of 16): weight is int32 [N, K / 8] of 4-bit values along K, stored + 8
    (compressed-tensors pack-quantized), and weight_scale [N, K / int4_group] their scales (W4A16).
    gated: weight is a fused [gate; up] projection and the result is silu(gate) * up, [M, N / 2] (SwiGLU's
    SiluAndMul folded in: one kernel instead of two); gelu_tanh: GELU's tanh form for the gate instead of SiLU.
    norm: (weight [K], eps): multiply rms_norm(x) * weight instead of x (the RMSNorm before a projection).
    residual: [M, N]: the result plus residual (the add after a projection).
    out: [M, N] with contiguous rows to write into (default: residual itself, in place, or a new tensor).
    x and residual may be ReduceSites (M = 1): the sum of the ranks' parts, x waited for. push: the result is this
    rank's part of that site, sent to every rank; returns the site (reduce_site.py)."""
    x_site = x if isinstance(x, ReduceSite) else None
    residual_site = residual if isinstance(residual, ReduceSite) else None
    if not use_triton(weight):
        assert push is None, "ReduceSites are pushed by the Triton kernel only"
        result = gemv_ref(x_site.sum() if x_site else x, weight, bias, gated, norm,
                          residual_site.sum() if residual_site else residual, weight_scale, int4_group, gelu_tanh,
                          quant_x)
        out = residual if out is None and residual_site is None else out
        return result if out is None else out.copy_(result)
    m, k = (1, x_site.parts.shape[1]) if x_site else x.shape
    n = weight.shape[0] // 2 if gated else weight.shape[0]
    if config is None and m == 1 and weight.dtype == torch.bfloat16 and weight.is_cuda:  # a tuned file, if any
        tile = tuned_tile(m, weight.shape[0], k, "bf16", weight.device)
        if tile is not None:
            config = GemvConfig(*tile[1:5])
            if norm is not None and not tile.fold_norm and x_site is None:  # the norm as a kernel of its own
                x, norm = rms_norm(x, *norm), None
    assert m <= MAX_ROWS and weight.shape[1] * (8 if int4_group else 1) == k and weight.stride(-1) == 1
    assert (weight.dtype == FP8 or int4_group > 0) == (weight_scale is not None)
    assert not quant_x or weight.dtype == FP8
    assert not int4_group or (weight.dtype == torch.int32 and k % int4_group == 0 and weight_scale.stride(-1) == 1
                              and int4_group % 16 == 0 and weight.stride(0) % 2 == 0 and weight.data_ptr() % 8 == 0)
    x_rows = x_site.parts if x_site else x
    assert x_rows.stride(-1) == 1
    residual_rows = residual_site.parts if residual_site else residual
    if residual is not None:
        assert residual_rows.shape[-1] == n and residual_rows.stride(-1) == 1
        assert residual_site is not None or residual.shape[0] == m
    if push is not None:
        assert m == 1 and out is None and push.parts.shape[1] == n
        out = push.parts
    if out is None:
        out = residual if residual is not None and residual_site is None else torch.empty(m, n, dtype=x_rows.dtype,
                                                                                           device=weight.device)
    assert (push is not None or out.shape == (m, n)) and out.stride(-1) == 1
    added = residual_rows if residual is not None else out  # never read without ADD_RESIDUAL
    if m == 0:
        return out
    if config is None and weight_scale is not None:  # quant_tile_configs' matrix-vector entry for M rows
        dtype = "int4_w4a16" if int4_group else "fp8_w8a8"
        config = tile_config(m, weight.shape[0], k, dtype, weight.device)
    if isinstance(config, TileConfig):  # a quantized weight's tile: GemvConfig's fields after block_m
        if config.block_m >= 16 and quant_x and x_site is None and push is None:
            return fp8_one_row_in_tiles(x, weight, weight_scale, config, bias, gated, norm, residual, out, gelu_tanh)
        config = GemvConfig(*(default_config(m, k, "fp8_w8a8") if config.block_m >= 16 else config)[1:5])
    block_n, block_k, num_warps, num_stages = config or gemv_config(m, norm is not None, gated)
    block_k = min(block_k, max(16, next_pow2(k)))  # a K tile past K's next power of two would only be masked off
    waits = (x_site.count, x_site.previous_count) if x_site else (weight, weight)  # unused pointers: any tensor
    pushes = (push.peer_parts, push.peer_counts, push.ticket, push.rank) if push else (weight, weight, weight, 0)
    x_parts, residual_parts = x_site.world if x_site else 0, residual_site.world if residual_site else 0
    if int4_group:
        launch_int4_gemv(x_rows, weight, weight_scale, int4_group, bias, out, norm, added, m, n, k, waits, pushes,
                         x_parts, residual_parts, push.world if push else 0, block_n, block_k, num_warps, num_stages,
                         gated, residual is not None, gelu_tanh)
        return push if push is not None else out
    _gemv_kernel[(triton.cdiv(n, block_n),)](
        x_rows, weight, weight_scale if weight_scale is not None else weight, bias if bias is not None else weight, out,
        norm[0] if norm else weight, added, m, n, k, x_rows.stride(0), weight.stride(0), out.stride(0),
        added.stride(0), norm[1] if norm else 0.0, *waits, *pushes, HAS_BIAS=bias is not None,
        BLOCK_M=max(next_pow2(m), 1), BLOCK_N=block_n, BLOCK_K=block_k,
        ACC_K=accumulator_width(block_n, block_k, num_warps, gated) if m == 1 else block_k,
        EVEN_K=k % block_k == 0, GATED=gated, NORM=norm is not None, ADD_RESIDUAL=residual is not None,
        X_PARTS=x_parts, RESIDUAL_PARTS=residual_parts, PUSH=push.world if push else 0,
        W_SCALE=weight_scale is not None, GELU_TANH=gelu_tanh, QUANT_X=quant_x, num_warps=num_warps,
        num_stages=num_stages, **pdl_args(weight, "gemv"), **prefetch_args(weight, weight.shape[1], "gemv"))
    return push if push is not None else out


def gemv_ref(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, gated: bool = False,
             norm: tuple[torch.Tensor, float] | None = None, residual: torch.Tensor | None = None,
             weight_scale: torch.Tensor | None = None, int4_group: int = 0, gelu_tanh: bool = False,
             quant_x: bool = False) -> torch.Tensor:
    h = x.float()
    if norm is not None:
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + norm[1]) * norm[0].float()
    if quant_x:  # as the RMSNorm's output (in x's dtype) quantized per token
        h_q, h_scale = per_token_quant_fp8_ref(h.to(x.dtype))
        h = h_q.float() * h_scale
    if int4_group:
        w = dequantize_packed_ref(weight, weight_scale, int4_group)
    else:
        w = weight.float() if weight_scale is None else weight.float() * weight_scale.float()[:, None]
    out = h @ w.t()
    if bias is not None:
        out += bias.float()
    if gated:
        gate, up = out.chunk(2, dim=-1)
        act = torch.nn.functional.gelu(gate, approximate="tanh") if gelu_tanh else torch.nn.functional.silu(gate)
        out = act * up
    if residual is not None:
        return (residual.float() + out).to(residual.dtype)
    return out.to(x.dtype)
