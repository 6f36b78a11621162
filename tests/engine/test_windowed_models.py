"""Sliding windows and soft-caps through the scheduler: chunked prefill over cached context, prefix-cache hits and
preemption still give transformers' greedy tokens and prompt logprobs. Gemma 2 alternates windowed and global
layers and soft-caps; Phi-3 slides in every layer and loads fused qkv/gate_up tensors."""
import json
import shutil

import pytest
import torch
import transformers

from engine import LLM, SamplingParams
from tests.support.prompts import random_prompts

PROMPTS = random_prompts(seed=3, lens=(7, 40, 61, 23))
PARAMS = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, prompt_logprobs=0)


def transformers_outputs(path, prompts=PROMPTS):
    """Per prompt: greedy tokens and each prompt token's logprob (from the second on)."""
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    outs = []
    with torch.no_grad():
        for prompt in prompts:
            gen = hf.generate(torch.tensor([prompt]), max_new_tokens=PARAMS.max_tokens, do_sample=False,
                              eos_token_id=None, pad_token_id=0)[0, len(prompt):].tolist()
            logprobs = torch.log_softmax(hf(torch.tensor([prompt])).logits[0].float(), -1)
            outs.append((gen, [logprobs[i - 1, prompt[i]].item() for i in range(1, len(prompt))]))
    return outs


def assert_matches(outs, expected):
    for out, (tokens, prompt_logprobs) in zip(outs, expected, strict=True):
        assert out.outputs[0].token_ids == tokens
        ours = [lp[tok] for lp, tok in zip(out.prompt_logprobs[1:], out.prompt_token_ids[1:])]
        assert ours == pytest.approx(prompt_logprobs, abs=2e-4)


@pytest.mark.parametrize("kind", ["gemma2", "phi3"])
def test_chunked_prefill_prefix_hits_and_preemption_keep_transformers_outputs(kind, tiny_model_dir):
    path = tiny_model_dir(kind)
    expected = transformers_outputs(path)
    chunked = LLM(str(path), max_num_batched_tokens=16, block_size=16)  # prompts over 16 tokens come in chunks
    assert_matches(chunked.generate(PROMPTS, PARAMS, use_tqdm=False), expected)
    # Again without prompt logprobs (which compute every prompt position), so over cached prefix blocks.
    again = chunked.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True), use_tqdm=False)
    assert [o.outputs[0].token_ids for o in again] == [tokens for tokens, _ in expected]
    assert chunked.stats().prefix_cache_hits > 0
    tiny = LLM(str(path), num_kv_blocks=7, block_size=16)  # 112 tokens for ~180 needed
    assert_matches(tiny.generate(PROMPTS, PARAMS, use_tqdm=False), expected)
    assert tiny.stats().preemptions > 0


def test_phi3_longrope_short_factors_within_the_original_context(tiny_model_dir, tmp_path):
    """A max_model_len within original_max_position_embeddings rotates by the short factors, as transformers does
    for sequences that never pass it."""
    path = tmp_path / "phi3-short"
    shutil.copytree(tiny_model_dir("phi3"), path)
    config = json.loads((path / "config.json").read_text())
    config["original_max_position_embeddings"] = 128
    config["rope_parameters"]["original_max_position_embeddings"] = 128
    (path / "config.json").write_text(json.dumps(config))
    llm = LLM(str(path), max_model_len=128)
    assert_matches(llm.generate(PROMPTS, PARAMS, use_tqdm=False), transformers_outputs(path))
    long = LLM(str(path))  # max_model_len 512: the long factors, which transformers takes past 128 tokens only
    assert long.generate(PROMPTS[:1], PARAMS, use_tqdm=False)[0].prompt_logprobs[1:] != \
        llm.generate(PROMPTS[:1], PARAMS, use_tqdm=False)[0].prompt_logprobs[1:]


def test_the_profiling_step_leaves_triton_attention_out():
    """Before the KV cache exists (ModelRunner.profile's step) the Triton path's attention is an output buffer
    only: the torch path's soft-capped scores, whole fp32 matrices, would be counted in the step's peak and taken
    from the KV cache (about 8 GiB for Gemma-2-9B at 8,192 tokens), which the Triton kernels never need."""
    from engine.layers.attention import Attention

    attn = Attention(4, 2, 16, 0.25, sliding_window=8, softcap=5.0)
    attn.use_triton = True
    q, k, v = torch.randn(300, 4, 16), torch.randn(300, 2, 16), torch.randn(300, 2, 16)
    out = attn(q, k, v, None)
    assert out.shape == q.shape and not out.any()
    attn.use_triton = False  # the torch path computes it (the CPU product, and the oracle)
    assert attn(q, k, v, _fresh_prompt_metadata(300)).abs().sum() > 0


def _fresh_prompt_metadata(n: int):
    from engine.layers.attention import AttentionMetadata

    return AttentionMetadata(slot_mapping=torch.arange(n), query_start_loc=torch.tensor([0, n], dtype=torch.int32),
                             seq_lens=torch.tensor([n], dtype=torch.int32),
                             block_tables=torch.zeros(1, 0, dtype=torch.int32), max_query_len=n, max_seq_len=n,
                             query_lens_cpu=[n], seq_lens_cpu=[n])
