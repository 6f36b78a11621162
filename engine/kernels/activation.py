"""Gated MLP activations over the fused gate_up projection output: act(x[..., :I]) * x[..., I:]. SwiGLU's silu,
and GeGLU's GELU with the tanh approximation (Gemma's gelu_pytorch_tanh; vLLM's gelu_tanh_and_mul). Both also come
quantized to FP8 per token for an FP8 down projection (vLLM's silu_and_mul_quant)."""
import torch
import torch.nn.functional as F

from ._triton import pdl_args, row_warps, tl, triton, use_triton, wait_for_previous_kernel
from .fp8 import FP8, fp8_scale, per_token_quant_fp8_ref, store_per_token_fp8, to_fp8

ONE_PASS_MAX = 16384  # the widest row the FP8 activation keeps in registers (14336 for Llama-3-8B)


@triton.jit
def _gated_row(row_ptr, cols, mask, inter, GELU_TANH: tl.constexpr):
    """act(gate) * up in fp32 for columns `cols` of the row at row_ptr."""
    gate = tl.load(row_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(row_ptr + inter + cols, mask=mask, other=0.0).to(tl.float32)
    if GELU_TANH:  # 0.5 * (1 + tanh(u)) = sigmoid(2u), u = sqrt(2 / pi) * (x + 0.044715 x^3)
        act = gate * tl.sigmoid(1.5957691216057308 * (gate + 0.044715 * gate * gate * gate))
    else:
        act = gate * tl.sigmoid(gate)
    return act * up


@triton.jit
def _act_and_mul_kernel(x_ptr, out_ptr, x_stride, out_stride, inter, BLOCK: tl.constexpr, GELU_TANH: tl.constexpr,
                        PDL: tl.constexpr = False):
    wait_for_previous_kernel(PDL)
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < inter
    out = _gated_row(x_ptr + row * x_stride, cols, mask, inter, GELU_TANH)
    tl.store(out_ptr + row * out_stride + cols, out.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _act_and_mul_quant_kernel(x_ptr, q_ptr, scale_ptr, x_stride, q_stride, inter, BLOCK: tl.constexpr,
                              GELU_TANH: tl.constexpr, ONE_PASS: tl.constexpr, PDL: tl.constexpr = False):
    """One program a row. ONE_PASS (the row fits in one BLOCK): the row stays in registers between its absolute
    maximum and its FP8 values. Otherwise two passes, the activation recomputed in the second. Values rounded to
    x's dtype first, as the unfused path stores them; the scale and bytes of fp8.per_token_quant_fp8."""
    wait_for_previous_kernel(PDL)
    row = tl.program_id(0).to(tl.int64)
    row_ptr = x_ptr + row * x_stride
    if ONE_PASS:
        cols = tl.arange(0, BLOCK)
        y = _gated_row(row_ptr, cols, cols < inter, inter, GELU_TANH).to(x_ptr.dtype.element_ty).to(tl.float32)
        store_per_token_fp8(y, q_ptr + row * q_stride + cols, cols < inter, scale_ptr + row)
    else:
        abs_max = tl.zeros([BLOCK], tl.float32)
        for c0 in range(0, inter, BLOCK):
            cols = c0 + tl.arange(0, BLOCK)
            y = _gated_row(row_ptr, cols, cols < inter, inter, GELU_TANH).to(x_ptr.dtype.element_ty).to(tl.float32)
            abs_max = tl.maximum(abs_max, tl.abs(y))
        scale = fp8_scale(tl.max(abs_max, 0))
        tl.store(scale_ptr + row, scale)
        for c0 in range(0, inter, BLOCK):
            cols = c0 + tl.arange(0, BLOCK)
            mask = cols < inter
            y = _gated_row(row_ptr, cols, mask, inter, GELU_TANH).to(x_ptr.dtype.element_ty).to(tl.float32)
            tl.store(q_ptr + row * q_stride + cols, to_fp8(y, scale), mask=mask)


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
                                                                     BLOCK=block, GELU_TANH=gelu_tanh, **pdl_args(x))
    return out


def act_and_mul_quant_fp8(x: torch.Tensor, gelu_tanh: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, 2*I] -> (FP8 rows of silu_and_mul(x), or gelu_tanh_and_mul(x), and their scales [M, 1]):
    per_token_quant_fp8 of the activation, in one kernel."""
    if not use_triton(x):
        return per_token_quant_fp8_ref(gelu_tanh_and_mul_ref(x) if gelu_tanh else silu_and_mul_ref(x))
    inter = x.shape[-1] // 2
    q = torch.empty(x.shape[0], inter, dtype=FP8, device=x.device)
    scale = torch.empty(x.shape[0], 1, dtype=torch.float32, device=x.device)
    if x.shape[0]:
        whole_row = triton.next_power_of_2(inter)
        one_pass = whole_row <= ONE_PASS_MAX
        block = whole_row if one_pass else 2048
        _act_and_mul_quant_kernel[(x.shape[0],)](x, q, scale, x.stride(0), q.stride(0), inter, BLOCK=block,
                                                 GELU_TANH=gelu_tanh, ONE_PASS=one_pass,
                                                 num_warps=row_warps(block), **pdl_args(x))
    return q, scale


def silu_and_mul_ref(x: torch.Tensor) -> torch.Tensor:
    gate, up = x.float().chunk(2, dim=-1)
    return (F.silu(gate) * up).to(x.dtype)


def gelu_tanh_and_mul_ref(x: torch.Tensor) -> torch.Tensor:
    gate, up = x.float().chunk(2, dim=-1)
    return (F.gelu(gate, approximate="tanh") * up).to(x.dtype)
