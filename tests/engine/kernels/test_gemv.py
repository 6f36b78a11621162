import pytest
import torch

from engine.kernels.gemv import GemvConfig, gemv, gemv_ref
from engine.kernels.reduce_site import ReduceSite
from engine.kernels.rms_norm import rms_norm_ref

TOL = {torch.float32: dict(atol=1e-4, rtol=1e-4), torch.bfloat16: dict(atol=2e-2, rtol=2e-2)}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("m", [1, 3, 8])
@pytest.mark.parametrize("n,k,config", [(37, 200, GemvConfig(16, 64, 4, 2)),  # ragged N and K
                                        (64, 256, GemvConfig(8, 128, 4, 3)),  # K a multiple of the block
                                        (20, 96, None),  # the default config, one partial K block
                                        (70, 600, GemvConfig(32, 256, 4, 2))])  # one row: K tiles in two parts
def test_gemv_matches_reference(device, dtype, m, n, k, config):
    torch.manual_seed(0)
    x = torch.randn(m, k, device=device).to(dtype)
    weight = torch.randn(n, k, device=device).to(dtype) / k ** 0.5
    bias = torch.randn(n, device=device).to(dtype)
    for b in (None, bias):
        out = gemv(x, weight, b, config)
        assert out.shape == (m, n) and not out.isnan().any()
        torch.testing.assert_close(out, gemv_ref(x, weight, b), **TOL[dtype])


def test_gemv_reads_a_strided_row_view(device):
    """Decode passes rows of a wider activation buffer: only the last dim must be contiguous."""
    x = torch.randn(4, 2 * 64, device=device)[:, :64]
    weight = torch.randn(32, 64, device=device)
    torch.testing.assert_close(gemv(x, weight, None, GemvConfig(8, 32, 4, 2)), gemv_ref(x, weight), atol=1e-4,
                               rtol=1e-4)


