"""Instructions a weight value in the K loop of the decode kernels, compiled for Hopper (sm_90) on this machine, no
GPU needed: each kernel is compiled with Triton for its usual tiles, with the divisibility hints the runtime gives
16-aligned pointers and strides, disassembled with Triton's own nvdisasm, and the instructions of its main loop (the
longest backward branch) counted and divided by the weight values a thread takes in one pass of it. Also the
registers and spill bytes a thread, and the most frequent instructions.

A static count: it says how much issue work a weight value costs (an H200 issues 4 warp-instructions a cycle an SM),
not how fast the kernel runs. Use the Triton of the GPU machines (3.6 with torch 2.11) for their figures:

    pip install --target /tmp/t36 triton==3.6.0
    PYTHONPATH=/tmp/t36 python benchmarks/sass_counts.py [--root CHECKOUT]   # --root: another commit's engine/
"""
from __future__ import annotations

import argparse
import collections
import importlib
import os
import re
import subprocess
import sys
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.report import write_result  # noqa: E402

GEMV_POINTERS = {"x_ptr": "*bf16", "w_ptr": "*bf16", "w_scale_ptr": "*fp32", "bias_ptr": "*bf16", "out_ptr": "*bf16",
                 "norm_w_ptr": "*bf16", "residual_ptr": "*bf16", "x_count_ptr": "*i32", "previous_count_ptr": "*i32",
                 "peer_parts_ptr": "*i64", "peer_counts_ptr": "*i64", "ticket_ptr": "*i32", "scale_ptr": "*bf16"}
GEMV_FLAGS = dict(HAS_BIAS=False, BLOCK_M=1, EVEN_K=True, NORM=False, ADD_RESIDUAL=True, X_PARTS=0, RESIDUAL_PARTS=0,
                  PUSH=0, W_SCALE=False, GELU_TANH=False, GATED=False)


def cases(kernels) -> dict:
    """name -> (kernel, pointer types, constexprs, warps, stages, weight values a pass of the loop, weight bytes a
    value). Constexprs the kernel does not take are dropped, so that an older checkout compiles too."""
    gemv, scaled_mm, moe_gemv, int4 = (kernels[m] for m in ("gemv", "scaled_mm", "moe_gemv", "int4"))
    out = {}
    for bn, bk, warps in ((4, 1024, 4), (8, 2048, 8), (16, 2048, 4)):
        out[f"bf16 gemv {bn}x{bk}, {warps} warps"] = (gemv._gemv_kernel, GEMV_POINTERS, dict(
            GEMV_FLAGS, BLOCK_N=bn, BLOCK_K=bk, INT4_GROUP=0, ACC_K=_acc_k(kernels, bn, bk, warps)), warps, 2, bn * bk, 2)
    int4_gemv = kernels.get("gemv_int4")
    for bn, bk in ((8, 1024), (16, 1024)):
        if int4_gemv is not None:
            kernel, pointers, flags = int4_gemv._int4_gemv_kernel, dict(GEMV_POINTERS, w_ptr="*i32"), dict(GROUP=128)
        else:
            kernel, pointers, flags = gemv._gemv_kernel, dict(GEMV_POINTERS, w_ptr="*i32", w_scale_ptr="*bf16"), \
                dict(INT4_GROUP=128)
        out[f"INT4 gemv {bn}x{bk}, 4 warps"] = (kernel, pointers, dict(GEMV_FLAGS, BLOCK_N=bn, BLOCK_K=bk, **flags),
                                                4, 2, bn * bk, 0.5)
    for bn, bk, warps in ((16, 1024, 8), (8, 1024, 8)):  # W8A8 batch-1 decode: x quantized inside (QUANT_X)
        if "QUANT_X" in gemv._gemv_kernel.arg_names:
            out[f"FP8 W8A8 gemv, x quantized inside, {bn}x{bk}, {warps} warps"] = (
                gemv._gemv_kernel, dict(GEMV_POINTERS, w_ptr="*fp8e4nv", w_scale_ptr="*fp32"),
                dict(GEMV_FLAGS, BLOCK_N=bn, BLOCK_K=bk, W_SCALE=True, QUANT_X=True,
                     ACC_K=_acc_k(kernels, bn, bk, warps)), warps, 2, bn * bk, 1)
    for bn, bk, warps in ((16, 1024, 8), (8, 2048, 4)):
        out[f"FP8 W8A8 one row {bn}x{bk}, {warps} warps"] = (scaled_mm._scaled_mm_kernel, {
            "a_ptr": "*fp8e4nv", "b_ptr": "*fp8e4nv", "out_ptr": "*bf16", "a_scale_ptr": "*fp32", "b_scale_ptr": "*fp32",
            "bias_ptr": "*bf16"}, dict(GROUP_N=1, BLOCK_WISE=False, HAS_BIAS=False, BLOCK_M=1, BLOCK_N=bn,
                                       BLOCK_K=bk, ACC_K=_acc_k(kernels, bn, bk, warps), DOT=False, EVEN_K=True,
                                       PRECISE=True), warps, 2, bn * bk, 1)
    out["MoE gate/up, one token, 2x1024"] = (moe_gemv._moe_gate_up_kernel, {
        "x_ptr": "*bf16", "w_ptr": "*bf16", "ids_ptr": "*i32", "expert_map_ptr": "*i32", "act_ptr": "*bf16"},
        dict(TOP_K=8, HAS_MAP=False, BLOCK_N=2, BLOCK_K=1024, EVEN_K=True), 4, 2, 2 * 2 * 1024, 2)
    out["MoE down, one token, 2x1024"] = (moe_gemv._moe_down_kernel, {
        "act_ptr": "*bf16", "w_ptr": "*bf16", "ids_ptr": "*i32", "weights_ptr": "*fp32", "expert_map_ptr": "*i32",
        "out_ptr": "*bf16"}, dict(TOP_K=8, HAS_MAP=False, BLOCK_N=2, BLOCK_K=1024, EVEN_K=False, ADD_RESIDUAL=True),
        4, 2, 2 * 1024, 2)
    mm_pointers = {"x_ptr": "*bf16", "w_ptr": "*i32", "zeros_ptr": "*i32", "scales_ptr": "*bf16", "bias_ptr": "*bf16",
                   "out_ptr": "*bf16"}
    planes = getattr(int4, "_int4_mm_planes_kernel", None)
    out["INT4 matmul 64x64x128, 4 warps"] = (
        (planes, mm_pointers, dict(GROUP=128, HAS_BIAS=False, BLOCK_M=64, BLOCK_N=64, BLOCK_K=128, EVEN_K=True,
                                   PRECISION="tf32"), 4, 3, 64 * 128, 0.5) if planes is not None else
        (int4._int4_mm_kernel, mm_pointers, dict(GROUP=128, AWQ=False, HAS_BIAS=False, BLOCK_M=64, BLOCK_N=64,
                                                 BLOCK_K=128, DOT=True, PRECISION="tf32"), 4, 3, 64 * 128, 0.5))
    return out


