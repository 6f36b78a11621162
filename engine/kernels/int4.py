"""INT4 weight-only (W4A16) weights: unpacking and dequantization, the torch references of the Triton kernels.

Two packings, eight 4-bit values to an int32:
- AWQ (AutoAWQ's GEMM version): qweight [K, N / 8], qzeros [K / G, N / 8], scales [K / G, N]; the eight output
  columns of an int32 sit in its nibbles in the order 0 2 4 6 1 3 5 7; w = (q - zero) * scale.
- compressed-tensors pack-quantized, symmetric: weight_packed [N, K / 8] with input column 8j + i in nibble i,
  stored as q + 8; weight_scale [N, K / G]; w = (stored - 8) * scale.
`int4_mm` loads a tile of either packing along its packed dimension, unpacks and dequantizes it in registers and
multiplies it with tl.dot, or for up to MAX_GEMV_ROWS rows of x (batch-1 decode) sums the products along K (the
matrix-vector form). compressed-tensors' packing with K tiles of 128 or more takes a kernel with a dot a nibble
instead (_int4_mm_planes_kernel), which unpacks nothing along K: 11 SASS instructions a weight value for Hopper at
64 x 64 x 128 tiles, against 15 for the general kernel."""
from __future__ import annotations

import torch

from ._triton import next_pow2, tl, triton, use_triton
from .quant_tile_configs import MAX_GEMV_ROWS, TileConfig, tile_config

AWQ_NIBBLE = [0, 4, 1, 5, 2, 6, 3, 7]  # output column j of an int32 is its nibble AWQ_NIBBLE[j]


def unpack_int4(packed: torch.Tensor, nibble_of_column: list[int] | None = None) -> torch.Tensor:
    """int32 [R, C] -> int32 [R, 8 C] of values in [0, 16), along the last dim."""
    order = nibble_of_column or list(range(8))
    shifts = torch.tensor(order, device=packed.device, dtype=torch.int32) * 4
    return ((packed.unsqueeze(-1) >> shifts) & 0xF).flatten(-2)


def dequantize_awq_ref(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, group: int) -> torch.Tensor:
    """-> float32 [N, K] (the layer's orientation)."""
    q = unpack_int4(qweight, AWQ_NIBBLE)
    zeros = unpack_int4(qzeros, AWQ_NIBBLE).repeat_interleave(group, 0)
    return ((q - zeros).float() * scales.float().repeat_interleave(group, 0)).t()


def dequantize_packed_ref(weight_packed: torch.Tensor, weight_scale: torch.Tensor, group: int) -> torch.Tensor:
    """-> float32 [N, K]."""
    q = unpack_int4(weight_packed) - 8
    return q.float() * weight_scale.float().repeat_interleave(group, 1)


