"""FP8 scaled matmul: out[M, N] = (x_q * x_scale) @ (w_q * w_scale)^T (+ bias) with FP8 tensor-core dots
(tl.dot on e4m3 operands, fp32 accumulation). Scales per token or per tensor for x and per output channel for w
are applied once, after the K loop; block-wise scales (DeepSeek-V3's 1 x bk for x, bn x bk for w) per K tile,
whose width is bk. One row of x (batch-1 decode) takes the matrix-vector form of the same kernel: no tensor-core
tile to fill, each program streams a few whole weight rows along K with wide K tiles, x quantized once by the
kernel before (fused into RMSNorm or SiLU-and-mul where it can be); 2 to 8 rows take 16-row tensor-core tiles.
The reference is fp8.scaled_mm_ref."""
from __future__ import annotations

import torch

from ._triton import (next_pow2, pdl_args, prefetch_args, prefetch_rows, tl, triton, use_triton,
                      wait_for_previous_kernel)
from .fp8 import scaled_mm_ref
from .gemv_parts import accumulator_width, add_products, load_rows
from .quant_tile_configs import MAX_GEMV_ROWS, TileConfig, tile_config


@triton.jit
def product(a, b, DOT: tl.constexpr, PRECISE: tl.constexpr):
    """a [M, K] @ b[N, K]^T in fp32: a tensor-core dot, or (the matrix-vector form) products summed along K."""
    if DOT:
        # Hopper's FP8 tensor cores keep a narrower running sum unless Triton promotes it to fp32, which its sm_90
        # default never does: a whole FP8 model then drifted 0.17 in logprob from the torch path, and 0.13 with
        # a promotion once a K tile (max_num_imprecise_acc=BLOCK_K, H100). 0: promote after every instruction.
        # PRECISE=False (Triton's default) is there to measure what that costs (benchmarks/quant_tuning.py).
        if PRECISE:
            return tl.dot(a, tl.trans(b), max_num_imprecise_acc=0)
        return tl.dot(a, tl.trans(b))
    return tl.sum(a.to(tl.float32)[:, None, :] * b.to(tl.float32)[None, :, :], 2)


