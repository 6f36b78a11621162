"""quant_method "awq": AutoAWQ's 4-bit GEMM checkpoints (qweight, qzeros, scales; zero points, grouped scales)."""
from __future__ import annotations

from engine.layers.quantization.int4 import Int4LinearMethod


class AwqConfig:
    name = "awq"

    def __init__(self, group: int):
        self.method = Int4LinearMethod("awq", group)

    @classmethod
    def from_config(cls, qc: dict) -> AwqConfig:
        bits, version = qc.get("bits", qc.get("w_bit")), str(qc.get("version", "gemm")).lower()
        zero_point, group = qc.get("zero_point", True), qc.get("group_size", qc.get("q_group_size"))
        if bits != 4 or version != "gemm" or not zero_point or not isinstance(group, int) or group <= 0:
            raise ValueError(f"awq: 4-bit GEMM checkpoints with zero points and a group size are supported, got "
                             f"bits={bits}, version={version}, zero_point={zero_point}, group_size={group}")
        if qc.get("modules_to_not_convert"):
            raise ValueError(f"awq: layers left unquantized ({qc['modules_to_not_convert']}) are not supported")
        return cls(group)

    def linear_method(self):
        return self.method
