"""INT4 weight-only (W4A16) matrix-vector product for batch-1 decode, gemv.gemv's kernel for compressed-tensors'
pack-quantized weights: int32 [N, K / 8] holding eight 4-bit values along K (value 8j + i in nibble i, stored + 8)
and scales [N, K / GROUP]. gemv.gemv validates the arguments and calls launch_int4_gemv; the folds (RMSNorm before,
SiLU/GELU gate, bias, residual, ReduceSites) are the 16-bit kernel's.

Each program streams BLOCK_N weight rows for one row of x. A weight tile stays as loaded, [rows, int32s], and x's
tile is loaded as [int32s, 8] and split into eight nibble planes: nibble i of every int32 meets x column 8c + i, so
nothing is unpacked or reshaped along K (a reshape moves values between threads; with it, the kernel this replaces
needed twice the instructions a weight and read 0.7-0.8 TB/s on an H200). A nibble becomes a float with no
int-to-float conversion (quarter rate on Hopper): masked where it sits and OR-ed into the mantissa of 2^23, it reads
2^23 + q * 2^s, and subtracting 2^23 + 8 * 2^s leaves (q - 8) * 2^s exactly, with x scaled by 2^-s instead (exact
too). A float's 23 mantissa bits hold nibbles 0-4 in place; nibbles 5-7 are shifted down 12 bits first. The groups'
scales multiply each int32's partial sum, not each value.
"""
from __future__ import annotations

import torch

from ._triton import pdl_args, prefetch_args, tl, triton
from .gemv_parts import finish_rows, load_vector, start_rows
from .int4 import MAGIC, split8
from .reduce_site import load_part_sum


@triton.jit
def _plane(packed, magic, SHIFT: tl.constexpr):
    """(q - 8) * 2^SHIFT for the nibble q at bits [SHIFT, SHIFT + 4) of each int32 (see the module doc)."""
    bits = (packed & (0xF << SHIFT)) | magic
    return bits.to(tl.float32, bitcast=True) - (8388608.0 + 8.0 * (1 << SHIFT))


@triton.jit
def _plane_sums(packed, x, magic):
    """packed int32 [R, C], x float32 [C, 8] (the K values of each int32's nibbles) -> [R, C]: each int32's sum
    of (q - 8) * x."""
    x0, x1, x2, x3, x4, x5, x6, x7 = split8(x)
    high = packed >> 12  # nibbles 5-7 where a float's mantissa holds them
    total = _plane(packed, magic, 0) * x0[None, :]
    total += _plane(packed, magic, 4) * (x1 * 0.0625)[None, :]
    total += _plane(packed, magic, 8) * (x2 * 0.00390625)[None, :]
    total += _plane(packed, magic, 12) * (x3 * 0.000244140625)[None, :]
    total += _plane(packed, magic, 16) * (x4 * 1.52587890625e-05)[None, :]
    total += _plane(high, magic, 8) * (x5 * 0.00390625)[None, :]
    total += _plane(high, magic, 12) * (x6 * 0.000244140625)[None, :]
    total += _plane(high, magic, 16) * (x7 * 1.52587890625e-05)[None, :]
    return total


