"""Mixture-of-experts models beyond plain parity (test_model_parity covers each family against transformers):
scheduling that must not change their tokens, checkpoints with a missing or mis-shaped expert, and tensor,
expert and pipeline parallelism are in test_parallel.py."""
import shutil

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from engine import LLM, SamplingParams
from engine.models.loader import load_hf_config, load_model
from tests.support.prompts import random_prompts

GREEDY = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)


def hf_greedy(path, prompts, max_new_tokens):
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return [hf.generate(torch.tensor([p]), max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=None,
                        pad_token_id=0)[0, len(p):].tolist() for p in prompts]


def test_chunked_prefill_preemption_and_prefix_hits_keep_transformers_tokens(tiny_model_dir):
    """16-token steps, a KV cache of 7 blocks for three sequences of ~5 blocks each, and a shared system prompt
    served from the cache: the tokens are still transformers' own (Qwen2-MoE: a shared expert, a dense layer)."""
    system = random_prompts(seed=3, lens=(40,))[0]
    prompts = [system + tail for tail in random_prompts(seed=4, lens=(3, 9, 20))]
    path = tiny_model_dir("qwen2_moe")
    llm = LLM(str(path), max_num_batched_tokens=16, num_kv_blocks=7, block_size=16)
    outs = llm.generate(prompts[:1], GREEDY, use_tqdm=False) + llm.generate(prompts[1:], GREEDY, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == hf_greedy(path, prompts, GREEDY.max_tokens)
    stats = llm.stats()
    assert stats.preemptions > 0 and stats.prefix_cache_hits > 0
    assert stats.steps >= sum(map(len, prompts)) // 16


@pytest.fixture
def qwen3_moe_copy(tiny_model_dir, tmp_path):
    path = tmp_path / "qwen3_moe"
    shutil.copytree(tiny_model_dir("qwen3_moe"), path)
    return path


def rewrite_weights(path, edit):
    tensors = load_file(str(path / "model.safetensors"))
    edit(tensors)
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})


def load(path):
    return load_model(path, load_hf_config(path), torch.float32, torch.device("cpu"), 64, progress=False)


def test_a_missing_expert_tensor_fails_at_load_naming_it(qwen3_moe_copy):
    rewrite_weights(qwen3_moe_copy, lambda t: t.pop("model.layers.2.mlp.experts.4.up_proj.weight"))
    with pytest.raises(ValueError, match=r"missing 1 tensors.*layers\.2\.mlp\.experts\.4\.up_proj \(w3\) of shape "
                                         r"\[32, 64\]"):
        load(qwen3_moe_copy)


def test_a_misshaped_expert_tensor_fails_at_load_naming_it_and_the_shape_expected(qwen3_moe_copy):
    name = "model.layers.0.mlp.experts.1.down_proj.weight"
    rewrite_weights(qwen3_moe_copy, lambda t: t.update({name: t[name][:, :31].contiguous()}))
    with pytest.raises(ValueError, match=rf"{name}: expert 1's w2 has shape \[64, 31\], expected \[64, 32\]"):
        load(qwen3_moe_copy)


def test_a_sharded_checkpoint_loads_every_expert(tiny_model_dir, tmp_path):
    """Saved over several safetensors files, the experts of one layer split between them."""
    src = tiny_model_dir("qwen3_moe")
    transformers.AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).save_pretrained(
        tmp_path, safe_serialization=True, max_shard_size="20KB")
    assert len(list(tmp_path.glob("*.safetensors"))) > 3
    model = load(tmp_path)
    ref = load_file(str(src / "model.safetensors"))
    experts = model.layers["2"].mlp.experts
    assert torch.equal(experts.w13_weight[4, 32:], ref["model.layers.2.mlp.experts.4.up_proj.weight"])
    assert torch.equal(experts.w2_weight[1], ref["model.layers.2.mlp.experts.1.down_proj.weight"])
    assert not hasattr(model.layers["1"].mlp, "experts")  # mlp_only_layers=[1] stays dense
