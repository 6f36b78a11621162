"""quant_method "fp8": block-wise FP8 checkpoints as DeepSeek-V3 and Qwen3-FP8 ship them (weight_block_size,
weight_scale_inv, activations quantized per 1 x block_k group while running), per-tensor FP8 checkpoints
(weight_scale, activation_scheme static with input_scale or dynamic), and `quantization: fp8` on a 16-bit
checkpoint: weights quantized per output channel while loading, activations per token."""
from __future__ import annotations

from engine.layers.quantization.fp8 import Fp8LinearMethod, Fp8Scheme


class Fp8Config:
    name = "fp8"

    def __init__(self, scheme: Fp8Scheme):
        self.method = Fp8LinearMethod(scheme)

    @classmethod
    def from_config(cls, qc: dict) -> Fp8Config:
        if qc.get("fmt", "e4m3") != "e4m3":
            raise ValueError(f"fp8 checkpoints in e4m3 are supported, got fmt {qc.get('fmt')!r}")
        activation_scheme = qc.get("activation_scheme", "dynamic")
        if activation_scheme not in ("dynamic", "static"):
            raise ValueError(f"fp8 activation_scheme {activation_scheme!r}: dynamic or static are supported")
        block = qc.get("weight_block_size")
        if block is not None:
            if activation_scheme != "dynamic" or len(block) != 2:
                raise ValueError("block-wise fp8 needs dynamic activations and a [block_n, block_k] "
                                 f"weight_block_size, got {activation_scheme}, {block}")
            return cls(Fp8Scheme("block", "group", block=tuple(block)))
        static = activation_scheme == "static"
        return cls(Fp8Scheme("tensor", "tensor" if static else "token", static_activations=static))

    @classmethod
    def online(cls) -> Fp8Config:
        return cls(Fp8Scheme("channel", "token", online=True))

    def linear_method(self):
        return self.method
