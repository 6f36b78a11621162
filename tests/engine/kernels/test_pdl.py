"""On a Hopper GPU: programmatic dependent launch (kernels/_triton.pdl_args) lets each Triton kernel be scheduled
while the one before it drains; every kernel waits for the one before it before it reads or writes. A kernel that
read too early would change the numbers, so the same greedy tokens and logprobs must come out, bit for bit, with it
on (and weights asked into L2 ahead) as with it off. Two layers of Llama-3-8B's shape, so that the matrix-vector
kernels have grids of hundreds of programs: bfloat16, FP8 W8A8 and INT4 W4A16. Skipped below Hopper."""
import pytest
import torch

from engine import LLM, SamplingParams
from tests.support.prompts import random_prompts

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.get_device_capability() < (9, 0), reason="needs a Hopper GPU")]

PARAMS = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, logprobs=2)


@pytest.fixture(scope="module")
def llama3_8b_layers(tmp_path_factory):
    from benchmarks.make_random_model import make

    root = tmp_path_factory.mktemp("llama3-8b-2l")

    def get(fmt: str | None):
        out = root / (fmt or "bf16")
        return out if (out / "config.json").exists() else make("llama3-8b", out, layers=2, fmt=fmt)

    return get


def generate(path, monkeypatch, pdl: str | None, prefetch: str | None):
    """pdl, prefetch: STRATA_PDL and STRATA_PDL_PREFETCH (None: unset, the defaults)."""
    for name, value in (("STRATA_PDL", pdl), ("STRATA_PDL_PREFETCH", prefetch)):
        if value is None:
            monkeypatch.delenv(name, raising=False)
        else:
            monkeypatch.setenv(name, value)
    llm = LLM(str(path), max_num_seqs=8, gpu_memory_utilization=0.5)
    try:
        assert llm.engine.executor.describe()["cuda_graphs"]
        one = llm.generate(random_prompts(seed=3, lens=(40,)), PARAMS, use_tqdm=False)  # batch-1 decode
        many = llm.generate(random_prompts(seed=4, lens=(7, 90, 33, 250)), PARAMS, use_tqdm=False)
    finally:
        llm.shutdown()
    return [(o.outputs[0].token_ids, o.outputs[0].logprobs) for o in one + many]


@pytest.mark.parametrize("fmt", [None, "fp8-dynamic", "w4a16"])
def test_dependent_launch_changes_no_number(llama3_8b_layers, monkeypatch, fmt):
    path = llama3_8b_layers(fmt)
    off = generate(path, monkeypatch, "0", "0")
    assert generate(path, monkeypatch, None, None) == off
    assert generate(path, monkeypatch, "gemv,int4,mm,moe,small", "4096") == off  # every family, 4 KB ahead
