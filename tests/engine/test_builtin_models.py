"""Built-in models (demo, SmolLM2 from GGUF) and `resolve_model`: real builds, real transformers loads, no mocks."""
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import huggingface_hub.constants
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from engine.builtin_models import BUILTIN_MODELS, CHATML_TEMPLATE, build_demo
from engine.model_source import resolve_model
from tests.support.paths import ROOT

BUILD_IN_SUBPROCESS = "import sys; from engine.builtin_models import build_demo; build_demo(sys.argv[1])"
RESOLVE_IN_SUBPROCESS = "import sys; from engine.model_source import resolve_model; print(resolve_model('demo'))"


def _python(code: str, *args: str, env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", code, *args], cwd=ROOT, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("demo")
    build_demo(path)
    return path


@pytest.fixture(scope="module")
def demo_tokenizer(demo_dir):
    return AutoTokenizer.from_pretrained(demo_dir)


def test_demo_build_is_deterministic_across_processes(demo_dir, tmp_path):
    proc = _python(BUILD_IN_SUBPROCESS, str(tmp_path))
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    for name in ("model.safetensors", "config.json", "tokenizer.json", "tokenizer_config.json"):
        assert (demo_dir / name).read_bytes() == (tmp_path / name).read_bytes(), name
    a, b = load_file(demo_dir / "model.safetensors"), load_file(tmp_path / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert all(t.dtype == torch.float32 for t in a.values())
    assert "lm_head.weight" in a  # untied


def test_demo_loads_with_transformers(demo_dir, demo_tokenizer):
    config = json.loads((demo_dir / "config.json").read_text())
    assert (config["hidden_size"], config["num_hidden_layers"], config["num_attention_heads"],
            config["num_key_value_heads"], config["intermediate_size"]) == (64, 2, 4, 2, 128)
    assert config["tie_word_embeddings"] is False and config["max_position_embeddings"] == 2048
    assert "quantization_config" not in config
    assert max(demo_tokenizer.get_vocab().values()) < config["vocab_size"] == len(demo_tokenizer)
    assert demo_tokenizer.eos_token == "<|endoftext|>" and demo_tokenizer.eos_token_id == config["eos_token_id"]
    assert demo_tokenizer.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"]) == [1, 2]

    model = AutoModelForCausalLM.from_pretrained(demo_dir)
    assert model.dtype == torch.float32
    ids = demo_tokenizer("Hello, world!", return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=8, do_sample=False, min_new_tokens=8)
    assert out.shape == (1, ids.shape[1] + 8)
    again = model.generate(ids, max_new_tokens=8, do_sample=False, min_new_tokens=8)
    assert torch.equal(out, again)


@settings(max_examples=200, deadline=None)
@given(text=st.text())
def test_demo_tokenizer_round_trips_any_unicode(demo_tokenizer, text):
    ids = demo_tokenizer.encode(text, add_special_tokens=False)
    assert demo_tokenizer.decode(ids) == text


def test_demo_tokenizer_round_trips_examples(demo_tokenizer):
    for text in ["", " ", "héllo wörld", "你好，世界", "🤖🚀 emoji", "tabs\tand\nnewlines\r\n", "\x00\x7f\u200b", "  x  "]:
        assert demo_tokenizer.decode(demo_tokenizer.encode(text, add_special_tokens=False)) == text


def test_demo_chat_template(demo_tokenizer):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"}]
    text = demo_tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert text == "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi!<|im_end|>\n<|im_start|>assistant\n"
    no_prompt = demo_tokenizer.apply_chat_template(messages, tokenize=False)
    assert no_prompt == text.removesuffix("<|im_start|>assistant\n")
    ids = demo_tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=True)["input_ids"]
    assert ids.count(1) == 3 and ids.count(2) == 2  # special tokens are single ids
    assert demo_tokenizer.chat_template == CHATML_TEMPLATE


def test_resolve_builtin_demo_builds_once(tmp_path, monkeypatch):
    monkeypatch.setenv("STRATA_CACHE_DIR", str(tmp_path))
    path = resolve_model("demo")
    assert path == tmp_path / "demo" and (path / "config.json").is_file()
    assert (path / "model.safetensors").is_file() and (path / "tokenizer.json").is_file()
    mtime = (path / "model.safetensors").stat().st_mtime_ns
    assert resolve_model("DEMO") == path and resolve_model(" Demo ") == path
    assert (path / "model.safetensors").stat().st_mtime_ns == mtime  # reused, not rebuilt
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")) == ["demo"]


def test_resolve_concurrent_processes(tmp_path):
    env = {**os.environ, "STRATA_CACHE_DIR": str(tmp_path)}
    procs = [_python(RESOLVE_IN_SUBPROCESS, env=env) for _ in range(3)]
    results = [p.communicate(timeout=180) for p in procs]
    assert all(p.returncode == 0 for p in procs), [err for _, err in results]
    assert {out.strip() for out, _ in results} == {str(tmp_path / "demo")}
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")) == ["demo"]  # no temp dirs left
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "demo").config.vocab_size == 512


