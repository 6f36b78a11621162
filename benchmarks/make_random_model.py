"""Write a random-weight checkpoint of a real model's shape (safetensors + a word-level tokenizer over its whole
vocabulary), for benchmarks. With --format, each shard's linear weights are quantized (quantize_checkpoint.py's
formats) before it is written, so a model whose 16-bit copy would not fit on the disk (Llama-3-70B's 141 GB) is
written at its quantized size only.

    python benchmarks/make_random_model.py --shape llama3-8b --out /tmp/llama3-8b-random
    python benchmarks/make_random_model.py --shape llama3-70b --format fp8-dynamic --out /root/llama3-70b-fp8
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import sys

import torch
from safetensors.torch import save_file
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.quantize_checkpoint import FORMATS, is_linear_weight, quantization_config, quantize_linear  # noqa: E402

SHAPES = {
    "llama3-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=8, vocab_size=128256, rope_theta=500000.0, max_position_embeddings=8192),
    "llama3-70b": dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                       num_key_value_heads=8, vocab_size=128256, rope_theta=500000.0, max_position_embeddings=8192),
    "smollm2-135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3, vocab_size=49152, rope_theta=100000.0, max_position_embeddings=8192),
    "tiny": dict(hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=8,
                 num_key_value_heads=2, vocab_size=10240, rope_theta=10000.0, max_position_embeddings=4096),
    "gemma2-9b": dict(family="gemma2", hidden_size=3584, intermediate_size=14336, num_hidden_layers=42,
                      num_attention_heads=16, num_key_value_heads=8, head_dim=256, vocab_size=256000,
                      rope_theta=10000.0, max_position_embeddings=8192),
    # Mixture of experts (Qwen3-MoE: per-head q/k norm, every layer sparse): about 61 GB in bf16
    "qwen3-30b-a3b": dict(family="qwen3_moe", hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768,
                          num_experts=128, num_experts_per_tok=8, norm_topk_prob=True, num_hidden_layers=48,
                          num_attention_heads=32, num_key_value_heads=4, head_dim=128, vocab_size=151936,
                          rope_theta=1000000.0, max_position_embeddings=40960),
    "tiny-moe": dict(family="qwen3_moe", hidden_size=256, intermediate_size=512, moe_intermediate_size=128,
                     num_experts=8, num_experts_per_tok=2, norm_topk_prob=True, num_hidden_layers=4,
                     num_attention_heads=8, num_key_value_heads=2, head_dim=32, vocab_size=10240,
                     rope_theta=10000.0, max_position_embeddings=4096),
}

# Per family: its config fields, the norms each layer has besides Llama's two, and the stored norm weight (Gemma
# stores w for a scale of 1 + w).
FAMILIES = {
    "llama": dict(config=dict(architectures=["LlamaForCausalLM"], model_type="llama", rms_norm_eps=1e-5,
                              hidden_act="silu", tie_word_embeddings=False),
                  extra_norms=(), norm_weight=1.0),
    "gemma2": dict(config=dict(architectures=["Gemma2ForCausalLM"], model_type="gemma2", rms_norm_eps=1e-6,
                               hidden_activation="gelu_pytorch_tanh", tie_word_embeddings=True,
                               query_pre_attn_scalar=256, sliding_window=4096, attn_logit_softcapping=50.0,
                               final_logit_softcapping=30.0),
                   extra_norms=("pre_feedforward_layernorm", "post_feedforward_layernorm"), norm_weight=0.0),
    "qwen3_moe": dict(config=dict(architectures=["Qwen3MoeForCausalLM"], model_type="qwen3_moe", rms_norm_eps=1e-6,
                                  hidden_act="silu", tie_word_embeddings=False),
                      extra_norms=(), norm_weight=1.0),
}


def tensors_of_layer(i: int, s: dict, extra_norms: tuple[str, ...] = ()) -> dict[str, tuple[int, ...]]:
    h, inter = s["hidden_size"], s["intermediate_size"]
    hd = s.get("head_dim") or h // s["num_attention_heads"]
    q, kv = s["num_attention_heads"] * hd, s["num_key_value_heads"] * hd
    p = f"model.layers.{i}."
    tensors = {p + "self_attn.q_proj.weight": (q, h), p + "self_attn.k_proj.weight": (kv, h),
               p + "self_attn.v_proj.weight": (kv, h), p + "self_attn.o_proj.weight": (h, q),
               p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,),
               **{p + f"{n}.weight": (h,) for n in extra_norms}}
    if "num_experts" in s:  # Qwen3-MoE: per-head q/k norm, a router and the experts on every layer
        tensors |= {p + "self_attn.q_norm.weight": (hd,), p + "self_attn.k_norm.weight": (hd,),
                    p + "mlp.gate.weight": (s["num_experts"], h)}
        inter = s["moe_intermediate_size"]
        for e in range(s["num_experts"]):
            tensors |= {f"{p}mlp.experts.{e}.gate_proj.weight": (inter, h),
                        f"{p}mlp.experts.{e}.up_proj.weight": (inter, h),
                        f"{p}mlp.experts.{e}.down_proj.weight": (h, inter)}
        return tensors
    return tensors | {p + "mlp.gate_proj.weight": (inter, h), p + "mlp.up_proj.weight": (inter, h),
                      p + "mlp.down_proj.weight": (h, inter)}


def make(shape: str, out: Path, dtype=torch.bfloat16, device: str = "cuda" if torch.cuda.is_available() else "cpu",
         layers: int | None = None, tokenizer: Path | None = None, fmt: str | None = None, group: int = 128):
    s = dict(SHAPES[shape], **({"num_hidden_layers": layers} if layers else {}))
    if tokenizer is not None:  # a real tokenizer (structured outputs need tokens such as `{`): its vocabulary size
        from transformers import AutoTokenizer

        real = AutoTokenizer.from_pretrained(tokenizer)
        s["vocab_size"] = len(real)
    family = FAMILIES[s.pop("family", "llama")]
    out.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator(device=device).manual_seed(0)
    weight_map, shards = {}, []
    groups = [{"model.embed_tokens.weight": (s["vocab_size"], s["hidden_size"])}]
    groups += [tensors_of_layer(i, s, family["extra_norms"]) for i in range(s["num_hidden_layers"])]
    groups += [{"model.norm.weight": (s["hidden_size"],)}]
    if not family["config"]["tie_word_embeddings"]:
        groups[-1]["lm_head.weight"] = (s["vocab_size"], s["hidden_size"])
    for n, shard in enumerate(tqdm(groups, desc=f"Writing {shape}", unit="shard")):
        name = f"model-{n:05d}-of-{len(groups):05d}.safetensors"
        tensors = {}
        for key, shp in shard.items():
            if len(shp) == 1:
                tensors[key] = torch.full(shp, family["norm_weight"], dtype=dtype)
            else:  # scaled so activations stay O(1) through the layers
                t = torch.randn(shp, generator=gen, device=device, dtype=torch.float32) * (shp[1] ** -0.5)
                if fmt and is_linear_weight(key):
                    tensors.update({k: v.cpu() for k, v in quantize_linear(fmt, key, t.to(dtype), group)[0].items()})
                    continue
                tensors[key] = t.to(dtype).cpu()
        weight_map.update(dict.fromkeys(tensors, name))
        save_file(tensors, str(out / name), metadata={"format": "pt"})
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    config = dict(**family["config"], torch_dtype="bfloat16", bos_token_id=0, eos_token_id=0, **s)
    if fmt:
        config["quantization_config"] = quantization_config(fmt, group)
    (out / "config.json").write_text(json.dumps(config, indent=2))
    if tokenizer is not None:
        real.save_pretrained(out)
    else:
        write_tokenizer(out, s["vocab_size"])
    return out


def write_tokenizer(out: Path, vocab_size: int) -> None:
    """A word-level tokenizer over the whole vocabulary, so that every sampled id decodes to text (" w123"), as a
    real model's tokens mostly do: streamed outputs then carry text at every token (a tokenizer covering only
    the first ids would leave most chunks of a random model's output empty, and an HTTP stream with them), and
    detokenizing costs about what it costs for a real model. Id 0 is the end-of-text token (bos and eos)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<|endoftext|>": 0, **{f"w{i}": i for i in range(1, vocab_size)}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<|endoftext|>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>",
                            pad_token="<|endoftext|>").save_pretrained(out)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=list(SHAPES), default="llama3-8b")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--layers", type=int, help="fewer decoder layers than the shape's (qwen3-30b-a3b's 48 take 61 GB)")
    ap.add_argument("--tokenizer", type=Path, help="a real tokenizer's directory instead of the word-level one; the "
                                                   "vocabulary takes its size")
    ap.add_argument("--format", choices=FORMATS, help="quantize the linear weights as quantize_checkpoint.py does")
    ap.add_argument("--group", type=int, default=128, help="input features to a scale (INT4 formats)")
    args = ap.parse_args()
    print(make(args.shape, args.out, layers=args.layers, tokenizer=args.tokenizer, fmt=args.format, group=args.group))
