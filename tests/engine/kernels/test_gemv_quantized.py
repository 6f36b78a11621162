"""The matrix-vector kernel with quantized weights. FP8 weight-only (W8A16) and W8A8 with x quantized per token
inside it, with RMSNorm, SiLU-and-mul and the residual add folded in. INT4 packed along K (compressed-tensors):
against int4_mm's reference, groups across and inside K tiles."""
import pytest
import torch

from engine.kernels.fp8 import FP8, quantize_fp8
from engine.kernels.gemv import GemvConfig, gemv, gemv_ref
from engine.kernels.int4 import dequantize_packed_ref, int4_mm_ref
from engine.kernels.quant_tile_configs import TileConfig
from engine.kernels.rms_norm import rms_norm_quant_fp8, rms_norm_ref
from engine.kernels.scaled_mm import scaled_mm


def _fp8_weight(n: int, k: int, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    w = torch.randn(n, k, device=device) / k ** 0.5 * torch.logspace(-1, 1, n, device=device)[:, None]
    scale = w.abs().amax(1) / 448
    return quantize_fp8(w, scale[:, None]), scale


def test_w8a16_gemv_folds_norm_gate_and_residual(device):
    """Decode's fused forms with weight-only FP8: RMSNorm in and SiLU-and-mul of [gate; up] (each half with its
    own scales), and the residual added in place."""
    torch.manual_seed(1)
    k, n = 200, 2 * 37
    x = (3 * torch.randn(1, k, device=device)).to(torch.bfloat16)
    norm = ((1 + 0.1 * torch.randn(k, device=device)).to(torch.bfloat16), 1e-5)
    w_q, w_scale = _fp8_weight(n, k, device)
    w = w_q.float() * w_scale[:, None]
    gated = gemv(x, w_q, None, GemvConfig(4, 64, 4, 2), gated=True, norm=norm, weight_scale=w_scale)
    gate, up = (rms_norm_ref(x.float(), norm[0].float(), norm[1]) @ w.t()).chunk(2, dim=-1)
    torch.testing.assert_close(gated.float(), torch.nn.functional.silu(gate) * up, atol=2e-2, rtol=2e-2)
    residual = torch.randn(1, n, device=device).to(torch.bfloat16)
    expected = residual.float() + x.float() @ w.t()
    out = gemv(x, w_q, None, None, residual=residual, weight_scale=w_scale)
    assert out.data_ptr() == residual.data_ptr()
    torch.testing.assert_close(out.float(), expected, atol=3e-2, rtol=2e-2)


def test_w8a16_gemv_multiplies_x_with_the_dequantized_weight(device):
    torch.manual_seed(2)
    x = torch.randn(2, 200, device=device)
    w_q, w_scale = _fp8_weight(37, 200, device)
    out = gemv(x, w_q, None, GemvConfig(8, 64, 4, 2), weight_scale=w_scale)
    torch.testing.assert_close(out, x @ (w_q.float() * w_scale[:, None]).t(), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("k, config", [(200, GemvConfig(16, 64, 4, 2)),  # K tiles with a ragged last one
                                       (256, GemvConfig(8, 256, 4, 2))])
def test_w8a8_gemv_quantizes_x_as_the_norm_quantize_kernel_and_scaled_mm_do(device, k, config):
    """W8A8 with dynamic per-token activations (batch-1 decode): x normalized, rounded to bf16 and quantized to FP8
    inside the kernel gives the bytes and scale of the fused RMSNorm-quantize kernel, so the product equals
    scaled_mm's on them; and without a norm, the per-token quantization of x itself, with the residual added."""
    torch.manual_seed(3)
    n = 37
    x = (3 * torch.randn(1, k, device=device)).to(torch.bfloat16)
    norm = ((1 + 0.1 * torch.randn(k, device=device)).to(torch.bfloat16), 1e-5)
    w_q, w_scale = _fp8_weight(n, k, device)
    out = gemv(x, w_q, None, config, norm=norm, weight_scale=w_scale, quant_x=True)
    x_q, x_scale = rms_norm_quant_fp8(x, *norm)
    expected = scaled_mm(x_q, x_scale, w_q, w_scale, torch.bfloat16)
    torch.testing.assert_close(out, expected, atol=1e-2, rtol=1e-2)
    assert (out.float() - (rms_norm_ref(x.float(), norm[0].float(), norm[1]) @ (w_q.float() * w_scale[:, None]).t())
            ).abs().max() > 1e-3  # x quantized: not the weight-only product
    residual = torch.randn(1, n, device=device).to(torch.bfloat16)
    expected = residual.float() + gemv_ref(x, w_q, None, False, None, None, w_scale, quant_x=True).float()
    out = gemv(x, w_q, None, config, residual=residual, weight_scale=w_scale, quant_x=True)
    torch.testing.assert_close(out.float(), expected, atol=2e-2, rtol=1e-2)


def test_w8a8_gemv_folds_the_gate_after_quantized_x(device):
    """silu(gate) * up of [gate; up] (each half with its own scales) on the RMSNorm-quantize kernel's FP8 x."""
    torch.manual_seed(4)
    k, n = 192, 2 * 24
    x = torch.randn(1, k, device=device).to(torch.bfloat16)
    norm = ((1 + 0.1 * torch.randn(k, device=device)).to(torch.bfloat16), 1e-6)
    w_q, w_scale = _fp8_weight(n, k, device)
    out = gemv(x, w_q, None, GemvConfig(8, 64, 4, 2), gated=True, norm=norm, weight_scale=w_scale, quant_x=True)
    x_q, x_scale = rms_norm_quant_fp8(x, *norm)
    gate, up = (x_q.float() * x_scale @ (w_q.float() * w_scale[:, None]).t()).chunk(2, dim=-1)
    torch.testing.assert_close(out.float(), torch.nn.functional.silu(gate) * up, atol=1e-2, rtol=1e-2)


def test_w8a8_one_row_in_tensor_core_tiles_equals_the_folded_kernel(device):
    """A tensor-core tile for one row of W8A8 (fp8_one_row.py: the quantization, the gate and the residual add as
    kernels of their own) gives the folded kernel's result."""
    torch.manual_seed(5)
    k, n = 192, 2 * 24
    x = torch.randn(1, k, device=device).to(torch.bfloat16)
    norm = ((1 + 0.1 * torch.randn(k, device=device)).to(torch.bfloat16), 1e-6)
    w_q, w_scale = _fp8_weight(n, k, device)
    tiles, folded = TileConfig(16, 32, 64, 4, 2), GemvConfig(8, 64, 4, 2)
    out = gemv(x, w_q, None, tiles, gated=True, norm=norm, weight_scale=w_scale, quant_x=True)
    torch.testing.assert_close(out, gemv(x, w_q, None, folded, gated=True, norm=norm, weight_scale=w_scale,
                                         quant_x=True), atol=1e-2, rtol=1e-2)
    residual = torch.randn(1, n, device=device).to(torch.bfloat16)
    expected = gemv(x, w_q, None, folded, residual=residual.clone(), weight_scale=w_scale, quant_x=True)
    out = gemv(x, w_q, None, tiles, residual=residual, weight_scale=w_scale, quant_x=True)
    assert out.data_ptr() == residual.data_ptr()
    torch.testing.assert_close(out, expected, atol=2e-2, rtol=1e-2)


def test_an_fp8_weight_needs_its_scales(device):
    w_q, _ = _fp8_weight(8, 32, device)
    with pytest.raises(AssertionError):
        gemv(torch.randn(1, 32, device=device), w_q)
    assert w_q.dtype == FP8


def _int4_weight(n: int, k: int, group: int, device: str, dtype=torch.float32):
    from tests.engine.kernels.test_int4 import int4_tensors
    packed, scales = int4_tensors("pack", n, k, group, device)
    return packed, scales.to(dtype)


@pytest.mark.parametrize("k, group, config", [(256, 32, GemvConfig(4, 128, 4, 2)),  # four groups a K tile
                                              (384, 128, GemvConfig(8, 64, 4, 2)),  # a tile cut up to one group
                                              (320, 64, None)])  # ragged K against the tile: five groups
def test_int4_gemv_matches_the_dequantized_product(device, k, group, config):
    torch.manual_seed(3)
    x = torch.randn(1, k, device=device)
    packed, scales = _int4_weight(40, k, group, device)
    bias = torch.randn(40, device=device)
    out = gemv(x, packed, bias, config, weight_scale=scales, int4_group=group)
    torch.testing.assert_close(out, int4_mm_ref(x, "pack", (packed, scales), group, bias), atol=1e-3, rtol=1e-4)


def test_int4_gemv_folds_norm_gate_and_residual_in_bf16(device):
    """Decode's fused forms in the models' dtype: [gate; up] halves with their own groups' scales."""
    torch.manual_seed(4)
    k = 256
    x = (3 * torch.randn(1, k, device=device)).to(torch.bfloat16)
    norm = ((1 + 0.1 * torch.randn(k, device=device)).to(torch.bfloat16), 1e-5)
    packed, scales = _int4_weight(2 * 24, k, 64, device, torch.bfloat16)
    w = dequantize_packed_ref(packed, scales, 64)
    gated = gemv(x, packed, None, GemvConfig(4, 128, 4, 2), gated=True, norm=norm, weight_scale=scales, int4_group=64)
    expected = gemv_ref(x, w, None, gated=True, norm=norm)
    torch.testing.assert_close(gated.float(), expected.float(), atol=0.1, rtol=2e-2)
    residual = torch.randn(1, 48, device=device).to(torch.bfloat16)
    expected = residual.float() + x.float() @ w.t()
    gemv(x, packed, None, None, residual=residual, weight_scale=scales, int4_group=64)
    torch.testing.assert_close(residual.float(), expected, atol=0.1, rtol=2e-2)


def test_int4_gemv_takes_each_row_of_x_and_gelu_gate(device):
    """Several rows of x (a program per row and weight tile), Gemma's GELU gate and a bias, with a K tile wider than
    a group and nibbles of every value 0-15 (int4_tensors draws them uniformly)."""
    torch.manual_seed(5)
    k, n, group = 512, 2 * 20, 128
    x = torch.randn(3, k, device=device) / 8
    packed, scales = _int4_weight(n, k, group, device)
    bias = torch.randn(n, device=device)
    out = gemv(x, packed, bias, GemvConfig(8, 256, 4, 2), gated=True, weight_scale=scales, int4_group=group,
               gelu_tanh=True)
    expected = gemv_ref(x, dequantize_packed_ref(packed, scales, group), bias, gated=True, gelu_tanh=True)
    torch.testing.assert_close(out, expected, atol=1e-3, rtol=1e-4)


def test_int4_gemv_pushes_to_and_reads_from_a_reduce_site(device):
    """Tensor-parallel decode with INT4 weights: two ranks push their partial products (rank 0 adding the residual),
    and a normalized INT4 projection reads their sum as x."""
    from tests.engine.kernels.test_gemv import _reduce_sites

    torch.manual_seed(6)
    world, n, k, group = 2, 64, 256, 64
    sites = _reduce_sites(world, n, device, torch.float32)
    xs = [torch.randn(1, k, device=device) for _ in range(world)]
    weights = [_int4_weight(n, k, group, device) for _ in range(world)]
    residual = torch.randn(1, n, device=device)
    for r in range(world):
        gemv(xs[r], weights[r][0], None, GemvConfig(8, 128, 4, 2), residual=residual if r == 0 else None,
             push=sites[r], weight_scale=weights[r][1], int4_group=group)
    parts = [gemv_ref(x, dequantize_packed_ref(w, s, group)) for x, (w, s) in zip(xs, weights)]
    total = residual + parts[0] + parts[1]
    torch.testing.assert_close(sites[1].sum(), total, atol=1e-3, rtol=1e-4)
    packed, scales = _int4_weight(24, n, group, device)
    norm = (torch.rand(n, device=device) + 0.5, 1e-5)
    y = gemv(sites[0], packed, None, GemvConfig(8, 64, 4, 2), norm=norm, weight_scale=scales, int4_group=group)
    expected = gemv_ref(total, dequantize_packed_ref(packed, scales, group), norm=norm)
    torch.testing.assert_close(y, expected, atol=1e-3, rtol=1e-4)