def test_resolve_local_directory(demo_dir, tmp_path):
    assert resolve_model(str(demo_dir)) == demo_dir
    with pytest.raises(ValueError, match="no config.json"):
        resolve_model(str(tmp_path))


@pytest.mark.parametrize("name", ["/nonexistent/strata/model-dir", "strata-tests/no-such-model-xyz"])
def test_resolve_unknown_model_gives_helpful_error(name, monkeypatch):
    # Offline mode makes the hub call fail at once instead of waiting on the network.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ValueError) as info:
        resolve_model(name)
    message = str(info.value)
    assert name in message and "does not exist locally" in message and "hub failed" in message
    assert "\n" not in message
    for builtin in BUILTIN_MODELS:
        assert builtin in message


@pytest.mark.slow
def test_smollm2_conversion(tmp_path, monkeypatch):
    monkeypatch.setenv("STRATA_CACHE_DIR", str(tmp_path))
    path = resolve_model("HuggingFaceTB/SmolLM2-135M-Instruct")
    assert path == tmp_path / "smollm2-135m-instruct" and resolve_model("smollm2-135M-Instruct") == path
    config = json.loads((path / "config.json").read_text())
    assert "quantization_config" not in config and config["dtype"] == "bfloat16"
    assert (config["num_hidden_layers"], config["hidden_size"], config["vocab_size"]) == (30, 576, 49152)
    weights = load_file(path / "model.safetensors")
    assert all(t.dtype == torch.bfloat16 for t in weights.values())

    tokenizer = AutoTokenizer.from_pretrained(path)
    assert "<|im_start|>" in tokenizer.chat_template and tokenizer.eos_token == "<|im_end|>"
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=True,
                                           return_tensors="pt")
    model = AutoModelForCausalLM.from_pretrained(path)
    out = model.generate(**inputs, max_new_tokens=12, do_sample=False)
    answer = tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    assert answer.strip() == "The capital of France is Paris."

    # Our engine on the converted checkpoint gives the same answer, stopping at <|im_end|>.
    from engine import LLM, SamplingParams

    for dtype in ("float32", "bfloat16"):  # bfloat16: the CPU path's float32 residual stream and logits
        with LLM(str(path), max_model_len=512, dtype=dtype) as llm:
            out = llm.chat(messages, SamplingParams(temperature=0, max_tokens=32), use_tqdm=False)[0].outputs[0]
            assert out.text == "The capital of France is Paris." and out.finish_reason == "stop", dtype
            packed = llm.engine.executor.describe()["onednn_packed_linears"]
            assert packed == 30 * 4 + 1  # qkv, o, gate_up and down of every layer, and the LM head


def test_cpu_dtype_auto_is_bfloat16_for_16_bit_checkpoints_where_the_cpu_has_bfloat16_arithmetic():
    from types import SimpleNamespace

    from engine.model_setup import cpu_has_native_bfloat16, shard_dtype

    cpu = torch.device("cpu")
    native = torch.bfloat16 if cpu_has_native_bfloat16() else torch.float32
    assert shard_dtype("auto", SimpleNamespace(dtype="bfloat16"), cpu) == native
    assert shard_dtype("auto", SimpleNamespace(torch_dtype="float16"), cpu) == native
    assert shard_dtype("auto", SimpleNamespace(dtype="float32"), cpu) == torch.float32
    assert shard_dtype("float32", SimpleNamespace(dtype="bfloat16"), cpu) == torch.float32
