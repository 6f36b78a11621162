"""Gated MLP activations over the fused gate_up projection output: act(x[..., :I]) * x[..., I:]. SwiGLU's silu,
and GeGLU's GELU with the tanh approximation (Gemma's gelu_pytorch_tanh; vLLM's gelu_tanh_and_mul)."""
import torch
import torch.nn.functional as F

from ._triton import tl, triton, use_triton


@triton.jit
def _act_and_mul_kernel(x_ptr, out_ptr, x_stride, out_stride, inter, BLOCK: tl.constexpr, GELU_TANH: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < inter
    gate = tl.load(x_ptr + row * x_stride + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x_ptr + row * x_stride + inter + cols, mask=mask, other=0.0).to(tl.float32)
    if GELU_TANH:  # 0.5 * (1 + tanh(u)) = sigmoid(2u), u = sqrt(2 / pi) * (x + 0.044715 x^3)
        act = gate * tl.sigmoid(1.5957691216057308 * (gate + 0.044715 * gate * gate * gate))
    else:
        act = gate * tl.sigmoid(gate)
    tl.store(out_ptr + row * out_stride + cols, (act * up).to(out_ptr.dtype.element_ty), mask=mask)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """x: [..., 2*I] with a contiguous last dim -> [..., I] in x's dtype (math in fp32)."""
    if not use_triton(x):
        return silu_and_mul_ref(x)
    return _act_and_mul(x, gelu_tanh=False)


def gelu_tanh_and_mul(x: torch.Tensor) -> torch.Tensor:
    """As silu_and_mul, with GELU's tanh approximation for the gate."""
    if not use_triton(x):
        return gelu_tanh_and_mul_ref(x)
    return _act_and_mul(x, gelu_tanh=True)


def _act_and_mul(x: torch.Tensor, gelu_tanh: bool) -> torch.Tensor:
    inter = x.shape[-1] // 2
    out = torch.empty(*x.shape[:-1], inter, dtype=x.dtype, device=x.device)
    x2, out2 = x.view(-1, 2 * inter), out.view(-1, inter)
    if x2.shape[0] == 0:
        return out
    block = min(1024, triton.next_power_of_2(inter))
    _act_and_mul_kernel[(x2.shape[0], triton.cdiv(inter, block))](x2, out2, x2.stride(0), out2.stride(0), inter,
                                                                     BLOCK=block, GELU_TANH=gelu_tanh)
    return out


def silu_and_mul_ref(x: torch.Tensor) -> torch.Tensor:
    gate, up = x.float().chunk(2, dim=-1)
    return (F.silu(gate) * up).to(x.dtype)


def gelu_tanh_and_mul_ref(x: torch.Tensor) -> torch.Tensor:
    gate, up = x.float().chunk(2, dim=-1)
    return (F.gelu(gate, approximate="tanh") * up).to(x.dtype)
