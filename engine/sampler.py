"""Turns a batch of logits into next tokens: penalties, min_tokens, temperature, top-k/top-p/min-p, seeded draws.

Random draws use the exponential race (argmax of probs / Exp(1) noise), with each seeded request's noise
drawn from its own generator, so a seeded request samples the same tokens whatever its batch mates are.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from engine.sampling_params import SamplingParams


@dataclass
class SamplingState:
    """What the worker keeps per sequence between steps."""

    params: SamplingParams
    prompt_token_ids: list[int]
    stop_ids: list[int]  # masked while fewer than min_tokens are out (EOS unless ignore_eos, and stop_token_ids)
    generator: torch.Generator | None
    output_token_ids: list[int] = field(default_factory=list)


@dataclass
class SampleResult:
    token_id: int
    logprobs: dict[int, float] | None = None  # the sampled token's, plus the top-N


class Sampler:
    def __init__(self, vocab_size: int, device: torch.device, seed: int):
        self.vocab_size = vocab_size
        self.device = device
        self.generator = torch.Generator(device=device)
        self.generator.manual_seed(seed)

    def __call__(self, logits: torch.Tensor, states: list[SamplingState]) -> list[SampleResult]:
        logits = logits[:, : self.vocab_size].float()
        raw_logprobs = None
        if any(s.params.logprobs is not None for s in states):
            raw_logprobs = torch.log_softmax(logits, dim=-1)
        logits = self._apply_penalties_and_min_tokens(logits, states)
        tokens = self._draw(logits, states)
        token_list = tokens.tolist()
        results = [SampleResult(t) for t in token_list]
        if raw_logprobs is not None:
            for i, s in enumerate(states):
                if s.params.logprobs is not None:
                    results[i].logprobs = top_logprobs(raw_logprobs[i], token_list[i], s.params.logprobs)
        for s, t in zip(states, token_list):
            s.output_token_ids.append(t)
        return results

    def _apply_penalties_and_min_tokens(self, logits: torch.Tensor, states: list[SamplingState]) -> torch.Tensor:
        for i, s in enumerate(states):
            p = s.params
            if p.needs_penalties:
                logits[i] = apply_penalties(logits[i], s.prompt_token_ids, s.output_token_ids, p.repetition_penalty,
                                            p.presence_penalty, p.frequency_penalty)
            if len(s.output_token_ids) < p.min_tokens and s.stop_ids:
                logits[i, s.stop_ids] = float("-inf")
        return logits

    def _draw(self, logits: torch.Tensor, states: list[SamplingState]) -> torch.Tensor:
        greedy = torch.tensor([s.params.greedy for s in states], device=logits.device)
        if bool(greedy.all()):
            return logits.argmax(dim=-1)
        temperature = torch.tensor([max(s.params.temperature, 1e-5) if not s.params.greedy else 1.0 for s in states],
                                   device=logits.device)
        probs = filter_probs(torch.softmax(logits / temperature[:, None], dim=-1),
                             top_k=[s.params.top_k for s in states], top_p=[s.params.top_p for s in states],
                             min_p=[s.params.min_p for s in states])
        noise = torch.empty_like(probs).exponential_(generator=self.generator)
        for i, s in enumerate(states):
            if s.generator is not None and not s.params.greedy:
                noise[i].exponential_(generator=s.generator)
        sampled = (probs / noise).argmax(dim=-1)
        return torch.where(greedy, logits.argmax(dim=-1), sampled)


def apply_penalties(logits: torch.Tensor, prompt_ids: list[int], output_ids: list[int], repetition: float,
                    presence: float, frequency: float) -> torch.Tensor:
    """vLLM/OpenAI semantics: repetition over prompt and output; presence and frequency over the output only."""
    device = logits.device
    if repetition != 1.0:
        seen = torch.tensor(sorted(set(prompt_ids) | set(output_ids)), dtype=torch.long, device=device)
        if len(seen):
            vals = logits[seen]
            logits[seen] = torch.where(vals > 0, vals / repetition, vals * repetition)
    if output_ids and (presence or frequency):
        counts = torch.bincount(torch.tensor(output_ids, device=device), minlength=logits.shape[0])[: logits.shape[0]]
        logits = logits - frequency * counts - presence * (counts > 0)
    return logits


def filter_probs(probs: torch.Tensor, top_k: list[int], top_p: list[float], min_p: list[float]) -> torch.Tensor:
    """Zero out tokens outside top-k (ties at the k-th value kept), outside the smallest top-p nucleus, or below
    min_p x the top probability; the most likely token always survives. Rows are renormalised."""
    vocab = probs.shape[-1]
    if any(0 < k < vocab for k in top_k) or any(p < 1.0 for p in top_p):
        sorted_probs, _ = probs.sort(dim=-1, descending=True)
        k = torch.tensor([k if 0 < k < vocab else vocab for k in top_k], device=probs.device)
        kth = sorted_probs.gather(1, (k - 1)[:, None])
        sorted_probs = sorted_probs.masked_fill(sorted_probs < kth, 0.0)
        # Nucleus: keep a token when the mass strictly before it (in sorted order) is below top_p.
        p = torch.tensor(top_p, device=probs.device, dtype=probs.dtype)[:, None]
        mass_before = (sorted_probs.cumsum(-1) - sorted_probs) / sorted_probs.sum(-1, keepdim=True)
        keep = ((mass_before < p) | (p >= 1.0)) & (sorted_probs > 0)
        cutoff = torch.where(keep, sorted_probs, torch.ones_like(sorted_probs)).min(dim=-1, keepdim=True).values
        probs = probs.masked_fill(probs < cutoff, 0.0)
    if any(m > 0 for m in min_p):
        m = torch.tensor(min_p, device=probs.device, dtype=probs.dtype)[:, None]
        probs = probs.masked_fill(probs < m * probs.max(dim=-1, keepdim=True).values, 0.0)
    return probs / probs.sum(-1, keepdim=True)


def top_logprobs(logprobs: torch.Tensor, token_id: int, n: int) -> dict[int, float]:
    out = {}
    if n:
        values, ids = logprobs.topk(n)
        out = dict(zip(ids.tolist(), values.tolist()))
    out[token_id] = float(logprobs[token_id])
    return out