def int4_mm_ref(x: torch.Tensor, packing: str, tensors: tuple[torch.Tensor, ...], group: int,
                bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [M, K] @ dequantized^T; tensors: (qweight, qzeros, scales) for "awq", (weight_packed, weight_scale) for
    "pack"."""
    w = dequantize_awq_ref(*tensors, group) if packing == "awq" else dequantize_packed_ref(*tensors, group)
    return torch.nn.functional.linear(x, w.to(x.dtype), bias)


@triton.jit
def _unpack_nibbles(packed, SHIFTS_AWQ: tl.constexpr):
    """int32 [R, C] -> int32 [R, 8 C]: value 8c + i of row r from nibble i (compressed-tensors) or nibble
    AWQ_NIBBLE[i] (AWQ) of packed[r, c]."""
    nibble = tl.arange(0, 8)
    if SHIFTS_AWQ:
        nibble = nibble // 2 + 4 * (nibble % 2)
    values = (packed[:, :, None] >> (nibble * 4)[None, None, :]) & 0xF
    return tl.reshape(values, (packed.shape[0], packed.shape[1] * 8))


@triton.jit
def nibbles_as_float(values):
    """int32 nibbles (0..15) -> float32 2^23 + nibble: the nibble becomes the low mantissa bits, with no
    int-to-float conversion (a quarter-rate instruction on Hopper, and the dequantization's costliest step). A
    difference of two such floats, or one minus 2^23 + 8, is exact."""
    return (values | 0x4B000000).to(tl.float32, bitcast=True)


MAGIC = 0x4B000000  # 2^23 as float32 bits; a kernel argument, not a literal, so that it sits in a register and the
# mask-and-OR of each nibble compiles to one LOP3 (a literal made Triton 3.6 emit two: one immediate an instruction)


@triton.jit
def split8(x):
    """[R, 8] -> eight [R]: its columns."""
    a, b = tl.split(tl.reshape(x, (x.shape[0], 4, 2)))
    a0, a1 = tl.split(tl.reshape(a, (x.shape[0], 2, 2)))
    b0, b1 = tl.split(tl.reshape(b, (x.shape[0], 2, 2)))
    x0, x4 = tl.split(a0)
    x2, x6 = tl.split(a1)
    x1, x5 = tl.split(b0)
    x3, x7 = tl.split(b1)
    return x0, x1, x2, x3, x4, x5, x6, x7


@triton.jit
def _plane_product(acc, x_plane, packed, magic, scales, SHIFT: tl.constexpr, PRECISION: tl.constexpr):
    """acc + x_plane [BLOCK_M, C] @ the nibbles at SHIFT of packed [BLOCK_N, C], dequantized as the reference does
    ((q - 8) * scale in float32, then the dot's dtype), transposed."""
    w = ((((packed >> SHIFT) & 0xF) | magic).to(tl.float32, bitcast=True) - 8388616.0) * scales
    return tl.dot(x_plane, tl.trans(w.to(x_plane.dtype)), acc, input_precision=PRECISION)


@triton.jit
def _int4_mm_planes_kernel(x_ptr, w_ptr, scales_ptr, bias_ptr, out_ptr, M, N, K, x_stride, w_stride, scales_stride,
                           out_stride, magic, GROUP: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr,
                           BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr,
                           PRECISION: tl.constexpr):
    """compressed-tensors' packing (along K) with tensor-core dots, one per nibble of the int32s: the weight tile
    stays [BLOCK_N, BLOCK_K / 8] as loaded, and nibble i of every int32 meets x's columns k0 + 8c + i (x loaded
    as [BLOCK_M * C, 8] and split), so no tile is reshaped or unpacked along K. Scales are gathered per int32,
    so a K tile may span groups."""
    pid_m, pid_n = tl.program_id(0), tl.program_id(1)
    C: tl.constexpr = BLOCK_K // 8
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask, n_mask = rows < M, cols < N
    ints = tl.arange(0, C)
    flat = tl.arange(0, BLOCK_M * C)  # x's tile as [BLOCK_M * C, 8]: entry (m * C + c, i) is column 8c + i of row m
    x_rows = pid_m * BLOCK_M + flat // C
    x_cols = 8 * (flat % C)[:, None] + tl.arange(0, 8)[None, :]
    x_base = x_ptr + x_rows.to(tl.int64)[:, None] * x_stride + x_cols
    w_base = w_ptr + cols.to(tl.int64)[:, None] * w_stride + ints[None, :]
    s_base = scales_ptr + cols.to(tl.int64)[:, None] * scales_stride
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        if EVEN_K:
            x_mask = (x_rows < M)[:, None]
            w_mask = n_mask[:, None]
        else:
            x_mask = (x_rows < M)[:, None] & (k0 + x_cols < K)
            w_mask = n_mask[:, None] & (k0 // 8 + ints < K // 8)[None, :]
        x = tl.load(x_base + k0, mask=x_mask, other=0.0)
        packed = tl.load(w_base + k0 // 8, mask=w_mask, other=0)
        scales = tl.load(s_base + ((k0 + 8 * ints) // GROUP)[None, :], mask=w_mask, other=0.0).to(tl.float32)
        x0, x1, x2, x3, x4, x5, x6, x7 = split8(x)
        acc = _plane_product(acc, tl.reshape(x0, (BLOCK_M, C)), packed, magic, scales, 0, PRECISION)
        acc = _plane_product(acc, tl.reshape(x1, (BLOCK_M, C)), packed, magic, scales, 4, PRECISION)
        acc = _plane_product(acc, tl.reshape(x2, (BLOCK_M, C)), packed, magic, scales, 8, PRECISION)
        acc = _plane_product(acc, tl.reshape(x3, (BLOCK_M, C)), packed, magic, scales, 12, PRECISION)
        acc = _plane_product(acc, tl.reshape(x4, (BLOCK_M, C)), packed, magic, scales, 16, PRECISION)
        acc = _plane_product(acc, tl.reshape(x5, (BLOCK_M, C)), packed, magic, scales, 20, PRECISION)
        acc = _plane_product(acc, tl.reshape(x6, (BLOCK_M, C)), packed, magic, scales, 24, PRECISION)
        acc = _plane_product(acc, tl.reshape(x7, (BLOCK_M, C)), packed, magic, scales, 28, PRECISION)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    tl.store(out_ptr + rows[:, None] * out_stride + cols[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=m_mask[:, None] & n_mask[None, :])


@triton.jit
def _int4_mm_kernel(x_ptr, w_ptr, zeros_ptr, scales_ptr, bias_ptr, out_ptr, M, N, K, x_stride, w_stride,
                    zeros_stride, scales_stride, out_stride, GROUP: tl.constexpr, AWQ: tl.constexpr,
                    HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                    DOT: tl.constexpr, PRECISION: tl.constexpr):
    """Each int32 is loaded once, along its packed dimension, and unpacked in registers; a K tile lies inside one
    group (BLOCK_K divides GROUP), so its zero points and scales are one row of BLOCK_N values."""
    pid_m, pid_n = tl.program_id(0), tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    packed_cols = pid_n * (BLOCK_N // 8) + tl.arange(0, BLOCK_N // 8)
    m_mask, n_mask = rows < M, cols < N
    ks = tl.arange(0, BLOCK_K)
    packed_ks = tl.arange(0, BLOCK_K // 8)
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + ks
        x = tl.load(x_ptr + rows[:, None] * x_stride + k[None, :], mask=m_mask[:, None] & (k < K)[None, :],
                    other=0.0)
        group = k0 // GROUP
        if AWQ:  # qweight [K, N / 8], qzeros [K / G, N / 8], scales [K / G, N]
            packed_mask = (k < K)[:, None] & (packed_cols < tl.cdiv(N, 8))[None, :]
            q = _unpack_nibbles(tl.load(w_ptr + k[:, None] * w_stride + packed_cols[None, :], mask=packed_mask,
                                        other=0), True)  # [BLOCK_K, BLOCK_N]
            z = _unpack_nibbles(tl.load(zeros_ptr + group * zeros_stride + packed_cols[None, :],
                                        mask=packed_cols[None, :] < tl.cdiv(N, 8), other=0), True)
            s = tl.load(scales_ptr + group * scales_stride + cols, mask=n_mask, other=0.0)
            w = ((nibbles_as_float(q) - nibbles_as_float(z)) * s.to(tl.float32)[None, :]).to(x.dtype)
        else:  # weight_packed [N, K / 8] stored + 8, weight_scale [N, K / G]
            packed_k = k0 // 8 + packed_ks
            packed_mask = n_mask[:, None] & (packed_k < tl.cdiv(K, 8))[None, :]
            q = _unpack_nibbles(tl.load(w_ptr + cols[:, None] * w_stride + packed_k[None, :], mask=packed_mask,
                                        other=0), False)  # [BLOCK_N, BLOCK_K]
            s = tl.load(scales_ptr + cols * scales_stride + group, mask=n_mask, other=0.0)
            w = tl.trans(((nibbles_as_float(q) - 8388616.0) * s.to(tl.float32)[:, None]).to(x.dtype))
        if DOT:
            acc += tl.dot(x, w, input_precision=PRECISION)  # float32: IEEE, as torch multiplies, not TF32
        else:
            acc += tl.sum(x.to(tl.float32)[:, :, None] * w.to(tl.float32)[None, :, :], 1)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    tl.store(out_ptr + rows[:, None] * out_stride + cols[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=m_mask[:, None] & n_mask[None, :])


def int4_mm(x: torch.Tensor, packing: str, tensors: tuple[torch.Tensor, ...], group: int,
            bias: torch.Tensor | None = None, config: TileConfig | None = None) -> torch.Tensor:
    """The dequantize-and-multiply kernel; int4_mm_ref is its reference. config: the tiles (default:
    quant_tile_configs' choice); BLOCK_N and BLOCK_K are multiples of 8, and BLOCK_K is cut to divide the group."""
    if not use_triton(x):
        return int4_mm_ref(x, packing, tensors, group, bias)
    m, k = x.shape
    assert x.stride(-1) == 1
    if packing == "awq":
        w, zeros, scales = tensors
        n = scales.shape[1]
    else:
        (w, scales), zeros = tensors, tensors[0]  # no zero points: any pointer
        n = w.shape[0]
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    if m == 0:
        return out
    dot = m > MAX_GEMV_ROWS
    block_m, block_n, block_k, num_warps, num_stages = (config or tile_config(m, n, k, "int4_w4a16", x.device))[:5]
    block_m = max(block_m, 16) if dot else next_pow2(m)
    if dot and packing == "pack" and block_k >= 128:  # a dot a nibble: K tiles of 16 int32s or more
        grid = (triton.cdiv(m, block_m), triton.cdiv(n, block_n))
        _int4_mm_planes_kernel[grid](x, w, scales, bias if bias is not None else out, out, m, n, k, x.stride(0),
                                     w.stride(0), scales.stride(0), out.stride(0), MAGIC, GROUP=group,
                                     HAS_BIAS=bias is not None, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
                                     EVEN_K=k % block_k == 0, PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
                                     num_warps=num_warps, num_stages=num_stages)
        return out
    block_n = max(8, block_n // 8 * 8)  # whole int32s of AWQ's packing along N (a tuned one-row entry is gemv's)
    while group % block_k and group != k:  # a K tile inside one group (group == K: a single group)
        block_k //= 2
    assert block_k >= 8 and block_n % 8 == 0, f"INT4 tiles {block_n}x{block_k} for group {group}"
    grid = (triton.cdiv(m, block_m), triton.cdiv(n, block_n))
    _int4_mm_kernel[grid](x, w, zeros, scales, bias if bias is not None else out, out, m, n, k, x.stride(0),
                          w.stride(0), zeros.stride(0), scales.stride(0), out.stride(0), GROUP=group,
                          AWQ=packing == "awq", HAS_BIAS=bias is not None, BLOCK_M=block_m, BLOCK_N=block_n,
                          BLOCK_K=block_k, DOT=dot, PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
                          num_warps=num_warps, num_stages=num_stages)
    return out
