"""compressed-tensors checkpoints (quant_method "compressed-tensors", as llm-compressor writes them): FP8 W8A8 and
W8A16 ("float-quantized": per-tensor or per-channel weight scales, activations per token dynamically or per tensor
from input_scale), and INT4 W4A16 ("pack-quantized": symmetric, grouped scales)."""
from __future__ import annotations

from engine.layers.quantization.fp8 import Fp8LinearMethod, Fp8Scheme
from engine.layers.quantization.int4 import Int4LinearMethod

FORMATS = ("float-quantized", "pack-quantized")


class CompressedTensorsConfig:
    name = "compressed-tensors"

    def __init__(self, method):
        self.method = method

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
        if fmt == "pack-quantized":
            return cls(_int4_method(groups[0]))
        return cls(Fp8LinearMethod(_fp8_scheme(groups[0])))

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


def _int4_method(group: dict) -> Int4LinearMethod:
    w, a = group.get("weights") or {}, group.get("input_activations")
    if (w.get("type"), w.get("num_bits"), w.get("strategy"), w.get("symmetric")) != ("int", 4, "group", True) or \
            a is not None or w.get("actorder") not in (None, False):
        raise ValueError(f"compressed-tensors pack-quantized: INT4 weight-only, symmetric, grouped scales (W4A16) "
                         f"is supported, got weights {w}, input_activations {a}")
    return Int4LinearMethod("pack", w["group_size"])
