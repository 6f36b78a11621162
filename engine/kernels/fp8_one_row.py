"""One row of x (batch-1 decode) through an FP8 W8A8 layer in tensor-core tiles: the route gemv.gemv takes where
the tuned tile for the shape is a tensor-core one (BLOCK_SIZE_M 16 or more, 15 of the 16 rows padding). x is
quantized per token by a kernel of its own (the RMSNorm's, where one comes first), scaled_mm multiplies, and the
gate activation and residual add are kernels after it: what the matrix-vector kernel folds in. On an H100 the
gate/up projection of Llama-3-8B read its FP8 weights at 2.63 TB/s this way, against 1.78 TB/s for the folded
matrix-vector kernel (benchmarks/results/onerow-ab-h100-37c28e8.json)."""
from __future__ import annotations

import torch

from .activation import gelu_tanh_and_mul, silu_and_mul
from .fp8 import per_token_quant_fp8
from .quant_tile_configs import TileConfig
from .rms_norm import rms_norm_quant_fp8
from .scaled_mm import scaled_mm


def fp8_one_row_in_tiles(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor, tile: TileConfig,
                         bias: torch.Tensor | None, gated: bool, norm: tuple[torch.Tensor, float] | None,
                         residual: torch.Tensor | None, out: torch.Tensor | None, gelu_tanh: bool) -> torch.Tensor:
    """gemv.gemv's result (its arguments, x a tensor, no ReduceSites) for W8A8 with dynamic per-token x."""
    x_q, x_scale = rms_norm_quant_fp8(x, *norm) if norm is not None else per_token_quant_fp8(x)
    y = scaled_mm(x_q, x_scale, weight, weight_scale, x.dtype, bias, config=tile)
    if gated:
        y = gelu_tanh_and_mul(y) if gelu_tanh else silu_and_mul(y)
    if residual is not None:
        return torch.add(residual, y, out=residual if out is None else out)
    return y if out is None else out.copy_(y)