@triton.jit
def _scaled_mm_kernel(a_ptr, b_ptr, out_ptr, a_scale_ptr, b_scale_ptr, bias_ptr, M, N, K, a_stride, b_stride,
                      out_stride, a_scale_stride, b_scale_stride, GROUP_N: tl.constexpr, BLOCK_WISE: tl.constexpr,
                      HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                      ACC_K: tl.constexpr, DOT: tl.constexpr, EVEN_K: tl.constexpr, PRECISE: tl.constexpr,
                      PDL: tl.constexpr = False, PREFETCH_LINES: tl.constexpr = 0, LINE: tl.constexpr = 128):
    """ACC_K: with one row of x (the matrix-vector form), the width of the products' accumulator, a K tile taken in
    BLOCK_K / ACC_K parts (gemv_parts.accumulator_width); BLOCK_K otherwise. PREFETCH_LINES: as gemv.py's."""
    pid_m, pid_n = tl.program_id(0), tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask, n_mask = rows < M, cols < N
    prefetch_rows(b_ptr, cols, n_mask, b_stride, PREFETCH_LINES, LINE)
    wait_for_previous_kernel(PDL)
    ks = tl.arange(0, ACC_K)
    a_row = a_ptr + rows.to(tl.int64)[:, None] * a_stride
    b_row = b_ptr + cols.to(tl.int64)[:, None] * b_stride
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    ONE_ROW: tl.constexpr = BLOCK_M == 1 and not DOT and not BLOCK_WISE
    row_products = tl.zeros([BLOCK_N, ACC_K if ONE_ROW else 1], tl.float32)  # ONE_ROW: summed after the loop
    for k0 in range(0, K, BLOCK_K):
        if ONE_ROW:
            for part in tl.static_range(BLOCK_K // ACC_K):
                k = k0 + part * ACC_K + ks
                row_products = add_products(row_products, load_rows(a_row, k, K, m_mask, EVEN_K),
                                            load_rows(b_row, k, K, n_mask, EVEN_K))
        else:
            part = product(load_rows(a_row, k0 + ks, K, m_mask, EVEN_K), load_rows(b_row, k0 + ks, K, n_mask, EVEN_K),
                           DOT, PRECISE)
            if BLOCK_WISE:  # BLOCK_K is the scale block's width: one x scale per row, one w scale per column here
                a_scale = tl.load(a_scale_ptr + rows * a_scale_stride + k0 // BLOCK_K, mask=m_mask, other=0.0)
                b_scale = tl.load(b_scale_ptr + (cols // GROUP_N) * b_scale_stride + k0 // BLOCK_K, mask=n_mask,
                                  other=0.0)
                acc += part * a_scale[:, None] * b_scale[None, :]
            else:
                acc += part
    if ONE_ROW:
        acc = tl.sum(row_products, 1)[None, :]
    if not BLOCK_WISE:
        a_scale = tl.load(a_scale_ptr + rows * a_scale_stride, mask=m_mask, other=0.0)  # stride 0: per tensor
        acc *= a_scale[:, None] * tl.load(b_scale_ptr + cols, mask=n_mask, other=0.0)[None, :]
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    out_mask = m_mask[:, None] & n_mask[None, :]
    tl.store(out_ptr + rows[:, None] * out_stride + cols[None, :], acc.to(out_ptr.dtype.element_ty), mask=out_mask)


def takes_library_mm(x_q: torch.Tensor, w_q: torch.Tensor, out_dtype: torch.dtype) -> bool:
    """Whether torch._scaled_mm (PyTorch's CUTLASS row-wise FP8 GEMM on Hopper) takes these operands."""
    return (x_q.is_cuda and torch.cuda.get_device_capability(x_q.device) >= (9, 0) and out_dtype == torch.bfloat16
            and x_q.shape[1] % 16 == 0 and w_q.shape[0] % 16 == 0)


def library_scaled_mm(x_q: torch.Tensor, x_scale: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor,
                      out_dtype: torch.dtype, bias: torch.Tensor | None = None, fast_accum: bool = False
                      ) -> torch.Tensor:
    """Per-token (or per-tensor) x per-channel scales through torch._scaled_mm, its sums promoted to fp32 as it
    goes unless fast_accum (what vLLM's CUTLASS FP8 kernels do on Hopper; benchmarks/quant_tuning.py times both)."""
    scale_a = x_scale.float().expand(x_q.shape[0], 1).contiguous()
    scale_b = w_scale.float().reshape(1, -1).expand(1, w_q.shape[0]).contiguous()
    out = torch._scaled_mm(x_q, w_q.t(), scale_a=scale_a, scale_b=scale_b, out_dtype=out_dtype,
                            use_fast_accum=fast_accum)
    return out if bias is None else out.add_(bias)


def scaled_mm(x_q: torch.Tensor, x_scale: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor,
              out_dtype: torch.dtype, bias: torch.Tensor | None = None, block: tuple[int, int] | None = None,
              config: TileConfig | None = None, precise: bool = True) -> torch.Tensor:
    """x_q [M, K] and w_q [N, K] FP8, rows contiguous; x_scale [M, 1] or [1, 1], w_scale [N]; with
    block = (bn, bk): x_scale [M, ceil(K / bk)], w_scale [ceil(N / bn), ceil(K / bk)]. config: the tiles
    (default: quant_tile_configs' choice for this shape and GPU); up to MAX_GEMV_ROWS rows a BLOCK_M below 16
    picks the matrix-vector form (BLOCK_M is then M; the defaults use it for one row only) and 16 or more the
    tensor-core tiles; with block-wise scales BLOCK_K is bk. precise=False: Triton's default FP8 accumulation (see
    product), for measuring its cost only.
    Without a config, more than MAX_GEMV_ROWS rows with per-token or per-tensor x scales go to torch._scaled_mm
    where it takes them (bf16 out, Hopper), as 16-bit GEMMs of that size go to cuBLAS: on an H200 this Triton
    kernel, promoting every FP8 instruction's sum, took 1.8x cuBLAS bf16's time at 4,096 rows (Llama-3-8B's
    gate/up: 2,133 against 1,211 us; benchmarks/results/quant-tuning-h200-667d7bb.json)."""
    if not use_triton(x_q):
        return scaled_mm_ref(x_q, x_scale, w_q, w_scale, out_dtype, bias, block)
    if config is None and block is None and x_q.shape[0] > MAX_GEMV_ROWS and takes_library_mm(x_q, w_q, out_dtype):
        return library_scaled_mm(x_q, x_scale, w_q, w_scale, out_dtype, bias)
    m, k = x_q.shape
    n = w_q.shape[0]
    assert w_q.shape[1] == k and x_q.stride(-1) == 1 and w_q.stride(-1) == 1
    out = torch.empty(m, n, dtype=out_dtype, device=x_q.device)
    if m == 0:
        return out
    block_m, block_n, block_k, num_warps, num_stages = (config or tile_config(m, n, k, "fp8_w8a8", x_q.device,
                                                                          block))[:5]
    dot = m > MAX_GEMV_ROWS or block_m >= 16  # a tuned entry may give a few rows tensor-core tiles
    block_m = max(block_m, 16) if dot else next_pow2(m)  # 16: the smallest tl.dot tile
    x_scale, w_scale = x_scale.float(), w_scale.float()
    if block is None:
        a_scale_stride, b_scale_stride, group_n = (x_scale.stride(0) if x_scale.shape[0] > 1 else 0), 0, 1
    else:
        group_n, block_k = block
        assert block_k >= 16 and block_k & (block_k - 1) == 0, f"block-wise K width {block_k}: a power of two >= 16"
        a_scale_stride, b_scale_stride = x_scale.stride(0), w_scale.stride(0)
    one_row = block_m == 1 and not dot and block is None
    grid = (triton.cdiv(m, block_m), triton.cdiv(n, block_n))
    _scaled_mm_kernel[grid](x_q, w_q, out, x_scale, w_scale, bias if bias is not None else out, m, n, k,
                            x_q.stride(0), w_q.stride(0), out.stride(0), a_scale_stride, b_scale_stride,
                            GROUP_N=group_n, BLOCK_WISE=block is not None, HAS_BIAS=bias is not None,
                            BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
                            ACC_K=accumulator_width(block_n, block_k, num_warps, False) if one_row else block_k,
                            DOT=dot, EVEN_K=k % block_k == 0,
                            PRECISE=precise, num_warps=num_warps, num_stages=num_stages, **pdl_args(x_q, "mm"),
                            **(prefetch_args(w_q, k, "mm") if one_row else {}))
    return out
