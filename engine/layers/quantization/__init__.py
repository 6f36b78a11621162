"""Quantization schemes the engine serves, read from a checkpoint's `quantization_config` (config.json).

A checkpoint quantized in a scheme the engine does not know fails here, at load, instead of loading its packed
integers or FP8 bytes as if they were plain weights."""
from __future__ import annotations

SUPPORTED: dict[str, object] = {}  # quant_method -> its config class


def scheme_name(qc: dict) -> str:
    method = qc.get("quant_method", "<no quant_method>")
    fmt = qc.get("format")
    return f"{method} ({fmt})" if fmt else str(method)


def quant_config_for(hf_config):
    """The checkpoint's quantization config, parsed; None for an unquantized checkpoint. Raises ValueError naming
    the scheme and the supported ones when the engine cannot serve it."""
    qc = getattr(hf_config, "quantization_config", None)
    if qc is None:
        return None
    if not isinstance(qc, dict):
        qc = qc.to_dict()
    method = qc.get("quant_method")
    if method not in SUPPORTED:
        raise ValueError(f"checkpoint quantization {scheme_name(qc)} is not supported; supported: "
                         f"{', '.join(SUPPORTED) or 'none (unquantized checkpoints only)'}")
    return SUPPORTED[method].from_config(qc)
