"""Offline batch inference, shaped like vLLM's `LLM` so users can switch with one import."""
from __future__ import annotations

import itertools
import logging
import weakref
from collections.abc import Sequence

from tqdm import tqdm

from engine.config import EngineConfig
from engine.core import EngineCore
from engine.outputs import CompletionOutput, RequestOutput
from engine.sampling_params import SamplingParams
from engine.tokenizer import apply_chat_template

logger = logging.getLogger("strata")


class LLM:
    """Releases its workers, placement group and device memory on `shutdown()`, at the end of a `with` block, or
    when garbage-collected, whichever comes first."""

    def __init__(self, model: str = "smollm2-135m-instruct", **kwargs):
        self.config = EngineConfig(model=model, **kwargs)
        self.engine = EngineCore(self.config)
        self._release = weakref.finalize(self, self.engine.shutdown)  # must not refer to self
        self._ids = itertools.count()

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()

    def get_tokenizer(self):
        return self.engine.tokenizer

    def generate(self, prompts: str | list[int] | Sequence[str | list[int]],
                 sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
                 use_tqdm: bool = True) -> list[RequestOutput]:
        if isinstance(prompts, str) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        params = sampling_params or SamplingParams()
        params = list(params) if isinstance(params, Sequence) else [params] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError(f"got {len(prompts)} prompts but {len(params)} sampling params")
        outputs: dict[str, RequestOutput] = {}
        order = []
        try:
            for prompt, p in zip(prompts, params):
                rid = str(next(self._ids))
                ids = self.engine.add_request(rid, prompt, p)
                outputs[rid] = RequestOutput(rid, prompt if isinstance(prompt, str) else None, ids,
                                             [CompletionOutput(i, "", []) for i in range(p.n)])
                order.append(rid)
            self._run(outputs, use_tqdm)
        except BaseException:
            for rid in order:
                self.engine.abort(rid)
            raise
        return [outputs[rid] for rid in order]

    def _run(self, outputs: dict[str, RequestOutput], use_tqdm: bool) -> None:
        pending = len(outputs)
        with tqdm(total=pending, desc="Generating", unit="req", disable=not use_tqdm) as bar:
            while pending:
                for d in self.engine.step():
                    out = outputs[d.request_id]
                    if d.error is not None:  # the engine failed on this request alone; the others go on
                        if out.finished:
                            continue
                        logger.error("request %s failed: %s", d.request_id, d.error)
                        for c in out.outputs:
                            c.finish_reason = c.finish_reason or "error"
                        out.finished = True
                        pending -= 1
                        bar.update(1)
                        continue
                    c = out.outputs[d.index]
                    c.token_ids.extend(d.token_ids)
                    c.text += d.text
                    if d.logprobs is not None:
                        c.logprobs = (c.logprobs or []) + d.logprobs
                    if d.prompt_logprobs is not None:
                        out.prompt_logprobs = d.prompt_logprobs
                    out.num_cached_tokens = max(out.num_cached_tokens, d.num_cached_tokens)
                    if d.finish_reason is not None:
                        c.finish_reason, c.stop_reason = d.finish_reason, d.stop_reason
                        if all(o.finished for o in out.outputs):
                            out.finished = True
                            pending -= 1
                            bar.update(1)

    def chat(self, messages: list[dict] | list[list[dict]], sampling_params: SamplingParams | None = None,
             use_tqdm: bool = True, chat_template: str | None = None) -> list[RequestOutput]:
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        prompts = [apply_chat_template(self.engine.tokenizer, m, chat_template=chat_template) for m in conversations]
        return self.generate(prompts, sampling_params, use_tqdm)

    def start_profile(self, out_dir: str) -> None:
        """Record what every rank's host and device do (torch.profiler) until stop_profile()."""
        self.engine.executor.start_profile(out_dir)

    def stop_profile(self) -> list[str]:
        """The Chrome traces written, one per rank."""
        return self.engine.executor.stop_profile()

    def stats(self):
        return self.engine.stats()

    def shutdown(self) -> None:
        self._release()  # runs the engine's shutdown once, whatever calls it first
