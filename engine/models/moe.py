"""What the mixture-of-experts families share: the sparse block (router, experts, an optional gated shared
expert) in place of the dense MLP, on some or all layers, and the per-expert checkpoint tensors mapped onto the
stacked expert weights."""
from __future__ import annotations

import re

import torch
from torch import nn

from engine.layers.moe import EXPERT_WEIGHTS, FusedMoE, ReplicatedLinear
from engine.models.llama import LlamaDecoderLayer, LlamaForCausalLM, LlamaMLP
from engine.parallel_state import TPGroup

_EXPERT_TENSOR = re.compile(r"^(.*\.mlp\.experts)\.(\d+)\.(\w+)\.weight$")


class SparseMoeBlock(nn.Module):
    def __init__(self, cfg, num_experts: int, intermediate: int, renormalize: bool, tp: TPGroup, dtype: torch.dtype,
                 shared_intermediate: int = 0):
        super().__init__()
        self.gate = ReplicatedLinear(cfg.hidden_size, num_experts, dtype)
        self.experts = FusedMoE(num_experts, cfg.num_experts_per_tok, cfg.hidden_size, intermediate, renormalize,
                                tp, dtype)
        self.shared_expert = self.shared_expert_gate = None
        if shared_intermediate:  # Qwen2-MoE: every token also goes through one dense expert, scaled by a sigmoid
            self.shared_expert = LlamaMLP(cfg, tp, dtype, shared_intermediate)
            self.shared_expert_gate = ReplicatedLinear(cfg.hidden_size, 1, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.experts(x, self.gate(x))
        if self.shared_expert is not None:
            out = out + torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)
        return out

    def add_to(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        """residual += self(x), in place (the batch-1 decode layer, LlamaDecoderLayer.decode_one)."""
        if self.shared_expert is not None:
            residual += torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)
        return self.experts.add_to(x, self.gate(x), residual)


class MoeForCausalLM(LlamaForCausalLM):
    """A Llama-shaped decoder whose sparse layers hold a SparseMoeBlock. Subclasses say which layers are sparse
    and how the block is configured."""

    block_name = "mlp"  # the sparse block's name in the checkpoint (Mixtral: block_sparse_moe)

    def is_sparse(self, cfg, index: int) -> bool:
        return True

    def moe_block(self, cfg, tp: TPGroup, dtype: torch.dtype) -> SparseMoeBlock:
        raise NotImplementedError

    def make_attention(self, cfg, arch: str, tp: TPGroup, dtype: torch.dtype, max_len: int) -> nn.Module | None:
        return None  # Llama's

    def make_layer(self, index: int, cfg, arch: str, tp: TPGroup, dtype: torch.dtype, max_len: int) -> nn.Module:
        mlp = self.moe_block(cfg, tp, dtype) if self.is_sparse(cfg, index) else None
        return LlamaDecoderLayer(cfg, arch, tp, dtype, max_len, index, self.make_attention(cfg, arch, tp, dtype, max_len),
                                 mlp)

    def param_for(self, ckpt_name: str):
        if self.block_name != "mlp":
            ckpt_name = ckpt_name.replace(f".{self.block_name}.", ".mlp.")
        match = _EXPERT_TENSOR.match(ckpt_name.removeprefix("model."))
        if match is None:
            return super().param_for(ckpt_name)
        block, expert, proj = match.groups()
        if proj not in EXPERT_WEIGHTS or block.split(".")[1] not in self.layers:
            return None
        experts = self.get_submodule(block)
        if not experts.is_local(int(expert)):
            return None  # another rank's expert (expert parallelism)
        param, which = EXPERT_WEIGHTS[proj]
        return experts, getattr(experts, param), (int(expert), which)


def sparse_by_step(cfg, index: int) -> bool:
    """Qwen-MoE's rule: layers in mlp_only_layers stay dense, and of the others every decoder_sparse_step-th."""
    return (index not in (getattr(cfg, "mlp_only_layers", None) or []) and cfg.num_experts > 0
            and (index + 1) % getattr(cfg, "decoder_sparse_step", 1) == 0)
