"""On two CUDA GPUs (NCCL between Ray workers): TP=2 (with CUDA graphs), PP=2 and TP=2 x PP=1 eager give what one
GPU gives (CUDA graphs on every stage); so do a mixture-of-experts model at TP=2 and EP=2 and an FP8 checkpoint at
TP=2. Skipped without two GPUs; run on the device tool's nvidia-h200-x2 (benchmarks/gpu_parallel.sh)."""
import pytest
import torch

from engine import LLM, SamplingParams
from tests.support import quantized
from tests.support.prompts import random_prompts

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs (NCCL)")]

PARAMS = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, logprobs=3)
PROMPTS = random_prompts(seed=5, lens=(3, 17, 64, 130)) * 3  # 12 sequences: decode batches of 12 (graph ladder)


@pytest.mark.parametrize("kind,tp,pp,eager,ep", [("llama", 2, 1, False, False), ("mistral", 2, 1, True, False),
                                                 ("llama_tied_mha", 1, 2, False, False),
                                                 ("qwen2_moe", 2, 1, False, False), ("qwen3_moe", 2, 1, False, True),
                                                 ("fp8", 2, 1, False, False)])
def test_nccl_matches_one_gpu(local_ray, tiny_model_dir, tmp_path, kind, tp, pp, eager, ep):
    """ep: the experts placed whole on ranks (enable_expert_parallel) rather than each split across them; fp8: the
    tiny Llama as a compressed-tensors FP8 W8A8 checkpoint, its weights and scales split across the ranks, with
    static activation scales so that every rank quantizes as one GPU does (dynamic per-token scales of a
    row-parallel layer's input slice differ from the whole row's)."""
    if kind == "fp8":
        path = str(quantized.fp8_compressed_tensors(tiny_model_dir("llama"), tmp_path / "fp8", "tensor", "tensor")[0])
    else:
        path = str(tiny_model_dir(kind))
    one = LLM(path, dtype="float32", device="cuda", enforce_eager=eager)
    ref = one.generate(PROMPTS, PARAMS, use_tqdm=False)
    one.shutdown()
    del one
    torch.cuda.empty_cache()
    llm = LLM(path, dtype="float32", tensor_parallel_size=tp, pipeline_parallel_size=pp, enforce_eager=eager,
              enable_expert_parallel=ep)
    try:
        shard = llm.engine.executor.describe()
        assert shard["device"].startswith("cuda") and shard["cuda_graphs"] == (not eager)
        assert len({n["gpu_ids"][0] for n in llm.engine.executor.worker_nodes()}) == tp * pp
        outs = llm.generate(PROMPTS, PARAMS, use_tqdm=False)
        for a, b in zip(outs, ref, strict=True):
            assert a.outputs[0].token_ids == b.outputs[0].token_ids
            for mine, theirs in zip(a.outputs[0].logprobs, b.outputs[0].logprobs):
                assert list(mine.values()) == pytest.approx(list(theirs.values()), abs=1e-3)
        llm.engine.executor.check_health()
    finally:
        llm.shutdown()


def test_tp2_batch1_decode_all_reduces_inside_its_gemvs(local_ray, tiny_model_dir):
    """One sequence at a time, TP=2 decodes through the gemvs' own all-reduce (ReduceSites in symmetric memory)
    in CUDA graphs and eagerly, and still gives one GPU's tokens and logprobs."""
    path = str(tiny_model_dir("llama"))
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, logprobs=3)
    prompts = random_prompts(seed=7, lens=(5, 40, 77))
    one = LLM(path, dtype="float32", device="cuda")
    ref = [one.generate([p], params, use_tqdm=False)[0] for p in prompts]
    one.shutdown()
    del one
    torch.cuda.empty_cache()
    for eager in (False, True):
        llm = LLM(path, dtype="float32", tensor_parallel_size=2, enforce_eager=eager)
        try:
            assert llm.engine.executor.describe()["fused_all_reduce"]
            for prompt, theirs in zip(prompts, ref):
                mine = llm.generate([prompt], params, use_tqdm=False)[0]
                assert mine.outputs[0].token_ids == theirs.outputs[0].token_ids
                for a, b in zip(mine.outputs[0].logprobs, theirs.outputs[0].logprobs):
                    assert list(a.values()) == pytest.approx(list(b.values()), abs=1e-3)
        finally:
            llm.shutdown()
