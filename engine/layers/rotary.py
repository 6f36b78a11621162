"""Rotary position embedding (neox style) with the checkpoint's scaling, through transformers' own init functions."""
from __future__ import annotations

import torch
from torch import nn
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from engine.kernels import reshape_and_cache, rotary_embedding


def rope_inv_freq(hf_config, head_dim: int, max_len: int, layer_type: str | None = None) -> tuple[torch.Tensor, float]:
    """Inverse frequencies and the cos/sin scale for this config (default, linear, llama3, yarn, dynamic, ...).
    `layer_type`: the key of this layer's own parameters where the config has one set per layer type (Gemma 3's
    sliding_attention and full_attention)."""
    params = getattr(hf_config, "rope_parameters", None) or {}
    if layer_type is not None:
        params = params[layer_type]
    rope_type = params.get("rope_type", "default")
    if rope_type == "default":
        theta = params.get("rope_theta", getattr(hf_config, "rope_theta", 10000.0))
        dim = int(head_dim * params.get("partial_rotary_factor", 1.0))  # the rest of each head passes unrotated
        return 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float) / dim), 1.0
    if rope_type not in ROPE_INIT_FUNCTIONS:
        raise ValueError(f"rope_type {rope_type!r} is not supported; supported: default, {', '.join(ROPE_INIT_FUNCTIONS)}")
    # Dynamic NTK is fixed at the longest length we serve (as vLLM does) rather than varying per step; so is
    # longrope's choice of factors: the long ones when max_len is past original_max_position_embeddings.
    return ROPE_INIT_FUNCTIONS[rope_type](hf_config, torch.device("cpu"), seq_len=max_len, layer_type=layer_type)


class RotaryEmbedding(nn.Module):
    def __init__(self, hf_config, head_dim: int, max_len: int, layer_type: str | None = None):
        super().__init__()
        # Computed on the CPU whatever the default device the model is built under (transformers' init functions
        # return CPU tensors), then moved there.
        device = torch.get_default_device()
        with torch.device("cpu"):
            inv_freq, scale = rope_inv_freq(hf_config, head_dim, max_len, layer_type)
            freqs = torch.outer(torch.arange(max_len, dtype=torch.float), inv_freq.cpu())
            # [max_len, rot_dim] = cat(cos, sin), each over rot_dim / 2, as vLLM lays it out.
            cache = torch.cat([freqs.cos() * scale, freqs.sin() * scale], -1).to(device)
        self.register_buffer("cos_sin_cache", cache, persistent=False)
        self.head_dim = head_dim
        self.use_triton = False

    @property
    def folds_qk_norm(self) -> bool:
        """Whether the Triton kernel can RMS-normalize q and k's heads on the way (whole-head rotary)."""
        return self.use_triton and self.cos_sin_cache.shape[1] == self.head_dim

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, kv_write: tuple | None = None,
                qk_norm: tuple[torch.Tensor, torch.Tensor, float] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """q: [T, Hq, D], k: [T, Hk, D]; returns them rotated (in place on the Triton path, which also stores keys
        and values in the KV cache given kv_write = (v, key_cache, value_cache, slot_mapping), and normalizes the
        heads first given qk_norm = (q_weight, k_weight, eps) where folds_qk_norm says it can)."""
        if self.use_triton:
            return rotary_embedding(positions, q, k, self.cos_sin_cache, self.head_dim, kv_write=kv_write,
                                    qk_norm=qk_norm)
        assert qk_norm is None, "the torch path normalizes q and k with their RMSNorm modules"
        cos, sin = self.cos_sin_cache[positions].unsqueeze(1).chunk(2, dim=-1)
        q, k = _rotate(q, cos, sin), _rotate(k, cos, sin)
        if kv_write is not None:
            reshape_and_cache(k, *kv_write)
        return q, k


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    rot_dim = 2 * cos.shape[-1]  # partial rotary: the dims past rot_dim pass through
    x1, x2 = x[..., :rot_dim].float().chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin, x[..., rot_dim:].float()], dim=-1).to(x.dtype)
