"""Mixtral: Mistral's attention, every layer sparse, top-k weights always renormalized."""
from engine.models.moe import MoeForCausalLM, SparseMoeBlock


class MixtralForCausalLM(MoeForCausalLM):
    block_name = "block_sparse_moe"

    def moe_block(self, cfg, tp, dtype):
        return SparseMoeBlock(cfg, cfg.num_local_experts, cfg.intermediate_size, True, tp, dtype)
