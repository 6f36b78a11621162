"""OLMoE: Llama attention with RMSNorm over the whole q and k projections (not per head) and optional clipping of
q/k/v, then a sparse block on every layer."""
from __future__ import annotations

import torch
from torch import nn

from engine.models.llama import LlamaAttention
from engine.models.moe import MoeForCausalLM, SparseMoeBlock
from engine.parallel_state import TPGroup


class ProjectionRMSNorm(nn.Module):
    """RMSNorm over a whole projection of which this rank holds `width` columns starting at `start`: the sum of
    squares is all-reduced, so every rank normalizes by the full projection's mean. With replicated KV heads each
    is counted once per replica in the sum and in the count alike."""

    def __init__(self, width: int, start: int, eps: float, tp: TPGroup, dtype: torch.dtype):
        super().__init__()
        self.width, self.start, self.eps, self.tp = width, start, eps, tp
        self.weight = nn.Parameter(torch.ones(width, dtype=dtype), requires_grad=False)

    def load(self, param: nn.Parameter, loaded: torch.Tensor, shard: str | None = None) -> None:
        param.data.copy_(loaded.narrow(0, self.start, self.width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        square_sum = h.pow(2).sum(-1, keepdim=True)
        if self.tp.size > 1:
            square_sum = self.tp.all_reduce(square_sum)
        h = h * torch.rsqrt(square_sum / (self.width * self.tp.size) + self.eps)
        return self.weight * h.to(x.dtype)


class OlmoeAttention(LlamaAttention):
    def __init__(self, cfg, arch: str, tp: TPGroup, dtype: torch.dtype, max_len: int):
        super().__init__(cfg, arch, tp, dtype, max_len)
        sizes, d = self.qkv_proj.shard_sizes, self.head_dim
        kv_replicas = self.qkv_proj.kv_replicas
        k_start = (tp.rank // kv_replicas) * d if kv_replicas > 1 else tp.rank * sizes["k"]
        self.q_norm = ProjectionRMSNorm(sizes["q"], tp.rank * sizes["q"], cfg.rms_norm_eps, tp, dtype)
        self.k_norm = ProjectionRMSNorm(sizes["k"], k_start, cfg.rms_norm_eps, tp, dtype)
        self.clip_qkv = getattr(cfg, "clip_qkv", None)

    def attend(self, positions: torch.Tensor, qkv: torch.Tensor, meta) -> torch.Tensor:
        q, k, v = qkv.split(list(self.qkv_proj.shard_sizes.values()), dim=-1)
        qkv = torch.cat([self.q_norm(q), self.k_norm(k), v], dim=-1)
        if self.clip_qkv is not None:
            qkv = qkv.clamp(-self.clip_qkv, self.clip_qkv)
        return super().attend(positions, qkv, meta)


class OlmoeForCausalLM(MoeForCausalLM):
    def make_attention(self, cfg, arch, tp, dtype, max_len):
        return OlmoeAttention(cfg, arch, tp, dtype, max_len)

    def moe_block(self, cfg, tp, dtype):
        return SparseMoeBlock(cfg, cfg.num_experts, cfg.intermediate_size, cfg.norm_topk_prob, tp, dtype)
