"""Whole-model greedy outputs with the Triton kernels equal the torch path.

Runs in a fresh interpreter, so this process's choice of interpreted or compiled kernels (conftest.py) does not
carry over: with a GPU, on CUDA with compiled kernels (TRITON_INTERPRET=0); without one, on CPU with
TRITON_INTERPRET=1 set before anything imports Triton, so every kernel the model's layers bound at import time is
the interpreted one.
"""
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from tests.support.paths import ROOT

ON_GPU = torch.cuda.is_available()
# Both paths in float32, so their tokens and logprobs agree; on a GPU a small KV cache and batch, so the second
# engine fits beside whatever the first left there, and few CUDA graphs are captured.
OPTIONS = dict(device="cuda", dtype="float32", num_kv_blocks=64, max_num_seqs=8) if ON_GPU else dict(device="cpu")

SCRIPT = textwrap.dedent("""
    import json, sys
    from engine import LLM, SamplingParams
    from tests.support.triton_interpreter import skip_repeated_patching
    skip_repeated_patching()
    path, prompts, options = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3])
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, logprobs=1)
    out = {}
    for backend in ("torch", "triton"):
        llm = LLM(path, attention_backend=backend, max_num_batched_tokens=24, block_size=16, **options)
        res = llm.generate(prompts, params, use_tqdm=False)
        res += llm.generate([prompts[1]], params, use_tqdm=False)  # a prefix-cache hit: prefill over cached blocks
        out[backend] = [[o.outputs[0].token_ids, [max(lp.values()) for lp in o.outputs[0].logprobs]] for o in res]
        llm.shutdown()
    print(json.dumps(out))
""")


