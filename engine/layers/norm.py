import torch
from torch import nn

from engine.kernels import fused_add_rms_norm, rms_norm, rms_norm_add, rms_norm_quant_fp8, rms_norm_ref
from engine.layers.quantization.fp8 import Fp8Rows


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, dtype: torch.dtype):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, dtype=dtype), requires_grad=False)
        self.use_triton = False

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None, fp8_rows: bool = False):
        """With `residual`: returns (norm(x + residual), x + residual), the fused form vLLM uses. fp8_rows (Triton
        path, x [T, H]): the normalized rows come quantized per token, as Fp8Rows for an FP8 layer."""
        if self.use_triton and fp8_rows:
            q, scale = rms_norm_quant_fp8(x, self.weight, self.eps, residual)
            rows = Fp8Rows(q, scale, x.dtype)
            return rows if residual is None else (rows, residual)
        if self.use_triton:
            shape = x.shape
            x2 = x.reshape(-1, shape[-1])
            if residual is None:
                return rms_norm(x2, self.weight, self.eps).view(shape)
            out, residual = fused_add_rms_norm(x2, residual, self.weight, self.eps)
            return out.view(shape), residual
        dtype = x.dtype
        if residual is not None:  # the torch path keeps the residual stream in float32 (why: pack_linear_weights)
            x = x.float() + residual
            residual = x
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        out = self.weight * h.to(dtype)
        return out if residual is None else (out, residual)


    def add_to(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        """Triton path, in place: residual += self(x), in one kernel (a post-norm and the add after it)."""
        assert self.use_triton
        return rms_norm_add(x, self.weight, self.eps, residual)


class GemmaRMSNorm(RMSNorm):
    """Gemma's x / rms(x) * (1 + w): the checkpoint holds w. The weight is kept as 1 + w in fp32, so the shared
    kernels run it (they read the weight in fp32) and a bf16 model loses none of w's small values to rounding."""

    def __init__(self, dim: int, eps: float, dtype: torch.dtype):
        super().__init__(dim, eps, torch.float32)

    def load(self, param: nn.Parameter, loaded, shard: str | None = None) -> None:
        param.data.copy_(loaded[...].float() + 1)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        if self.use_triton:
            return super().forward(x, residual)
        dtype = x.dtype
        if residual is not None:
            x = x.float() + residual
            residual = x
        out = rms_norm_ref(x, self.weight, self.eps).to(dtype)  # in fp32 with the fp32 weight, as Gemma's own norm
        return out if residual is None else (out, residual)
