"""Structured outputs on a tiny random model: a random model writes valid output only because the constraint makes
it, so every output is checked against its schema, regex, choices or grammar, at temperature 0 and 1. The grammar
state must follow every engine path: n > 1, async scheduling, chunked prefill, preemption, prefix-cache hits."""
import json
import re

import jsonschema
import pytest

from engine import LLM, InvalidRequestError, SamplingParams, StructuredOutputsParams
from tests.support.prompts import random_prompts

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 6},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "admin": {"type": "boolean"},
        "tags": {"type": "array", "items": {"enum": ["a", "bb", "ccc"]}, "maxItems": 3},
        "role": {"enum": ["user", "owner"]},
    },
    "required": ["name", "age", "admin", "tags", "role"],
    "additionalProperties": False,
}
ARITHMETIC = 'root ::= "(" num (("+" | "*") num)* ")"\nnum ::= [0-9] | [1-9] [0-9]'
CONSTRAINTS = {
    "json": (StructuredOutputsParams(json=SCHEMA), lambda text: jsonschema.validate(json.loads(text), SCHEMA)),
    "regex": (StructuredOutputsParams(regex=r"[A-Z][a-z]{2,5}-\d{3}"),
              lambda text: re.fullmatch(r"[A-Z][a-z]{2,5}-\d{3}", text) or pytest.fail(text)),
    "choice": (StructuredOutputsParams(choice=["red", "green", 'say "blue"']),
               lambda text: text in ("red", "green", 'say "blue"') or pytest.fail(text)),
    "grammar": (StructuredOutputsParams(grammar=ARITHMETIC),
                lambda text: re.fullmatch(r"\((?:[0-9]|[1-9][0-9])(?:[+*](?:[0-9]|[1-9][0-9]))*\)", text)
                or pytest.fail(text)),
}
PROMPTS = random_prompts(seed=5, lens=(9, 40, 70))


@pytest.fixture(scope="module")
def llm(tiny_model_dir):
    engine = LLM(str(tiny_model_dir("llama")), max_num_seqs=16)
    yield engine
    engine.shutdown()


def constrained(kind: str, **sampling) -> SamplingParams:
    return SamplingParams(max_tokens=160, structured_outputs=CONSTRAINTS[kind][0], **sampling)


def check_all(kind: str, outputs) -> None:
    for out in outputs:
        for c in out.outputs:
            assert c.finish_reason == "stop", (kind, c.text)
            CONSTRAINTS[kind][1](c.text)


@pytest.mark.parametrize("kind", list(CONSTRAINTS))
def test_every_output_is_valid_at_any_temperature(llm, kind):
    outs = llm.generate(PROMPTS, constrained(kind, temperature=0), use_tqdm=False)
    outs += llm.generate(PROMPTS, constrained(kind, temperature=1.0, n=3, seed=7), use_tqdm=False)
    check_all(kind, outs)


def test_unconstrained_output_of_the_same_model_is_not_valid(llm):
    """The proof that the constraint, not the model, makes the JSON: without it the model writes no JSON."""
    outs = llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=40), use_tqdm=False)
    for out in outs:
        with pytest.raises(ValueError):
            json.loads(out.outputs[0].text)


def test_any_json_object(llm):
    """Any JSON object: a random model may write one string forever, so only the outputs that ended are parsed,
    and every output is an object's beginning."""
    outs = llm.generate(PROMPTS, SamplingParams(temperature=1.0, seed=3, n=6, max_tokens=60,
                                                structured_outputs=StructuredOutputsParams(json_object=True)),
                        use_tqdm=False)
    ended = [c.text for out in outs for c in out.outputs if c.finish_reason == "stop"]
    assert all(c.text.lstrip().startswith("{") for out in outs for c in out.outputs)
    assert ended and all(isinstance(json.loads(text), dict) for text in ended)


def test_a_batch_mixes_constrained_and_free_requests(llm):
    """Each row gets its own mask, and free rows none: the free request generates what it does alone."""
    free = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    alone = llm.generate(PROMPTS[:1], free, use_tqdm=False)[0].outputs[0].token_ids
    outs = llm.generate(PROMPTS * 2, [free, constrained("json", temperature=0), constrained("regex", temperature=0),
                                      free, constrained("choice", temperature=1.0, seed=3),
                                      constrained("grammar", temperature=1.0, seed=4)], use_tqdm=False)
    assert outs[0].outputs[0].token_ids == alone == outs[3].outputs[0].token_ids
    for out, kind in ((outs[1], "json"), (outs[2], "regex"), (outs[4], "choice"), (outs[5], "grammar")):
        check_all(kind, [out])


