"""INT4 weight-only (W4A16) matrix-vector product for batch-1 decode, gemv.gemv's kernel for compressed-tensors'
pack-quantized weights: int32 [N, K / 8] holding eight 4-bit values along K (value 8j + i in nibble i, stored + 8)
and scales [N, K / GROUP]. gemv.gemv validates the arguments and calls launch_int4_gemv; the folds (RMSNorm before,
SiLU/GELU gate, bias, residual, ReduceSites) are the 16-bit kernel's.

Each program streams BLOCK_N weight rows for one row of x. A K tile is taken as [int64s, rows], two int32s of each
row a thread in one 8-byte load, and x as eight nibble planes for each half (plane i of half h: x at K columns 16c +
8h + i), so nibble i of every int32 meets its x without unpacking anything along K. The weights, their scales and
x's planes are all loaded one element a thread (`unit` hides the int64s' contiguity from Triton, which would
otherwise give the weights 16-byte vectors and x another layout): they then share one layout and no tile passes
through shared memory inside the loop (a vectorized form once spent 22 barriers a K tile on such conversions for
Hopper). The two int32s of an int64 share their group's scale, so a thread keeps one partial sum and one accumulator
for both (K and the group size are multiples of 16): about 60 registers at 16 rows of 512 K columns and 8 warps,
gate and up together, against about 100 for one int32 a thread. A nibble becomes a float with one mask-and-OR and
half a shift, no int-to-float conversion (quarter rate on Hopper) and no subtraction: shifted to bit s = 12 or 16
(nibbles 2j and 2j + 1 share a shift) and OR-ed into the mantissa of a float whose bit s is worth 1 (2^11 or 2^7),
it reads 2^(23 - s) + q and multiplies x as it is. What x contributes beyond (q - 8) x, (2^(23 - s) + 8) x, is
summed once per column for all its rows and taken off before the group's scale multiplies the partial sum. Bits 12
and 16 leave 11 and 7 bits above the nibble, so the float32 products keep their low bits (a nibble lower down would
lose them to the float's leading bit).
"""
from __future__ import annotations

import torch

from ._triton import pdl_args, prefetch_args, tl, triton
from .gemv_parts import finish_rows, load_vector, start_rows
from .reduce_site import load_part_sum

# 2^11 as float32 bits: a nibble q OR-ed in at bit 12 of its mantissa reads 2^11 + q. A kernel argument, not a
# literal, so that it sits in a register (the one for bit 16, 2^7, is derived from it once).
MAGIC_12 = 0x45000000


@triton.jit
def _moved(packed, I: tl.constexpr):
    """The int32s shifted so that nibble I sits at bit 12 (I even) or 16 (I odd): nibbles 2j and 2j + 1 share a
    shift."""
    if I < 2:
        return packed << 12
    elif I < 4:
        return packed << 4
    elif I < 6:
        return packed >> 4
    else:
        return packed >> 12


@triton.jit
def _nibble_float(moved, magic_12, magic_16, I: tl.constexpr):
    """2^(23 - s) + q for the nibble q of `moved` at bit s (12 or 16, see _moved): OR-ed into the mantissa of a
    float whose bit s is worth 1."""
    if I % 2 == 0:
        return ((moved & 0xF000) | magic_12).to(tl.float32, bitcast=True)
    return ((moved & 0xF0000) | magic_16).to(tl.float32, bitcast=True)


@triton.jit
def _x_offset(I: tl.constexpr):
    """2^(23 - s) + 8 for nibble I: what x contributes beyond (q - 8) x."""
    return (1 << (11 - 4 * (I % 2))) + 8.0


@triton.jit
def _load_tile(ptrs, k_mask, EVEN_K: tl.constexpr):
    """A [int64s, rows] tile of weights or scales; zeros past K. No row mask: rows past N are clamped (the loop
    then has no predicated loads and no zero fill of them)."""
    if EVEN_K:
        return tl.load(ptrs)
    return tl.load(ptrs, mask=k_mask[:, None], other=0)


@triton.jit
def _x_plane(x_ptr, x_stride, row, norm_w_ptr, k, K, EVEN_K: tl.constexpr, NORM: tl.constexpr,
             X_PARTS: tl.constexpr):
    """x at the K columns k (one nibble plane of a tile), float32, times the norm's weights where NORM."""
    if X_PARTS > 0:
        x = load_part_sum(x_ptr, x_stride, k, k < K, X_PARTS).to(tl.float32)
    else:
        x = load_vector(x_ptr + row * x_stride, k, K, EVEN_K).to(tl.float32)
    if NORM:
        return x, x * load_vector(norm_w_ptr, k, K, EVEN_K).to(tl.float32)
    return x, x


