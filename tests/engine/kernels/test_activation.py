import pytest
import torch
import torch.nn.functional as F

from engine.kernels.activation import gelu_tanh_and_mul, gelu_tanh_and_mul_ref, silu_and_mul, silu_and_mul_ref

TOL = {torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 1e-2}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(7, 2 * 100), (3, 2 * 1500), (2, 5, 2 * 64)])
def test_matches_reference(device, dtype, shape):
    torch.manual_seed(0)
    x = torch.randn(shape, dtype=dtype, device=device) * 3
    out = silu_and_mul(x)
    assert out.shape == (*shape[:-1], shape[-1] // 2) and out.dtype == dtype and not out.isnan().any()
    torch.testing.assert_close(out, silu_and_mul_ref(x), atol=TOL[dtype], rtol=TOL[dtype])


def test_reference_is_swiglu_gate():
    x = torch.randn(4, 32)
    torch.testing.assert_close(silu_and_mul_ref(x), F.silu(x[:, :16]) * x[:, 16:])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gelu_tanh_matches_reference(device, dtype):
    torch.manual_seed(0)
    x = torch.randn(3, 2 * 1500, dtype=dtype, device=device) * 3
    out = gelu_tanh_and_mul(x)
    assert out.shape == (3, 1500) and out.dtype == dtype
    torch.testing.assert_close(out, gelu_tanh_and_mul_ref(x), atol=TOL[dtype], rtol=TOL[dtype])


def test_reference_is_geglu_gate():
    x = torch.randn(4, 32)
    torch.testing.assert_close(gelu_tanh_and_mul_ref(x), F.gelu(x[:, :16], approximate="tanh") * x[:, 16:])