@pytest.mark.parametrize("options", [
    {"async_scheduling": True},
    {"max_num_batched_tokens": 16},  # chunked prefill
    {"num_kv_blocks": 10, "block_size": 16, "enable_prefix_caching": False},  # preemption and recompute
])
def test_the_grammar_follows_every_engine_path(tiny_model_dir, llm, options):
    """The same tokens as plain synchronous steps: the matcher advanced exactly once per accepted token."""
    params = [constrained("json", temperature=1.0, seed=11, n=2), constrained("grammar", temperature=0),
              constrained("regex", temperature=1.0, seed=12)]
    expected = llm.generate(PROMPTS, params, use_tqdm=False)
    other = LLM(str(tiny_model_dir("llama")), max_num_seqs=16, **options)
    launched = []  # a spy: every step goes through unchanged
    execute_async = other.engine.executor.execute_async
    other.engine.executor.execute_async = lambda batch: launched.append(batch) or execute_async(batch)
    try:
        got = other.generate(PROMPTS, params, use_tqdm=False)
        assert other.stats().preemptions > 0 or "num_kv_blocks" not in options
    finally:
        other.shutdown()
    assert [[c.token_ids for c in o.outputs] for o in got] == [[c.token_ids for c in o.outputs] for o in expected]
    check_all("json", [got[0]])
    if options.get("async_scheduling"):  # constrained rows decoded ahead, their bitmask sent after the launch
        assert sum(b.bitmask_later for b in launched) > len(launched) // 2


@pytest.mark.parametrize("options", [{"tensor_parallel_size": 2}, {"pipeline_parallel_size": 2}], ids=["tp2", "pp2"])
def test_the_bitmask_reaches_parallel_workers(tiny_model_dir, llm, local_ray, options):
    """TP ranks each sample with the step's bitmask; under PP the last stage does, with micro-batches in flight."""
    params = [constrained("json", temperature=1.0, seed=11, n=2), constrained("choice", temperature=0),
              SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)]
    expected = llm.generate(PROMPTS, params, use_tqdm=False)
    parallel = LLM(str(tiny_model_dir("llama")), max_num_seqs=16, **options)
    try:
        got = parallel.generate(PROMPTS, params, use_tqdm=False)
    finally:
        parallel.shutdown()
    assert [[c.token_ids for c in o.outputs] for o in got] == [[c.token_ids for c in o.outputs] for o in expected]


def test_prefix_cache_hits_and_stop_strings(llm):
    params = constrained("json", temperature=0)
    first = llm.generate(PROMPTS[2:], params, use_tqdm=False)[0]
    again = llm.generate(PROMPTS[2:], params, use_tqdm=False)[0]
    assert again.num_cached_tokens > 0 and again.outputs[0].token_ids == first.outputs[0].token_ids
    cut = llm.generate(PROMPTS[2:], SamplingParams(max_tokens=160, temperature=0, stop=['"age"'],
                                                   structured_outputs=StructuredOutputsParams(json=SCHEMA)),
                       use_tqdm=False)[0].outputs[0]
    assert cut.finish_reason == "stop" and first.outputs[0].text.startswith(cut.text) and '"age"' not in cut.text


@pytest.mark.parametrize("spec, words", [
    (dict(json={"type": "object", "properties": {"a": {"type": "nonsense"}}}), "json"),
    (dict(json='{"type": '), "json"),
    (dict(regex="(unclosed"), "regex"),
    (dict(grammar="root ::= missing_rule"), "grammar"),
])
def test_a_bad_constraint_is_refused_when_the_request_arrives(llm, spec, words):
    with pytest.raises(InvalidRequestError) as e:
        llm.generate(PROMPTS[:1], SamplingParams(structured_outputs=StructuredOutputsParams(**spec)), use_tqdm=False)
    assert e.value.param == "structured_outputs" and words in e.value.message


def test_exactly_one_constraint():
    for spec in ({}, {"json": {}, "regex": "a"}, {"choice": []}):
        with pytest.raises(InvalidRequestError):
            StructuredOutputsParams(**spec)


def test_a_reasoning_models_grammar_starts_after_its_reasoning(tiny_model_dir, tmp_path):
    """With a reasoning parser, the output is free until `</think>` and constrained after it; a prompt whose
    template already closed the reasoning (thinking off) is constrained from its first token. A logit bias makes
    the random model write `</think>` whenever it may."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = tmp_path / "reasoning"
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir("llama"))
    tokenizer.add_special_tokens({"additional_special_tokens": ["<think>", "</think>"]})
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir("llama"))
    model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    start, end = tokenizer.convert_tokens_to_ids(["<think>", "</think>"])
    regex = CONSTRAINTS["regex"]
    params = SamplingParams(max_tokens=40, temperature=0, logit_bias={end: 100}, structured_outputs=regex[0])
    thinking, thinking_off = PROMPTS[0], PROMPTS[1] + [start, 30, end, 40]

    llm = LLM(str(path), reasoning_parser="deepseek_r1", max_num_seqs=4)
    try:
        free_first, constrained_first = llm.generate([thinking, thinking_off], params, use_tqdm=False)
    finally:
        llm.shutdown()
    assert free_first.outputs[0].token_ids[0] == end  # the bias won: the grammar had not started
    assert constrained_first.outputs[0].token_ids[0] != end
    for out in (free_first, constrained_first):
        assert out.outputs[0].finish_reason == "stop"
        regex[1](out.outputs[0].text)  # the special token is not in the text; what follows it is
