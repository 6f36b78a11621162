import torch
from torch import nn

from engine.kernels import fused_add_rms_norm, rms_norm


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, dtype: torch.dtype):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, dtype=dtype), requires_grad=False)
        self.use_triton = False

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        """With `residual`: returns (norm(x + residual), x + residual), the fused form vLLM uses."""
        if self.use_triton:
            shape = x.shape
            x2 = x.reshape(-1, shape[-1])
            if residual is None:
                return rms_norm(x2, self.weight, self.eps).view(shape)
            out, residual = fused_add_rms_norm(x2, residual, self.weight, self.eps)
            return out.view(shape), residual
        if residual is not None:
            x = x + residual
            residual = x
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        out = self.weight * h.to(x.dtype)
        return out if residual is None else (out, residual)
