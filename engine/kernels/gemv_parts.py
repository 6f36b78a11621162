"""Pieces the matrix-vector kernels share (gemv.py's 16-bit and FP8 one, gemv_int4.py's, moe_gemv.py's): loads of
x and weight rows, and the epilogue every projection folds in (bias, gate activation, residual add, store or push
to a ReduceSite)."""
from ._triton import prefetch_rows, tl, triton, wait_for_previous_kernel
from .reduce_site import load_part_sum, push_part, wait_for_parts


@triton.jit
def start_rows(w_ptr, rows, row_mask, w_stride, N, x_count_ptr, previous_count_ptr, GATED: tl.constexpr,
               X_PARTS: tl.constexpr, PDL: tl.constexpr, PREFETCH_LINES: tl.constexpr, LINE: tl.constexpr):
    """A matrix-vector program's start: the first lines of its weight rows (and GATED, of their up rows N rows on)
    asked into L2, then the waits for the kernel before it and for x's ReduceSite parts."""
    prefetch_rows(w_ptr, rows, row_mask, w_stride, PREFETCH_LINES, LINE)
    if GATED:
        prefetch_rows(w_ptr + N * w_stride, rows, row_mask, w_stride, PREFETCH_LINES, LINE)
    wait_for_previous_kernel(PDL)
    if X_PARTS > 0:
        wait_for_parts(x_count_ptr, previous_count_ptr, X_PARTS)


@triton.jit
def load_rows(row_ptr, k, K, row_mask, EVEN_K: tl.constexpr):
    """Columns k of the rows at row_ptr (one pointer per row), zeros past K and for masked rows."""
    if EVEN_K:
        mask = row_mask[:, None]
    else:
        mask = row_mask[:, None] & (k[None, :] < K)
    return tl.load(row_ptr + k[None, :], mask=mask, other=0.0)


@triton.jit
def load_vector(ptr, k, K, EVEN_K: tl.constexpr):
    if EVEN_K:
        return tl.load(ptr + k)
    return tl.load(ptr + k, mask=k < K, other=0.0)


@triton.jit
def load_x(x_ptr, x_row, x_stride, k, K, m_mask, EVEN_K: tl.constexpr, NORM: tl.constexpr, X_PARTS: tl.constexpr):
    """Columns k of x's rows: its rows at x_row, or the sum of a ReduceSite's parts; float32 where it is normalized."""
    if X_PARTS > 0:
        x = load_part_sum(x_ptr, x_stride, k[None, :], (k < K)[None, :], X_PARTS)
    else:
        x = load_rows(x_row, k, K, m_mask, EVEN_K)
    return x.to(tl.float32) if NORM else x


@triton.jit
def dot_rows(x, w):
    return tl.sum(x.to(tl.float32)[:, None, :] * w.to(tl.float32)[None, :, :], 2)


@triton.jit
def add_products(acc, x, w):
    """acc [BLOCK_N, BLOCK_K] + w [BLOCK_N, BLOCK_K] * x [1, BLOCK_K], in float32. For one row of x: summed along
    K once after the loop (tl.sum(acc, 1)), not every K tile as dot_rows does, which keeps the warp shuffles of
    that sum out of the loop (Hopper SASS of scaled_mm's FP8 one-row form: 1.3-2 shuffles a weight byte)."""
    return acc + w.to(tl.float32) * x.to(tl.float32)


@triton.jit
def finish_rows(acc, acc_up, rows_m, rows_n, m_mask, n_mask, N, bias_ptr, residual_ptr, residual_stride, out_ptr,
                out_stride, peer_parts_ptr, peer_counts_ptr, ticket_ptr, rank, HAS_BIAS: tl.constexpr,
                GATED: tl.constexpr, GELU_TANH: tl.constexpr, ADD_RESIDUAL: tl.constexpr,
                RESIDUAL_PARTS: tl.constexpr, PUSH: tl.constexpr):
    """acc (and acc_up, GATED) [BLOCK_M, BLOCK_N] float32 -> bias, silu(gate) * up or gelu_tanh(gate) * up,
    plus the residual, stored at out_ptr or pushed as this rank's part of a ReduceSite (see gemv.gemv)."""
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rows_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
        if GATED:
            acc_up += tl.load(bias_ptr + N + rows_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    if GATED and GELU_TANH:  # as activation._gated_row
        acc = acc * tl.sigmoid(1.5957691216057308 * (acc + 0.044715 * acc * acc * acc)) * acc_up
    elif GATED:
        acc = acc * tl.sigmoid(acc) * acc_up
    out_mask = m_mask[:, None] & n_mask[None, :]
    if ADD_RESIDUAL:
        if RESIDUAL_PARTS > 0:
            acc += load_part_sum(residual_ptr, residual_stride, rows_n[None, :], out_mask,
                                 RESIDUAL_PARTS).to(tl.float32)
        else:
            acc += tl.load(residual_ptr + rows_m[:, None] * residual_stride + rows_n[None, :], mask=out_mask,
                           other=0.0).to(tl.float32)
    if PUSH > 0:
        push_part(acc.to(out_ptr.dtype.element_ty), rows_n[None, :], out_mask, out_stride, peer_parts_ptr,
                  peer_counts_ptr, ticket_ptr, rank, PUSH)
    else:
        tl.store(out_ptr + rows_m[:, None] * out_stride + rows_n[None, :], acc.to(out_ptr.dtype.element_ty),
                 mask=out_mask)


def accumulator_width(block_n: int, block_k: int, num_warps: int, gated: bool) -> int:
    """Columns of the one-row kernel's [BLOCK_N, ACC_K] float32 accumulators (the products, summed along K after
    the loop): about 32 registers a thread each, so that wide K tiles of many rows do not spill; a K tile is
    multiplied in BLOCK_K / ACC_K parts."""
    width = 32 * 32 * num_warps // (block_n * (2 if gated else 1))
    return max(16, min(block_k, 1 << (width.bit_length() - 1)))
