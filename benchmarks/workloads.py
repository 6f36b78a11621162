"""The shared benchmark workloads (W1, W2, W3), re-implemented draw for draw from shared/bench/workloads.py
so that this repo runs them without the shared folder; tests/benchmarks checks the prompts are identical."""
import numpy as np


def w1_single(prompt_len=128, out_len=256, vocab=10000, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, vocab, size=prompt_len).tolist()], [out_len]


def w2_nano_vllm(n=256, lo=100, hi=1024, vocab=10000, seed=0):
    rng = np.random.default_rng(seed)
    in_lens = rng.integers(lo, hi + 1, size=n)
    out_lens = rng.integers(lo, hi + 1, size=n)
    prompts = [rng.integers(0, vocab, size=int(n_in)).tolist() for n_in in in_lens]
    return prompts, [int(x) for x in out_lens]


def _lognormal_lengths(rng, n, mean, sigma, lo, hi):
    mu = np.log(mean) - sigma ** 2 / 2
    return np.clip(np.rint(rng.lognormal(mean=mu, sigma=sigma, size=n)), lo, hi).astype(np.int64)


def w3_sharegpt_like(n=1000, in_mean=215.0, out_mean=197.0, sigma=0.9, lo=4, hi=1024, vocab=10000, seed=0):
    rng = np.random.default_rng(seed)
    in_lens = _lognormal_lengths(rng, n, in_mean, sigma, lo, hi)
    out_lens = _lognormal_lengths(rng, n, out_mean, sigma, lo, hi)
    prompts = [rng.integers(0, vocab, size=int(n_in)).tolist() for n_in in in_lens]
    return prompts, [int(x) for x in out_lens]


WORKLOADS = {"W1": w1_single, "W2": w2_nano_vllm, "W3": w3_sharegpt_like}