@triton.jit(do_not_specialize=["M", "rank", "unit"])
def _int4_gemv_kernel(x_ptr, w_ptr, scale_ptr, bias_ptr, out_ptr, norm_w_ptr, residual_ptr, M, N, K, x_stride,
                      w_stride, scale_stride, out_stride, residual_stride, eps, x_count_ptr, previous_count_ptr,
                      peer_parts_ptr, peer_counts_ptr, ticket_ptr, rank, magic_12, unit, GROUP: tl.constexpr,
                      HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr,
                      GATED: tl.constexpr, NORM: tl.constexpr, ADD_RESIDUAL: tl.constexpr, X_PARTS: tl.constexpr,
                      RESIDUAL_PARTS: tl.constexpr, PUSH: tl.constexpr, GELU_TANH: tl.constexpr,
                      PDL: tl.constexpr = False, PREFETCH_LINES: tl.constexpr = 0, LINE: tl.constexpr = 32):
    """Program (i, m): weight rows [i * BLOCK_N, (i + 1) * BLOCK_N) against row m of x. The flags are gemv.py's."""
    pid, row = tl.program_id(0), tl.program_id(1)
    rows_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = rows_n < N
    start_rows(w_ptr, rows_n, n_mask, w_stride, N, x_count_ptr, previous_count_ptr, GATED, X_PARTS, PDL,
               PREFETCH_LINES, LINE)
    rows_m = row + tl.arange(0, 1)
    # `unit` (1) hides that a row's int64s are contiguous: loaded one an int64 a thread, the weights, their scales
    # and x's nibble planes all take one layout, and nothing passes through shared memory in the loop
    C2: tl.constexpr = BLOCK_K // 16  # int64s (two int32s) of a row in a K tile
    pairs = tl.arange(0, C2) * unit
    safe_rows = tl.minimum(rows_n, N - 1).to(tl.int64)[None, :]  # rows past N read row N - 1, whose sums are dropped
    w_row = w_ptr.to(tl.pointer_type(tl.int64)) + safe_rows * (w_stride // 2)
    s_row = scale_ptr + safe_rows * scale_stride
    up_offset = N * (w_stride // 2)
    up_s_offset = N * scale_stride
    acc = tl.zeros([C2, BLOCK_N], tl.float32)  # reduced once after the loop
    acc_up = tl.zeros([C2, BLOCK_N], tl.float32)
    sum_sq = tl.zeros([C2], tl.float32)
    magic_16 = magic_12 - (4 << 23)  # 2^7
    for k0 in range(0, K, BLOCK_K):
        pair_k = k0 // 16 + pairs
        groups = (k0 + 16 * pairs) // GROUP
        pair_mask = pair_k < K // 16
        wide = _load_tile(w_row + pair_k[:, None], pair_mask, EVEN_K)
        scales = _load_tile(s_row + groups[:, None], pair_mask, EVEN_K).to(tl.float32)
        if GATED:
            wide_up = _load_tile(w_row + up_offset + pair_k[:, None], pair_mask, EVEN_K)
            scales_up = _load_tile(s_row + up_s_offset + groups[:, None], pair_mask, EVEN_K).to(tl.float32)
        total = tl.zeros([C2, BLOCK_N], tl.float32)
        total_up = tl.zeros([C2, BLOCK_N], tl.float32)
        offset = tl.zeros([C2], tl.float32)
        for h in tl.static_range(2):
            packed = (wide >> (32 * h)).to(tl.int32)
            if GATED:
                packed_up = (wide_up >> (32 * h)).to(tl.int32)
            for i in tl.static_range(8):
                x_raw, x = _x_plane(x_ptr, x_stride, row, norm_w_ptr, k0 + 16 * pairs + 8 * h + i, K, EVEN_K, NORM,
                                    X_PARTS)
                if NORM:
                    sum_sq += x_raw * x_raw
                offset += x * _x_offset(i)
                x = x[:, None]
                if i % 2 == 0:
                    moved = _moved(packed, i)
                    if GATED:
                        moved_up = _moved(packed_up, i)
                total += _nibble_float(moved, magic_12, magic_16, i) * x
                if GATED:
                    total_up += _nibble_float(moved_up, magic_12, magic_16, i) * x
        acc += (total - offset[:, None]) * scales
        if GATED:
            acc_up += (total_up - offset[:, None]) * scales_up
    out = tl.sum(acc, 0)[None, :]
    out_up = tl.sum(acc_up, 0)[None, :]
    if NORM:
        inv_rms = tl.rsqrt(tl.sum(sum_sq, 0) / K + eps)
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
    """gemv.gemv's INT4 launch: its checked arguments and tiles; BLOCK_K becomes a power of two of at least 16."""
    block_k = max(16, 1 << (block_k.bit_length() - 1))
    _int4_gemv_kernel[(triton.cdiv(n, block_n), m)](
        x_rows, weight, weight_scale, bias if bias is not None else weight, out, norm[0] if norm else weight, added,
        m, n, k, x_rows.stride(0), weight.stride(0), weight_scale.stride(0), out.stride(0), added.stride(0),
        norm[1] if norm else 0.0, *waits, *pushes, MAGIC_12, 1, GROUP=group, HAS_BIAS=bias is not None, BLOCK_N=block_n,
        BLOCK_K=block_k, EVEN_K=k % block_k == 0, GATED=gated, NORM=norm is not None, ADD_RESIDUAL=add_residual,
        X_PARTS=x_parts, RESIDUAL_PARTS=residual_parts, PUSH=push_world, GELU_TANH=gelu_tanh, num_warps=num_warps,
        num_stages=num_stages, **pdl_args(weight, "int4"),
        **prefetch_args(weight, weight.shape[1], "int4"))
