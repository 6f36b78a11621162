"""compressed-tensors checkpoints (quant_method "compressed-tensors", as llm-compressor writes them): FP8 W8A8 and
W8A16 ("float-quantized": per-tensor or per-channel weight scales, activations per token dynamically or per tensor
from input_scale)."""
from __future__ import annotations

from engine.layers.quantization.fp8 import Fp8LinearMethod, Fp8Scheme

FORMATS = ("float-quantized",)


class CompressedTensorsConfig:
    name = "compressed-tensors"

    def __init__(self, method, ignore: list[str]):
        self.method, self.ignore = method, ignore

    @classmethod
    def from_config(cls, qc: dict) -> CompressedTensorsConfig:
        fmt = qc.get("format")
        groups = list((qc.get("config_groups") or {}).values())
        if fmt not in FORMATS:
            raise ValueError(f"compressed-tensors format {fmt!r} is not supported; supported: {', '.join(FORMATS)}")
        if len(groups) != 1 or "Linear" not in groups[0].get("targets", []):
            raise ValueError("compressed-tensors: one config group targeting Linear layers is supported, got "
                             f"{[g.get('targets') for g in groups]}")
        ignore = [name for name in qc.get("ignore") or [] if name not in ("lm_head", "re:.*lm_head")]
        if ignore:
            raise ValueError(f"compressed-tensors: linear layers left unquantized ({ignore}) are not supported")
        return cls(Fp8LinearMethod(_fp8_scheme(groups[0])), ignore)

    def linear_method(self):
        return self.method


def _fp8_scheme(group: dict) -> Fp8Scheme:
    w, a = group.get("weights") or {}, group.get("input_activations")
    if (w.get("type"), w.get("num_bits")) != ("float", 8) or w.get("strategy") not in ("tensor", "channel") or \
            not w.get("symmetric", True) or w.get("dynamic"):
        raise ValueError(f"compressed-tensors float-quantized: FP8 weights with static per-tensor or per-channel "
                         f"symmetric scales are supported, got weights {w}")
    if a is None:
        return Fp8Scheme(w["strategy"], None)
    if (a.get("type"), a.get("num_bits")) != ("float", 8) or (a.get("strategy"), bool(a.get("dynamic"))) not in \
            (("token", True), ("tensor", False), ("tensor", True)):
        raise ValueError(f"compressed-tensors float-quantized: FP8 activations per token (dynamic) or per tensor "
                         f"(static) are supported, got input_activations {a}")
    static = not a.get("dynamic")
    return Fp8Scheme(w["strategy"], "tensor" if static else "token", static_activations=static)
