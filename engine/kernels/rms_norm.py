"""RMSNorm and vLLM's fused residual-add + RMSNorm. Math in fp32, results in the input dtype."""
import torch

from ._triton import next_pow2, tl, triton, use_triton


@triton.jit
def _rms_norm_kernel(x_ptr, residual_ptr, weight_ptr, out_ptr, x_stride, residual_stride, out_stride, hidden, eps,
                     ADD_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr):
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
    tl.store(out_ptr + row * out_stride + cols, (x * inv_rms * w).to(out_ptr.dtype.element_ty), mask=mask)


def _launch(x, residual, weight, out, eps):
    hidden = x.shape[-1]
    x2, out2 = x.view(-1, hidden), out.view(-1, hidden)
    r2 = residual.view(-1, hidden) if residual is not None else x2
    if x2.shape[0] == 0:
        return
    _rms_norm_kernel[(x2.shape[0],)](x2, r2, weight, out2, x2.stride(0), r2.stride(0), out2.stride(0), hidden, eps,
                                     ADD_RESIDUAL=residual is not None, BLOCK=next_pow2(hidden))


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


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    h = x.float()
    return (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps) * weight.float()).to(x.dtype)


def fused_add_rms_norm_ref(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                           eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    residual.copy_(x.float() + residual.float())
    x.copy_(rms_norm_ref(residual, weight, eps))
    return x, residual
