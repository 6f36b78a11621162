"""On one CUDA GPU: the Triton path with CUDA graphs (the batch-1 matmul kernel with SiLU folded in, the rotary
kernel writing the KV cache, the greedy kernel) gives the torch reference path's greedy tokens and logprobs.
Skipped without CUDA; run on the device tool (the CPU suite checks the same kernels under TRITON_INTERPRET=1)."""
import pytest
import torch

from engine import LLM, SamplingParams
from tests.support.prompts import random_prompts

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

GREEDY = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
WITH_LOGPROBS = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True, logprobs=3)


@pytest.mark.parametrize("kind", ["llama", "qwen2", "qwen3"])  # GQA + llama3 rope; qkv bias; q/k norm
def test_triton_with_graphs_matches_torch_path(tiny_model_dir, kind):
    path = str(tiny_model_dir(kind))
    prompts = random_prompts(seed=7, lens=(5, 33, 130, 17))
    outs = {}
    for backend in ("torch", "triton"):
        llm = LLM(path, dtype="float32", device="cuda", attention_backend=backend, enforce_eager=backend == "torch")
        try:
            assert llm.engine.executor.describe()["cuda_graphs"] == (backend == "triton")
            single = llm.generate(prompts[:1], GREEDY, use_tqdm=False)  # batch-1 decode: gemv, greedy kernel
            batch = llm.generate(prompts, WITH_LOGPROBS, use_tqdm=False)
        finally:
            llm.shutdown()
        outs[backend] = single + batch
    for ref, got in zip(outs["torch"], outs["triton"], strict=True):
        assert got.outputs[0].token_ids == ref.outputs[0].token_ids
        for mine, theirs in zip(got.outputs[0].logprobs or [], ref.outputs[0].logprobs or []):
            assert list(mine.values()) == pytest.approx(list(theirs.values()), abs=1e-3)


def test_decode_graph_logits_survive_a_later_launch(tiny_model_dir):
    """Async scheduling launches step n+1 before a constrained row of step n is sampled (its bitmask waits for the
    grammar): the logits that the decode graph computed must not be those its next replay rewrote. Greedy JSON under
    async scheduling gives the tokens of synchronous steps, and valid JSON."""
    import json

    from engine import StructuredOutputsParams

    path = str(tiny_model_dir("llama"))
    params = SamplingParams(temperature=0, max_tokens=64, structured_outputs=StructuredOutputsParams(json_object=True))
    prompts = random_prompts(seed=9, lens=(6, 21, 40))
    outs = {}
    for async_scheduling in (False, True):
        llm = LLM(path, dtype="float32", device="cuda", async_scheduling=async_scheduling)
        try:
            assert llm.engine.executor.describe()["cuda_graphs"]
            outs[async_scheduling] = llm.generate(prompts, params, use_tqdm=False)
        finally:
            llm.shutdown()
    for sync, ahead in zip(outs[False], outs[True], strict=True):
        assert ahead.outputs[0].token_ids == sync.outputs[0].token_ids
        if ahead.outputs[0].finish_reason == "stop":
            json.loads(ahead.outputs[0].text)
