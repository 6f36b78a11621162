"""Turns a batch of logits into next tokens: penalties, min_tokens, temperature, top-k/top-p/min-p, seeded draws.

The filters and the draw are `engine.kernels.sampling` (device-resident; the exponential race, argmax of
probs / Exp(1) noise). Each seeded request's noise row comes from its own generator, so a seeded request samples
the same tokens whatever its batch mates are.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from engine.kernels.sampling import apply_penalties, greedy_sample, sample
from engine.sampling_params import SamplingParams
from engine.step import SampleResult


@dataclass
class SamplingState:
    """What the worker keeps per sequence between steps."""

    params: SamplingParams
    prompt_token_ids: list[int]
    stop_ids: list[int]  # masked while fewer than min_tokens are out (EOS unless ignore_eos, and stop_token_ids)
    generator: torch.Generator | None
    output_token_ids: list[int] = field(default_factory=list)

    def __post_init__(self):
        p = self.params  # fixed for the sequence's life: checked once, not every step
        self.plain_params = (p.greedy and p.logprobs is None and not p.needs_penalties and not p.logit_bias)


@dataclass
class SamplerLaunch:
    """Tokens drawn on the device, on their way to the host."""

    states: list[SamplingState]
    tokens: torch.Tensor  # [batch] on the device: the next step may read them before the host does
    host: torch.Tensor  # [2, batch] tokens and "logits were finite", copied without blocking
    ready: torch.cuda.Event | None
    raw_logprobs: torch.Tensor | None


class NonFiniteLogitsError(RuntimeError):
    """The model produced NaN or infinite logits: a bad input or bad weights, not something sampling can fix."""


class Sampler:
    def __init__(self, vocab_size: int, device: torch.device, seed: int):
        self.vocab_size = vocab_size
        self.device = device
        self.generator = torch.Generator(device=device)
        self.generator.manual_seed(seed)

    def warm_up(self, dtype: torch.dtype) -> None:
        """Compile the greedy kernel at start-up rather than inside the first greedy request."""
        greedy_sample(torch.zeros(1, self.vocab_size, dtype=dtype, device=self.device), self.vocab_size)

    def __call__(self, logits: torch.Tensor, states: list[SamplingState]) -> list[SampleResult]:
        return self.finish(self.launch(logits, states))

    def launch(self, logits: torch.Tensor, states: list[SamplingState],
               bitmask: tuple[np.ndarray, list[int]] | None = None) -> SamplerLaunch:
        """Draw the batch's tokens on the device and start copying them to the host. `bitmask`: structured
        outputs' allowed tokens (xgrammar's packed bitmask) and the rows it constrains."""
        raw_logprobs = None
        if bitmask is None and all(_plain_greedy(s) for s in states):  # one kernel over the raw logits
            both = greedy_sample(logits, self.vocab_size)
            tokens = both[0]
        else:
            logits = logits[:, : self.vocab_size].float().contiguous()
            finite = torch.isfinite(logits).all(dim=-1)  # read back with the tokens: no extra device sync
            if bitmask is not None:
                self._mask(logits, *bitmask)
            if any(s.params.logprobs is not None for s in states):
                raw_logprobs = torch.log_softmax(logits, dim=-1)
            if any(s.params.needs_penalties for s in states):
                self._penalize(logits, states)
            if any(s.params.logit_bias for s in states):
                self._bias(logits, states)
            for i, s in enumerate(states):
                if _masks_stop_ids(s):
                    logits[i, s.stop_ids] = float("-inf")
            tokens = self._draw(logits, states)
            both = torch.stack([tokens, finite.long()])
        if logits.device.type != "cuda":
            return SamplerLaunch(states, tokens, both, None, raw_logprobs)
        host = torch.empty(both.shape, dtype=both.dtype, pin_memory=True)
        host.copy_(both, non_blocking=True)
        ready = torch.cuda.Event()
        ready.record()
        return SamplerLaunch(states, tokens, host, ready, raw_logprobs)

    def finish(self, launched: SamplerLaunch) -> list[SampleResult]:
        """Wait for the tokens; raise before any state changes if the logits were not finite."""
        if launched.ready is not None:
            launched.ready.synchronize()
        token_list, finite_list = launched.host.tolist()
        if not all(finite_list):  # raised before any state changes, so the step can be rerun without this request
            raise NonFiniteLogitsError("the model produced non-finite logits (NaN or inf) for this input")
        results = [SampleResult(t) for t in token_list]
        states, raw_logprobs = launched.states, launched.raw_logprobs
        if raw_logprobs is not None:
            for i, s in enumerate(states):
                if s.params.logprobs is not None:
                    results[i].logprobs = top_logprobs(raw_logprobs[i], token_list[i], s.params.logprobs)
        for s, t in zip(states, token_list):
            s.output_token_ids.append(t)
        return results

    def _penalize(self, logits: torch.Tensor, states: list[SamplingState]) -> None:
        batch, vocab = logits.shape
        prompt_mask = torch.zeros(batch, vocab, dtype=torch.bool, device=logits.device)
        counts = torch.zeros(batch, vocab, dtype=torch.int32, device=logits.device)
        for i, s in enumerate(states):
            if s.params.needs_penalties:
                prompt_mask[i, torch.tensor(s.prompt_token_ids, device=logits.device)] = True
                if s.output_token_ids:
                    out = torch.tensor(s.output_token_ids, device=logits.device)
                    counts[i] = torch.bincount(out, minlength=vocab)[:vocab].int()
        apply_penalties(logits, prompt_mask, counts, self._column(states, "repetition_penalty"),
                        self._column(states, "presence_penalty"), self._column(states, "frequency_penalty"))

    def _mask(self, logits: torch.Tensor, bitmask: np.ndarray, rows: list[int]) -> None:
        """-inf where the grammar forbids a token: one copy of the bitmask to the device, one kernel for the batch
        (xgrammar's Triton kernel on CUDA, torch elsewhere)."""
        import xgrammar as xgr

        rows_mask = torch.from_numpy(bitmask)
        if logits.device.type == "cuda":
            rows_mask = rows_mask.pin_memory().to(logits.device, non_blocking=True)
        mask = torch.full((logits.shape[0], bitmask.shape[1]), -1, dtype=torch.int32, device=logits.device)
        mask[to_device(rows, torch.int64, self.device)] = rows_mask  # xgrammar indexes logits and mask alike
        backend = "triton" if logits.device.type == "cuda" else "torch_native"
        xgr.apply_token_bitmask_inplace(logits, mask, vocab_size=self.vocab_size, indices=rows, backend=backend)

    def _bias(self, logits: torch.Tensor, states: list[SamplingState]) -> None:
        """Add each request's logit_bias to its row, in one scatter for the batch."""
        rows, cols, values = [], [], []
        for i, s in enumerate(states):
            for token_id, bias in (s.params.logit_bias or {}).items():
                rows.append(i)
                cols.append(token_id)
                values.append(bias)
        index = (to_device(rows, torch.int64, self.device), to_device(cols, torch.int64, self.device))
        logits.index_put_(index, to_device(values, torch.float32, self.device), accumulate=True)

    def _column(self, states: list[SamplingState], name: str, dtype=torch.float32) -> torch.Tensor:
        return to_device([getattr(s.params, name) for s in states], dtype, self.device)

    def _draw(self, logits: torch.Tensor, states: list[SamplingState]) -> torch.Tensor:
        if all(s.params.greedy for s in states):
            return sample(logits, None)  # argmax: no temperature to copy to the device
        noise = torch.empty_like(logits).exponential_(generator=self.generator)
        for i, s in enumerate(states):
            if s.generator is not None and not s.params.greedy:
                noise[i].exponential_(generator=s.generator)
        params = [s.params for s in states]
        top_k = self._column(states, "top_k", torch.int64) if any(p.top_k > 0 for p in params) else None
        top_p = self._column(states, "top_p") if any(p.top_p < 1.0 for p in params) else None
        min_p = self._column(states, "min_p") if any(p.min_p > 0 for p in params) else None
        return sample(logits, self._column(states, "temperature"), top_k, top_p, min_p, noise)


def _masks_stop_ids(s: SamplingState) -> bool:
    return len(s.output_token_ids) < s.params.min_tokens and bool(s.stop_ids)


def _plain_greedy(s: SamplingState) -> bool:
    """Argmax of the raw logits is the whole answer: no logprobs, penalties or masked stop tokens."""
    return s.plain_params and not _masks_stop_ids(s)


def to_device(data, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A host list, or a numpy array of that dtype, on the device without waiting for the GPU (pinned memory,
    asynchronous copy)."""
    t = torch.from_numpy(data) if isinstance(data, np.ndarray) else torch.tensor(data, dtype=dtype)
    assert t.dtype == dtype, f"{t.dtype} given for {dtype}"
    return t.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else t


def top_logprobs(logprobs: torch.Tensor, token_id: int, n: int) -> dict[int, float]:
    out = {}
    if n:
        values, ids = logprobs.topk(n)
        out = dict(zip(ids.tolist(), values.tolist()))
    out[token_id] = float(logprobs[token_id])
    return out