@triton.jit(do_not_specialize=["M", "rank"])
def _int4_gemv_kernel(x_ptr, w_ptr, scale_ptr, bias_ptr, out_ptr, norm_w_ptr, residual_ptr, M, N, K, x_stride,
                      w_stride, scale_stride, out_stride, residual_stride, eps, x_count_ptr, previous_count_ptr,
                      peer_parts_ptr, peer_counts_ptr, ticket_ptr, rank, magic, GROUP: tl.constexpr,
                      HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr,
                      GATED: tl.constexpr, NORM: tl.constexpr, ADD_RESIDUAL: tl.constexpr, X_PARTS: tl.constexpr,
                      RESIDUAL_PARTS: tl.constexpr, PUSH: tl.constexpr, GELU_TANH: tl.constexpr,
                      PDL: tl.constexpr = False, PREFETCH_LINES: tl.constexpr = 0, LINE: tl.constexpr = 32):
    """Program (i, m): weight rows [i * BLOCK_N, (i + 1) * BLOCK_N) against row m of x. The flags are gemv.py's."""
    pid, row = tl.program_id(0), tl.program_id(1)
    C: tl.constexpr = BLOCK_K // 8  # int32s of a row in a K tile
    rows_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = rows_n < N
    start_rows(w_ptr, rows_n, n_mask, w_stride, N, x_count_ptr, previous_count_ptr, GATED, X_PARTS, PDL,
               PREFETCH_LINES, LINE)
    rows_m = row + tl.arange(0, 1)
    ints = tl.arange(0, C)
    x_cols = 8 * ints[:, None] + tl.arange(0, 8)[None, :]  # [C, 8]: the K index of each nibble of a tile
    w_row = w_ptr + rows_n.to(tl.int64)[:, None] * w_stride
    s_row = scale_ptr + rows_n.to(tl.int64)[:, None] * scale_stride
    up_offset = N * w_stride
    up_s_offset = N * scale_stride
    acc = tl.zeros([BLOCK_N, C], tl.float32)  # reduced once after the loop
    acc_up = tl.zeros([BLOCK_N, C], tl.float32)
    sum_sq = tl.zeros([C, 8], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + x_cols
        packed_k = k0 // 8 + ints
        x_mask = k < K
        w_mask = n_mask[:, None] if EVEN_K else n_mask[:, None] & (packed_k < K // 8)[None, :]
        if X_PARTS > 0:
            x = load_part_sum(x_ptr, x_stride, k, x_mask, X_PARTS).to(tl.float32)
        else:
            x = load_vector(x_ptr + row * x_stride, k, K, EVEN_K).to(tl.float32)
        if NORM:
            sum_sq += x * x
            x = x * load_vector(norm_w_ptr, k, K, EVEN_K).to(tl.float32)
        groups = (k0 + 8 * ints) // GROUP
        packed = tl.load(w_row + packed_k[None, :], mask=w_mask, other=0)
        scales = tl.load(s_row + groups[None, :], mask=w_mask, other=0.0).to(tl.float32)
        acc += _plane_sums(packed, x, magic) * scales
        if GATED:
            packed = tl.load(w_row + up_offset + packed_k[None, :], mask=w_mask, other=0)
            scales = tl.load(s_row + up_s_offset + groups[None, :], mask=w_mask, other=0.0).to(tl.float32)
            acc_up += _plane_sums(packed, x, magic) * scales
    out = tl.sum(acc, 1)[None, :]
    out_up = tl.sum(acc_up, 1)[None, :]
    if NORM:
        inv_rms = tl.rsqrt(tl.sum(tl.sum(sum_sq, 1), 0) / K + eps)
        out = out * inv_rms
        out_up = out_up * inv_rms
    finish_rows(out, out_up, rows_m, rows_n, rows_m < M, n_mask, N, bias_ptr, residual_ptr, residual_stride, out_ptr,
                out_stride, peer_parts_ptr, peer_counts_ptr, ticket_ptr, rank, HAS_BIAS, GATED, GELU_TANH,
                ADD_RESIDUAL, RESIDUAL_PARTS, PUSH)


def launch_int4_gemv(x_rows: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor, group: int,
                     bias: torch.Tensor | None, out: torch.Tensor, norm: tuple[torch.Tensor, float] | None,
                     added: torch.Tensor, m: int, n: int, k: int, waits: tuple, pushes: tuple, x_parts: int,
                     residual_parts: int, push_world: int, block_n: int, block_k: int, num_warps: int,
                     num_stages: int, gated: bool, add_residual: bool, gelu_tanh: bool) -> None:
    """gemv.gemv's INT4 launch: its checked arguments and tiles; BLOCK_K becomes a power of two of at least 8."""
    block_k = max(8, 1 << (block_k.bit_length() - 1))
    _int4_gemv_kernel[(triton.cdiv(n, block_n), m)](
        x_rows, weight, weight_scale, bias if bias is not None else weight, out, norm[0] if norm else weight, added,
        m, n, k, x_rows.stride(0), weight.stride(0), weight_scale.stride(0), out.stride(0), added.stride(0),
        norm[1] if norm else 0.0, *waits, *pushes, MAGIC, GROUP=group, HAS_BIAS=bias is not None, BLOCK_N=block_n,
        BLOCK_K=block_k, EVEN_K=k % block_k == 0, GATED=gated, NORM=norm is not None, ADD_RESIDUAL=add_residual,
        X_PARTS=x_parts, RESIDUAL_PARTS=residual_parts, PUSH=push_world, GELU_TANH=gelu_tanh, num_warps=num_warps,
        num_stages=num_stages, **pdl_args(weight, "int4"),
        **prefetch_args(weight, weight.shape[1], "int4"))
