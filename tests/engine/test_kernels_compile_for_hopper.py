"""Kernels compiled for an H100 (sm_90) here, without a GPU. The interpreter runs any Python, while compiled
Triton types every value statically, so a kernel can pass under TRITON_INTERPRET=1 and still fail to compile on a
GPU (an FP8 KV cache's rotary kernel once did). Compiling the variants only some models reach catches that in CI.
In a process of its own: tests/engine/kernels/ imports the kernels for the interpreter."""
import os
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

COMPILE = textwrap.dedent(r"""
    import sys
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from engine.kernels.reshape_and_cache import _reshape_and_cache_kernel
    from engine.kernels.rotary import _rotary_kernel

    def compile_for_hopper(kernel, pointers, floats, constexprs):
        names = kernel.arg_names  # every argument not named is an int32 scalar
        signature = {n: "constexpr" if n in constexprs else pointers.get(n) or ("fp32" if n in floats else "i32")
                     for n in names}
        source = ASTSource(kernel, signature, constexprs={(names.index(k),): v for k, v in constexprs.items()})
        triton.compile(source, target=GPUTarget("cuda", 90, 32))

    def rotary(cache):
        compile_for_hopper(
            _rotary_kernel,
            {"positions_ptr": "*i64", "q_ptr": "*bf16", "k_ptr": "*bf16", "cache_ptr": "*bf16", "v_ptr": "*bf16",
             "key_cache_ptr": f"*{cache}", "value_cache_ptr": f"*{cache}", "slot_mapping_ptr": "*i64"},
            ("k_scale", "v_scale"),
            dict(IS_NEOX=True, ROT_HALF=64, HALF_P2=64, Q_HEADS_P2=32, K_HEADS_P2=8, DIM_P2=128, WRITE_KV=True,
                 FP8_CACHE=cache == "fp8e4nv"))
    def reshape_and_cache(cache):
        compile_for_hopper(
            _reshape_and_cache_kernel,
            {"key_ptr": "*bf16", "value_ptr": "*bf16", "key_cache_ptr": f"*{cache}", "value_cache_ptr": f"*{cache}",
             "slot_mapping_ptr": "*i64"},
            ("k_scale", "v_scale"), dict(HEADS_P2=8, DIM_P2=128, FP8_CACHE=cache == "fp8e4nv"))

    failed = []
    for kernel in (rotary, reshape_and_cache):
        for cache in ("bf16", "fp8e4nv"):
            try:
                kernel(cache)
            except Exception as e:
                failed.append(f"{kernel.__name__} into a {cache} cache: {str(e)[-1500:]}")
    sys.exit("\n\n".join(failed) or None)
""")


def test_kv_cache_writers_compile_for_hopper():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    done = subprocess.run([sys.executable, "-c", COMPILE], env=env, cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
