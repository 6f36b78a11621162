"""FP8 (e4m3) W8A8: activation quantization and the scaled matmul, vLLM's semantics.

out[M, N] = (x_q[M, K] * x_scale) @ (w_q[N, K] * w_scale)^T, the scales per token or per tensor for x, per output
channel for w, or per (1 x block_k) group of x and (block_n x block_k) block of w (DeepSeek-V3's block-wise FP8).
The torch functions here (`*_ref`) are the CPU path and the oracle of the Triton kernels: they dequantize to
float32. The matmul kernel is in scaled_mm.py."""
from __future__ import annotations

import torch

from ._triton import next_pow2, pdl_args, tl, triton, use_triton, wait_for_previous_kernel

FP8 = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8).max  # 448
MIN_SCALE = 1.0 / (FP8_MAX * 512.0)  # vLLM's floor: an all-zero row gets a finite scale


def divide(x: torch.Tensor, divisor: torch.Tensor | float) -> torch.Tensor:
    """x / divisor as IEEE division rounds it on every device, as the kernels' div_rn: CUDA divides by a Python
    number (or a CPU scalar) as a multiplication by its reciprocal, 1 ulp off for some quotients, which moves the
    values that fall halfway between two FP8 values."""
    return x / torch.as_tensor(divisor, dtype=torch.float32, device=x.device)


def quantize_fp8(x: torch.Tensor, scale: torch.Tensor | float) -> torch.Tensor:
    """x / scale, saturated to the e4m3 range and rounded to FP8; scale broadcasts against x."""
    return divide(x.float(), scale).clamp(-FP8_MAX, FP8_MAX).to(FP8)


def per_token_quant_fp8_ref(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic per-token quantization: x [M, K] -> (x_q [M, K] FP8, scale [M, 1] float32)."""
    scale = divide(x.float().abs().amax(-1, keepdim=True), FP8_MAX).clamp(min=MIN_SCALE)
    return quantize_fp8(x, scale), scale


def per_token_group_quant_fp8_ref(x: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic quantization per `group` consecutive columns of each token (block-wise FP8's activations):
    x [M, K] -> (x_q [M, K], scale [M, ceil(K / group)]). A last, shorter group has a scale of its own."""
    m, k = x.shape
    groups = -(-k // group)
    padded = torch.nn.functional.pad(x.float(), (0, groups * group - k)).view(m, groups, group)
    scale = divide(padded.abs().amax(-1), FP8_MAX).clamp(min=MIN_SCALE)
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


@triton.jit
def e4m3_value(v):
    """The e4m3 value nearest v (fp32 within +-448), rounding to nearest even like torch, as a float32: the
    nearest multiple of v's e4m3 spacing, via the 1.5 * 2^23 trick, so that a cast to FP8 only drops zero bits
    (Triton's interpreter truncates where a value rounds up into the next binade)."""
    bits = v.to(tl.int32, bitcast=True)
    spacing_exp = tl.maximum(((bits >> 23) & 0xFF) - 127, -6) - 3  # 3 mantissa bits; subnormals below 2^-6
    spacing = ((spacing_exp + 127) << 23).to(tl.float32, bitcast=True)
    inverse = ((127 - spacing_exp) << 23).to(tl.float32, bitcast=True)  # powers of two: both products exact
    return ((v * inverse + 12582912.0) - 12582912.0) * spacing


@triton.jit
def fp8_scale(abs_max):
    """The dynamic scale of values whose absolute maximum is abs_max, as per_token_quant_fp8_ref's; divisions
    IEEE-rounded here and in to_fp8 (a GPU's `/` is approximate), so the scales and bytes are torch's."""
    return tl.maximum(tl.math.div_rn(abs_max, 448.0), 1.0 / (448.0 * 512.0))


@triton.jit
def to_fp8(x, scale):
    """x / scale, saturated to e4m3's range and rounded to FP8, with x's sign kept where it rounds to zero (-0, as
    torch's cast gives)."""
    sign = x.to(tl.float32).to(tl.int32, bitcast=True) & -2147483648
    value = fp8_value(x, scale).to(tl.int32, bitcast=True) | sign
    return value.to(tl.float32, bitcast=True).to(tl.float8e4nv)


@triton.jit
def fp8_value(x, scale):
    """x / scale, saturated to e4m3's range and rounded to the nearest FP8 value, kept as a float32."""
    return e4m3_value(tl.minimum(tl.maximum(tl.math.div_rn(x, scale), -448.0), 448.0))


@triton.jit
def store_per_token_fp8(x, q_ptrs, mask, scale_ptr):
    """Dynamic per-token quantization of one row x (fp32, zeros where masked) into FP8 at q_ptrs, its scale at
    scale_ptr."""
    scale = fp8_scale(tl.max(tl.abs(x), 0))
    tl.store(scale_ptr, scale)
    tl.store(q_ptrs, to_fp8(x, scale), mask=mask)


@triton.jit
def _quant_fp8_kernel(x_ptr, q_ptr, scale_ptr, K, x_stride, q_stride, scale_stride, GROUP: tl.constexpr,
                      BLOCK: tl.constexpr, STATIC: tl.constexpr, PDL: tl.constexpr = False):
    """One program per (token, group of GROUP columns). STATIC: the scale is given (scale_ptr[0]), not computed."""
    wait_for_previous_kernel(PDL)
    row, group = tl.program_id(0), tl.program_id(1)
    offs = tl.arange(0, BLOCK)
    cols = group * GROUP + offs
    mask = (offs < GROUP) & (cols < K)
    x = tl.load(x_ptr + row * x_stride + cols, mask=mask, other=0.0).to(tl.float32)
    if STATIC:
        tl.store(q_ptr + row * q_stride + cols, to_fp8(x, tl.load(scale_ptr)), mask=mask)
    else:
        store_per_token_fp8(x, q_ptr + row * q_stride + cols, mask, scale_ptr + row * scale_stride + group)


def _quant_fp8(x: torch.Tensor, group: int, scale: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    m, k = x.shape
    assert x.stride(-1) == 1
    q = torch.empty(m, k, dtype=FP8, device=x.device)
    groups = -(-k // group)
    static = scale is not None
    scale = scale.reshape(1, 1).float() if static else torch.empty(m, groups, dtype=torch.float32, device=x.device)
    if m:
        _quant_fp8_kernel[(m, 1 if static else groups)](x, q, scale, k, x.stride(0), q.stride(0), scale.stride(0),
                                                        GROUP=k if static else group,
                                                        BLOCK=next_pow2(k if static else group), STATIC=static,
                                                        **pdl_args(x))
    return q, scale


def per_token_quant_fp8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic per-token quantization, x [M, K] -> (x_q, scale [M, 1])."""
    return _quant_fp8(x, x.shape[1], None) if use_triton(x) else per_token_quant_fp8_ref(x)


def per_token_group_quant_fp8(x: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    return _quant_fp8(x, group, None) if use_triton(x) else per_token_group_quant_fp8_ref(x, group)


def static_quant_fp8(x: torch.Tensor, scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-tensor quantization with a calibrated scale (a 1-element tensor) -> (x_q, scale [1, 1])."""
    if use_triton(x):
        return _quant_fp8(x, x.shape[1], scale)
    return quantize_fp8(x, scale), scale.reshape(1, 1)
