"""Bad input fails early with a message that names the fix."""
import json
import shutil

import pytest

from engine import LLM, EngineConfig, InvalidRequestError, SamplingParams


@pytest.mark.parametrize("kwargs, message", [
    (dict(max_tokens=0), "max_tokens must be at least 1"),
    (dict(temperature=-0.1), "temperature must be non-negative"),
    (dict(top_p=0.0), r"top_p must be in \(0, 1\]"),
    (dict(top_p=1.5), r"top_p must be in \(0, 1\]"),
    (dict(top_k=-2), "top_k must be -1"),
    (dict(n=0), "n must be at least 1"),
    (dict(min_tokens=5, max_tokens=2), "min_tokens"),
    (dict(stop=[""]), "stop strings must be non-empty"),
])
def test_bad_sampling_params(kwargs, message):
    with pytest.raises(InvalidRequestError, match=message) as e:
        SamplingParams(**kwargs)
    assert e.value.param == next(iter(kwargs)), "the error names the field at fault"


def test_prompt_longer_than_max_model_len(tiny_model_dir):
    llm = LLM(str(tiny_model_dir("llama")), max_model_len=64)
    with pytest.raises(InvalidRequestError, match="prompt has 70 tokens but max_model_len is 64") as e:
        llm.generate([[5] * 70], use_tqdm=False)
    assert (e.value.param, e.value.code) == ("prompt", "context_length_exceeded")
    assert llm.stats().waiting == 0  # nothing was left queued


def test_empty_prompt_and_out_of_vocab_ids(tiny_llm):
    with pytest.raises(ValueError, match="empty"):
        tiny_llm.generate([[]], use_tqdm=False)
    with pytest.raises(ValueError, match=r"token ids must be in \[0, 512\)"):
        tiny_llm.generate([[1, 100000]], use_tqdm=False)


def test_logprobs_above_the_limit(tiny_llm):
    with pytest.raises(InvalidRequestError, match="logprobs must be at most 20, got 50") as e:
        tiny_llm.generate(["hi"], SamplingParams(logprobs=50), use_tqdm=False)
    assert e.value.param == "logprobs"
    with pytest.raises(InvalidRequestError) as e:
        tiny_llm.generate(["hi"], SamplingParams(prompt_logprobs=21), use_tqdm=False)
    assert e.value.param == "prompt_logprobs"
    with pytest.raises(InvalidRequestError) as e:
        tiny_llm.generate(["hi"], SamplingParams(stop_token_ids=[512]), use_tqdm=False)
    assert e.value.param == "stop_token_ids"


def test_max_tokens_beyond_the_context(tiny_model_dir):
    """Offline, a max_tokens beyond the context is capped at it; a server's AsyncEngine refuses it, naming the
    field and the code."""
    import asyncio

    from engine import AsyncEngine

    llm = LLM(str(tiny_model_dir("llama")), max_model_len=64)
    out = llm.generate([[5] * 60], SamplingParams(max_tokens=10, ignore_eos=True), use_tqdm=False)[0]
    assert len(out.outputs[0].token_ids) == 4 and out.outputs[0].finish_reason == "length"
    llm.shutdown()
    engine = AsyncEngine(model=str(tiny_model_dir("llama")), max_model_len=64)

    async def add():
        engine.add_request("r", [5] * 60, SamplingParams(max_tokens=10), max_tokens_must_fit=True)

    try:
        with pytest.raises(InvalidRequestError, match="lower max_tokens to at most 4") as e:
            asyncio.run(add())
        assert (e.value.param, e.value.code) == ("max_tokens", "context_length_exceeded")
    finally:
        engine.shutdown()


def test_unknown_architecture(tiny_model_dir, tmp_path):
    path = tmp_path / "gpt2ish"
    shutil.copytree(tiny_model_dir("llama"), path)
    cfg = json.loads((path / "config.json").read_text())
    cfg["architectures"] = ["GPTBigCodeForCausalLM"]
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="unsupported model architecture.*supported: LlamaForCausalLM"):
        LLM(str(path))


def test_missing_weights(tiny_model_dir, tmp_path):
    path = tmp_path / "noweights"
    shutil.copytree(tiny_model_dir("llama"), path)
    for f in path.glob("*.safetensors"):
        f.unlink()
    with pytest.raises(FileNotFoundError, match="no safetensors weights"):
        LLM(str(path))


def test_missing_model_directory():
    with pytest.raises(ValueError, match="does not exist locally"):
        LLM("/nonexistent/model/dir")


def test_config_rejects_unknown_and_bad_options():
    with pytest.raises(ValueError, match="block_size must be a power of two"):
        EngineConfig(block_size=12)
    with pytest.raises(ValueError, match="extra"):
        EngineConfig(blocksize=16)


def test_max_model_len_above_the_model_limit(tiny_model_dir):
    with pytest.raises(ValueError, match="above the model's max_position_embeddings"):
        LLM(str(tiny_model_dir("llama")), max_model_len=100000)
