"""Kernels compiled for an H100 (sm_90) here, without a GPU, some also as programmatic dependent launch compiles them. The interpreter runs any Python, while compiled
Triton types every value statically, so a kernel can pass under TRITON_INTERPRET=1 and still fail to compile on a
GPU (an FP8 KV cache's rotary kernel once did). Compiling the variants only quantized models and caches reach
catches that in CI.
In a process of its own: tests/engine/kernels/ imports the kernels for the interpreter."""
import os
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

COMPILE = textwrap.dedent(r"""
    import itertools, sys
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from engine.kernels.activation import _act_and_mul_quant_kernel
    from engine.kernels.fp8 import _quant_fp8_kernel
    from engine.kernels.gemv import _gemv_kernel
    from engine.kernels.gemv_int4 import _int4_gemv_kernel
    from engine.kernels.fused_moe import _moe_sum_kernel
    from engine.kernels.int4 import _int4_mm_kernel, _int4_mm_planes_kernel
    from engine.kernels.moe_align import _offsets_kernel, _place_kernel
    from engine.kernels.moe_gemv import _moe_down_kernel, _moe_gate_up_kernel
    from engine.kernels.reshape_and_cache import _reshape_and_cache_kernel
    from engine.kernels.rms_norm import _rms_norm_kernel
    from engine.kernels.rotary import _rotary_kernel
    from engine.kernels.scaled_mm import _scaled_mm_kernel

    def compile_for_hopper(kernel, pointers, constexprs, floats=("k_scale", "v_scale", "eps")):
        names = kernel.arg_names  # every argument not named is an int32 scalar, or a constexpr's default
        constexprs = {**{p.name: p.default for p in kernel.params if p.is_constexpr and p.has_default}, **constexprs}
        signature = {n: "constexpr" if n in constexprs else pointers.get(n) or ("fp32" if n in floats else "i32")
                     for n in names}
        source = ASTSource(kernel, signature, constexprs={(names.index(k),): v for k, v in constexprs.items()})
        triton.compile(source, target=GPUTarget("cuda", 90, 32))

    cases = {}
    for cache in ("bf16", "fp8e4nv"):
        for qk_norm in (False, True):
            cases[f"rotary into a {cache} cache, qk_norm={qk_norm}"] = (_rotary_kernel, {
                "positions_ptr": "*i64", "q_ptr": "*bf16", "k_ptr": "*bf16", "cache_ptr": "*bf16", "v_ptr": "*bf16",
                "key_cache_ptr": f"*{cache}", "value_cache_ptr": f"*{cache}", "slot_mapping_ptr": "*i64",
                "q_norm_ptr": "*bf16", "k_norm_ptr": "*bf16"},
                dict(IS_NEOX=True, ROT_HALF=64, HALF_P2=64, Q_HEADS_P2=32, K_HEADS_P2=8, DIM_P2=128, WRITE_KV=True,
                     FP8_CACHE=cache == "fp8e4nv", QK_NORM=qk_norm))
        cases[f"reshape_and_cache into a {cache} cache"] = (_reshape_and_cache_kernel, {
            "key_ptr": "*bf16", "value_ptr": "*bf16", "key_cache_ptr": f"*{cache}", "value_cache_ptr": f"*{cache}",
            "slot_mapping_ptr": "*i64"}, dict(HEADS_P2=8, DIM_P2=128, FP8_CACHE=cache == "fp8e4nv"))
    for static in (False, True):
        cases[f"FP8 quantization, static={static}"] = (_quant_fp8_kernel, {
            "x_ptr": "*bf16", "q_ptr": "*fp8e4nv", "scale_ptr": "*fp32"}, dict(GROUP=128, BLOCK=128, STATIC=static))
    for block_wise, dot in itertools.product((False, True), (False, True)):
        cases[f"FP8 scaled_mm, block_wise={block_wise} dot={dot}"] = (_scaled_mm_kernel, {
            "a_ptr": "*fp8e4nv", "b_ptr": "*fp8e4nv", "out_ptr": "*bf16", "a_scale_ptr": "*fp32",
            "b_scale_ptr": "*fp32", "bias_ptr": "*bf16"},
            dict(GROUP_N=128 if block_wise else 1, BLOCK_WISE=block_wise, HAS_BIAS=True, BLOCK_M=64 if dot else 4,
                 BLOCK_N=64 if dot else 16, BLOCK_K=128 if block_wise else 64 if dot else 256,
                 ACC_K=128 if block_wise else 64 if dot else 256, DOT=dot, EVEN_K=not block_wise, PRECISE=True))
    cases["FP8 scaled_mm, one row, K tiles in parts"] = (_scaled_mm_kernel, {
        "a_ptr": "*fp8e4nv", "b_ptr": "*fp8e4nv", "out_ptr": "*bf16", "a_scale_ptr": "*fp32", "b_scale_ptr": "*fp32",
        "bias_ptr": "*bf16"}, dict(GROUP_N=1, BLOCK_WISE=False, HAS_BIAS=True, BLOCK_M=1, BLOCK_N=16, BLOCK_K=1024,
                                   ACC_K=512, DOT=False, EVEN_K=True, PRECISE=True))
    cases["FP8 scaled_mm, Triton's default accumulation"] = (_scaled_mm_kernel, {
        "a_ptr": "*fp8e4nv", "b_ptr": "*fp8e4nv", "out_ptr": "*bf16", "a_scale_ptr": "*fp32", "b_scale_ptr": "*fp32",
        "bias_ptr": "*bf16"}, dict(GROUP_N=1, BLOCK_WISE=False, HAS_BIAS=False, BLOCK_M=128, BLOCK_N=64, BLOCK_K=128,
                                   ACC_K=128, DOT=True, EVEN_K=True, PRECISE=False))
    cases["RMSNorm into FP8 rows, residual added"] = (_rms_norm_kernel, {
        "x_ptr": "*bf16", "residual_ptr": "*bf16", "weight_ptr": "*bf16", "out_ptr": "*fp8e4nv", "scale_ptr": "*fp32"},
        dict(ADD_RESIDUAL=True, QUANT_FP8=True, BLOCK=4096))
    for one_pass in (False, True):
        cases[f"SiLU-and-mul into FP8 rows, one_pass={one_pass}"] = (_act_and_mul_quant_kernel, {
            "x_ptr": "*bf16", "q_ptr": "*fp8e4nv", "scale_ptr": "*fp32"},
            dict(BLOCK=16384 if one_pass else 2048, GELU_TANH=False, ONE_PASS=one_pass))
    for norm in (False, True):
        cases[f"FP8 weight-only gemv, norm={norm}"] = (_gemv_kernel, {
            "x_ptr": "*bf16", "w_ptr": "*fp8e4nv", "w_scale_ptr": "*fp32", "bias_ptr": "*bf16", "out_ptr": "*bf16",
            "norm_w_ptr": "*bf16", "residual_ptr": "*bf16", "x_count_ptr": "*i32", "previous_count_ptr": "*i32",
            "peer_parts_ptr": "*i64", "peer_counts_ptr": "*i64", "ticket_ptr": "*i32"},
            dict(HAS_BIAS=False, BLOCK_M=1, BLOCK_N=4, BLOCK_K=2048, ACC_K=512, EVEN_K=True, GATED=norm, NORM=norm,
                 ADD_RESIDUAL=not norm, X_PARTS=0, RESIDUAL_PARTS=0, PUSH=0, W_SCALE=True, GELU_TANH=norm))
    for norm, parts in ((True, 0), (False, 0), (True, 2)):
        cases[f"INT4 gemv, gated with norm={norm}, ReduceSite parts={parts}"] = (_int4_gemv_kernel, {
            "x_ptr": "*bf16", "w_ptr": "*i32", "scale_ptr": "*bf16", "bias_ptr": "*bf16", "out_ptr": "*bf16",
            "norm_w_ptr": "*bf16", "residual_ptr": "*bf16", "x_count_ptr": "*i32", "previous_count_ptr": "*i32",
            "peer_parts_ptr": "*i64", "peer_counts_ptr": "*i64", "ticket_ptr": "*i32"},
            dict(GROUP=128, HAS_BIAS=False, BLOCK_N=8, BLOCK_K=1024, EVEN_K=norm, GATED=norm, NORM=norm,
                 ADD_RESIDUAL=not norm, X_PARTS=parts, RESIDUAL_PARTS=0, PUSH=parts, GELU_TANH=False))
    for awq, dot in itertools.product((False, True), (False, True)):
        cases[f"INT4 matmul, awq={awq} dot={dot}"] = (_int4_mm_kernel, {
            "x_ptr": "*bf16", "w_ptr": "*i32", "zeros_ptr": "*i32", "scales_ptr": "*bf16", "bias_ptr": "*bf16",
            "out_ptr": "*bf16"}, dict(GROUP=128, AWQ=awq, HAS_BIAS=True, BLOCK_M=64 if dot else 4,
                                      BLOCK_N=64 if dot else 16, BLOCK_K=64 if dot else 128, DOT=dot,
                                      PRECISION="tf32"))
    cases["INT4 matmul, compressed-tensors, a dot a nibble"] = (_int4_mm_planes_kernel, {
        "x_ptr": "*bf16", "w_ptr": "*i32", "scales_ptr": "*bf16", "bias_ptr": "*bf16", "out_ptr": "*bf16"},
        dict(GROUP=128, HAS_BIAS=True, BLOCK_M=64, BLOCK_N=64, BLOCK_K=128, EVEN_K=False, PRECISION="tf32"))
    cases["RMSNorm added into the residual (Gemma's post-norms)"] = (_rms_norm_kernel, {
        "x_ptr": "*bf16", "residual_ptr": "*bf16", "weight_ptr": "*fp32", "out_ptr": "*bf16", "scale_ptr": "*fp32"},
        dict(ADD_RESIDUAL=False, QUANT_FP8=False, BLOCK=4096, ADD_AFTER=True))
    for one_chunk in (False, True):
        cases[f"MoE alignment offsets, one_chunk={one_chunk}"] = (_offsets_kernel, {
            "table_ptr": "*i32", "expert_map_ptr": "*i32", "sorted_ptr": "*i32", "expert_ids_ptr": "*i32",
            "post_pad_ptr": "*i32", "ids_ptr": "*i32"},
            dict(BLOCK_SIZE=16, HAS_MAP=False, BINS=128, ROWS=16, LANES=64, ONE_CHUNK=one_chunk, CHUNK=128))
    cases["MoE alignment placing"] = (_place_kernel, {"ids_ptr": "*i32", "table_ptr": "*i32", "sorted_ptr": "*i32"},
                                      dict(BINS=128, CHUNK=128))
    cases["MoE top-k sum"] = (_moe_sum_kernel, {"x_ptr": "*bf16", "out_ptr": "*bf16"}, dict(TOP_K=8, BLOCK=1024))
    cases["few-token MoE gate/up"] = (_moe_gate_up_kernel, {
        "x_ptr": "*bf16", "w_ptr": "*bf16", "ids_ptr": "*i32", "expert_map_ptr": "*i32", "act_ptr": "*bf16"},
        dict(TOP_K=8, HAS_MAP=True, BLOCK_N=2, BLOCK_K=1024, EVEN_K=True))
    cases["few-token MoE down, residual added"] = (_moe_down_kernel, {
        "act_ptr": "*bf16", "w_ptr": "*bf16", "ids_ptr": "*i32", "weights_ptr": "*fp32", "expert_map_ptr": "*i32",
        "out_ptr": "*bf16"}, dict(TOP_K=8, HAS_MAP=True, BLOCK_N=2, BLOCK_K=1024, EVEN_K=False, ADD_RESIDUAL=True))
    for name in ("rotary into a bf16 cache, qk_norm=True", "FP8 quantization, static=False",
                 "FP8 scaled_mm, one row, K tiles in parts", "RMSNorm into FP8 rows, residual added",
                 "SiLU-and-mul into FP8 rows, one_pass=True", "FP8 weight-only gemv, norm=True",
                 "INT4 gemv, gated with norm=True, ReduceSite parts=0", "few-token MoE gate/up",
                 "few-token MoE down, residual added"):  # programmatic dependent launch, weights asked into L2
        kernel, pointers, constexprs = cases[name]
        ahead = dict(PREFETCH_LINES=8, LINE=32) if kernel in (_gemv_kernel, _int4_gemv_kernel, _scaled_mm_kernel) else {}
        cases[f"{name}, dependent launch"] = (kernel, pointers, dict(constexprs, PDL=True, **ahead))
    failed = []
    for name, (kernel, pointers, constexprs) in cases.items():
        try:
            compile_for_hopper(kernel, pointers, constexprs)
        except Exception as e:
            failed.append(f"{name}: {str(e)[-1500:]}")
    sys.exit("\n\n".join(failed) or None)
""")


def test_quantization_and_kv_cache_kernels_compile_for_hopper():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    done = subprocess.run([sys.executable, "-c", COMPILE], env=env, cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
