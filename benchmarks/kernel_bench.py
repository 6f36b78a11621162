"""Kernel benchmarks on CUDA: decode attention bandwidth, causal prefill attention TFLOP/s, and the device's own
copy bandwidth and bf16 matmul rate as the yardsticks. Writes JSON under benchmarks/results/.

    python benchmarks/kernel_bench.py
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.report import write_result  # noqa: E402


def bench_ms(fn, iters: int = 50) -> float:
    import triton.testing

    return triton.testing.do_bench(fn, warmup=10, rep=iters)


def copy_bandwidth() -> float:
    """Bytes read + written per second by a device-to-device copy of 2 GiB."""
    src = torch.empty(1 << 30, dtype=torch.bfloat16, device="cuda")
    dst = torch.empty_like(src)
    ms = bench_ms(lambda: dst.copy_(src))
    return 2 * src.numel() * 2 / (ms / 1e3)


def matmul_tflops(n: int = 8192) -> float:
    a = torch.randn(n, n, dtype=torch.bfloat16, device="cuda")
    b = torch.randn(n, n, dtype=torch.bfloat16, device="cuda")
    return 2 * n ** 3 / (bench_ms(lambda: a @ b) / 1e3) / 1e12


def paged_setup(num_seqs, ctx, q_len, heads=32, kv_heads=8, dim=128, block=16):
    blocks_per_seq = -(-ctx // block)
    num_blocks = num_seqs * blocks_per_seq
    kc = torch.randn(num_blocks, block, kv_heads, dim, dtype=torch.bfloat16, device="cuda")
    vc = torch.randn_like(kc)
    tables = torch.randperm(num_blocks, device="cuda", dtype=torch.int32).view(num_seqs, blocks_per_seq)
    q = torch.randn(num_seqs * q_len, heads, dim, dtype=torch.bfloat16, device="cuda")
    qsl = torch.arange(0, num_seqs * q_len + 1, q_len, dtype=torch.int32, device="cuda")
    seq_lens = torch.full((num_seqs,), ctx, dtype=torch.int32, device="cuda")
    return q, kc, vc, qsl, seq_lens, tables


def decode_attention(num_seqs=64, ctx=2048) -> dict:
    from engine.kernels import unified_attention

    q, kc, vc, qsl, seq_lens, tables = paged_setup(num_seqs, ctx, 1)
    out = torch.empty_like(q)
    ms = bench_ms(lambda: unified_attention(q, kc, vc, out, qsl, seq_lens, tables, 128 ** -0.5, 1, ctx))
    kv_bytes = 2 * num_seqs * ctx * kc.shape[2] * kc.shape[3] * kc.element_size()
    return {"num_seqs": num_seqs, "context": ctx, "ms": ms, "kv_bytes": kv_bytes, "bytes_per_s": kv_bytes / (ms / 1e3)}


def prefill_attention(tokens=4096) -> dict:
    from engine.kernels import unified_attention

    q, kc, vc, qsl, seq_lens, tables = paged_setup(1, tokens, tokens)
    out = torch.empty_like(q)
    ms = bench_ms(lambda: unified_attention(q, kc, vc, out, qsl, seq_lens, tables, 128 ** -0.5, tokens, tokens))
    flops = 2 * 2 * q.shape[1] * q.shape[2] * tokens * tokens / 2  # QK^T and PV over the causal half
    return {"tokens": tokens, "ms": ms, "tflops": flops / (ms / 1e3) / 1e12}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out-dir", type=Path, default=None)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks/kernel_bench.py needs a CUDA GPU (the kernels' CPU correctness runs in make test)")
    bw = copy_bandwidth()
    figures = {"copy_bandwidth_bytes_per_s": bw, "matmul_bf16_tflops": matmul_tflops()}
    dec = decode_attention()
    dec["fraction_of_copy_bandwidth"] = dec["bytes_per_s"] / bw
    figures["decode_attention_b64_ctx2048"] = dec
    figures["prefill_attention_4096"] = prefill_attention()
    for k, v in figures.items():
        print(k, v)
    print("wrote", write_result("kernels", {}, figures, args.out_dir))
    return figures


if __name__ == "__main__":
    main()
