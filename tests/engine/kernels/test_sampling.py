import pytest
import torch

from engine.kernels.sampling import (apply_penalties, apply_penalties_ref, greedy_sample, greedy_sample_ref,
                                     sample, sample_ref)

VOCAB = 64


def exponential_noise(batch: int, vocab: int, device, seed: int = 0) -> torch.Tensor:
    return torch.empty(batch, vocab, device=device).exponential_(generator=torch.Generator(device).manual_seed(seed))


def random_params(batch: int, device):
    g = torch.Generator().manual_seed(1)
    temperature = torch.rand(batch, generator=g) * 1.5 + 0.1
    temperature[::5] = 0.0  # greedy rows mixed in
    top_k = torch.randint(0, 10, (batch,), generator=g)  # 0 = off
    top_p = torch.where(torch.rand(batch, generator=g) < 0.3, 1.0, torch.rand(batch, generator=g) * 0.9 + 0.05)
    min_p = torch.where(torch.rand(batch, generator=g) < 0.5, 0.0, torch.rand(batch, generator=g) * 0.3)
    return [t.to(device) for t in (temperature, top_k, top_p, min_p)]


def test_greedy_rows_are_argmax(device):
    logits = torch.randn(12, VOCAB, device=device) * 3
    temperature = torch.tensor([0.0, 1.0] * 6, device=device)
    assert torch.equal(sample(logits, temperature), logits.argmax(-1))  # no noise: every row greedy
    ids = sample(logits, temperature, noise=exponential_noise(12, VOCAB, device))
    assert torch.equal(ids[::2], logits[::2].argmax(-1))


def test_same_noise_same_tokens_as_reference(device):
    batch = 40
    logits = torch.randn(batch, VOCAB, device=device) * 2
    params = random_params(batch, device)
    for seed in range(5):
        noise = exponential_noise(batch, VOCAB, device, seed)
        assert torch.equal(sample(logits, *params, noise=noise), sample_ref(logits, *params, noise=noise))
    noise = exponential_noise(batch, VOCAB, device)
    temperature, top_k, top_p, min_p = params
    for filters in [(None, None, None), (top_k, None, None), (None, top_p, None), (None, None, min_p)]:
        assert torch.equal(sample(logits, temperature, *filters, noise=noise),
                           sample_ref(logits, temperature, *filters, noise=noise))


def test_filters_never_emit_excluded_tokens(device):
    batch = 30
    logits = torch.randn(batch, VOCAB, device=device) * 2
    temperature, top_k, top_p, min_p = random_params(batch, device)
    temperature.clamp_(min=0.5)  # sampled rows only
    probs = (logits / temperature[:, None]).softmax(-1)
    sorted_probs = probs.sort(-1, descending=True).values
    for seed in range(20):
        for name, kwargs in [("top_k", dict(top_k=top_k)), ("top_p", dict(top_p=top_p)), ("min_p", dict(min_p=min_p))]:
            ids = sample(logits, temperature, noise=exponential_noise(batch, VOCAB, device, seed), **kwargs)
            p = probs.gather(1, ids[:, None]).squeeze(1)
            if name == "top_k":
                kth = sorted_probs.gather(1, (top_k.clamp(min=1) - 1)[:, None]).squeeze(1)
                assert ((top_k == 0) | (p >= kth)).all()
            elif name == "top_p":  # the mass strictly above the chosen token must not already reach top_p
                above = (probs * (probs > p[:, None])).sum(-1)
                assert (above < top_p + 1e-6).all()
            else:
                assert (p >= min_p * sorted_probs[:, 0]).all()


def test_top_k_1_and_tiny_top_p_are_greedy(device):
    logits = torch.randn(8, VOCAB, device=device)
    temperature, noise = torch.ones(8, device=device), exponential_noise(8, VOCAB, device)
    ones = torch.ones(8, dtype=torch.long, device=device)
    assert torch.equal(sample(logits, temperature, top_k=ones, noise=noise), logits.argmax(-1))
    assert torch.equal(sample(logits, temperature, top_p=torch.full((8,), 1e-4, device=device), noise=noise),
                       logits.argmax(-1))


def test_exponential_race_samples_the_distribution(device):
    """argmax(probs / Exp(1) noise) draws token i with probability probs[i]."""
    n, logits = 20000, torch.tensor([[2.0, 1.0, 0.0, -1.0]], device=device)
    ids = sample(logits.expand(n, 4), torch.ones(n, device=device), noise=exponential_noise(n, 4, device))
    freq = torch.bincount(ids, minlength=4).float() / n
    torch.testing.assert_close(freq, logits[0].softmax(-1), atol=0.015, rtol=0)


@pytest.mark.parametrize("vocab", [64, 1500])
def test_penalties_match_reference(device, vocab):
    torch.manual_seed(0)
    batch = 6
    logits = torch.randn(batch, vocab, device=device) * 3
    prompt_mask = torch.rand(batch, vocab, device=device) < 0.2
    output_counts = torch.randint(0, 3, (batch, vocab), device=device) * (torch.rand(batch, vocab, device=device) < 0.3)
    repetition = torch.tensor([1.0, 1.3, 0.8, 1.0, 2.0, 1.1], device=device)
    presence = torch.tensor([0.0, 0.5, 0.0, -0.5, 1.0, 0.2], device=device)
    frequency = torch.tensor([0.0, 0.0, 0.3, 0.5, -0.2, 0.1], device=device)
    args = (prompt_mask, output_counts, repetition, presence, frequency)
    original = logits.clone()
    expected = apply_penalties_ref(logits.clone(), *args)
    out = apply_penalties(logits, *args)
    assert out.data_ptr() == logits.data_ptr()  # in place
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=1e-6)
    assert torch.equal(out[0], original[0])  # neutral penalties leave a row alone

def test_penalties_reference_semantics():
    logits = torch.tensor([[2.0, -2.0, 2.0, 1.0]])
    out = apply_penalties_ref(logits, torch.tensor([[True, True, False, False]]), torch.tensor([[0, 0, 2, 0]]),
                              torch.tensor([2.0]), torch.tensor([0.5]), torch.tensor([0.25]))
    # prompt tokens: 2/2, -2*2; output token seen twice: 2/2 - 0.5 - 2*0.25; unseen token unchanged
    torch.testing.assert_close(out, torch.tensor([[1.0, -4.0, 0.0, 1.0]]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_greedy_sample_kernel(device, dtype):
    """Rows longer than one 4096-wide chunk, ties across chunks (the first wins), a maximum in the padded columns
    past `vocab` (ignored), a NaN row and an inf row (reported not finite)."""
    vocab, batch = 5000, 6
    logits = torch.randn(batch, vocab + 8, device=device).to(dtype)
    logits[0, 4500] = 50.0  # in the second chunk
    logits[1, 10] = logits[1, 4200] = 40.0  # a tie across chunks
    logits[2, vocab + 3] = 99.0  # past the vocabulary (tensor-parallel padding): not a candidate
    logits[3, 7] = float("nan")
    logits[4, 4999] = float("inf")
    out = greedy_sample(logits, vocab)
    ref = greedy_sample_ref(logits, vocab)
    assert out.dtype == torch.int64 and out.shape == (2, batch)
    assert out[0, 0] == 4500 and out[0, 1] == 10 and out[0, 2] < vocab
    assert out[1].tolist() == [1, 1, 1, 0, 0, 1]
    keep = [0, 1, 2, 5]  # argmax of a row holding NaN is unspecified (the step raises for it anyway)
    assert torch.equal(out[:, keep], ref[:, keep])
