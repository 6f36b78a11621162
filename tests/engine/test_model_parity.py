"""Our engine against transformers on the same weights: greedy tokens and prompt logprobs."""
import pytest
import torch
import transformers

from engine import LLM, SamplingParams
from tests.support.checkpoints import CONFIGS
from tests.support.prompts import random_prompts


def hf_greedy(model, prompt, max_new_tokens):
    out = model.generate(torch.tensor([prompt]), max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=None,
                         pad_token_id=0)
    return out[0, len(prompt):].tolist()


@pytest.mark.parametrize("kind", list(CONFIGS))
def test_greedy_tokens_and_prompt_logprobs_match_transformers(kind, tiny_model_dir):
    path = tiny_model_dir(kind)
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    llm = LLM(str(path), max_num_seqs=8)
    prompts = random_prompts()
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=16, ignore_eos=True, prompt_logprobs=0,
                                                logprobs=2), use_tqdm=False)
    for prompt, out in zip(prompts, outs, strict=True):
        assert out.prompt_token_ids == prompt
        assert out.outputs[0].token_ids == hf_greedy(hf, prompt, 16)
        assert out.outputs[0].finish_reason == "length"
        with torch.no_grad():
            ref = torch.log_softmax(hf(torch.tensor([prompt])).logits[0].float(), -1)
        assert out.prompt_logprobs[0] is None
        for pos in range(1, len(prompt)):
            ours = out.prompt_logprobs[pos][prompt[pos]]
            assert ours == pytest.approx(ref[pos - 1, prompt[pos]].item(), abs=2e-4)
        # Sampled-token logprobs come with the top 2; the greedy token is the most likely one.
        first = out.outputs[0].logprobs[0]
        assert max(first, key=first.get) == out.outputs[0].token_ids[0]
        assert first[out.outputs[0].token_ids[0]] == pytest.approx(ref_next_logprob(hf, prompt, out), abs=2e-4)


def ref_next_logprob(hf, prompt, out):
    with torch.no_grad():
        logits = hf(torch.tensor([prompt])).logits[0, -1].float()
    return torch.log_softmax(logits, -1)[out.outputs[0].token_ids[0]].item()


def test_sharded_checkpoint_and_dtype_override(tiny_model_dir, tmp_path):
    """A checkpoint split over several safetensors files (model.safetensors.index.json) loads like one file."""
    src = tiny_model_dir("llama")
    hf = transformers.AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    hf.save_pretrained(tmp_path, safe_serialization=True, max_shard_size="100KB")
    transformers.AutoTokenizer.from_pretrained(src).save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors.index.json").exists() and len(list(tmp_path.glob("*.safetensors"))) > 1
    prompts = random_prompts(lens=(9, 30))
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    expected = [o.outputs[0].token_ids for o in LLM(str(src)).generate(prompts, params, use_tqdm=False)]
    sharded = LLM(str(tmp_path))
    assert [o.outputs[0].token_ids for o in sharded.generate(prompts, params, use_tqdm=False)] == expected
    half = LLM(str(tmp_path), dtype="bfloat16")
    assert half.engine.setup.dtype == torch.bfloat16
    assert all(len(o.outputs[0].token_ids) == 8 for o in half.generate(prompts, params, use_tqdm=False))


def test_one_process_engine_records_a_profile(tiny_model_dir, tmp_path):
    """LLM.start_profile/stop_profile without workers: one trace, of this process, holding the step's torch ops."""
    import json
    import os

    llm = LLM(str(tiny_model_dir("llama")))
    llm.start_profile(str(tmp_path / "traces"))
    llm.generate(random_prompts(lens=(9,)), SamplingParams(max_tokens=4, ignore_eos=True), use_tqdm=False)
    (trace,) = llm.stop_profile()
    assert trace.startswith(str(tmp_path / "traces")) and f"pid{os.getpid()}" in trace
    assert any(e.get("name", "").startswith("aten::") for e in json.load(open(trace))["traceEvents"])
