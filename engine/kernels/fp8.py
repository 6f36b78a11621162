"""FP8 (e4m3) W8A8: activation quantization and the scaled matmul, vLLM's semantics.

out[M, N] = (x_q[M, K] * x_scale) @ (w_q[N, K] * w_scale)^T, the scales per token or per tensor for x, per output
channel for w, or per (1 x block_k) group of x and (block_n x block_k) block of w (DeepSeek-V3's block-wise FP8).
The torch functions here are the CPU path and the oracle of the Triton kernels: they dequantize to float32."""
from __future__ import annotations

import torch

FP8 = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8).max  # 448
MIN_SCALE = 1.0 / (FP8_MAX * 512.0)  # vLLM's floor: an all-zero row gets a finite scale


def quantize_fp8(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x / scale, saturated to the e4m3 range and rounded to FP8; scale broadcasts against x."""
    return (x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8)


def per_token_quant_fp8_ref(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic per-token quantization: x [M, K] -> (x_q [M, K] FP8, scale [M, 1] float32)."""
    scale = (x.float().abs().amax(-1, keepdim=True) / FP8_MAX).clamp(min=MIN_SCALE)
    return quantize_fp8(x, scale), scale


def per_token_group_quant_fp8_ref(x: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic quantization per `group` consecutive columns of each token (block-wise FP8's activations):
    x [M, K] -> (x_q [M, K], scale [M, ceil(K / group)]). A last, shorter group has a scale of its own."""
    m, k = x.shape
    groups = -(-k // group)
    padded = torch.nn.functional.pad(x.float(), (0, groups * group - k)).view(m, groups, group)
    scale = (padded.abs().amax(-1) / FP8_MAX).clamp(min=MIN_SCALE)
    return quantize_fp8(x, expand_blocks(scale, 1, group, k)), scale


def expand_blocks(scale: torch.Tensor, dim: int, block: int, size: int) -> torch.Tensor:
    """Repeat each scale `block` times along `dim`, cut to `size`: block scales as elementwise ones."""
    return scale.repeat_interleave(block, dim).narrow(dim, 0, size)


def dequantize_weight_fp8(w_q: torch.Tensor, w_scale: torch.Tensor, block: tuple[int, int] | None) -> torch.Tensor:
    """w_q [N, K] FP8 with w_scale [N] (per channel) or [ceil(N / bn), ceil(K / bk)] (block) -> float32."""
    n, k = w_q.shape
    if block is None:
        return w_q.float() * w_scale.float().view(n, 1)
    scale = expand_blocks(expand_blocks(w_scale.float(), 0, block[0], n), 1, block[1], k)
    return w_q.float() * scale


def scaled_mm_ref(x_q: torch.Tensor, x_scale: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor,
                  out_dtype: torch.dtype, bias: torch.Tensor | None = None,
                  block: tuple[int, int] | None = None) -> torch.Tensor:
    """x_scale: [M, 1] or [1, 1] (per token / per tensor), or [M, ceil(K / bk)] with `block`; w_scale as in
    dequantize_weight_fp8."""
    k = x_q.shape[1]
    x_scale = x_scale.float() if block is None else expand_blocks(x_scale.float(), 1, block[1], k)
    out = (x_q.float() * x_scale) @ dequantize_weight_fp8(w_q, w_scale, block).t()
    if bias is not None:
        out += bias.float()
    return out.to(out_dtype)
