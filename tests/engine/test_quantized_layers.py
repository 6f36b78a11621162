"""Tensor-parallel ranks' parts of quantized weights and their scales: each rank's dequantized weight is its part
of the whole dequantized weight, for fused and row-parallel layers; block-wise scales split on block edges or fail;
INT4 parts keep whole int32s and groups."""
import pytest
import torch

from engine.kernels.fp8 import FP8, dequantize_weight_fp8
from engine.kernels.int4 import dequantize_awq_ref
from engine.layers.linear import QKVParallelLinear, RowParallelLinear
from engine.layers.quantization import building_with
from engine.layers.quantization.awq import AwqConfig
from engine.layers.quantization.fp8 import Fp8Scheme
from engine.layers.quantization.fp8_config import Fp8Config
from engine.parallel_state import TPGroup

PER_TENSOR_STATIC = Fp8Config(Fp8Scheme("tensor", "tensor", static_activations=True))
BLOCK_32 = Fp8Config(Fp8Scheme("block", "group", block=(32, 32)))


def fp8_tensors(n, k, block=None):
    torch.manual_seed(n + k)
    w = (torch.randn(n, k) * 4).to(FP8)
    scale = torch.rand(-(-n // block[0]), -(-k // block[1])) if block else torch.rand(1)
    return w, scale


def dequantized(layer, block=None):
    scale = layer.weight_scale_inv if block else layer.weight_scale
    return dequantize_weight_fp8(layer.weight, scale, block)


@pytest.mark.parametrize("tp_size", [2, 4])  # 4 ranks over 2 KV heads: each KV head on two ranks
def test_fused_qkv_parts_and_per_tensor_scales_split_with_the_rows(tp_size):
    head_dim, heads, kv_heads, hidden = 16, 4, 2, 64
    ckpt = {s: fp8_tensors(n, hidden) for s, n in (("q", heads * head_dim), ("k", kv_heads * head_dim),
                                                    ("v", kv_heads * head_dim))}
    input_scales = {"q": torch.tensor([0.5]), "k": torch.tensor([0.5]), "v": torch.tensor([0.25])}
    for rank in range(tp_size):
        with building_with(PER_TENSOR_STATIC):
            layer = QKVParallelLinear(hidden, head_dim, heads, kv_heads, False, TPGroup(rank, tp_size), torch.float32)
        for shard, (w, scale) in ckpt.items():
            layer.load(layer.weight, w, shard)
            layer.load(layer.weight_scale, scale, shard)
            layer.load(layer.input_scale, input_scales[shard], shard)
        assert layer.input_scale.item() == 0.5  # q/k/v see one input: one scale, their max
        got = dequantized(layer).split(list(layer.shard_sizes.values()))
        for shard, part in zip(("q", "k", "v"), got, strict=True):
            w, scale = ckpt[shard]
            start = layer.out_part(shard).start
            torch.testing.assert_close(part, w.float()[start: start + part.shape[0]] * scale)


@pytest.mark.parametrize("tp_size", [1, 2, 4])
def test_row_parallel_block_scales_split_on_block_edges(tp_size):
    w, scale = fp8_tensors(48, 128, (32, 32))  # 48 rows: a last, half-filled row block
    full = dequantize_weight_fp8(w, scale, (32, 32))
    parts = []
    for rank in range(tp_size):
        with building_with(BLOCK_32):
            layer = RowParallelLinear(128, 48, False, TPGroup(rank, tp_size), torch.float32)
        layer.load(layer.weight, w)
        layer.load(layer.weight_scale_inv, scale)
        parts.append(dequantized(layer, (32, 32)))
    torch.testing.assert_close(torch.cat(parts, 1), full)


def test_a_tensor_parallel_size_that_splits_a_scale_block_fails_clearly():
    w, scale = fp8_tensors(48, 128, (64, 64))
    with building_with(Fp8Config(Fp8Scheme("block", "group", block=(64, 64)))):
        layer = RowParallelLinear(128, 48, False, TPGroup(1, 4), torch.float32)
    with pytest.raises(ValueError, match=r"input columns \[32, 64\) do not align to the 64-wide blocks"):
        layer.load(layer.weight_scale_inv, scale)


def awq_tensors(n, k, group):
    torch.manual_seed(n * k)
    qweight = torch.randint(-2**31, 2**31 - 1, (k, n // 8), dtype=torch.int32)
    qzeros = torch.randint(-2**31, 2**31 - 1, (k // group, n // 8), dtype=torch.int32)
    return qweight, qzeros, torch.rand(k // group, n)


@pytest.mark.parametrize("tp_size", [2, 4])
def test_awq_parts_keep_whole_int32s_and_groups(tp_size):
    """Column parts of the fused qkv layer (packed along the output features) and row parts (groups along the
    input features) dequantize to the rank's part of the whole weight."""
    config = AwqConfig(32)
    awq = config.method
    head_dim, heads, kv_heads, hidden = 16, 4, 2, 128
    ckpt = {s: awq_tensors(n, hidden, 32) for s, n in (("q", 64), ("k", 32), ("v", 32))}
    row_ckpt = awq_tensors(48, 128, 32)
    row_parts = []
    for rank in range(tp_size):
        with building_with(config):
            qkv = QKVParallelLinear(hidden, head_dim, heads, kv_heads, False, TPGroup(rank, tp_size), torch.float32)
            row = RowParallelLinear(128, 48, False, TPGroup(rank, tp_size), torch.float32)
        for shard, tensors in ckpt.items():
            for param, t in zip((qkv.qweight, qkv.qzeros, qkv.scales), tensors):
                qkv.load(param, t, shard)
        for shard, part in zip(("q", "k", "v"), awq.dequantized_weight(qkv).split(list(qkv.shard_sizes.values()))):
            start = qkv.out_part(shard).start
            torch.testing.assert_close(part, dequantize_awq_ref(*ckpt[shard], 32)[start: start + part.shape[0]])
        for param, t in zip((row.qweight, row.qzeros, row.scales), row_ckpt):
            row.load(param, t)
        row_parts.append(awq.dequantized_weight(row))
    torch.testing.assert_close(torch.cat(row_parts, 1), dequantize_awq_ref(*row_ckpt, 32))

