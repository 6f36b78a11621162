import torch
import torch.nn.functional as F
from torch import nn

from engine.kernels import gelu_tanh_and_mul as fused_gelu_tanh_and_mul
from engine.kernels import silu_and_mul as fused_silu_and_mul
from engine.kernels import act_and_mul_quant_fp8
from engine.layers.quantization.fp8 import Fp8Rows


class SiluAndMul(nn.Module):
    """silu(gate) * up over the fused [gate | up] projection."""

    def __init__(self):
        super().__init__()
        self.use_triton = False

    def forward(self, x: torch.Tensor, fp8_rows: bool = False) -> torch.Tensor | Fp8Rows:
        """fp8_rows (Triton path, x [T, 2I]): the result quantized per token, as Fp8Rows for an FP8 layer."""
        if self.use_triton and fp8_rows:
            return Fp8Rows(*act_and_mul_quant_fp8(x), x.dtype)
        if self.use_triton:
            return fused_silu_and_mul(x)
        gate, up = x.chunk(2, dim=-1)
        return F.silu(gate) * up


class GeluTanhAndMul(nn.Module):
    """gelu(gate) * up with GELU's tanh approximation: GeGLU, Gemma's MLP (hidden_activation gelu_pytorch_tanh)."""

    def __init__(self):
        super().__init__()
        self.use_triton = False

    def forward(self, x: torch.Tensor, fp8_rows: bool = False) -> torch.Tensor | Fp8Rows:
        if self.use_triton and fp8_rows:
            return Fp8Rows(*act_and_mul_quant_fp8(x, gelu_tanh=True), x.dtype)
        if self.use_triton:
            return fused_gelu_tanh_and_mul(x)
        gate, up = x.chunk(2, dim=-1)
        return F.gelu(gate, approximate="tanh") * up
