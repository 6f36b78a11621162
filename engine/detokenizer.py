"""Detokenization, all of it: a completion's text, incrementally and with stop strings (never half a UTF-8
character or part of a stop string), and the text of each token that logprobs name."""
from __future__ import annotations

from tokenizers.decoders import DecodeStream

from engine.sampling_params import SamplingParams

PROMPT_CONTEXT_TOKENS = 8  # enough prompt tokens for the decoder to place spaces the way a full decode would


class IncrementalDetokenizer:
    def __init__(self, tokenizer, prompt_token_ids: list[int], params: SamplingParams):
        self.backend = tokenizer.backend_tokenizer  # the `tokenizers.Tokenizer` behind a fast HF tokenizer
        self.stream = DecodeStream(ids=prompt_token_ids[-PROMPT_CONTEXT_TOKENS:],
                                   skip_special_tokens=params.skip_special_tokens)
        self.stop = params.stop or []
        # Text that could still become the start of a stop string is held back until it cannot.
        self.hold = max((len(s) for s in self.stop), default=1) - 1
        self.text = ""
        self.emitted = 0

    def add(self, token_ids: list[int]) -> tuple[str, str | None]:
        """Feed new tokens; return (text to emit now, the stop string that ended the output or None)."""
        if not self.stop:  # nothing to hold back or look for (the common case, once a token): no text kept
            pieces = [piece for t in token_ids if (piece := self.stream.step(self.backend, t))]
            return (pieces[0] if len(pieces) == 1 else "".join(pieces)), None
        checked = len(self.text)
        for t in token_ids:
            piece = self.stream.step(self.backend, t)
            if piece:
                self.text += piece
        stop = self._find_stop(max(0, checked - self.hold))
        end = len(self.text) if stop else max(self.emitted, len(self.text) - self.hold)
        delta = self.text[self.emitted:end]
        self.emitted = end
        return delta, stop

    def flush(self) -> str:
        """The held-back tail, once the output has ended for another reason."""
        delta = self.text[self.emitted:]
        self.emitted = len(self.text)
        return delta

    def _find_stop(self, start: int) -> str | None:
        best = None
        for s in self.stop:
            i = self.text.find(s, start)
            if i != -1 and (best is None or i < best[0]):
                best = (i, s)
        if best is None:
            return None
        self.text = self.text[: best[0]]
        return best[1]


def token_texts(tokenizer, token_ids: list[int], logprobs: list[dict[int, float] | None]) -> dict[int, str]:
    """The text of each token in `token_ids` and in the logprob entries, one token decoded alone (as OpenAI's
    logprobs show tokens)."""
    ids = set(token_ids)
    for entry in logprobs:
        if entry:
            ids.update(entry)
    return {t: tokenizer.decode([t]) for t in ids}
