"""Phi-3 and Phi-4 (Phi3ForCausalLM): Llama's layers over checkpoints whose q/k/v and gate/up projections are
stored fused (qkv_proj, gate_up_proj). Those tensors load whole into our fused layers, which split them into their
parts and each tensor-parallel rank's rows (ColumnParallelLinear.load with no shard). LongRoPE's short or long
factors are chosen once for the engine: the long ones when max_model_len passes original_max_position_embeddings
(rotary.rope_inv_freq)."""
from __future__ import annotations

from engine.models.llama import LlamaForCausalLM


class Phi3ForCausalLM(LlamaForCausalLM):
    packed = {}  # checkpoint names are ours already: qkv_proj and gate_up_proj come fused
