"""Guarded Triton import: without Triton every kernel module still imports and falls back to its torch reference."""
import functools
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

try:
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
except ImportError:  # an older Triton: kernels never take the PDL branch (USE_PDL is False)
    gdc_launch_dependents = gdc_wait = None


def interpreting() -> bool:
    """TRITON_INTERPRET=1 runs kernels on CPU tensors in Triton's interpreter (tests)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def use_triton(t: torch.Tensor) -> bool:
    return HAS_TRITON and (t.is_cuda or interpreting())


def next_pow2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


@functools.cache
def _pdl_capable(device_index: int) -> bool:
    return gdc_wait is not None and torch.cuda.get_device_capability(device_index)[0] >= 9


def use_pdl(t: torch.Tensor) -> bool:
    """Programmatic dependent launch (Hopper and later): a kernel's programs start while the previous kernel
    drains and wait (`wait_for_previous`) before touching its outputs, hiding most of the ~1-2 us gap between
    the few-microsecond kernels of a batch-1 decode step. Off in the interpreter and with STRATA_PDL=0."""
    return (t.is_cuda and not interpreting() and os.environ.get("STRATA_PDL", "1") != "0"
            and _pdl_capable(t.device.index if t.device.index is not None else torch.cuda.current_device()))


@triton.jit
def wait_for_previous(USE_PDL: tl.constexpr):
    """First statement of every PDL-launched kernel, in every program (also those that return early): this kernel
    completing must imply the previous one completed, or a later kernel could read stale outputs."""
    if USE_PDL:
        gdc_wait()
        gdc_launch_dependents()
