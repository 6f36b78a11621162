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
