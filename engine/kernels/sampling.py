"""Batched sampling that stays on the device (no .item()/.tolist()), plus vLLM-style penalties.

`sample` is plain torch ops (one sort per step, only when top-k or top-p is on); `apply_penalties` is one fused
Triton kernel over [B, V]; `greedy_sample` is one Triton kernel for all-greedy batches (argmax and the finite
check in one read of the raw logits, no fp32 copy).

Sampling is the exponential race: with noise ~ Exp(1) i.i.d., argmax(probs / noise) is a sample from probs. The
caller draws the noise (per request, from its own torch.Generator), so a request's tokens depend only on its
seed, never on its batch mates, and the reference reproduces the kernel exactly from the same noise.

Filter semantics (applied in this order, on the temperature-scaled probabilities):
  min_p: keep tokens with prob >= min_p * max prob (0 = off).
  top_k: keep tokens with prob >= the k-th largest prob, so ties with the k-th all stay (k <= 0 or >= V = off).
  top_p: over the tokens still kept, renormalized, keep the smallest prefix of the sorted order whose cumulative
         prob reaches top_p (the token crossing top_p stays), plus its ties (1.0 = off).
The most probable token is always kept. Rows with temperature < 1e-5 are greedy (argmax of the raw logits).
"""
import torch

from ._triton import pdl_args, tl, triton, use_triton, wait_for_previous_kernel

GREEDY_TEMPERATURE = 1e-5


