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


_PDL_DEVICES: dict[int, bool] = {}
_PDL_ON, _NO_ARGS = {"PDL": True, "launch_pdl": True}, {}
# Kernel families under programmatic dependent launch by default, from one H100's batch-1 decode (Llama-3-8B shape,
# benchmarks/gpu_pdl.sh, benchmarks/results/pdl-ab-h100-*.json): FP8 W8A8 W1 +4% with its weights asked into L2,
# MoE +2%, bfloat16 even; the INT4 matrix-vector kernel lost 8-14% under it, so it is left out.
PDL_FAMILIES = ("gemv", "mm", "moe", "small")
PREFETCH_BYTES = {"mm": 4096}  # a weight row's first bytes a matrix-vector program asks into L2 ahead


def pdl_families() -> tuple[str, ...]:
    """STRATA_PDL: unset, the defaults; 0, none; else a comma list of families: gemv (16-bit and FP8 weight-only
    matrix-vector), int4 (its INT4 form), mm (FP8 scaled_mm), moe (few-token experts), small (norms, rotary,
    attention, quantization, activation, sampling)."""
    value = os.environ.get("STRATA_PDL")
    if value is None:
        return PDL_FAMILIES
    return () if value == "0" else tuple(value.split(","))


def pdl_args(t: torch.Tensor, family: str = "small") -> dict:
    """Launch arguments for programmatic dependent launch on Hopper and later: the kernel may be scheduled while
    the one before it drains, and waits for that one's results in `wait_for_previous_kernel`. A batch-1 decode
    step is a chain of several hundred kernels of a few microseconds each, so their start and drain are a large
    part of the step."""
    if not t.is_cuda or family not in pdl_families():
        return _NO_ARGS
    index = t.get_device()
    hopper = _PDL_DEVICES.get(index)
    if hopper is None:
        hopper = _PDL_DEVICES[index] = torch.cuda.get_device_capability(index) >= (9, 0)
    return _PDL_ON if hopper else _NO_ARGS  # shared dicts: every launch of an eager step asks (callers unpack them)


def prefetch_args(weight: torch.Tensor, row_elements: int, family: str) -> dict:
    """Under dependent launch: how much of each weight row (of `row_elements` elements) a matrix-vector program
    asks into L2 before the kernel before it has finished (PREFETCH_BYTES, or STRATA_PDL_PREFETCH bytes for every
    family), as PREFETCH_LINES lines of LINE elements."""
    override = os.environ.get("STRATA_PDL_PREFETCH")
    wanted = int(override) if override is not None else PREFETCH_BYTES.get(family, 0)
    if not wanted or not pdl_args(weight, family):
        return {}
    lines = min(wanted, row_elements * weight.element_size()) // 128
    return {"PREFETCH_LINES": 1 << (lines.bit_length() - 1), "LINE": 128 // weight.element_size()} if lines else {}


@triton.jit
def wait_for_previous_kernel(PDL: tl.constexpr):
    """Under programmatic dependent launch (pdl_args): wait until the kernel before this one has finished and its
    writes are visible, then let the kernel after this one be scheduled. Every program calls it before it reads
    another kernel's results or writes anything, and before any early return: a kernel whose programs all
    returned early would count as finished while the one before it still runs."""
    if PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()


@triton.jit
def prefetch_rows(w_ptr, rows, row_mask, w_stride, LINES: tl.constexpr, LINE: tl.constexpr):
    """Ask the first LINES lines (of LINE elements) of each weight row into L2 without waiting for them: weights a
    program will read first, fetched while the kernel before it drains (prefetch_args)."""
    if LINES > 0:
        ptrs = w_ptr + tl.where(row_mask, rows, 0).to(tl.int64)[:, None] * w_stride + \
            (tl.arange(0, LINES) * LINE)[None, :]
        tl.inline_asm_elementwise("prefetch.global.L2 [$1]; mov.u32 $0, 0;", "=r,l", [ptrs], dtype=tl.int32,
                                  is_pure=False, pack=1)
