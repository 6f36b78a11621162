"""Gemma 2 and Gemma 3 (text): the Llama module tree with Gemma's layers.

Against Llama: RMSNorm scales by (1 + weight); norms both before and after attention and the MLP; a GeGLU MLP;
embeddings scaled by sqrt(hidden); attention scaled by query_pre_attn_scalar ** -0.5; sliding-window and global
layers alternating by `layer_types`. Gemma 2 soft-caps attention scores and the final logits; Gemma 3 norms q and k
and gives its sliding and global layers their own rope parameters."""
from __future__ import annotations

import torch
from torch import nn

from engine.kernels import gemv
from engine.layers.activation import GeluTanhAndMul
from engine.layers.attention import Attention, AttentionMetadata, layer_sliding_window
from engine.layers.linear import (ColumnParallelLinear, QKVParallelLinear, RowParallelLinear, gemv_weights,
                                  takes_fp8_rows, takes_gemv)
from engine.layers.norm import GemmaRMSNorm
from engine.layers.rotary import RotaryEmbedding
from engine.models.llama import LlamaAttention, LlamaForCausalLM
from engine.parallel_state import TPGroup


class GemmaAttention(nn.Module):
    def __init__(self, cfg, arch: str, tp: TPGroup, dtype: torch.dtype, max_len: int, layer_idx: int):
        super().__init__()
        self.head_dim = cfg.head_dim
        self.num_heads = cfg.num_attention_heads // tp.size
        bias = bool(getattr(cfg, "attention_bias", False))
        self.qkv_proj = QKVParallelLinear(cfg.hidden_size, self.head_dim, cfg.num_attention_heads,
                                          cfg.num_key_value_heads, bias, tp, dtype)
        self.num_kv_heads = self.qkv_proj.shard_sizes["k"] // self.head_dim
        self.o_proj = RowParallelLinear(cfg.num_attention_heads * self.head_dim, cfg.hidden_size, bias, tp, dtype)
        layer_type = cfg.layer_types[layer_idx]
        per_type_rope = layer_type in (getattr(cfg, "rope_parameters", None) or {})  # Gemma 3
        self.rotary = RotaryEmbedding(cfg, self.head_dim, max_len, layer_type if per_type_rope else None)
        self.qk_norm = arch == "Gemma3ForCausalLM"
        if self.qk_norm:
            self.q_norm = GemmaRMSNorm(self.head_dim, cfg.rms_norm_eps, dtype)
            self.k_norm = GemmaRMSNorm(self.head_dim, cfg.rms_norm_eps, dtype)
        self.attn = Attention(self.num_heads, self.num_kv_heads, self.head_dim, cfg.query_pre_attn_scalar ** -0.5,
                              layer_sliding_window(cfg, layer_idx), getattr(cfg, "attn_logit_softcapping", None))

    forward = LlamaAttention.forward
    attend = LlamaAttention.attend


class GemmaMLP(nn.Module):
    def __init__(self, cfg, tp: TPGroup, dtype: torch.dtype):
        super().__init__()
        if cfg.hidden_activation != "gelu_pytorch_tanh":
            raise ValueError(f"Gemma with hidden_activation {cfg.hidden_activation!r} is not supported")
        self.gate_up_proj = ColumnParallelLinear(
            cfg.hidden_size, [("gate", cfg.intermediate_size), ("up", cfg.intermediate_size)], False, tp, dtype)
        self.down_proj = RowParallelLinear(cfg.intermediate_size, cfg.hidden_size, False, tp, dtype)
        self.act = GeluTanhAndMul()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_up_proj(x), fp8_rows=takes_fp8_rows(self.down_proj)))


class GemmaDecoderLayer(nn.Module):
    def __init__(self, cfg, arch: str, tp: TPGroup, dtype: torch.dtype, max_len: int, layer_idx: int = 0):
        super().__init__()
        self.self_attn = GemmaAttention(cfg, arch, tp, dtype, max_len, layer_idx)
        self.mlp = GemmaMLP(cfg, tp, dtype)
        norm = lambda: GemmaRMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)  # noqa: E731
        self.input_layernorm, self.post_attention_layernorm = norm(), norm()
        self.pre_feedforward_layernorm, self.post_feedforward_layernorm = norm(), norm()

    def decode_one(self, positions, h, meta, sites=(None, None)):
        """One token through a one-GPU model on the Triton path (GemmaForCausalLM.takes_decode_one), `h` the
        residual stream. Each pre-norm runs inside the matrix-vector kernel after it, GeGLU inside the gate/up one,
        and each post-norm with the residual add after it is one kernel: six kernels a layer besides rotary and
        attention's, against nine. `sites` is unused: no tensor parallelism here."""
        attn, mlp, ln, pre_ff = self.self_attn, self.mlp, self.input_layernorm, self.pre_feedforward_layernorm
        qkv = gemv(h, bias=attn.qkv_proj.bias, norm=(ln.weight, ln.eps), **gemv_weights(attn.qkv_proj))
        h = self.post_attention_layernorm.add_to(
            gemv(attn.attend(positions, qkv, meta), bias=attn.o_proj.bias, **gemv_weights(attn.o_proj)), h)
        act = gemv(h, gated=True, gelu_tanh=True, norm=(pre_ff.weight, pre_ff.eps), **gemv_weights(mlp.gate_up_proj))
        return self.post_feedforward_layernorm.add_to(gemv(act, **gemv_weights(mlp.down_proj)), h)

    def forward(self, positions, x, residual, meta: AttentionMetadata):
        """The residual stream is added by the next pre-norm (fused), as in the Llama layer; post-norms apply to
        the attention and MLP outputs before that add."""
        if residual is None:
            residual, x = x, self.input_layernorm(x)
        else:
            x, residual = self.input_layernorm(x, residual)
        x = self.post_attention_layernorm(self.self_attn(positions, x, meta))
        x, residual = self.pre_feedforward_layernorm(x, residual)
        return self.post_feedforward_layernorm(self.mlp(x)), residual


class GemmaForCausalLM(LlamaForCausalLM):
    """Gemma2ForCausalLM and Gemma3ForCausalLM (the text model; checkpoint names as Llama's)."""

    decoder_layer = GemmaDecoderLayer

    def __init__(self, cfg, arch: str, dtype: torch.dtype, max_len: int, tp: TPGroup | None = None,
                 layer_range: tuple[int, int] | None = None):
        super().__init__(cfg, arch, dtype, max_len, tp, layer_range)
        if self.norm is not None:
            self.norm = GemmaRMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        self.final_softcap = getattr(cfg, "final_logit_softcapping", None)
        # sqrt(hidden) rounded to the model's dtype first, as Gemma does
        self.embed_scale = torch.tensor(cfg.hidden_size ** 0.5, dtype=dtype).item()

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens(input_ids) * self.embed_scale

    def takes_decode_one(self, hidden: torch.Tensor) -> bool:
        """As Llama's, on one GPU: a post-norm needs its projection's whole sum, which under tensor parallelism
        is only there after the all-reduce."""
        return (self.tp.size == 1 and self.is_first and self.is_last and self.gemv_weights_everywhere
                and takes_gemv(self.lm_head, hidden))

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.lm_head(hidden)
        if self.final_softcap:
            logits = torch.tanh(logits / self.final_softcap) * self.final_softcap
        return logits
