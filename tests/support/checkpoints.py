"""Checkpoints built for tests, saved the way Hugging Face saves real ones: tiny random models of each supported
architecture, and the demo model with one token poisoned."""
from __future__ import annotations

import shutil
from pathlib import Path

import torch
import transformers

from engine.builtin_models import build_demo

COMMON = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              max_position_embeddings=512, rms_norm_eps=1e-6)

# Windows shorter than most test prompts (random_prompts: 5 to 64 tokens), so they matter.
CONFIGS = {
    "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM,
              dict(num_key_value_heads=2, tie_word_embeddings=False,
                   rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                 "high_freq_factor": 4.0, "original_max_position_embeddings": 128},
                   rope_theta=500000.0)),
    "llama_tied_mha": (transformers.LlamaConfig, transformers.LlamaForCausalLM,
                       dict(num_key_value_heads=4, tie_word_embeddings=True)),
    "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM,
                dict(num_key_value_heads=1, sliding_window=12, tie_word_embeddings=False)),
    # Layer 0 attends over everything, layer 1 over a window (max_window_layers=1).
    "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM,
              dict(num_key_value_heads=2, tie_word_embeddings=True, use_sliding_window=True, sliding_window=10,
                   max_window_layers=1)),
    "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM,
              dict(num_key_value_heads=2, head_dim=32, tie_word_embeddings=False, use_sliding_window=False)),
    # Soft-caps low enough to bite; query_pre_attn_scalar unlike head_dim; layer 0 slides, layer 1 is global.
    "gemma2": (transformers.Gemma2Config, transformers.Gemma2ForCausalLM,
               dict(num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=24, sliding_window=8,
                    attn_logit_softcapping=5.0, final_logit_softcapping=3.0, tie_word_embeddings=True)),
    # Local layers on rope theta 10k, the global one on 1M with linear scaling, as Gemma 3 4B and up.
    "gemma3": (transformers.Gemma3TextConfig, transformers.Gemma3ForCausalLM,
               dict(num_key_value_heads=1, head_dim=32, query_pre_attn_scalar=24, sliding_window=8,
                    layer_types=["sliding_attention", "full_attention"], tie_word_embeddings=True,
                    rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                                     "full_attention": {"rope_type": "linear", "factor": 8.0,
                                                        "rope_theta": 1000000.0}})),
    # LongRoPE past original_max_position_embeddings (4): the engine (max_model_len 512) and transformers (every
    # prompt is longer) take the long factors; a 3/4 partial rotary (as Phi-4-mini); fused qkv/gate_up tensors.
    "phi3": (transformers.Phi3Config, transformers.Phi3ForCausalLM,
             dict(num_key_value_heads=2, tie_word_embeddings=False, sliding_window=24,
                  original_max_position_embeddings=4,
                  rope_parameters={"rope_type": "longrope", "rope_theta": 10000.0, "partial_rotary_factor": 0.75,
                                   "short_factor": [1.0 + 0.1 * i for i in range(6)],
                                   "long_factor": [2.0 + 0.5 * i for i in range(6)]})),
    # Mixture-of-experts: odd expert counts, top-k 1 to 3, a shared expert, dense layers between sparse ones
    "mixtral": (transformers.MixtralConfig, transformers.MixtralForCausalLM,
                dict(num_key_value_heads=2, intermediate_size=32, num_local_experts=3, num_experts_per_tok=2,
                     sliding_window=None, tie_word_embeddings=False)),
    "qwen2_moe": (transformers.Qwen2MoeConfig, transformers.Qwen2MoeForCausalLM,
                  dict(num_key_value_heads=2, num_hidden_layers=3, num_experts=4, num_experts_per_tok=3,
                       moe_intermediate_size=32, shared_expert_intermediate_size=48, decoder_sparse_step=2,
                       norm_topk_prob=False, tie_word_embeddings=True, use_sliding_window=False)),
    "qwen3_moe": (transformers.Qwen3MoeConfig, transformers.Qwen3MoeForCausalLM,
                  dict(num_key_value_heads=2, head_dim=32, num_hidden_layers=3, num_experts=5, num_experts_per_tok=2,
                       moe_intermediate_size=32, mlp_only_layers=[1], norm_topk_prob=True,
                       tie_word_embeddings=False, use_sliding_window=False)),
    "olmoe": (transformers.OlmoeConfig, transformers.OlmoeForCausalLM,
              dict(num_key_value_heads=2, intermediate_size=32, num_experts=7, num_experts_per_tok=1,
                   norm_topk_prob=False, clip_qkv=8.0, tie_word_embeddings=True)),
}
# Kinds whose norm weights are randomized too (Gemma's are stored as weight - 1, zero at init).
RANDOM_NORMS = {"gemma2", "gemma3", "phi3"}

# The poisoned demo's NaN embedding row; the demo's greedy outputs of prompts.TEXTS never hold it.
POISON_TOKEN = 7


def make_tiny_model(kind: str, out_dir: Path, seed: int = 0) -> Path:
    """A random model of `kind` with the demo byte-level tokenizer (its ids fit the 512-token vocab)."""
    config_cls, model_cls, extra = CONFIGS[kind]
    config = config_cls(**{**COMMON, **extra}, bos_token_id=None, eos_token_id=None, pad_token_id=None)
    torch.manual_seed(seed)
    model = model_cls(config).to(torch.float32).eval()
    with torch.no_grad():  # random init is small; widen it so greedy decoding isn't a flat argmax tie
        for p in model.parameters():
            if p.dim() >= 2:  # MoE experts: [experts, out, in]
                p.normal_(0, 0.5 / p.shape[-1] ** 0.5 * 4)
            elif kind in RANDOM_NORMS:
                p.normal_(0, 0.2)
    model.save_pretrained(out_dir, safe_serialization=True)
    demo = out_dir.parent / f"{out_dir.name}-demo-tokenizer"
    build_demo(demo)
    transformers.AutoTokenizer.from_pretrained(demo).save_pretrained(out_dir)
    return out_dir


def make_poisoned_model(out_dir: Path, token: int = POISON_TOKEN) -> Path:
    """The demo checkpoint with the embedding row of `token` set to NaN: any sequence holding that token drives
    the model to NaN logits, as corrupt weights or an overflow would."""
    from safetensors.torch import load_file, save_file

    from engine.model_source import resolve_model

    shutil.copytree(resolve_model("demo"), out_dir)
    path = out_dir / "model.safetensors"
    tensors = load_file(str(path))
    tensors["model.embed_tokens.weight"][token] = float("nan")
    save_file(tensors, str(path), metadata={"format": "pt"})
    return out_dir
