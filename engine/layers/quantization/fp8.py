"""FP8 (e4m3) linear layers: W8A8 with per-tensor, per-channel or block-wise weight scales, activations quantized
per token (dynamic), per tensor (static, the checkpoint's input_scale) or per 1 x block_k group; weight-only W8A16;
and online quantization of a 16-bit checkpoint, per output channel, while it loads."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from engine.kernels import fp8 as kernels
from engine.kernels.fp8 import FP8, FP8_MAX, MIN_SCALE, dequantize_weight_fp8, quantize_fp8
from engine.kernels.scaled_mm import scaled_mm
from engine.layers.quantization.parts import InPart, OutPart, copy_part, parameter


class Fp8Rows(NamedTuple):
    """A layer's input already quantized per token to FP8 by the kernel before it (RMSNorm, SiLU-and-mul), for a
    layer that would quantize it so (Fp8LinearMethod.takes_fp8_rows); `dtype` is the model's."""
    q: torch.Tensor
    scale: torch.Tensor
    dtype: torch.dtype


@dataclass(frozen=True)
class Fp8Scheme:
    weights: Literal["tensor", "channel", "block"]
    activations: Literal["token", "tensor", "group"] | None  # None: weight-only, x stays in the model dtype
    static_activations: bool = False  # per-tensor activation scale from the checkpoint's input_scale
    block: tuple[int, int] | None = None  # (block_n, block_k) of block-wise weight scales
    online: bool = False  # a 16-bit checkpoint, quantized per channel while loading

    def __post_init__(self):
        assert (self.weights == "block") == (self.block is not None) == (self.activations == "group"), self


class Fp8LinearMethod:
    """Creates, loads and applies one linear layer's FP8 weight and scales. Per-tensor weight scales are kept per
    output channel, so a fused layer (q/k/v, gate/up) whose parts have scales of their own stays exact; the
    static input scales of a fused layer's parts (which see the same input) are merged by their max, as vLLM does."""

    def __init__(self, scheme: Fp8Scheme):
        self.scheme = scheme

    def create_weights(self, layer: nn.Module, out_features: int, in_features: int, dtype: torch.dtype) -> None:
        s = self.scheme
        layer.weight = parameter(torch.empty(out_features, in_features, dtype=FP8))
        if s.block is not None:
            bn, bk = s.block
            layer.weight_scale_inv = parameter(torch.empty(-(-out_features // bn), -(-in_features // bk)))
        else:
            layer.weight_scale = parameter(torch.empty(out_features), computed=s.online)
        if s.static_activations:
            layer.input_scale = parameter(torch.zeros(()))

    def load(self, layer: nn.Module, param: nn.Parameter, loaded, out_part: OutPart | None,
             in_part: InPart | None) -> None:
        s = self.scheme
        if param is layer.weight and s.online:
            self._quantize_online(layer, loaded, out_part, in_part)
        elif param is layer.weight:
            if loaded.dtype != FP8:
                raise ValueError(f"an FP8 checkpoint's weight is {loaded.dtype}, not {FP8}")
            copy_part(param.data, loaded, out_part, in_part)
        elif s.block is not None and param is layer.weight_scale_inv:
            copy_part(param.data, loaded, out_part, in_part, block=s.block)
        elif param is getattr(layer, "weight_scale", None):
            if loaded.numel() == 1:  # per tensor: this part's channels share it
                rows = param.data if out_part is None else param.data.narrow(0, out_part.offset, out_part.size)
                rows.fill_(loaded[...].reshape(()).item())
            else:
                rows = loaded if out_part is None else loaded.narrow(0, out_part.start, out_part.size)
                dst = param.data if out_part is None else param.data.narrow(0, out_part.offset, out_part.size)
                dst.copy_(rows[...].reshape(-1))
        elif param is getattr(layer, "input_scale", None):
            param.data.copy_(torch.maximum(param.data, loaded[...].reshape(()).float()))
        else:
            raise AssertionError(f"no FP8 loader for {param.shape}")

    @staticmethod
    def _quantize_online(layer: nn.Module, loaded, out_part: OutPart | None, in_part: InPart | None) -> None:
        """Only this part is read in 16 bits (on the device), so loading never holds more than one tensor of
        the unquantized model."""
        w = loaded.narrow(0, out_part.start, out_part.size) if out_part else loaded
        w = w.narrow(1, in_part.start, in_part.size) if in_part else w[...]
        scale = (w.float().abs().amax(1) / FP8_MAX).clamp(min=MIN_SCALE)
        rows = slice(out_part.offset, out_part.offset + out_part.size) if out_part else slice(None)
        layer.weight.data[rows] = quantize_fp8(w, scale[:, None])
        layer.weight_scale.data[rows] = scale

    def gemv_weights(self, layer: nn.Module) -> dict | None:
        """Per-tensor or per-channel weight scales take the matrix-vector kernel (batch-1 decode,
        kernels/gemv.py): weight-only FP8 with x as it is, W8A8 with dynamic per-token activations quantizing x
        inside it (the RMSNorm before the layer folded in, as for 16-bit weights). Block-wise weights and static
        activation scales do not."""
        s = self.scheme
        if s.block is not None or s.activations not in (None, "token") or s.static_activations:
            return None
        return {"weight": layer.weight, "weight_scale": layer.weight_scale, "quant_x": s.activations == "token"}

    def takes_fp8_rows(self) -> bool:
        """Dynamic per-token activations: the kernel before the layer may quantize them (apply takes Fp8Rows)."""
        return self.scheme.activations == "token" and not self.scheme.static_activations

    def apply(self, layer: nn.Module, x: torch.Tensor | Fp8Rows, bias: torch.Tensor | None) -> torch.Tensor:
        s = self.scheme
        if isinstance(x, Fp8Rows):
            assert self.takes_fp8_rows() and layer.use_triton
            return scaled_mm(x.q, x.scale, layer.weight, layer.weight_scale, x.dtype, bias)
        scale = layer.weight_scale_inv if s.block is not None else layer.weight_scale
        if s.activations is None:
            return F.linear(x, dequantize_weight_fp8(layer.weight, scale, s.block).to(x.dtype), bias)
        rows = x.reshape(-1, x.shape[-1])
        if s.activations == "group":
            quant = kernels.per_token_group_quant_fp8 if layer.use_triton else kernels.per_token_group_quant_fp8_ref
            x_q, x_scale = quant(rows, s.block[1])
        elif s.static_activations:
            x_q, x_scale = kernels.static_quant_fp8(rows, layer.input_scale) if layer.use_triton else \
                (quantize_fp8(rows, layer.input_scale), layer.input_scale.view(1, 1))
        else:
            x_q, x_scale = (kernels.per_token_quant_fp8 if layer.use_triton else kernels.per_token_quant_fp8_ref)(rows)
        mm = scaled_mm if layer.use_triton else kernels.scaled_mm_ref
        out = mm(x_q, x_scale, layer.weight, scale, x.dtype, bias, s.block)
        return out.view(*x.shape[:-1], out.shape[-1])
