"""Structured outputs: sequences constrained to a JSON schema, any JSON object, a regex, a choice of strings, an
EBNF grammar or a structural tag, with xgrammar.

A request's grammar is checked when it arrives (`check_grammar`: parsed, without the tokenizer), compiled against
the vocabulary in a thread pool off the step loop (cached by its text), and then each sequence gets a matcher. The
engine fills the token bitmask of the sequences that sample in a step before launching it, and advances each
matcher with every token the step returns; the sampler applies the bitmask on the device, for the whole batch."""
from __future__ import annotations

import json
import logging
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np

from engine.errors import InvalidRequestError
from engine.sampling_params import StructuredOutputsParams

logger = logging.getLogger("strata")

# A random or repetitive model can write whitespace between JSON tokens forever; a bound keeps every constrained
# output finite (as vLLM's xgrammar backend does), while still allowing indented JSON.
MAX_JSON_WHITESPACE = 16
MAX_CACHED_GRAMMARS = 256


def check_grammar(params: StructuredOutputsParams) -> None:
    """Raise InvalidRequestError if the constraint does not parse (a bad schema, regex or grammar)."""
    import xgrammar as xgr

    kind, text = params.key
    try:
        if kind == "json":
            xgr.Grammar.from_json_schema(text, max_whitespace_cnt=MAX_JSON_WHITESPACE)
        elif kind == "regex":
            xgr.Grammar.from_regex(text)
        elif kind in ("grammar", "choice"):
            xgr.Grammar.from_ebnf(_ebnf(params))
        elif kind == "structural_tag":
            xgr.Grammar.from_structural_tag(*_structural_tag_args(text))
    except InvalidRequestError:
        raise
    except Exception as e:  # noqa: BLE001 - xgrammar raises RuntimeError/ValueError with the parser's message
        raise InvalidRequestError(f"invalid {kind.replace('_', ' ')} for structured outputs: "
                                  f"{str(e).strip().splitlines()[0][:300]}", "structured_outputs") from None


def json_schema_ebnf(schema: str) -> str:
    """xgrammar's grammar for a JSON schema, with raw control characters kept out of length-bounded strings
    (xgrammar 0.2.9's `maxLength` strings allow U+0000-U+001F, which JSON forbids unescaped; its other strings
    do not)."""
    import xgrammar as xgr

    ebnf = str(xgr.Grammar.from_json_schema(schema, max_whitespace_cnt=MAX_JSON_WHITESPACE))
    return ebnf.replace(r'[^\"\\\r\n]', r'[^\0-\x1f\"\\\r\n]')


def _ebnf(params: StructuredOutputsParams) -> str:
    if params.choice is None:
        return params.grammar
    return "root ::= " + " | ".join(json.dumps(c) for c in params.choice)  # JSON string escapes are EBNF's too


def _structural_tag_args(text: str) -> tuple:
    """vLLM's `structural_tag` shape ({"structures": [{"begin", "schema", "end"}], "triggers": [...]}), or
    xgrammar's own format (passed through)."""
    import xgrammar as xgr

    try:
        tag = json.loads(text)
    except json.JSONDecodeError as e:
        raise InvalidRequestError(f"structural_tag is not JSON: {e}", "structured_outputs") from None
    if isinstance(tag, dict) and "structures" in tag:
        items = [xgr.StructuralTagItem(begin=s["begin"], schema=json.dumps(s.get("schema", {})), end=s["end"])
                 for s in tag["structures"]]
        return items, list(tag.get("triggers", []))
    return (text,)


