"""INT4 weight-only (W4A16) weights: unpacking and dequantization, the torch references of the Triton kernels.

Two packings, eight 4-bit values to an int32:
- AWQ (AutoAWQ's GEMM version): qweight [K, N / 8], qzeros [K / G, N / 8], scales [K / G, N]; the eight output
  columns of an int32 sit in its nibbles in the order 0 2 4 6 1 3 5 7; w = (q - zero) * scale.
- compressed-tensors pack-quantized, symmetric: weight_packed [N, K / 8] with input column 8j + i in nibble i,
  stored as q + 8; weight_scale [N, K / G]; w = (stored - 8) * scale."""
from __future__ import annotations

import torch

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