@triton.jit
def _penalties_kernel(logits_ptr, prompt_mask_ptr, counts_ptr, repetition_ptr, presence_ptr, frequency_ptr,
                      vocab, logits_stride, mask_stride, counts_stride, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < vocab
    logit = tl.load(logits_ptr + row * logits_stride + cols, mask=mask, other=0.0)
    count = tl.load(counts_ptr + row * counts_stride + cols, mask=mask, other=0).to(tl.float32)
    seen = (tl.load(prompt_mask_ptr + row * mask_stride + cols, mask=mask, other=0) != 0) | (count > 0)
    repetition = tl.load(repetition_ptr + row)
    penalized = tl.where(logit > 0, logit / repetition, logit * repetition)
    logit = tl.where(seen, penalized, logit)
    logit = logit - tl.load(frequency_ptr + row) * count - tl.load(presence_ptr + row) * (count > 0).to(tl.float32)
    tl.store(logits_ptr + row * logits_stride + cols, logit, mask=mask)


@triton.jit(do_not_specialize=["batch", "logits_stride"])
def _greedy_kernel(logits_ptr, out_ptr, vocab, logits_stride, batch, BLOCK: tl.constexpr, PDL: tl.constexpr = False):
    """One program per row. Each lane keeps its own running maximum (the first one on ties) across the chunks, so
    the loop is pure streaming; the lanes are reduced once at the end."""
    wait_for_previous_kernel(PDL)
    row = tl.program_id(0).to(tl.int64)
    lanes = tl.arange(0, BLOCK)
    best = tl.full([BLOCK], float("-inf"), tl.float32)
    best_id = tl.zeros([BLOCK], tl.int32)
    bad = tl.zeros([BLOCK], tl.int32)
    for start in range(0, vocab, BLOCK):
        cols = start + lanes
        mask = cols < vocab
        x = tl.load(logits_ptr + row * logits_stride + cols, mask=mask, other=float("-inf")).to(tl.float32)
        bad |= (mask & ((x != x) | (tl.abs(x) == float("inf")))).to(tl.int32)
        better = x > best
        best = tl.where(better, x, best)
        best_id = tl.where(better, cols, best_id)
    top = tl.max(best, 0)
    first = tl.min(tl.where(best == top, best_id, vocab), 0)  # the lowest column holding the maximum
    tl.store(out_ptr + row, tl.minimum(first, vocab - 1).to(tl.int64))
    tl.store(out_ptr + batch + row, 1 - tl.max(bad, 0).to(tl.int64))


def greedy_sample(logits: torch.Tensor, vocab: int) -> torch.Tensor:
    """logits: [B, >= vocab] (any float dtype, last dim contiguous) -> int64 [2, B]: each row's argmax over the first
    `vocab` columns (the first maximum on ties) and 1 where that row is all finite, else 0."""
    if not use_triton(logits):
        return greedy_sample_ref(logits, vocab)
    assert logits.stride(-1) == 1
    batch = logits.shape[0]
    out = torch.empty(2, batch, dtype=torch.int64, device=logits.device)
    if batch:
        _greedy_kernel[(batch,)](logits, out, vocab, logits.stride(0), batch, BLOCK=2048,
                                 num_warps=8, **pdl_args(logits))
    return out


def greedy_sample_ref(logits: torch.Tensor, vocab: int) -> torch.Tensor:
    logits = logits[:, :vocab].float()
    return torch.stack([logits.argmax(-1), torch.isfinite(logits).all(-1).long()])


def apply_penalties(logits: torch.Tensor, prompt_mask: torch.Tensor, output_counts: torch.Tensor,
                    repetition_penalty: torch.Tensor, presence_penalty: torch.Tensor,
                    frequency_penalty: torch.Tensor) -> torch.Tensor:
    """In place on logits [B, V] fp32. prompt_mask: bool [B, V] (token occurs in the prompt); output_counts:
    int [B, V] (times generated so far); penalties: fp32 [B] (1.0 / 0.0 / 0.0 = off).
    Repetition divides positive / multiplies negative logits of tokens seen in prompt or output;
    presence subtracts once and frequency once per occurrence, for output tokens only. Returns logits."""
    if not use_triton(logits):
        return apply_penalties_ref(logits, prompt_mask, output_counts, repetition_penalty, presence_penalty,
                                   frequency_penalty)
    assert logits.dtype == torch.float32 and logits.stride(-1) == prompt_mask.stride(-1) == output_counts.stride(-1) == 1
    batch, vocab = logits.shape
    if batch == 0:
        return logits
    block = 1024
    _penalties_kernel[(batch, triton.cdiv(vocab, block))](
        logits, prompt_mask.view(torch.uint8), output_counts, repetition_penalty, presence_penalty, frequency_penalty,
        vocab, logits.stride(0), prompt_mask.stride(0), output_counts.stride(0), BLOCK=block)
    return logits


def apply_penalties_ref(logits: torch.Tensor, prompt_mask: torch.Tensor, output_counts: torch.Tensor,
                        repetition_penalty: torch.Tensor, presence_penalty: torch.Tensor,
                        frequency_penalty: torch.Tensor) -> torch.Tensor:
    output_mask = output_counts > 0
    repetition = torch.where(prompt_mask | output_mask, repetition_penalty[:, None], 1.0)
    logits.copy_(torch.where(logits > 0, logits / repetition, logits * repetition))
    logits -= frequency_penalty[:, None] * output_counts + presence_penalty[:, None] * output_mask
    return logits


def sample(logits: torch.Tensor, temperature: torch.Tensor | None, top_k: torch.Tensor | None = None,
           top_p: torch.Tensor | None = None, min_p: torch.Tensor | None = None,
           noise: torch.Tensor | None = None) -> torch.Tensor:
    """logits: fp32 [B, V]; temperature/top_p/min_p: fp32 [B]; top_k: int [B]; noise: fp32 [B, V] of Exp(1)
    draws (> 0), or None when every row is greedy. Pass None for a filter no row uses: it skips the sort.
    Returns int64 [B] token ids. `temperature` may be None when `noise` is (every row greedy)."""
    greedy_ids = logits.argmax(-1)
    if noise is None:
        return greedy_ids
    greedy = temperature < GREEDY_TEMPERATURE
    probs = (logits.float() / torch.where(greedy, 1.0, temperature)[:, None]).softmax(-1)
    keep = probs >= _keep_threshold(probs, top_k, top_p, min_p)[:, None]
    sampled = torch.where(keep, probs / noise, -1.0).argmax(-1)
    return torch.where(greedy, greedy_ids, sampled)


def _keep_threshold(probs, top_k, top_p, min_p) -> torch.Tensor:
    """Per row, the smallest prob a token needs to survive all three filters."""
    top1 = probs.amax(-1)
    threshold = min_p * top1 if min_p is not None else torch.zeros_like(top1)
    if top_k is not None or top_p is not None:
        sorted_probs = probs.sort(-1, descending=True).values
        vocab = probs.shape[-1]
        if top_k is not None:
            k = torch.where((top_k <= 0) | (top_k > vocab), vocab, top_k).long()
            threshold = torch.maximum(threshold, sorted_probs.gather(1, k[:, None] - 1).squeeze(1))
        if top_p is not None:
            cumulative = torch.where(sorted_probs >= threshold[:, None], sorted_probs, 0.0).cumsum(-1)
            # tokens before the one whose cumulative prob reaches top_p (of the kept mass)
            cutoff = (cumulative < top_p[:, None] * cumulative[:, -1:]).sum(-1).clamp_(max=vocab - 1)
            threshold = torch.maximum(threshold, sorted_probs.gather(1, cutoff[:, None]).squeeze(1))
    return torch.minimum(threshold, top1)


def sample_ref(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor | None = None,
               top_p: torch.Tensor | None = None, min_p: torch.Tensor | None = None,
               noise: torch.Tensor | None = None) -> torch.Tensor:
    """Row by row, each filter as the module docstring states it."""
    ids = []
    for i, row in enumerate(logits.float()):
        if noise is None or temperature[i] < GREEDY_TEMPERATURE:
            ids.append(row.argmax())
            continue
        probs = (row / temperature[i]).softmax(-1)
        sorted_probs = probs.sort(descending=True).values
        keep = torch.ones_like(probs, dtype=torch.bool)
        if min_p is not None:
            keep &= probs >= min_p[i] * sorted_probs[0]
        if top_k is not None and 0 < top_k[i] < len(probs):
            keep &= probs >= sorted_probs[top_k[i] - 1]
        if top_p is not None:
            kept_sorted = probs[keep].sort(descending=True).values
            cumulative = kept_sorted.cumsum(0)
            needed = int((cumulative < top_p[i] * cumulative[-1]).sum())
            keep &= probs >= kept_sorted[min(needed, len(kept_sorted) - 1)]
        keep[probs.argmax()] = True
        ids.append(torch.where(keep, probs / noise[i], -1.0).argmax())
    return torch.stack(ids) if ids else torch.empty(0, dtype=torch.long, device=logits.device)
