"""Quantized checkpoints: built here from tiny random models in each format the engine serves, compared with the
same checkpoint dequantized; schemes the engine does not serve fail at load."""
import json
import shutil

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from engine import LLM, SamplingParams
from tests.engine.test_model_parity import hf_greedy
from tests.support import quantized
from tests.support.prompts import random_prompts


def with_quantization_config(src, dst, qc: dict):
    shutil.copytree(src, dst)
    config = json.loads((dst / "config.json").read_text())
    config["quantization_config"] = qc
    (dst / "config.json").write_text(json.dumps(config))
    return dst


@pytest.mark.parametrize("qc, named", [
    ({"quant_method": "gptq", "bits": 4, "group_size": 128}, "gptq"),
    ({"quant_method": "bitsandbytes", "load_in_4bit": True}, "bitsandbytes"),
])
def test_unsupported_quantization_fails_at_load_naming_the_scheme(tiny_model_dir, tmp_path, qc, named):
    path = with_quantization_config(tiny_model_dir("llama"), tmp_path / "model", qc)
    with pytest.raises(ValueError, match=rf"quantization {named}.* not supported; supported: "):
        LLM(str(path))


def assert_matches(llm, ref, prompts, abs_tol):
    """Greedy tokens equal and prompt logprobs within abs_tol of the reference model's."""
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, prompt_logprobs=0),
                        use_tqdm=False)
    worst = 0.0
    for prompt, out in zip(prompts, outs, strict=True):
        assert out.outputs[0].token_ids == hf_greedy(ref, prompt, 8)
        with torch.no_grad():
            expected = torch.log_softmax(ref(torch.tensor([prompt])).logits[0].float(), -1)
        for pos in range(1, len(prompt)):
            worst = max(worst, abs(out.prompt_logprobs[pos][prompt[pos]] - expected[pos - 1, prompt[pos]].item()))
    assert worst < abs_tol


def input_scales(path):
    return {k.removesuffix(".input_scale"): v.item() for k, v in load_file(str(path / "model.safetensors")).items()
            if k.endswith(".input_scale")}


@pytest.mark.parametrize("weights, activations", [("channel", "token"), ("tensor", "tensor"), ("channel", None)])
def test_compressed_tensors_fp8_matches_the_dequantized_checkpoint(tiny_model_dir, tmp_path, weights, activations):
    """W8A8 with dynamic per-token or static per-tensor activations, and W8A16; per-tensor weight scales differ
    between q, k and v, which the fused qkv layer keeps apart."""
    src = tiny_model_dir("llama")
    path, dequantized = quantized.fp8_compressed_tensors(src, tmp_path / "fp8", weights, activations)
    ref = quantized.reference_model(src, tmp_path / "ref", dequantized, activations, input_scales(path))
    assert_matches(LLM(str(path), max_num_seqs=4), ref, random_prompts(lens=(5, 33)), abs_tol=2e-3)


def test_fp8_of_fused_checkpoint_tensors_under_a_sliding_window(tiny_model_dir, tmp_path):
    """Phi-3 keeps q/k/v and gate/up fused in one checkpoint tensor each, quantized with one per-tensor scale that
    every part of the fused layer takes; its layers attend over a 24-token window, which 33-token prompts pass."""
    src = tiny_model_dir("phi3")
    path, dequantized = quantized.fp8_compressed_tensors(src, tmp_path / "fp8", "tensor", "token")
    assert "model.layers.0.self_attn.qkv_proj.weight_scale" in load_file(str(path / "model.safetensors"))
    ref = quantized.reference_model(src, tmp_path / "ref", dequantized, "token")
    assert_matches(LLM(str(path), max_num_seqs=4), ref, random_prompts(lens=(5, 33)), abs_tol=2e-3)


def test_fp8_block_wise_matches_the_dequantized_checkpoint(tiny_model_dir, tmp_path):
    """DeepSeek-V3 style: 32 x 32 weight blocks (the tiny model's layers are 64 wide; real ones use 128), the
    activations quantized per 32 columns of a token. transformers loads the same checkpoint as its dequantized
    weights, which pins the format."""
    src = tiny_model_dir("llama")
    path, dequantized = quantized.fp8_block_wise(src, tmp_path / "fp8", (32, 32))
    ref = quantized.reference_model(src, tmp_path / "ref", dequantized, "group", group=32)
    assert_matches(LLM(str(path), max_num_seqs=4), ref, random_prompts(lens=(5, 33)), abs_tol=2e-3)
    # transformers reads this format too (on CPU it dequantizes the weights and leaves activations as they are)
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    weight_only = quantized.reference_model(src, tmp_path / "weight-only", dequantized, None)
    ids = torch.tensor(random_prompts(lens=(33,)))
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, weight_only(ids).logits)


