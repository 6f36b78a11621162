"""INT4 weight-only linear layers (W4A16): AWQ (GEMM packing, zero points) and compressed-tensors pack-quantized
(symmetric), grouped scales along the input features. The weights stay packed in the checkpoint's layout;
a tensor-parallel rank keeps whole int32s and whole groups of its part."""
from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from engine.kernels import int4 as kernels
from engine.layers.quantization.parts import InPart, OutPart, copy_part, parameter


class Int4LinearMethod:
    def __init__(self, packing: Literal["awq", "pack"], group: int):
        self.packing, self.group = packing, group

    def create_weights(self, layer: nn.Module, out_features: int, in_features: int, dtype: torch.dtype) -> None:
        g = self.group
        if in_features % g:
            raise ValueError(f"INT4 group size {g} does not divide a layer's {in_features} input features (per "
                             "tensor-parallel rank)")
        if (out_features if self.packing == "awq" else in_features) % 8:
            raise ValueError(f"INT4 packs 8 values to an int32: {out_features} x {in_features} does not pack")
        if self.packing == "awq":
            layer.qweight = parameter(torch.empty(in_features, out_features // 8, dtype=torch.int32))
            layer.qzeros = parameter(torch.empty(in_features // g, out_features // 8, dtype=torch.int32))
            layer.scales = parameter(torch.empty(in_features // g, out_features, dtype=dtype))
        else:
            layer.weight_packed = parameter(torch.empty(out_features, in_features // 8, dtype=torch.int32))
            layer.weight_scale = parameter(torch.empty(out_features, in_features // g, dtype=dtype))

    def load(self, layer: nn.Module, param: nn.Parameter, loaded, out_part: OutPart | None,
             in_part: InPart | None) -> None:
        g = self.group
        if self.packing == "awq":  # [K, N] layouts: output along dim 1
            block = {id(layer.qweight): (8, 1), id(layer.qzeros): (8, g), id(layer.scales): (1, g)}[id(param)]
            copy_part(param.data, loaded, out_part, in_part, block=block, out_dim=1, in_dim=0)
        else:
            block = {id(layer.weight_packed): (1, 8), id(layer.weight_scale): (1, g)}[id(param)]
            copy_part(param.data, loaded, out_part, in_part, block=block)

    def dequantized_weight(self, layer: nn.Module) -> torch.Tensor:
        if self.packing == "awq":
            return kernels.dequantize_awq_ref(layer.qweight, layer.qzeros, layer.scales, self.group)
        return kernels.dequantize_packed_ref(layer.weight_packed, layer.weight_scale, self.group)

    def gemv_weights(self, layer: nn.Module) -> dict | None:
        """compressed-tensors' packing runs along K, as the matrix-vector kernel (batch-1 decode, kernels/gemv.py)
        streams weight rows, two int32s at a time within a group (a group of a multiple of 16); AWQ packs along N
        and keeps int4_mm."""
        if self.packing == "awq" or self.group % 16:
            return None
        return {"weight": layer.weight_packed, "weight_scale": layer.weight_scale, "int4_group": self.group}

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if not layer.use_triton:
            return F.linear(x, self.dequantized_weight(layer).to(x.dtype), bias)
        tensors = (layer.qweight, layer.qzeros, layer.scales) if self.packing == "awq" else \
            (layer.weight_packed, layer.weight_scale)
        rows = x.reshape(-1, x.shape[-1])
        out = kernels.int4_mm(rows, self.packing, tensors, self.group, bias)
        return out.view(*x.shape[:-1], out.shape[-1])

