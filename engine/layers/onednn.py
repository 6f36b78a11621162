"""Linear layers on CPU through oneDNN, each weight packed once after loading, as vLLM's CPU backend does
(onednn_mm). F.linear hands the row-major weight to the CPU GEMM, which re-lays it out on every call: at decode
batch sizes that costs about as much as the multiply (SmolLM2-135M, 16 sequences, float32, 2 cores: a decode step
took 133 ms with F.linear and 65 ms with packed weights)."""
from __future__ import annotations

import torch

# The batch size oneDNN picks the packed layout for; any batch size runs on it.
PACKED_FOR_BATCH = 16


def packs_weights(dtype: torch.dtype) -> bool:
    if not torch.backends.mkldnn.is_available():
        return False
    return dtype == torch.float32 or (dtype == torch.bfloat16 and torch.ops.mkldnn._is_mkldnn_bf16_supported())


def pack_weight(weight: torch.Tensor) -> torch.Tensor:
    """weight [out, in] laid out once for oneDNN's GEMM."""
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach(), PACKED_FOR_BATCH)


def onednn_linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x @ weight^T + bias in the packed weight's dtype."""
    return torch.ops.mkldnn._linear_pointwise(x.to(packed.dtype), packed, bias, "none", [], "")
