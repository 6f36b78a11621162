"""Sampling: seeds reproduce whatever the batch, filters never leak excluded tokens, draws follow the distribution."""
import pytest
import torch
from scipy import stats as scistats

from engine import SamplingParams
from engine.kernels.sampling import apply_penalties
from engine.sampler import Sampler, SamplingState

VOCAB = 32


def states(params_list, seeds=None):
    out = []
    for i, p in enumerate(params_list):
        seed = (seeds or [None] * len(params_list))[i]
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        out.append(SamplingState(p, [1, 2, 3], [0], gen))
    return out


def filtered_distribution(logits, p: SamplingParams) -> torch.Tensor:
    """What the filters promise, computed the plain way: min_p, then top-k (ties kept), then the top-p nucleus."""
    probs = torch.softmax(logits / p.temperature, -1)
    keep = probs >= p.min_p * probs.max()
    if p.top_k:
        keep &= probs >= probs.sort(descending=True).values[p.top_k - 1]
    kept = torch.where(keep, probs, 0.0)
    sorted_p, order = kept.sort(descending=True)
    mass_before = (sorted_p.cumsum(0) - sorted_p) / sorted_p.sum()
    nucleus = torch.zeros_like(keep)
    nucleus[order[(mass_before < p.top_p) & (sorted_p > 0)]] = True
    kept = torch.where(nucleus, probs, 0.0)
    return kept / kept.sum()


def draw(sampler, logits, params, n, seed=None):
    counts = torch.zeros(logits.shape[-1])
    st = states([params], [seed])
    for _ in range(n):
        st[0].output_token_ids.clear()
        counts[sampler(logits[None].clone(), st)[0].token_id] += 1
    return counts


@pytest.fixture
def sampler():
    return Sampler(VOCAB, torch.device("cpu"), seed=0)


@pytest.fixture
def logits():
    return torch.randn(VOCAB, generator=torch.Generator().manual_seed(0)) * 2


def test_greedy_is_argmax(sampler, logits):
    assert sampler(logits[None].clone(), states([SamplingParams(temperature=0)]))[0].token_id == logits.argmax()


@pytest.mark.parametrize("params, allowed", [
    (dict(top_k=3), lambda p: p.topk(3).indices),
    (dict(top_p=0.5), None),
    (dict(min_p=0.2), lambda p: (p >= 0.2 * p.max()).nonzero().flatten()),
])
def test_filters_never_emit_excluded_tokens(sampler, logits, params, allowed):
    probs = torch.softmax(logits, -1)
    if allowed is None:  # nucleus: smallest set of top tokens whose mass reaches top_p
        sorted_p, idx = probs.sort(descending=True)
        keep = (sorted_p.cumsum(0) - sorted_p) < 0.5
        allowed_ids = set(idx[keep].tolist())
    else:
        allowed_ids = set(allowed(probs).tolist())
    counts = draw(sampler, logits, SamplingParams(temperature=1.0, **params), 600)
    assert set(counts.nonzero().flatten().tolist()) <= allowed_ids
    assert len(set(counts.nonzero().flatten().tolist())) > 1


@pytest.mark.parametrize("params", [dict(temperature=1.0), dict(temperature=0.7, top_k=6), dict(temperature=1.3, top_p=0.8)])
def test_draws_follow_the_filtered_distribution(sampler, logits, params):
    p = SamplingParams(**params)
    expected = filtered_distribution(logits, p)
    n = 4000
    counts = draw(sampler, logits, p, n)
    support = expected > 0
    assert counts[~support].sum() == 0
    _, pvalue = scistats.chisquare(counts[support].numpy(), (expected[support] * n).numpy())
    assert pvalue > 1e-3


def test_seeded_requests_reproduce_regardless_of_batch_mates(logits):
    p = SamplingParams(temperature=1.0, seed=123)
    alone = Sampler(VOCAB, torch.device("cpu"), seed=0)
    crowd = Sampler(VOCAB, torch.device("cpu"), seed=99)
    s_alone = states([p], [123])
    s_crowd = states([SamplingParams(temperature=1.0), p, SamplingParams(temperature=0.5, seed=5)], [None, 123, 5])
    a, b = [], []
    for _ in range(20):
        a.append(alone(logits[None].clone(), s_alone)[0].token_id)
        b.append(crowd(logits[None].repeat(3, 1), s_crowd)[1].token_id)
    assert a == b


def test_min_tokens_masks_stop_ids(sampler):
    logits = torch.full((VOCAB,), -5.0)
    logits[0] = 10.0  # the stop id is by far the most likely
    st = states([SamplingParams(temperature=0, min_tokens=2)])
    got = [sampler(logits[None].clone(), st)[0].token_id for _ in range(3)]
    assert got[0] != 0 and got[1] != 0 and got[2] == 0


def test_penalties_follow_openai_semantics():
    logits = torch.tensor([[2.0, -2.0, 1.0, 0.5]])
    prompt_mask = torch.tensor([[True, False, False, False]])
    counts = torch.tensor([[0, 1, 2, 0]])
    out = apply_penalties(logits.clone(), prompt_mask, counts, torch.tensor([2.0]), torch.tensor([0.5]),
                          torch.tensor([0.25]))
    assert out[0].tolist() == pytest.approx([1.0, -4.0 - 0.75, 0.5 - 1.0, 0.5])


def test_engine_penalties_discourage_repeats(tiny_llm):
    free = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)
    penalized = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True, frequency_penalty=2.0,
                               presence_penalty=2.0)
    a, b = (tiny_llm.generate(["aaaa"], p, use_tqdm=False)[0].outputs[0].token_ids for p in (free, penalized))
    assert len(set(b)) > len(set(a))


def test_logprobs_include_the_sampled_token_and_top_n(sampler, logits):
    res = sampler(logits[None].clone(), states([SamplingParams(temperature=1.0, logprobs=3, seed=1)], [1]))[0]
    ref = torch.log_softmax(logits, -1)
    assert res.token_id in res.logprobs and len(res.logprobs) in (3, 4)
    for tok, lp in res.logprobs.items():
        assert lp == pytest.approx(ref[tok].item(), abs=1e-5)


def test_engine_seeded_generation_is_batch_independent(tiny_llm):
    p = SamplingParams(temperature=1.0, seed=7, max_tokens=10, ignore_eos=True)
    alone = tiny_llm.generate(["The quick brown fox"], p, use_tqdm=False)[0].outputs[0].token_ids
    others = SamplingParams(temperature=1.0, max_tokens=15, ignore_eos=True)
    batch = tiny_llm.generate(["Hello", "The quick brown fox", "Numbers: 1 2 3"], [others, p, others], use_tqdm=False)
    assert batch[1].outputs[0].token_ids == alone
