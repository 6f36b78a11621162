"""INT4 weight-only (W4A16) weights: unpacking and dequantization, the torch references of the Triton kernels.

Two packings, eight 4-bit values to an int32:
- AWQ (AutoAWQ's GEMM version): qweight [K, N / 8], qzeros [K / G, N / 8], scales [K / G, N]; the eight output
  columns of an int32 sit in its nibbles in the order 0 2 4 6 1 3 5 7; w = (q - zero) * scale.
- compressed-tensors pack-quantized, symmetric: weight_packed [N, K / 8] with input column 8j + i in nibble i,
  stored as q + 8; weight_scale [N, K / G]; w = (stored - 8) * scale.
`int4_mm` dequantizes a [BLOCK_K, BLOCK_N] tile of either in registers and multiplies it with tl.dot, or for up
to MAX_GEMV_ROWS rows of x (batch-1 decode) sums the products along K (the matrix-vector form)."""
from __future__ import annotations

import torch

from ._triton import next_pow2, tl, triton, use_triton
from .scaled_mm import MAX_GEMV_ROWS

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
def _int4_mm_kernel(x_ptr, w_ptr, zeros_ptr, scales_ptr, bias_ptr, out_ptr, M, N, K, x_stride, w_stride,
                    zeros_stride, scales_stride, out_stride, GROUP: tl.constexpr, AWQ: tl.constexpr,
                    HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                    DOT: tl.constexpr, PRECISION: tl.constexpr):
    pid_m, pid_n = tl.program_id(0), tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask, n_mask = rows < M, cols < N
    ks = tl.arange(0, BLOCK_K)
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + ks
        k_mask = k < K
        x = tl.load(x_ptr + rows[:, None] * x_stride + k[None, :], mask=m_mask[:, None] & k_mask[None, :], other=0.0)
        tile_mask = k_mask[:, None] & n_mask[None, :]
        groups = (k // GROUP)[:, None]
        if AWQ:  # qweight [K, N / 8]; column n in nibble (n % 8) // 2 + 4 * (n % 2)
            shift = (((cols % 8) // 2 + 4 * (cols % 2)) * 4)[None, :]
            q = (tl.load(w_ptr + k[:, None] * w_stride + (cols // 8)[None, :], mask=tile_mask, other=0) >> shift) & 0xF
            z = (tl.load(zeros_ptr + groups * zeros_stride + (cols // 8)[None, :], mask=tile_mask, other=0)
                 >> shift) & 0xF
            s = tl.load(scales_ptr + groups * scales_stride + cols[None, :], mask=tile_mask, other=0.0)
        else:  # weight_packed [N, K / 8]; input column k in nibble k % 8, stored + 8
            shift = ((k % 8) * 4)[:, None]
            q = (tl.load(w_ptr + cols[None, :] * w_stride + (k // 8)[:, None], mask=tile_mask, other=0) >> shift) & 0xF
            z = 8
            s = tl.load(scales_ptr + cols[None, :] * scales_stride + groups, mask=tile_mask, other=0.0)
        w = ((q - z).to(tl.float32) * s.to(tl.float32)).to(x.dtype)  # [BLOCK_K, BLOCK_N]
        if DOT:
            acc += tl.dot(x, w, input_precision=PRECISION)  # float32: IEEE, as torch multiplies, not TF32
        else:
            acc += tl.sum(x.to(tl.float32)[:, :, None] * w.to(tl.float32)[None, :, :], 1)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    tl.store(out_ptr + rows[:, None] * out_stride + cols[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=m_mask[:, None] & n_mask[None, :])


def int4_mm(x: torch.Tensor, packing: str, tensors: tuple[torch.Tensor, ...], group: int,
            bias: torch.Tensor | None = None, tiles: tuple[int, int, int] = (64, 64, 64)) -> torch.Tensor:
    """The dequantize-and-multiply kernel; int4_mm_ref is its reference. tiles: (BLOCK_M, BLOCK_N, BLOCK_K) of
    the tensor-core form."""
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
    block_m, block_n, block_k = tiles if dot else (next_pow2(m), 16, 128)
    block_m = 16 if dot and m <= 16 else block_m
    grid = (triton.cdiv(m, block_m), triton.cdiv(n, block_n))
    _int4_mm_kernel[grid](x, w, zeros, scales, bias if bias is not None else out, out, m, n, k, x.stride(0),
                          w.stride(0), zeros.stride(0), scales.stride(0), out.stride(0), GROUP=group,
                          AWQ=packing == "awq", HAS_BIAS=bias is not None, BLOCK_M=block_m, BLOCK_N=block_n,
                          BLOCK_K=block_k, DOT=dot, PRECISION="ieee" if x.dtype == torch.float32 else "tf32")
    return out
