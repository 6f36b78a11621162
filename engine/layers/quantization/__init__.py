"""Quantization schemes the engine serves, read from a checkpoint's `quantization_config` (config.json), or asked
for with the `quantization` option (online FP8 of a 16-bit checkpoint).

A checkpoint quantized in a scheme the engine does not know fails here, at load, instead of loading its packed
integers or FP8 bytes as if they were plain weights. The model is built inside `building_with(config)`: each
column/row-parallel linear layer it makes takes the config's linear method, so model files need not pass it."""
from __future__ import annotations

from contextlib import contextmanager
from contextvars import ContextVar

from engine.layers.quantization.awq import AwqConfig
from engine.layers.quantization.compressed_tensors import CompressedTensorsConfig
from engine.layers.quantization.fp8_config import Fp8Config

SUPPORTED = {"compressed-tensors": CompressedTensorsConfig, "fp8": Fp8Config, "awq": AwqConfig}
ONLINE = {"fp8": Fp8Config.online}  # the `quantization` option on an unquantized checkpoint

_building: ContextVar = ContextVar("quant_config", default=None)


def scheme_name(qc: dict) -> str:
    method = qc.get("quant_method", "<no quant_method>")
    fmt = qc.get("format")
    return f"{method} ({fmt})" if fmt else str(method)


def quant_config_for(hf_config, quantization: str | None = None):
    """The checkpoint's quantization config, parsed, or the online one `quantization` names; None for an
    unquantized model. Raises ValueError naming the scheme and the supported ones when the engine cannot serve
    it."""
    qc = getattr(hf_config, "quantization_config", None)
    if qc is None:
        if quantization is None:
            return None
        if quantization not in ONLINE:
            raise ValueError(f"quantization {quantization!r} of an unquantized checkpoint is not supported; "
                             f"supported: {', '.join(ONLINE)}")
        return ONLINE[quantization]()
    if not isinstance(qc, dict):
        qc = qc.to_dict()
    method = qc.get("quant_method")
    if method not in SUPPORTED:
        raise ValueError(f"checkpoint quantization {scheme_name(qc)} is not supported; supported: "
                         f"{', '.join(SUPPORTED)}")
    if quantization is not None and quantization != method:
        raise ValueError(f"quantization {quantization!r} asked for a checkpoint already quantized as {method}")
    return SUPPORTED[method].from_config(qc)


@contextmanager
def building_with(quant_config):
    token = _building.set(quant_config)
    try:
        yield
    finally:
        _building.reset(token)


def linear_method_for_new_layer():
    """The linear method of the model being built; None: plain weights."""
    config = _building.get()
    return config.linear_method() if config is not None else None