@pytest.mark.parametrize("config", [GemvConfig(4, 64, 4, 2), None])
@pytest.mark.parametrize("gelu_tanh", [False, True])
def test_gated_gemv_is_the_activation_and_mul_of_the_projection(device, config, gelu_tanh):
    """The fused [gate; up] weight: silu(x @ gate^T) * (x @ up^T) in one pass (or GELU's tanh form: Gemma), bias
    on both halves."""
    torch.manual_seed(0)
    x = 2 * torch.randn(1, 200, device=device)
    weight = torch.randn(2 * 37, 200, device=device) / 200 ** 0.5
    bias = torch.randn(2 * 37, device=device)
    act = (lambda g: torch.nn.functional.gelu(g, approximate="tanh")) if gelu_tanh else torch.nn.functional.silu
    for b in (None, bias):
        out = gemv(x, weight, b, config, gated=True, gelu_tanh=gelu_tanh)
        full = gemv_ref(x, weight, b)
        expected = act(full[:, :37]) * full[:, 37:]
        assert out.shape == (1, 37)
        torch.testing.assert_close(out, expected, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(out, gemv_ref(x, weight, b, gated=True, gelu_tanh=gelu_tanh), atol=1e-4,
                                   rtol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("config", [GemvConfig(4, 64, 4, 2), GemvConfig(8, 128, 4, 3), None])
def test_gemv_with_rms_norm_first_equals_norm_then_product(device, dtype, config):
    """norm=(weight, eps): the RMSNorm before a projection (decode layers fold theirs in), ragged and even K."""
    torch.manual_seed(0)
    for k in (200, 256):
        x = (3 * torch.randn(2, k, device=device)).to(dtype)
        norm_weight = (1 + 0.1 * torch.randn(k, device=device)).to(dtype)
        weight = (torch.randn(2 * 37, k, device=device) / k ** 0.5).to(dtype)
        bias = torch.randn(2 * 37, device=device).to(dtype)
        normed = rms_norm_ref(x.float(), norm_weight.float(), 1e-5)
        for gated in (False, True):
            out = gemv(x, weight, bias, config, gated=gated, norm=(norm_weight, 1e-5))
            expected = gemv_ref(normed, weight.float(), bias.float(), gated=gated)
            assert not out.isnan().any()
            torch.testing.assert_close(out.float(), expected, **TOL[dtype])
            torch.testing.assert_close(out, gemv_ref(x, weight, bias, gated, norm=(norm_weight, 1e-5)), **TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gemv_adds_into_the_residual_in_place(device, dtype):
    """residual=: the projection's output is added to the residual rows it owns, in place (no other row moves)."""
    torch.manual_seed(0)
    x = torch.randn(1, 96, device=device).to(dtype)
    weight = (torch.randn(70, 96, device=device) / 96 ** 0.5).to(dtype)
    residual = torch.randn(1, 70, device=device).to(dtype)
    before = residual.clone()
    out = gemv(x, weight, None, GemvConfig(16, 64, 4, 2), residual=residual)
    assert out.data_ptr() == residual.data_ptr()
    torch.testing.assert_close(residual.float(), before.float() + gemv_ref(x, weight).float(), **TOL[dtype])


def test_gemv_writes_residual_plus_product_into_another_buffer(device):
    """out=: residual + product lands in `out` (a tensor-parallel rank's all-reduce buffer); residual is unchanged."""
    torch.manual_seed(0)
    x = torch.randn(1, 96, device=device)
    weight = torch.randn(70, 96, device=device) / 96 ** 0.5
    residual = torch.randn(1, 70, device=device)
    before = residual.clone()
    buffer = torch.full((2, 70), float("nan"), device=device)
    out = gemv(x, weight, None, GemvConfig(16, 64, 4, 2), residual=residual, out=buffer[0:1])
    assert out.data_ptr() == buffer.data_ptr() and torch.equal(residual, before) and buffer[1].isnan().all()
    torch.testing.assert_close(out, before + gemv_ref(x, weight), atol=1e-4, rtol=1e-4)


def _reduce_sites(world: int, n: int, device: str, dtype: torch.dtype) -> list[ReduceSite]:
    """One site as each of `world` ranks sees it, all in this process: their buffers stand in for the symmetric
    memory, and the peer address tables point at each of them."""
    parts = [torch.full((world, n), float("nan"), dtype=dtype, device=device) for _ in range(world)]
    counters = [torch.tensor([0, 0, 7], dtype=torch.int32, device=device) for _ in range(world)]  # count, ticket, prev
    peer_parts = torch.tensor([p.data_ptr() for p in parts], dtype=torch.int64, device=device)
    peer_counts = torch.tensor([c.data_ptr() for c in counters], dtype=torch.int64, device=device)
    return [ReduceSite(parts[r], counters[r][0:1], counters[r][1:2], peer_parts, peer_counts, counters[r][2:3], r)
            for r in range(world)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gemv_all_reduces_through_a_reduce_site(device, dtype):
    """Each of three ranks pushes its partial product (rank 0 adding the residual) into the site on every rank and
    counts itself in there once; a later gemv reads the sum as x, another as its residual, both the all-reduce's."""
    torch.manual_seed(0)
    world, n, k = 3, 70, 96
    sites = _reduce_sites(world, n, device, dtype)
    xs = [torch.randn(1, k, device=device, dtype=dtype) for _ in range(world)]
    weights = [(torch.randn(n, k, device=device) / k ** 0.5).to(dtype) for _ in range(world)]
    residual = torch.randn(1, n, device=device, dtype=dtype)
    for r in range(world):  # ranks in turn: a rank's kernel never waits for the others to push
        assert gemv(xs[r], weights[r], None, GemvConfig(16, 64, 4, 2), residual=residual if r == 0 else None,
                    push=sites[r]) is sites[r]
    parts = [residual.float() + gemv_ref(xs[0], weights[0]).float()] + \
        [gemv_ref(x, w).float() for x, w in zip(xs[1:], weights[1:])]
    for site in sites:
        assert site.count.item() == world and site.ticket.item() == 0  # every rank counted in; ticket rearmed
        torch.testing.assert_close(site.parts.float(), torch.cat(parts), **TOL[dtype])
    total = sites[1].sum()
    torch.testing.assert_close(total.float(), sum(parts), **TOL[dtype])

    w2 = (torch.randn(40, n, device=device) / n ** 0.5).to(dtype)
    norm = (torch.rand(n, device=device, dtype=dtype) + 0.5, 1e-5)
    y = gemv(sites[1], w2, None, GemvConfig(8, 32, 4, 2), norm=norm)
    torch.testing.assert_close(y, gemv_ref(total, w2, norm=norm), **TOL[dtype])
    assert sites[1].previous_count.item() == 0 and sites[2].previous_count.item() == 7  # read here: reset here
    w3 = (torch.randn(n, 40, device=device) / 40 ** 0.5).to(dtype)
    z = gemv(y, w3, None, GemvConfig(16, 64, 4, 2), residual=sites[1])
    torch.testing.assert_close(z, gemv_ref(y, w3, residual=total), **TOL[dtype])
