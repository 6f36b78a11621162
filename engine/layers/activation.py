import torch
import torch.nn.functional as F
from torch import nn

from engine.kernels import gelu_tanh_and_mul as fused_gelu_tanh_and_mul
from engine.kernels import silu_and_mul as fused_silu_and_mul


class SiluAndMul(nn.Module):
    """silu(gate) * up over the fused [gate | up] projection."""

    def __init__(self):
        super().__init__()
        self.use_triton = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.use_triton:
            return fused_silu_and_mul(x)
        gate, up = x.chunk(2, dim=-1)
        return F.silu(gate) * up


class GeluTanhAndMul(nn.Module):
    """gelu(gate) * up with GELU's tanh approximation: GeGLU, Gemma's MLP (hidden_activation gelu_pytorch_tanh)."""

    def __init__(self):
        super().__init__()
        self.use_triton = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.use_triton:
            return fused_gelu_tanh_and_mul(x)
        gate, up = x.chunk(2, dim=-1)
        return F.gelu(gate, approximate="tanh") * up