def _acc_k(kernels, block_n: int, block_k: int, warps: int) -> int:
    parts = kernels.get("gemv_parts")
    width = getattr(parts, "accumulator_width", None)
    return width(block_n, block_k, warps, False) if width else block_k


def compile_and_count(kernel, pointers: dict, constexprs: dict, warps: int, stages: int, tmp: Path) -> dict:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    names = kernel.arg_names  # a constexpr not given takes its default (PDL and its prefetch off)
    constexprs = {**{p.name: p.default for p in kernel.params if p.is_constexpr and p.has_default},
                  **{k: v for k, v in constexprs.items() if k in names}}
    untyped = {"eps": "fp32"}
    signature = {n: "constexpr" if n in constexprs else pointers.get(n) or untyped.get(n, "i32") for n in names}
    aligned = {(names.index(n),): [["tt.divisibility", 16]] for n in names
               if n not in constexprs and n not in ("M", "rank", "eps", "unit")}
    source = ASTSource(kernel, signature, constexprs={(names.index(k),): v for k, v in constexprs.items()},
                       attrs=aligned)
    compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32),
                              options=dict(num_warps=warps, num_stages=stages))
    cubin = tmp / "kernel.cubin"
    cubin.write_bytes(compiled.asm["cubin"])
    tools = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    sass = subprocess.run([str(tools / "nvdisasm"), "-c", str(cubin)], capture_output=True, text=True,
                          check=True).stdout
    usage = subprocess.run([str(tools / "cuobjdump"), "--dump-resource-usage", str(cubin)], capture_output=True,
                           text=True, check=True).stdout
    registers = int(re.search(r"REG:(\d+)", usage).group(1))
    spill = int(re.search(r"STACK:(\d+)", usage).group(1))
    return dict(loop_ops(sass), registers=registers, stack_bytes=spill)


def loop_ops(sass: str) -> dict:
    lines = sass.splitlines()
    labels = {line.strip()[:-1]: i for i, line in enumerate(lines) if re.match(r"^\.L_x_\d+:", line)}
    loops = [(labels[m.group(1)], i) for i, line in enumerate(lines)
             for m in [re.search(r"BRA `\((\.L_x_\d+)\)", line)] if m and labels.get(m.group(1), i) < i]
    start, end = max(loops, key=lambda span: span[1] - span[0])
    ops = collections.Counter()
    for line in lines[start:end + 1]:
        m = re.match(r"\s*/\*[0-9a-f]+\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)", line)
        if m:
            ops[m.group(1)] += 1
    return {"loop_instructions": sum(ops.values()), "ops": dict(ops.most_common(8))}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", type=Path, default=None, help="a checkout whose engine/ to compile (default this one)")
    ap.add_argument("--out-dir", type=Path, default=None)
    args = ap.parse_args(argv)
    if args.root:
        sys.path.insert(0, str(args.root.resolve()))
    import tempfile

    import triton

    kernels = {}
    for name in ("gemv", "gemv_int4", "gemv_parts", "scaled_mm", "moe_gemv", "int4"):
        try:
            kernels[name] = importlib.import_module(f"engine.kernels.{name}")
        except ModuleNotFoundError:
            pass
    figures = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, (kernel, pointers, constexprs, warps, stages, values, value_bytes) in cases(kernels).items():
            res = compile_and_count(kernel, pointers, constexprs, warps, stages, Path(tmp))
            per_thread = values / (32 * warps)
            res.update(per_weight_value=res["loop_instructions"] / per_thread,
                       per_weight_byte=res["loop_instructions"] / per_thread / value_bytes)
            figures[name] = res
            print(f"{name:40s} {res['per_weight_value']:5.2f} a value, {res['per_weight_byte']:5.2f} a byte; "
                  f"{res['registers']} registers, {res['stack_bytes']} B spilled", flush=True)
    source = args.root.resolve() if args.root else Path(__file__).resolve().parents[1]
    commit = subprocess.run(["git", "-C", str(source), "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    settings = {"triton": triton.__version__, "target": "sm_90", "engine_commit": commit}
    print("wrote", write_result("sass-counts", settings, figures, args.out_dir))
    return figures


if __name__ == "__main__":
    main()