def test_fp8_block_wise_fails_clearly_where_blocks_split_a_fused_layer(tiny_model_dir, tmp_path):
    """128-row blocks cannot hold the tiny model's 64-row q and 32-row k apart in the fused qkv layer."""
    path, _ = quantized.fp8_block_wise(tiny_model_dir("llama"), tmp_path / "fp8", (128, 128))
    with pytest.raises(ValueError, match=r"fused output rows \[64, 96\) do not align to the 128-wide blocks"):
        LLM(str(path))


def test_missing_scale_tensor_fails_naming_it(tiny_model_dir, tmp_path):
    path, _ = quantized.fp8_compressed_tensors(tiny_model_dir("llama"), tmp_path / "fp8", "channel", "token")
    tensors = load_file(str(path / "model.safetensors"))
    del tensors["model.layers.1.mlp.down_proj.weight_scale"]
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"missing 1 tensors: layers.1.mlp.down_proj.weight_scale"):
        LLM(str(path))


def test_online_fp8_of_an_unquantized_checkpoint(tiny_model_dir, tmp_path):
    """quantization='fp8': per-channel weight scales computed while loading, activations per token; the same as
    transformers on those weights quantized and dequantized, and on average within 8% of the float32 model's
    prompt logprobs (e4m3 keeps 3 mantissa bits; this model's logits are wide, its logprobs near -8)."""
    src = tiny_model_dir("llama")
    weights = load_file(str(src / "model.safetensors"))
    dequantized = {}
    for name, w in weights.items():
        dequantized[name] = w
        if quantized.is_linear_weight(name):
            scale = (w.abs().amax(1, keepdim=True) / 448).clamp(min=1 / (448 * 512))
            dequantized[name] = quantized.fp8(w, scale).float() * scale
    ref = quantized.reference_model(src, tmp_path / "ref", dequantized, "token")
    llm = LLM(str(src), quantization="fp8", max_num_seqs=4)
    linears = [m for m in llm.engine.executor.runner.model.modules() if getattr(m, "quant_method", None)]
    assert len(linears) == 8 and all(m.weight.dtype == torch.float8_e4m3fn for m in linears)  # never 16-bit
    prompts = random_prompts(lens=(5, 33))
    assert_matches(llm, ref, prompts, abs_tol=2e-3)
    params = SamplingParams(max_tokens=1, prompt_logprobs=0)
    online = [o.prompt_logprobs for o in llm.generate(prompts, params, use_tqdm=False)]
    plain = [o.prompt_logprobs for o in LLM(str(src)).generate(prompts, params, use_tqdm=False)]
    pairs = [(a[p][t], b[p][t]) for prompt, a, b in zip(prompts, online, plain) for p, t in enumerate(prompt) if p]
    error = sum(abs(a - b) for a, b in pairs) / sum(abs(b) for _, b in pairs)
    assert 0 < error < 0.08


@pytest.mark.parametrize("fmt", ["awq", "w4a16_compressed_tensors"])
def test_int4_weight_only_matches_the_dequantized_checkpoint(tiny_model_dir, tmp_path, fmt):
    """AWQ (GEMM packing, zero points) and compressed-tensors pack-quantized (symmetric), 32 input features a group
    (the tiny model's layers are 64 wide; real checkpoints use 128)."""
    src = tiny_model_dir("llama")
    path, dequantized = getattr(quantized, fmt)(src, tmp_path / "int4", 32)
    ref = quantized.reference_model(src, tmp_path / "ref", dequantized, None)
    assert_matches(LLM(str(path), max_num_seqs=4), ref, random_prompts(lens=(5, 33)), abs_tol=2e-3)


def test_int4_group_size_that_does_not_divide_a_layer_fails_clearly(tiny_model_dir, tmp_path):
    path, _ = quantized.awq(tiny_model_dir("llama"), tmp_path / "int4", 32)
    config = json.loads((path / "config.json").read_text())
    config["quantization_config"]["group_size"] = 128
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="INT4 group size 128 does not divide a layer's 64 input features"):
        LLM(str(path))


def prompt_logprob_error(llm, reference, prompts) -> float:
    """Mean |difference| of the prompt logprobs relative to the mean |logprob| of `reference`."""
    params = SamplingParams(max_tokens=1, prompt_logprobs=0)
    ours = [o.prompt_logprobs for o in llm.generate(prompts, params, use_tqdm=False)]
    ref = [o.prompt_logprobs for o in reference.generate(prompts, params, use_tqdm=False)]
    pairs = [(a[p][t], b[p][t]) for prompt, a, b in zip(prompts, ours, ref) for p, t in enumerate(prompt) if p]
    return sum(abs(a - b) for a, b in pairs) / sum(abs(b) for _, b in pairs)