def assert_triton_equals_torch(script: str, model_dir, prompts: list[list[int]], **options) -> None:
    """Run `script` on the model and prompts; its "triton" outputs equal its "torch" ones."""
    # PYTHONPATH: the script and its Ray workers import tests.support (and keep what the caller had, e.g. a
    # GPU machine's wheels directory)
    env = dict(os.environ, TRITON_INTERPRET="0" if ON_GPU else "1",
               PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    proc = subprocess.run([sys.executable, "-c", script, str(model_dir), json.dumps(prompts),
                           json.dumps(OPTIONS | options)],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(out["torch"]) >= len(prompts)
    for (tok_torch, lp_torch), (tok_triton, lp_triton) in zip(out["torch"], out["triton"], strict=True):
        assert tok_triton == tok_torch
        assert lp_triton == pytest.approx(lp_torch, abs=1e-3)


# Qwen3: its q/k norms folded into the rotary kernel; Qwen2-MoE: decode steps of up to 4 tokens take the few-token
# expert kernels, the prefill the grouped GEMM
@pytest.mark.parametrize("kind", ["llama", "qwen3", "qwen2_moe"])
def test_triton_path_matches_torch_path(kind, tiny_model_dir):
    prompts = [[5, 9, 200, 17, 3], list(range(40, 77)), [300 + i for i in range(19)]]
    assert_triton_equals_torch(SCRIPT, tiny_model_dir(kind), prompts)


@pytest.mark.parametrize("kind", ["gemma2", "gemma3"])
def test_triton_path_with_windows_and_soft_caps_matches_torch_path(kind, tiny_model_dir):
    """Gemma 2: windowed (8 tokens) and global layers, soft-capped scores, in chunks and over cached blocks; the
    prefix-cache hit alone, so its tokens take Gemma's batch-1 decode layer (pre-norms and GeGLU in the
    matrix-vector kernels, post-norms with their residual adds). Gemma 3 adds q/k norms (folded into the rotary
    kernel, with Gemma's float32 1 + w weights) and per-type rope."""
    assert_triton_equals_torch(SCRIPT, tiny_model_dir(kind), [[5, 9, 200, 17, 3], list(range(40, 71))])


TP_SCRIPT = textwrap.dedent("""
    import json, sys
    import ray
    from engine import LLM, SamplingParams
    from tests.support.triton_interpreter import skip_repeated_patching
    path, prompts, options = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3])
    params = SamplingParams(temperature=0, max_tokens=5, ignore_eos=True, logprobs=1)
    skip_repeated_patching()
    ray.init(address="local", num_cpus=4, include_dashboard=False,
             runtime_env={"worker_process_setup_hook": skip_repeated_patching})  # the workers interpret too
    out = {}
    for backend, tp in (("torch", 1), ("triton", 2)):
        # a small token budget: the workers' start profiles a step of that many tokens, interpreted on CPU
        llm = LLM(path, attention_backend=backend, tensor_parallel_size=tp, block_size=16, max_num_batched_tokens=24,
                  **options)
        res = [llm.generate([p], params, use_tqdm=False)[0] for p in prompts]  # one at a time: batch-1 decode
        out[backend] = [[o.outputs[0].token_ids, [max(lp.values()) for lp in o.outputs[0].logprobs]] for o in res]
        llm.shutdown()
    print(json.dumps(out))
""")


@pytest.mark.skipif(ON_GPU and torch.cuda.device_count() < 2,
                    reason="on a GPU machine this runs on CUDA and needs two GPUs (see also test_parallel_gpu.py)")
def test_triton_batch1_decode_under_tensor_parallelism_matches_one_process(tiny_model_dir):
    """Tensor-parallel ranks fold the residual add into rank 0's partial product of the o/down projections before
    the all-reduce (LlamaDecoderLayer.decode_one); on CPU over gloo with the kernels interpreted in the workers,
    on GPUs over NCCL and symmetric memory."""
    assert_triton_equals_torch(TP_SCRIPT, tiny_model_dir("llama"), [[300 + i for i in range(19)]])


def test_triton_path_matches_torch_path_on_an_fp8_checkpoint_and_kv_cache(tiny_model_dir, tmp_path):
    """FP8 W8A8 (compressed-tensors, per-channel weight scales, per-token activations) over an FP8 KV cache: the
    Triton activation quantization, scaled matmul, batch-1 decode's folded matrix-vector kernel and the cache's
    writes and reads against the torch path through the whole model (block-wise scales and static activations:
    tests/engine/kernels/test_fp8.py). Interpreted on CPU too (about 30 s)."""
    from tests.support import quantized

    path, _ = quantized.fp8_compressed_tensors(tiny_model_dir("llama"), tmp_path / "fp8", "channel", "token")
    assert_triton_equals_torch(SCRIPT, path, [[5, 9, 200, 17, 3], [300 + i for i in range(19)]], kv_cache_dtype="fp8")


@pytest.mark.skipif(not ON_GPU, reason="interpreted, the INT4 kernel is covered by test_int4.py; the whole model "
                                       "runs on CUDA, where it is cheap")
def test_triton_path_matches_torch_path_on_an_awq_checkpoint(tiny_model_dir, tmp_path):
    """INT4 AWQ through the whole model: the dequantize-and-multiply kernel against the torch path's dequantized
    weights (both packings and group edges: tests/engine/kernels/test_int4.py)."""
    from tests.support import quantized

    path, _ = quantized.awq(tiny_model_dir("llama"), tmp_path / "awq", 32)
    assert_triton_equals_torch(SCRIPT, path, [[5, 9, 200, 17, 3], [300 + i for i in range(19)]])


def test_triton_path_matches_torch_path_on_a_w4a16_checkpoint(tiny_model_dir, tmp_path):
    """compressed-tensors INT4 (packed along K) through the whole model: batch-1 decode in the matrix-vector kernel
    with norm, gate and residual folded in, larger batches in int4_mm. Interpreted on CPU too (about 20 s)."""
    from tests.support import quantized

    path, _ = quantized.w4a16_compressed_tensors(tiny_model_dir("llama"), tmp_path / "w4a16", 32)
    assert_triton_equals_torch(SCRIPT, path, [[5, 9, 200, 17, 3], [300 + i for i in range(19)]])
