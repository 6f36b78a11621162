"""Guarded Triton import: without Triton every kernel module still imports and falls back to its torch reference."""
import os

import torch

try:
    import triton
    import triton.language as tl
    HAS_TRITON = True
except ImportError:  # kernels below are then defined but never launched
    HAS_TRITON = False

    class _Missing:
        def jit(self, fn=None, **kwargs):
            return fn if fn is not None else (lambda f: f)

        def __getattr__(self, name):  # annotations such as `tl.constexpr` evaluate at def time
            return None

    triton = tl = _Missing()


def interpreting() -> bool:
    """TRITON_INTERPRET=1 runs kernels on CPU tensors in Triton's interpreter (tests)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def use_triton(t: torch.Tensor) -> bool:
    return HAS_TRITON and (t.is_cuda or interpreting())


def next_pow2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def row_warps(block: int) -> int:
    """Warps for one program over a row of `block` values, about 16 values a thread: at batch 1 that program is
    all the GPU runs (a 14336-wide SiLU-and-mul into FP8 took 15 us on an H200 with 4 warps and two passes)."""
    return max(4, min(16, block // 512))
