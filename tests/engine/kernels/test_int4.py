"""The INT4 dequantize-and-multiply kernel against its torch reference: both packings, ragged M/N/K, K tiles that
straddle groups, and the unpacking against values packed the way AutoAWQ and compressed-tensors pack them."""
import pytest
import torch

from engine.kernels.int4 import AWQ_NIBBLE, int4_mm, int4_mm_ref, unpack_int4
from engine.kernels.quant_tile_configs import TileConfig


def pack_columns(values, order):
    """AutoAWQ's loop (order 0 2 4 6 1 3 5 7) or compressed-tensors' (0..7): int32 c holds value 8c + order[i] in
    nibble i."""
    packed = torch.zeros(values.shape[0], values.shape[1] // 8, dtype=torch.int64)
    for c in range(packed.shape[1]):
        for i, j in enumerate(order):
            packed[:, c] |= values[:, 8 * c + j].to(torch.int64) << (4 * i)
    return packed.to(torch.uint32).view(torch.int32)


@pytest.mark.parametrize("order, nibbles", [([0, 2, 4, 6, 1, 3, 5, 7], AWQ_NIBBLE), (list(range(8)), None)])
def test_unpack_inverts_the_checkpoint_packing(order, nibbles):
    values = torch.randint(0, 16, (5, 24))
    values[0, :8] = 15  # all nibbles set: the int32 is negative
    assert torch.equal(unpack_int4(pack_columns(values, order), nibbles), values.to(torch.int32))


def int4_tensors(packing, n, k, group, device):
    torch.manual_seed(n + k)
    if packing == "awq":
        return (pack_columns(torch.randint(0, 16, (k, n)), [0, 2, 4, 6, 1, 3, 5, 7]).to(device),
                pack_columns(torch.randint(0, 16, (k // group, n)), [0, 2, 4, 6, 1, 3, 5, 7]).to(device),
                (torch.rand(k // group, n) / 10).to(device))
    return pack_columns(torch.randint(0, 16, (n, k)), list(range(8))).to(device), \
        (torch.rand(n, k // group) / 10).to(device)


@pytest.mark.parametrize("packing", ["awq", "pack"])
@pytest.mark.parametrize("m, n, k, group, tiles", [(1, 40, 64, 32, None),  # matrix-vector: two groups
                                                   (5, 64, 384, 128, None),  # and three K tiles
                                                   (19, 72, 96, 32, TileConfig(32, 64, 16)),  # ragged M and N
                                                   (24, 64, 256, 128, TileConfig(16, 32, 64)),  # tiles in a group
                                                   (17, 48, 256, 64, TileConfig(16, 32, 128)),  # K tile cut to 64
                                                   (9, 40, 72, 72, TileConfig(16, 16, 64)),  # one group, ragged K
                                                   (33, 40, 384, 128, TileConfig(32, 32, 128)),  # compressed-
                                                   # tensors: a dot a nibble, ragged M and N, three K tiles
                                                   (20, 48, 320, 64, TileConfig(16, 16, 256))])  # K tiles across
                                                   # groups, the last one ragged
def test_int4_mm_matches_reference(device, packing, m, n, k, group, tiles):
    x = torch.randn(m, k, device=device)
    tensors = int4_tensors(packing, n, k, group, device)
    bias = torch.randn(n, device=device)
    for b in (None, bias):
        torch.testing.assert_close(int4_mm(x, packing, tensors, group, b, tiles),
                                   int4_mm_ref(x, packing, tensors, group, b), atol=1e-3, rtol=1e-4)


@pytest.mark.parametrize("packing", ["awq", "pack"])
def test_int4_matrix_vector_form_takes_bf16_activations(device, packing):
    """The models' dtype: values are dequantized through float32 (the interpreter casts int32 to bf16 wrongly).
    bf16 tensor-core dots are not run here: Triton 3.9's interpreter multiplies bf16 tiles wrongly."""
    x = torch.randn(1, 256, device=device).to(torch.bfloat16)
    tensors = tuple(t.to(torch.bfloat16) if t.is_floating_point() else t for t in int4_tensors(packing, 48, 256, 128,
                                                                                                device))
    expected = int4_mm_ref(x, packing, tensors, 128)  # sums of 256 products near 1: bf16 rounding at about 1e-2
    torch.testing.assert_close(int4_mm(x, packing, tensors, 128), expected, atol=0.1, rtol=2e-2)