def test_fp8_kv_cache_with_scales_from_the_checkpoint_or_one(tiny_model_dir, tmp_path):
    """kv_cache_dtype='fp8': keys and values stored in e4m3 (half the bytes of a 16-bit cache), divided by the
    checkpoint's per-layer k_scale/v_scale where it has them. The prompt logprobs stay within 3% of the float32
    cache's, and decode steps, which read the keys back from the cache, score their tokens as a prompt holding
    them does (a fresh prompt attends over its keys and values rounded as the cache stores them)."""
    src = tiny_model_dir("llama")
    prompts = random_prompts(lens=(5, 33))
    plain = LLM(str(src), max_num_seqs=4)
    fp8 = LLM(str(src), max_num_seqs=4, kv_cache_dtype="fp8")
    assert fp8.engine.executor.runner.kv_block_bytes() * 4 == plain.engine.executor.runner.kv_block_bytes()
    assert 0 < prompt_logprob_error(fp8, plain, prompts) < 0.03
    greedy = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True, logprobs=0)
    for prompt, out in zip(prompts, fp8.generate(prompts, greedy, use_tqdm=False)):
        tokens = out.outputs[0].token_ids
        decoded = [lp[t] for lp, t in zip(out.outputs[0].logprobs, tokens)]
        whole = fp8.generate([prompt + tokens], SamplingParams(max_tokens=1, prompt_logprobs=0), use_tqdm=False)[0]
        as_prompt = [whole.prompt_logprobs[len(prompt) + i][t] for i, t in enumerate(tokens)]
        assert as_prompt == pytest.approx(decoded, abs=1e-4)

    tensors = load_file(str(src / "model.safetensors"))
    tensors |= {f"model.layers.{i}.self_attn.{s}": torch.tensor(0.1) for i in range(2) for s in ("k_scale", "v_scale")}
    scaled = quantized.write_checkpoint(src, tmp_path / "scaled", tensors, None)
    with_scales = LLM(str(scaled), max_num_seqs=4, kv_cache_dtype="fp8")
    attn = with_scales.engine.executor.runner.model.attention_layers()[1]
    assert (attn.k_scale, attn.v_scale) == (pytest.approx(0.1), pytest.approx(0.1))
    error = prompt_logprob_error(with_scales, plain, prompts)
    assert 0 < error < 0.03 and error != prompt_logprob_error(fp8, plain, prompts)


def test_fp8_per_tensor_checkpoint_with_static_activations(tiny_model_dir, tmp_path):
    """quant_method fp8 without blocks (vLLM's serialized FP8): per-tensor weight_scale, static input_scale."""
    src = tiny_model_dir("llama")
    path, dequantized = quantized.fp8_compressed_tensors(src, tmp_path / "fp8", "tensor", "tensor")
    config = json.loads((path / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "static"}
    (path / "config.json").write_text(json.dumps(config))
    ref = quantized.reference_model(src, tmp_path / "ref", dequantized, "tensor", input_scales(path))
    assert_matches(LLM(str(path), max_num_seqs=4), ref, random_prompts(lens=(5, 33)), abs_tol=2e-3)


def test_tensor_parallel_fp8_matches_one_process(tiny_model_dir, tmp_path, local_ray):
    """Two ranks over Ray split the fused qkv and gate/up weights with their per-tensor scales and the row-parallel
    ones with theirs; with static activation scales every rank quantizes as one process does, so the outputs
    agree."""
    path, _ = quantized.fp8_compressed_tensors(tiny_model_dir("llama"), tmp_path / "fp8", "tensor", "tensor")
    prompts = random_prompts(lens=(5, 19))
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, prompt_logprobs=0)
    one = LLM(str(path)).generate(prompts, params, use_tqdm=False)
    two = LLM(str(path), tensor_parallel_size=2)
    for a, b in zip(two.generate(prompts, params, use_tqdm=False), one, strict=True):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
        assert [next(iter(p.values())) for p in a.prompt_logprobs[1:]] == \
            pytest.approx([next(iter(p.values())) for p in b.prompt_logprobs[1:]], abs=1e-4)
    two.shutdown()


def test_quantizing_a_mixture_of_experts_model_fails_at_load(tiny_model_dir):
    """Its fused experts take 16-bit weights: refused rather than served half quantized."""
    with pytest.raises(ValueError, match="quantized mixture-of-experts models are not supported"):
        LLM(str(tiny_model_dir("qwen3_moe")), quantization="fp8")
