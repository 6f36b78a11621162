"""The Llama family (Llama, Mistral, Qwen2 with qkv bias, Qwen3 with q/k norm) as one module tree."""
from __future__ import annotations

import torch
from torch import nn

from engine.kernels import gemv
from engine.kernels.reduce_site import ReduceSite
from engine.layers.activation import SiluAndMul
from engine.layers.attention import Attention, AttentionMetadata, layer_sliding_window
from engine.layers.linear import (ColumnParallelLinear, ParallelLMHead, QKVParallelLinear, RowParallelLinear,
                                  VocabParallelEmbedding, gemv_weights, quant_method, takes_fp8_rows,
                                  takes_gemv)
from engine.layers.norm import RMSNorm
from engine.layers.rotary import RotaryEmbedding
from engine.parallel_state import TPGroup


class LlamaAttention(nn.Module):
    def __init__(self, cfg, arch: str, tp: TPGroup, dtype: torch.dtype, max_len: int,
                 sliding_window: int | None = None):
        super().__init__()
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.num_heads = cfg.num_attention_heads // tp.size
        self.qkv_proj = QKVParallelLinear(cfg.hidden_size, self.head_dim, cfg.num_attention_heads,
                                          cfg.num_key_value_heads, _qkv_bias(cfg, arch), tp, dtype)
        self.num_kv_heads = self.qkv_proj.shard_sizes["k"] // self.head_dim
        self.o_proj = RowParallelLinear(cfg.num_attention_heads * self.head_dim, cfg.hidden_size,
                                        getattr(cfg, "attention_bias", False), tp, dtype)
        self.rotary = RotaryEmbedding(cfg, self.head_dim, max_len)
        self.qk_norm = arch in QK_NORM_ARCHS
        if self.qk_norm:
            self.q_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps, dtype)
            self.k_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps, dtype)
        self.attn = Attention(self.num_heads, self.num_kv_heads, self.head_dim, self.head_dim ** -0.5, sliding_window)

    def forward(self, positions: torch.Tensor, x: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        return self.o_proj(self.attend(positions, self.qkv_proj(x), meta))

    def attend(self, positions: torch.Tensor, qkv: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """Attention from the projected q/k/v to the heads' outputs [T, heads * head_dim], before o_proj."""
        q, k, v = qkv.split(list(self.qkv_proj.shard_sizes.values()), dim=-1)
        q = q.view(-1, self.num_heads, self.head_dim)
        k = k.view(-1, self.num_kv_heads, self.head_dim)
        v = v.view(-1, self.num_kv_heads, self.head_dim)
        kv_write = self.attn.kv_write(v, meta)  # the rotary kernel stores k/v in the cache on the way
        qk_norm = None
        if self.qk_norm and self.rotary.folds_qk_norm and self.q_norm.eps == self.k_norm.eps:
            qk_norm = (self.q_norm.weight, self.k_norm.weight, self.q_norm.eps)
        elif self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = self.rotary(positions, q, k, kv_write, qk_norm)
        return self.attn(q, k, v, meta, kv_written=kv_write is not None).flatten(1)


QK_NORM_ARCHS = ("Qwen3ForCausalLM", "Qwen3MoeForCausalLM")  # per-head RMSNorm of q and k before rotary


def _qkv_bias(cfg, arch: str) -> bool:
    return arch == "Qwen2ForCausalLM" or bool(getattr(cfg, "attention_bias", False) or getattr(cfg, "qkv_bias", False))


class LlamaMLP(nn.Module):
    def __init__(self, cfg, tp: TPGroup, dtype: torch.dtype, intermediate_size: int | None = None):
        super().__init__()
        bias = bool(getattr(cfg, "mlp_bias", False))
        inter = intermediate_size or cfg.intermediate_size
        self.gate_up_proj = ColumnParallelLinear(cfg.hidden_size, [("gate", inter), ("up", inter)], bias, tp, dtype)
        self.down_proj = RowParallelLinear(inter, cfg.hidden_size, bias, tp, dtype)
        self.act = SiluAndMul()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if takes_gemv(self.gate_up_proj, x):  # SiLU-and-mul folded into the matrix-vector kernel
            return self.down_proj(gemv(x, bias=self.gate_up_proj.bias, gated=True, **gemv_weights(self.gate_up_proj)))
        return self.down_proj(self.act(self.gate_up_proj(x), fp8_rows=takes_fp8_rows(self.down_proj)))


class LlamaDecoderLayer(nn.Module):
    """`self_attn` and `mlp` default to Llama's; other families pass their own (an MoE block, another attention)."""

    def __init__(self, cfg, arch: str, tp: TPGroup, dtype: torch.dtype, max_len: int, layer_idx: int = 0,
                 self_attn: nn.Module | None = None, mlp: nn.Module | None = None):
        super().__init__()
        self.self_attn = self_attn or LlamaAttention(cfg, arch, tp, dtype, max_len,
                                                     layer_sliding_window(cfg, layer_idx))
        self.mlp = mlp or LlamaMLP(cfg, tp, dtype)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)

    def forward(self, positions, x, residual, meta):
        # Each norm hands FP8 rows to a Llama attention or MLP whose first projection would quantize them anyway.
        attn_fp8 = type(self.self_attn) is LlamaAttention and takes_fp8_rows(self.self_attn.qkv_proj)
        mlp_fp8 = type(self.mlp) is LlamaMLP and takes_fp8_rows(self.mlp.gate_up_proj)
        if residual is None:
            residual, x = x, self.input_layernorm(x, fp8_rows=attn_fp8)
        else:
            x, residual = self.input_layernorm(x, residual, fp8_rows=attn_fp8)
        x = self.self_attn(positions, x, meta)
        x, residual = self.post_attention_layernorm(x, residual, fp8_rows=mlp_fp8)
        return self.mlp(x), residual

    def decode_one(self, positions, h, meta, sites=(None, None)):
        """One token through a single-stage model on the Triton path (LlamaForCausalLM.takes_decode_one): `h` is
        the residual stream. Each RMSNorm runs inside the matrix-vector kernel after it and each residual add
        inside the one before it, so a layer is four of those, rotary, attention and, under tensor parallelism,
        the two all-reduces: no norm or add kernels. A sparse MoE block instead takes its norm as a kernel and adds
        its experts' sum to `h` in its last kernel. `sites`: the ReduceSites the o and down projections
        all-reduce through inside their kernels (None: a separate all-reduce); `h` may be the previous one."""
        attn, mlp, ln, post_ln = self.self_attn, self.mlp, self.input_layernorm, self.post_attention_layernorm
        qkv = gemv(h, bias=attn.qkv_proj.bias, norm=(ln.weight, ln.eps), **gemv_weights(attn.qkv_proj))
        h = _add_projection(attn.o_proj, attn.attend(positions, qkv, meta), h, sites[0])
        if type(mlp) is not LlamaMLP:  # a sparse MoE block (one GPU): its norm, then it adds itself to h
            return mlp.add_to(post_ln(h), h)
        act = gemv(h, bias=mlp.gate_up_proj.bias, gated=True, norm=(post_ln.weight, post_ln.eps),
                   **gemv_weights(mlp.gate_up_proj))
        return _add_projection(mlp.down_proj, act, h, sites[1])


def _add_projection(proj: RowParallelLinear, x: torch.Tensor, h, site: ReduceSite | None):
    """h + proj(x). Tensor-parallel rank 0 adds h to its partial product and the all-reduce sums that with the
    other ranks': pushed to `site` from the kernel, or written straight into the all-reduce's buffer where it has
    one; on one GPU, h in place."""
    first = proj.tp.rank == 0
    bias, residual = (proj.bias, h) if first else (None, None)
    if site is not None:
        return gemv(x, bias=bias, residual=residual, push=site, **gemv_weights(proj))
    weights = gemv_weights(proj)
    part = gemv(x, bias=bias, residual=residual, out=proj.tp.staging((1, weights["weight"].shape[0]), x.dtype),
                **weights)
    return proj.tp.all_reduce(part)


class LlamaForCausalLM(nn.Module):
    """`layer_range` holds this pipeline stage's layers; the first stage embeds, the last computes logits.
    Families with other decoder layers (Gemma) subclass it with their own `decoder_layer`."""

    decoder_layer = LlamaDecoderLayer

    # checkpoint name fragment -> (our parameter fragment, shard id)
    packed = {"q_proj": ("qkv_proj", "q"), "k_proj": ("qkv_proj", "k"), "v_proj": ("qkv_proj", "v"),
              "gate_proj": ("gate_up_proj", "gate"), "up_proj": ("gate_up_proj", "up")}

    def __init__(self, cfg, arch: str, dtype: torch.dtype, max_len: int, tp: TPGroup | None = None,
                 layer_range: tuple[int, int] | None = None):
        super().__init__()
        tp = tp or TPGroup()
        self.tp = tp
        self.cfg = cfg
        self.layer_range = layer_range or (0, cfg.num_hidden_layers)
        self.is_first = self.layer_range[0] == 0
        self.is_last = self.layer_range[1] == cfg.num_hidden_layers
        self.embed_tokens = VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size, tp, dtype) if self.is_first else None
        self.layers = nn.ModuleDict({str(i): self.make_layer(i, cfg, arch, tp, dtype, max_len)
                                     for i in range(*self.layer_range)})
        # decode_one fuses Llama's own attention and MLP, or on one GPU a sparse MoE block that adds itself to the
        # residual (add_to); other layers take the unfused path
        self.llama_layers = all(type(layer.self_attn) is LlamaAttention and (
            type(layer.mlp) is LlamaMLP or (tp.size == 1 and hasattr(layer.mlp, "add_to")))
            for layer in self.layers.values())
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype) if self.is_last else None
        self.lm_head = None
        if self.is_last:
            self.lm_head = ParallelLMHead(cfg.vocab_size, cfg.hidden_size, tp, dtype)
            if cfg.tie_word_embeddings and self.embed_tokens is not None:
                self.lm_head.weight = self.embed_tokens.weight
        # decode_one passes each layer's weights to the matrix-vector kernel: plain, FP8 per channel or INT4 along K
        self.gemv_weights_everywhere = all(quant_method(m) is None or gemv_weights(m) is not None
                                           for m in self.modules())

    def make_layer(self, index: int, cfg, arch: str, tp: TPGroup, dtype: torch.dtype, max_len: int) -> nn.Module:
        """Decoder layer `index`: the family's `decoder_layer`; a family whose layers differ (MoE blocks) overrides
        this."""
        return self.decoder_layer(cfg, arch, tp, dtype, max_len, index)

    def forward(self, input_ids: torch.Tensor | None, positions: torch.Tensor, meta: AttentionMetadata,
                hidden: torch.Tensor | None = None, residual: torch.Tensor | None = None):
        """Returns (hidden, residual); on the last stage `hidden` is already normed, ready for `logits`."""
        if self.is_first:
            hidden = self.embed(input_ids)
        if self.takes_decode_one(hidden):
            sites = self.tp.reduce_sites + [None]  # the norm reads the last down projection's all-reduce
            for i, layer in enumerate(self.layers.values()):
                hidden = layer.decode_one(positions, hidden, meta, sites[2 * i: 2 * i + 2] if sites[0] else (None,) * 2)
            return self.norm(hidden), None
        for layer in self.layers.values():
            hidden, residual = layer(positions, hidden, residual, meta)
        if self.is_last:
            hidden, _ = self.norm(hidden, residual)
        return hidden, residual

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens(input_ids)

    def takes_decode_one(self, hidden: torch.Tensor) -> bool:
        """A single token through a single-stage model (any tensor parallelism) on the Triton path: the layers'
        fused batch-1 form."""
        return (self.is_first and self.is_last and self.llama_layers and self.gemv_weights_everywhere
                and takes_gemv(self.lm_head, hidden))

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden)

    def attention_layers(self) -> list[Attention]:
        return [layer.self_attn.attn for layer in self.layers.values()]

    def param_for(self, ckpt_name: str) -> tuple[nn.Module, nn.Parameter, str | None] | None:
        """Map a checkpoint tensor name to (owning module, parameter, shard id); None if not on this shard."""
        name = ckpt_name.removeprefix("model.")
        if name == "embed_tokens.weight" and self.embed_tokens is None and self.lm_head is not None and \
                self.cfg.tie_word_embeddings:
            return self.lm_head, self.lm_head.weight, None  # a last pipeline stage without the embedding
        if name.startswith("layers."):
            idx = name.split(".")[1]
            if idx not in self.layers:
                return None
        shard = None
        for frag, (ours, shard_id) in self.packed.items():
            if f".{frag}." in name:
                name, shard = name.replace(frag, ours), shard_id
                break
        if name == "lm_head.weight" and self.lm_head is not None and self.lm_head.weight is getattr(
                self.embed_tokens, "weight", None):
            return None  # tied: the embedding already loaded it
        module_path, _, param_name = name.rpartition(".")
        try:
            module = self.get_submodule(module_path)
        except AttributeError:
            return None
        if module is None or not hasattr(module, param_name):
            return None
        param = getattr(module, param_name)
        return (module, param, shard) if isinstance(param, nn.Parameter) else None
