"""Dynamic per-token FP8 quantization fused into the kernel before an FP8 layer (RMSNorm, SiLU/GELU-and-mul): the same
bytes and scales as the unfused kernel followed by per_token_quant_fp8."""
import pytest
import torch

from engine.kernels.activation import act_and_mul_quant_fp8, gelu_tanh_and_mul, silu_and_mul
from engine.kernels.fp8 import per_token_quant_fp8_ref
from engine.kernels.rms_norm import fused_add_rms_norm, rms_norm, rms_norm_quant_fp8


def _assert_same_fp8(got: tuple[torch.Tensor, torch.Tensor], expected: tuple[torch.Tensor, torch.Tensor]):
    torch.testing.assert_close(got[1], expected[1])
    assert got[1].shape == expected[1].shape
    # the same bytes, -0 included; assert_close names how many differ and where
    torch.testing.assert_close(got[0].view(torch.uint8), expected[0].view(torch.uint8), rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("hidden", [64, 200])  # a power of two, and a ragged row
def test_rms_norm_quant_equals_norm_then_quantize(device, dtype, hidden):
    torch.manual_seed(0)
    x = (torch.randn(5, hidden, device=device) * torch.logspace(-2, 2, 5, device=device)[:, None]).to(dtype)
    x[2] = 0  # an all-zero row: the floor scale
    weight = (1 + 0.1 * torch.randn(hidden, device=device)).to(dtype)
    _assert_same_fp8(rms_norm_quant_fp8(x, weight, 1e-5), per_token_quant_fp8_ref(rms_norm(x, weight, 1e-5)))


def test_rms_norm_quant_adds_the_residual_in_place_first(device):
    torch.manual_seed(1)
    x, residual = torch.randn(3, 96, device=device), torch.randn(3, 96, device=device)
    weight = 1 + 0.1 * torch.randn(96, device=device)
    expected_residual = x + residual
    x2, residual2 = x.clone(), residual.clone()
    normed, _ = fused_add_rms_norm(x2, residual2, weight, 1e-5)
    got = rms_norm_quant_fp8(x, weight, 1e-5, residual=residual)
    torch.testing.assert_close(residual, expected_residual)
    _assert_same_fp8(got, per_token_quant_fp8_ref(normed))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("inter", [48, 2500, 17000])  # in one pass (48, 2500), or two over ragged blocks
@pytest.mark.parametrize("gelu_tanh", [False, True])
def test_act_and_mul_quant_equals_activation_then_quantize(device, dtype, inter, gelu_tanh):
    torch.manual_seed(2)
    x = (3 * torch.randn(4, 2 * inter, device=device)).to(dtype)
    activation = gelu_tanh_and_mul if gelu_tanh else silu_and_mul
    _assert_same_fp8(act_and_mul_quant_fp8(x, gelu_tanh), per_token_quant_fp8_ref(activation(x)))
