"""Qwen2-MoE (a sigmoid-gated shared expert, qkv bias) and Qwen3-MoE (per-head q/k norm, no shared expert): sparse
layers chosen by decoder_sparse_step and mlp_only_layers, the others dense with intermediate_size."""
from engine.models.moe import MoeForCausalLM, SparseMoeBlock, sparse_by_step


class Qwen2MoeForCausalLM(MoeForCausalLM):
    def is_sparse(self, cfg, index):
        return sparse_by_step(cfg, index)

    def moe_block(self, cfg, tp, dtype):
        return SparseMoeBlock(cfg, cfg.num_experts, cfg.moe_intermediate_size, cfg.norm_topk_prob, tp, dtype,
                              shared_intermediate=getattr(cfg, "shared_expert_intermediate_size", 0) or 0)


class Qwen3MoeForCausalLM(MoeForCausalLM):
    def is_sparse(self, cfg, index):
        return sparse_by_step(cfg, index)

    def moe_block(self, cfg, tp, dtype):
        return SparseMoeBlock(cfg, cfg.num_experts, cfg.moe_intermediate_size, cfg.norm_topk_prob, tp, dtype)
