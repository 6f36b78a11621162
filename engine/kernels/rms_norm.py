"""RMSNorm and vLLM's fused residual-add + RMSNorm. Math in fp32, results in the input dtype, or (vLLM's
rms_norm_dynamic_per_token_quant) quantized to FP8 per token for the FP8 layer after it."""
import torch

from ._triton import next_pow2, pdl_args, row_warps, tl, triton, use_triton, wait_for_previous_kernel
from .fp8 import FP8, per_token_quant_fp8_ref, store_per_token_fp8


@triton.jit
def _rms_norm_kernel(x_ptr, residual_ptr, weight_ptr, out_ptr, scale_ptr, x_stride, residual_stride, out_stride,
                     hidden, eps, ADD_RESIDUAL: tl.constexpr, QUANT_FP8: tl.constexpr, BLOCK: tl.constexpr,
                     ADD_AFTER: tl.constexpr = False, PDL: tl.constexpr = False):
    """ADD_RESIDUAL: the residual is added to x first (and stored); ADD_AFTER: the normalized x, rounded to its
    dtype, is added to the residual (out_ptr) instead of being stored (Gemma's post-norms)."""
    wait_for_previous_kernel(PDL)
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < hidden
    x = tl.load(x_ptr + row * x_stride + cols, mask=mask, other=0.0).to(tl.float32)
    if ADD_RESIDUAL:
        r = tl.load(residual_ptr + row * residual_stride + cols, mask=mask, other=0.0).to(tl.float32)
        r = (x + r).to(residual_ptr.dtype.element_ty)
        tl.store(residual_ptr + row * residual_stride + cols, r, mask=mask)
        x = r.to(tl.float32)  # normalize the stored (rounded) sum, as the unfused path would
    inv_rms = tl.rsqrt(tl.sum(x * x, 0) / hidden + eps)
    w = tl.load(weight_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    y = x * inv_rms * w
    if QUANT_FP8:  # the normalized row rounded to the model's dtype first, as the unfused path stores it
        store_per_token_fp8(y.to(x_ptr.dtype.element_ty).to(tl.float32), out_ptr + row * out_stride + cols, mask,
                            scale_ptr + row)
    elif ADD_AFTER:
        r = tl.load(out_ptr + row * out_stride + cols, mask=mask, other=0.0).to(tl.float32)
        y = y.to(x_ptr.dtype.element_ty).to(tl.float32)
        tl.store(out_ptr + row * out_stride + cols, (r + y).to(out_ptr.dtype.element_ty), mask=mask)
    else:
        tl.store(out_ptr + row * out_stride + cols, y.to(out_ptr.dtype.element_ty), mask=mask)


def _launch(x, residual, weight, out, eps, scale=None):
    hidden = x.shape[-1]
    x2, out2 = x.view(-1, hidden), out.view(-1, hidden)
    r2 = residual.view(-1, hidden) if residual is not None else x2
    if x2.shape[0] == 0:
        return
    _rms_norm_kernel[(x2.shape[0],)](x2, r2, weight, out2, scale if scale is not None else weight, x2.stride(0),
                                     r2.stride(0), out2.stride(0), hidden, eps, ADD_RESIDUAL=residual is not None,
                                     QUANT_FP8=scale is not None, BLOCK=next_pow2(hidden),
                                     num_warps=row_warps(next_pow2(hidden)), **pdl_args(x))


def rms_norm_add(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor) -> torch.Tensor:
    """In place: residual += rms_norm(x) * weight (the normalized x rounded to x's dtype first, as the unfused
    path stores it). Returns residual."""
    if not use_triton(x):
        return residual.copy_(residual.float() + rms_norm_ref(x, weight, eps).float())
    x2, r2 = x.view(-1, x.shape[-1]), residual.view(-1, x.shape[-1])
    if x2.shape[0]:
        block = next_pow2(x.shape[-1])
        _rms_norm_kernel[(x2.shape[0],)](x2, x2, weight, r2, weight, x2.stride(0), x2.stride(0), r2.stride(0),
                                         x.shape[-1], eps, ADD_RESIDUAL=False, QUANT_FP8=False, BLOCK=block,
                                         ADD_AFTER=True, num_warps=row_warps(block), **pdl_args(x))
    return residual


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x: [..., H] with a contiguous last dim -> new tensor x / rms(x) * weight."""
    if not use_triton(x):
        return rms_norm_ref(x, weight, eps)
    out = torch.empty_like(x)
    _launch(x, None, weight, out, eps)
    return out


def fused_add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                       eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """In place: residual += x, then x = rms_norm(residual) * weight. Returns (x, residual)."""
    if not use_triton(x):
        return fused_add_rms_norm_ref(x, residual, weight, eps)
    _launch(x, residual, weight, x, eps)
    return x, residual


def rms_norm_quant_fp8(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, H] -> (FP8 rows of rms_norm(x) * weight, their scales [M, 1]): per_token_quant_fp8 of what rms_norm
    returns, in one kernel. With `residual`: residual += x first, in place, and its sum is normalized."""
    if not use_triton(x):
        normed = fused_add_rms_norm_ref(x.clone(), residual, weight, eps)[0] if residual is not None else \
            rms_norm_ref(x, weight, eps)
        return per_token_quant_fp8_ref(normed)
    q = torch.empty(x.shape, dtype=FP8, device=x.device)
    scale = torch.empty(x.shape[0], 1, dtype=torch.float32, device=x.device)
    _launch(x, residual, weight, q, eps, scale)
    return q, scale


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    h = x.float()
    return (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps) * weight.float()).to(x.dtype)


def fused_add_rms_norm_ref(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                           eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    residual.copy_(x.float() + residual.float())
    x.copy_(rms_norm_ref(residual, weight, eps))
    return x, residual