class GrammarCompiler:
    """Compiles constraints against one model's vocabulary, in the background, at most once per distinct text."""

    def __init__(self, tokenizer, vocab_size: int, stop_token_ids: set[int]):
        self._tokenizer, self._vocab_size, self._stop_ids = tokenizer, vocab_size, sorted(stop_token_ids)
        self._compiler = None  # built on first use: the vocabulary scan costs ~0.1 s per 50k tokens
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="strata-grammar")
        self._cache: dict[tuple[str, str], Future] = {}

    @property
    def bitmask_words(self) -> int:
        return (self._vocab_size + 31) // 32

    def submit(self, params: StructuredOutputsParams) -> Future:
        """A future of the compiled grammar (already done when this text was compiled before)."""
        key = params.key
        future = self._cache.get(key)
        if future is None or (future.done() and future.exception() is not None):
            if len(self._cache) >= MAX_CACHED_GRAMMARS:
                self._cache.pop(next(iter(self._cache)))
            future = self._cache[key] = self._pool.submit(self._compile, params)
        return future

    def _compile(self, params: StructuredOutputsParams):
        import xgrammar as xgr

        if self._compiler is None:
            info = xgr.TokenizerInfo.from_huggingface(self._tokenizer, vocab_size=self._vocab_size,
                                                      stop_token_ids=self._stop_ids or None)
            self._compiler = xgr.GrammarCompiler(info, max_threads=1)
        kind, text = params.key
        if kind == "json":
            return self._compiler.compile_grammar(json_schema_ebnf(text))
        if kind == "json_object":  # OpenAI's json_object is an object (xgrammar's builtin JSON allows arrays too)
            return self._compiler.compile_grammar(json_schema_ebnf('{"type": "object"}'))
        if kind == "regex":
            return self._compiler.compile_regex(text)
        if kind == "structural_tag":
            return self._compiler.compile_structural_tag(*_structural_tag_args(text))
        return self._compiler.compile_grammar(_ebnf(params))

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


class SequenceGrammar:
    """One sequence's matcher: the grammar state after the tokens it has output. `starts_after`: a token (a
    reasoning model's `</think>`) before which the output is free and the grammar does not move."""

    def __init__(self, compiled, starts_after: int | None = None):
        import xgrammar as xgr

        self._matcher = xgr.GrammarMatcher(compiled)
        self.starts_after = starts_after

    def fill_bitmask(self, bitmask: np.ndarray, row: int) -> None:
        """The tokens allowed next, as bits in `bitmask[row]` (all of them before the grammar starts and after it
        has ended)."""
        if self.starts_after is not None or self._matcher.is_terminated():
            bitmask[row] = -1
        else:
            self._matcher.fill_next_token_bitmask(bitmask, row)

    def accept(self, token_id: int) -> bool:
        """Advance past a sampled token; False if the grammar does not allow it (it then stays where it was)."""
        if self.starts_after is not None:
            if token_id == self.starts_after:
                self.starts_after = None
            return True
        return self._matcher.is_terminated() or self._matcher.accept_token(token_id)

    @property
    def is_terminated(self) -> bool:
        """The grammar is complete and a stop token was accepted: the sequence is done."""
        return self.starts_after is None and self._matcher.is_terminated()


REASONING_TAGS = ("<think>", "</think>")


def reasoning_tag_ids(tokenizer) -> tuple[int, int] | None:
    """The token ids of `<think>` and `</think>`, or None (with a warning) where either is not one token: then
    structured outputs constrain the whole output, reasoning included."""
    ids = tuple(tokenizer.convert_tokens_to_ids(tag) for tag in REASONING_TAGS)
    if any(i is None or i == tokenizer.unk_token_id for i in ids):
        logger.warning("reasoning_parser is set, but this tokenizer has no single token for %s: structured outputs "
                       "will constrain the reasoning too", " or ".join(REASONING_TAGS))
        return None
    return ids


def reasoning_ended(prompt_ids: list[int], tags: tuple[int, int]) -> bool:
    """Whether a prompt already closes the reasoning, as a template does when thinking is off (Qwen3's
    `enable_thinking: false` writes an empty <think></think>): its last `</think>` comes after its last `<think>`."""
    start, end = tags
    last = {t: i for i, t in enumerate(prompt_ids) if t in tags}
    return last.get(end, -1) > last.get(start, -1)
