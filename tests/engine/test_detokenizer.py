"""Incremental detokenization: exact text, whole UTF-8 characters, stop strings cut exactly."""
import pytest

from engine import SamplingParams
from engine.builtin_models import build_demo
from engine.detokenizer import IncrementalDetokenizer
from engine.tokenizer import load_tokenizer

TEXT = "Héllo wörld, 世界! 🙂 The capital of France is Paris. The end."


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    path = tmp_path_factory.mktemp("demo-tok")
    build_demo(path)
    return load_tokenizer(path)


def stream(tokenizer, ids, **params):
    detok = IncrementalDetokenizer(tokenizer, [1, 2], SamplingParams(**params))
    deltas, stop = [], None
    for t in ids:
        delta, stop = detok.add([t])
        deltas.append(delta)
        if stop:
            break
    else:
        deltas.append(detok.flush())
    return deltas, stop


def test_streamed_text_equals_a_full_decode_and_never_splits_a_character(tokenizer):
    ids = tokenizer.encode(TEXT)
    assert any(len(tokenizer.decode([t])) and "\ufffd" in tokenizer.decode([t]) for t in ids)  # bytes split across tokens
    deltas, stop = stream(tokenizer, ids)
    assert stop is None
    assert "".join(deltas) == TEXT
    assert not any("\ufffd" in d for d in deltas)


@pytest.mark.parametrize("stop", ["Paris", "tal of Fr", "🙂", "end."])
def test_stop_strings_cut_the_text_exactly_even_across_tokens(tokenizer, stop):
    deltas, found = stream(tokenizer, tokenizer.encode(TEXT), stop=[stop, "never appears"])
    assert found == stop
    assert "".join(deltas) == TEXT[: TEXT.index(stop)]


def test_held_back_text_is_released_when_no_stop_follows(tokenizer):
    deltas, found = stream(tokenizer, tokenizer.encode("Pari Paris"), stop=["Paris!"])
    assert found is None and "".join(deltas) == "Pari Paris"


def test_engine_stop_string_ends_the_output(tiny_llm):
    free = tiny_llm.generate(["Once upon"], SamplingParams(temperature=0, max_tokens=40, ignore_eos=True),
                             use_tqdm=False)[0].outputs[0]
    text = free.text
    stop = text[len(text) // 2: len(text) // 2 + 3]
    cut = tiny_llm.generate(["Once upon"], SamplingParams(temperature=0, max_tokens=40, ignore_eos=True, stop=stop),
                            use_tqdm=False)[0].outputs[0]
    assert cut.text == text[: text.index(stop)]
    assert cut.finish_reason == "stop" and cut.stop_reason == stop


def test_a_stop_token_id_ends_the_output_without_its_text(tiny_llm):
    """As vLLM: the token that ended the output (EOS or a stop token id) is in token_ids, not in the text, even
    when it is an ordinary token (a Mistral answer kept with its special tokens would end in `</s>` otherwise)."""
    free = tiny_llm.generate(["The quick brown fox"], SamplingParams(temperature=0, max_tokens=12, ignore_eos=True),
                             use_tqdm=False)[0].outputs[0]
    stop_id = free.token_ids[5]
    out = tiny_llm.generate(["The quick brown fox"], SamplingParams(temperature=0, max_tokens=12, ignore_eos=True,
                                                                    stop_token_ids=[stop_id]),
                            use_tqdm=False)[0].outputs[0]
    end = free.token_ids.index(stop_id)
    assert out.token_ids == free.token_ids[:end + 1] and out.stop_reason == stop_id
    decode = tiny_llm.engine.tokenizer.decode
    assert out.text == decode(free.token_ids[:end], skip_special_tokens=True)
    assert out.text != decode(free.token_ids[:end + 1], skip_special_tokens=True)
