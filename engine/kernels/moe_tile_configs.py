"""Tile sizes for the fused-MoE kernel, per expert shape and GPU, in vLLM's format and file names.

A tuned file `configs/E={experts},N={intermediate per rank},device_name={GPU name}.json` maps a token count to
BLOCK_SIZE_M/N/K, GROUP_SIZE_M, num_warps and num_stages; the entry nearest the step's token count is used, as in
vLLM. `benchmarks/moe_tuning.py` writes these files on the GPU they are for. Without one, vLLM's defaults apply.
"""
from __future__ import annotations

import functools
import json
from pathlib import Path

CONFIG_DIR = Path(__file__).parent / "configs"


def config_file_name(num_experts: int, intermediate: int, device_name: str) -> str:
    return f"E={num_experts},N={intermediate},device_name={device_name.replace(' ', '_')}.json"


@functools.lru_cache(maxsize=None)
def tuned_configs(num_experts: int, intermediate: int, device_name: str) -> dict[int, dict] | None:
    path = CONFIG_DIR / config_file_name(num_experts, intermediate, device_name)
    if not path.exists():
        return None
    return {int(tokens): config for tokens, config in json.loads(path.read_text()).items()}


def default_config(num_tokens: int, num_experts: int, top_k: int) -> dict:
    """vLLM's defaults: small M blocks when few tokens reach each expert (decode), larger ones for prefill."""
    if num_tokens * top_k <= num_experts * 4:
        return dict(BLOCK_SIZE_M=16, BLOCK_SIZE_N=32, BLOCK_SIZE_K=64, GROUP_SIZE_M=1)
    return dict(BLOCK_SIZE_M=64, BLOCK_SIZE_N=64, BLOCK_SIZE_K=32, GROUP_SIZE_M=8)


def moe_config(num_tokens: int, num_experts: int, top_k: int, weight_shape: tuple[int, int] | None = None,
               device_name: str | None = None) -> dict:
    """The tuned entry nearest `num_tokens` for `weight_shape` (this rank's experts, their intermediate size) on
    this GPU, else the default."""
    tuned = tuned_configs(*weight_shape, device_name) if weight_shape and device_name else None
    if not tuned:
        return default_config(num_tokens, num_experts, top_k)
    return tuned[min(tuned, key=lambda tokens: abs(tokens - num_tokens))]
