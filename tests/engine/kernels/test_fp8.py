"""FP8 activation quantization and the scaled matmul against their torch references: ragged shapes, group and
block edges, per-token, per-tensor and block-wise scales."""
import pytest
import torch

from engine.kernels.fp8 import (FP8, dequantize_weight_fp8, per_token_group_quant_fp8, per_token_group_quant_fp8_ref,
                                per_token_quant_fp8, per_token_quant_fp8_ref, quantize_fp8, static_quant_fp8)
from engine.kernels.quant_tile_configs import TileConfig
from engine.kernels.scaled_mm import scaled_mm, scaled_mm_ref, takes_library_mm


@pytest.mark.parametrize("m, k", [(1, 64), (5, 200), (3, 17)])
def test_per_token_quant_rounds_like_torch(device, m, k):
    torch.manual_seed(0)
    x = torch.randn(m, k, device=device) * torch.logspace(-3, 2, m, device=device)[:, None]
    x[0, :3] = torch.tensor([1.9688, -7.97, 0.4908])  # round up into the next binade
    q, scale = per_token_quant_fp8(x)
    q_ref, scale_ref = per_token_quant_fp8_ref(x)
    assert q.dtype == FP8 and scale.shape == (m, 1)
    torch.testing.assert_close(scale, scale_ref)
    assert torch.equal(q.float(), q_ref.float())


@pytest.mark.parametrize("k, group", [(128, 32), (200, 64), (96, 128)])  # a short last group; one partial group
def test_per_token_group_quant_matches_reference(device, k, group):
    torch.manual_seed(1)
    x = torch.randn(4, k, device=device).to(torch.bfloat16)
    x[1] = 0  # an all-zero row gets the floor scale, not a division by zero
    q, scale = per_token_group_quant_fp8(x, group)
    q_ref, scale_ref = per_token_group_quant_fp8_ref(x, group)
    assert scale.shape == (4, -(-k // group))
    torch.testing.assert_close(scale, scale_ref)
    assert torch.equal(q.float(), q_ref.float()) and not q.float().isnan().any()


def test_static_quant_saturates_at_the_e4m3_range(device):
    x = torch.tensor([[0.5, -3.0, 1000.0, -1000.0]], device=device)
    q, scale = static_quant_fp8(x, torch.tensor([0.5], device=device))
    assert q.float().tolist() == [[1.0, -6.0, 448.0, -448.0]] and scale.shape == (1, 1)


def random_fp8(*shape, device):
    return (torch.randn(*shape, device=device) * 4).to(FP8)


# up to 8 rows: the matrix-vector form (one partial K tile; three, the last ragged); then tensor-core tiles
@pytest.mark.parametrize("m, n, k", [(1, 48, 64), (3, 40, 600), (37, 70, 200), (64, 64, 128)])
@pytest.mark.parametrize("per_token", [True, False])
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
def test_scaled_mm_per_token_and_per_channel(device, m, n, k, per_token, out_dtype):
    torch.manual_seed(2)
    x_q, w_q = random_fp8(m, k, device=device), random_fp8(n, k, device=device)
    x_scale = torch.rand(m if per_token else 1, 1, device=device) + 0.1
    w_scale = torch.rand(n, device=device) / 100
    bias = torch.randn(n, device=device).to(out_dtype)
    for b in (None, bias):
        out = scaled_mm(x_q, x_scale, w_q, w_scale, out_dtype, b, config=TileConfig(32, 32, 64))
        ref = scaled_mm_ref(x_q, x_scale, w_q, w_scale, out_dtype, b)
        tol = dict(atol=1e-4, rtol=1e-4) if out_dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
        torch.testing.assert_close(out, ref, **tol)


def test_one_row_is_right_in_either_form(device):
    """A tuned one-row entry may give tensor-core tiles (BLOCK_M 16: the row padded to 16) or a matrix-vector
    tile."""
    torch.manual_seed(3)
    x_q, w_q = random_fp8(1, 256, device=device), random_fp8(70, 256, device=device)
    x_scale, w_scale = torch.rand(1, 1, device=device) + 0.1, torch.rand(70, device=device) / 100
    ref = scaled_mm_ref(x_q, x_scale, w_q, w_scale, torch.float32)
    for config in (TileConfig(16, 32, 64), TileConfig(1, 16, 128), TileConfig(1, 32, 256, 4)):  # the last: K tiles
        # in two parts (scaled_mm's accumulator is 128 wide there)
        out = scaled_mm(x_q, x_scale, w_q, w_scale, torch.float32, config=config)
        torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("m, n, k, block", [(3, 96, 128, (32, 32)), (20, 80, 100, (32, 32)), (2, 128, 256, (128, 128))])
def test_scaled_mm_block_wise(device, m, n, k, block):
    """Ragged N and K end in partial blocks; N tiles of 32 and 64 straddle 32-row scale blocks or stay in one;
    2 and 3 rows take the matrix-vector form."""
    torch.manual_seed(3)
    bn, bk = block
    x = torch.randn(m, k, device=device)
    x_q, x_scale = per_token_group_quant_fp8_ref(x, bk)
    w_q = random_fp8(n, k, device=device)
    w_scale = torch.rand(-(-n // bn), -(-k // bk), device=device) / 100 + 1e-3
    for tiles in (TileConfig(16, 32, 64), TileConfig(32, 64, 64)):  # BLOCK_K: the block's width
        out = scaled_mm(x_q, x_scale, w_q, w_scale, torch.float32, None, block, config=tiles)
        torch.testing.assert_close(out, scaled_mm_ref(x_q, x_scale, w_q, w_scale, torch.float32, None, block),
                                   atol=1e-4, rtol=1e-4)
    # and the reference is the dequantized product
    deq = (x_q.float() * x_scale.repeat_interleave(bk, 1)[:, :k]) @ dequantize_weight_fp8(w_q, w_scale, block).t()
    torch.testing.assert_close(out, deq, atol=1e-4, rtol=1e-4)


def test_quantize_fp8_is_the_dequantized_value_rounded(device):
    x = torch.tensor([0.1, 1.0, 3.3], device=device)
    assert quantize_fp8(x, torch.tensor(1.0)).float().tolist() == pytest.approx([0.1015625, 1.0, 3.25])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() < (9, 0),
                    reason="torch._scaled_mm's row-wise FP8 GEMM needs a Hopper GPU")
@pytest.mark.parametrize("per_token", [True, False])
def test_many_rows_take_torch_scaled_mm_on_hopper(per_token):
    """More than MAX_GEMV_ROWS rows with bf16 out: torch._scaled_mm, within bf16 rounding of the reference, as
    the Triton kernel."""
    torch.manual_seed(4)
    x_q, w_q = random_fp8(64, 256, device="cuda"), random_fp8(96, 256, device="cuda")
    x_scale = torch.rand(64 if per_token else 1, 1, device="cuda") + 0.1
    w_scale, bias = torch.rand(96, device="cuda") / 100, torch.randn(96, device="cuda").bfloat16()
    assert takes_library_mm(x_q, w_q, torch.bfloat16)
    ref = scaled_mm_ref(x_q, x_scale, w_q, w_scale, torch.bfloat16, bias)
    triton_out = scaled_mm(x_q, x_scale, w_q, w_scale, torch.bfloat16, bias, config=TileConfig(64, 64, 128))
    for out in (scaled_mm(x_q, x_scale, w_q, w_scale, torch.bfloat16, bias), triton_out):
        torch.testing.assert_close(out, ref, atol=2e-2, rtol=2e-2)
