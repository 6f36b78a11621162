import pytest
import torch

from engine.kernels.rms_norm import fused_add_rms_norm, fused_add_rms_norm_ref, rms_norm, rms_norm_add, rms_norm_ref

TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(7, 80), (5, 128), (2, 3, 4096)])
def test_rms_norm(device, dtype, shape):
    torch.manual_seed(0)
    x = torch.randn(shape, dtype=dtype, device=device) * 4
    weight = torch.randn(shape[-1], dtype=dtype, device=device)
    out = rms_norm(x, weight, 1e-6)
    assert out.dtype == dtype and not out.isnan().any()
    torch.testing.assert_close(out, rms_norm_ref(x, weight, 1e-6), atol=TOL[dtype], rtol=TOL[dtype])
    h = x.double()
    expected = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6) * weight.double()
    torch.testing.assert_close(out.double(), expected, atol=TOL[dtype], rtol=TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hidden", [80, 256])
def test_fused_add_rms_norm_in_place(device, dtype, hidden):
    torch.manual_seed(0)
    x = torch.randn(9, hidden, dtype=dtype, device=device)
    residual = torch.randn(9, hidden, dtype=dtype, device=device)
    weight = torch.randn(hidden, dtype=dtype, device=device)
    x_ref, residual_ref = x.clone(), residual.clone()
    x_ptr, residual_ptr = x.data_ptr(), residual.data_ptr()
    out, new_residual = fused_add_rms_norm(x, residual, weight, 1e-5)
    assert out.data_ptr() == x_ptr and new_residual.data_ptr() == residual_ptr  # in place, as vLLM does
    fused_add_rms_norm_ref(x_ref, residual_ref, weight, 1e-5)
    # One rounding of the fp32 sum; Triton's interpreter rounds fp32 -> bf16 toward zero, so allow one ulp there.
    exact = dict(atol=0, rtol=2 ** -7 if dtype == torch.bfloat16 else 0)
    torch.testing.assert_close(residual, residual_ref, **exact)
    torch.testing.assert_close(x, x_ref, atol=TOL[dtype], rtol=TOL[dtype])
    torch.testing.assert_close(x, rms_norm_ref(residual, weight, 1e-5), atol=TOL[dtype], rtol=TOL[dtype])
    assert not x.isnan().any()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 3])
def test_rms_norm_add_adds_the_rounded_norm_into_the_residual(device, dtype, rows):
    """Gemma's post-norm and the residual add after it: residual + rms_norm(x) * w, with w in float32 (Gemma's
    1 + w) and the normalized x rounded to x's dtype first, as the unfused path stores it."""
    torch.manual_seed(0)
    x = 3 * torch.randn(rows, 200, device=device).to(dtype)
    residual = torch.randn(rows, 200, device=device).to(dtype)
    weight = 1 + 0.1 * torch.randn(200, device=device)
    expected = (residual.float() + rms_norm_ref(x, weight, 1e-6).float()).to(dtype)
    ptr = residual.data_ptr()
    out = rms_norm_add(x, weight, 1e-6, residual)
    assert out.data_ptr() == ptr
    # up to a rounding of each operand: the interpreter rounds fp32 -> bf16 toward zero
    tol = dict(atol=5e-2, rtol=2 ** -7) if dtype == torch.bfloat16 else dict(atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(residual, expected, **tol)
