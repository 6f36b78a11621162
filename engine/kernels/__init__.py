"""Triton kernels, each beside the plain torch reference it is tested against (the `*_ref` functions).

Every public kernel function falls back to its reference for CPU tensors (unless TRITON_INTERPRET=1) and when
Triton is not installed. Nothing here imports from the rest of `engine`.
"""
from .activation import (act_and_mul_quant_fp8, gelu_tanh_and_mul, gelu_tanh_and_mul_ref, silu_and_mul,
                         silu_and_mul_ref)
from .fp8 import (per_token_group_quant_fp8, per_token_group_quant_fp8_ref, per_token_quant_fp8,
                  per_token_quant_fp8_ref, scaled_mm_ref, static_quant_fp8)
from .fused_moe import fused_experts, fused_experts_ref
from .gemv import gemv, gemv_ref
from .int4 import int4_mm, int4_mm_ref
from .moe_align import moe_align_block_size, moe_align_block_size_ref
from .moe_router import topk_route, topk_route_ref
from .paged_attention import paged_attention_ref, unified_attention, use_split_kv
from .reshape_and_cache import reshape_and_cache, reshape_and_cache_ref
from .rms_norm import (fused_add_rms_norm, fused_add_rms_norm_ref, rms_norm, rms_norm_add, rms_norm_quant_fp8,
                       rms_norm_ref)
from .rotary import rotary_embedding, rotary_embedding_ref
from .scaled_mm import scaled_mm
from .sampling import apply_penalties, apply_penalties_ref, greedy_sample, greedy_sample_ref, sample, sample_ref
