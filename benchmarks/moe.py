"""Mixture-of-experts on one GPU: batch-1 decode against the roofline of the bytes a step reads, and the fused-MoE
layer alone at 1, 64 and 4,096 tokens as a fraction of the bound that limits it (memory or tensor cores).

The decode roofline counts what a step must read: every non-expert weight except the input embedding table (one
row per token), the experts the step's tokens route to (at batch 1, top_k of them per layer), and the KV cache.
The yardsticks are measured here: a device-to-device copy's bandwidth and an 8192^3 bf16 matmul's rate. Eight more
batch-1 decode steps are profiled (GPU kernels by total time, in the JSON under decode_batch1; --no-profile skips).

    python benchmarks/moe.py --model /root/qwen3-30b-a3b-random
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path[0] = str(Path(__file__).resolve().parents[1])

from benchmarks.kernel_bench import bench_ms, copy_bandwidth, matmul_tflops  # noqa: E402
from benchmarks.report import write_result  # noqa: E402
from benchmarks.throughput import decode_roofline  # noqa: E402


def moe_layers(model) -> list:
    from engine.layers.moe import FusedMoE

    return [m for m in model.modules() if isinstance(m, FusedMoE)]


def expected_experts(num_experts: int, top_k: int, tokens: int) -> float:
    """Distinct experts `tokens` uniformly routed tokens reach."""
    return num_experts * (1 - (1 - top_k / num_experts) ** tokens)


def decode_step_bytes(model, tokens: int) -> int:
    """Weight bytes one decode step of `tokens` sequences reads (the KV cache aside)."""
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    embed, head = getattr(model, "embed_tokens", None), getattr(model, "lm_head", None)
    if embed is not None and (head is None or head.weight.data_ptr() != embed.weight.data_ptr()):
        total -= embed.weight.numel() * embed.weight.element_size()
    for moe in moe_layers(model):
        expert_bytes = sum(p.numel() * p.element_size() for p in (moe.w13_weight, moe.w2_weight))
        total -= expert_bytes * (1 - expected_experts(moe.num_local, moe.top_k, tokens) / moe.num_local)
    return int(total)


def layer_alone(moe, tokens: int, copy_bps: float, tflops: float) -> dict:
    x = torch.randn(tokens, moe.hidden, dtype=moe.w13_weight.dtype, device=moe.w13_weight.device)
    logits = torch.randn(tokens, moe.num_experts, dtype=torch.float32, device=x.device)
    ms = bench_ms(lambda: moe(x, logits), iters=50)
    per_expert = sum(p[0].numel() * p.element_size() for p in (moe.w13_weight, moe.w2_weight))
    bytes_read = expected_experts(moe.num_local, moe.top_k, tokens) * per_expert + 2 * x.numel() * x.element_size()
    flops = 2 * tokens * moe.top_k * 3 * moe.hidden * moe.inter_part
    memory_ms, compute_ms = bytes_read / copy_bps * 1e3, flops / (tflops * 1e12) * 1e3
    bound = "memory" if memory_ms >= compute_ms else "tensor cores"
    return {"tokens": tokens, "ms": ms, "bytes": int(bytes_read), "flops": flops, "bound": bound,
            "fraction_of_bound": max(memory_ms, compute_ms) / ms,
            "bytes_per_s": bytes_read / (ms / 1e3), "tflops": flops / (ms / 1e3) / 1e12}


GEMV_TILES = [(4, 1024, 4, 2), (4, 512, 4, 2), (8, 512, 4, 2), (8, 1024, 8, 2), (2, 1024, 4, 2), (16, 256, 4, 3)]


def experts_alone(moe, tokens: int, copy_bps: float) -> dict:
    """The expert kernels alone at a few tokens: the grouped GEMM against the matrix-vector kernels, these with
    each of GEMV_TILES for both of their kernels; each as a fraction of copy bandwidth over the routed experts."""
    from engine.kernels.fused_moe import fused_experts, moe_config
    from engine.kernels.moe_gemv import MoeGemvConfig, fused_experts_gemv

    w13, w2 = moe.w13_weight, moe.w2_weight
    x = torch.randn(tokens, moe.hidden, dtype=w13.dtype, device=w13.device)
    weights, ids = torch.rand(tokens, moe.top_k, device=x.device), torch.stack(
        [torch.randperm(moe.num_local, device=x.device)[:moe.top_k] for _ in range(tokens)]).int()
    per_expert = sum(p[0].numel() * p.element_size() for p in (w13, w2))
    bytes_read = expected_experts(moe.num_local, moe.top_k, tokens) * per_expert
    config = moe_config(tokens, moe.num_local, moe.top_k, (moe.num_local, moe.inter_part),
                        torch.cuda.get_device_name(x.device))
    timings = {"grouped_gemm": bench_ms(lambda: fused_experts(x, w13, w2, weights, ids, config=config), iters=100)}
    for tile in GEMV_TILES:
        configs = (MoeGemvConfig(*tile), MoeGemvConfig(*tile))
        timings[f"gemv_{'_'.join(map(str, tile))}"] = bench_ms(
            lambda: fused_experts_gemv(x, w13, w2, weights, ids, configs=configs), iters=100)
    timings["gemv_default"] = bench_ms(lambda: fused_experts_gemv(x, w13, w2, weights, ids), iters=100)
    return {"tokens": tokens, "bytes": int(bytes_read), "ms": timings,
            "fraction_of_copy_bandwidth": {k: bytes_read / copy_bps * 1e3 / ms for k, ms in timings.items()}}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--tokens", type=int, nargs="+", default=[1, 64, 4096])
    ap.add_argument("--decode-context", type=int, default=256)
    ap.add_argument("--out-dir", type=Path, default=None)
    ap.add_argument("--no-profile", action="store_true", help="skip the profile of 8 batch-1 decode steps (kernels by "
                    "GPU time, written with the figures)")
    args = ap.parse_args(argv)
    from engine import LLM

    copy_bps, tflops = copy_bandwidth(), matmul_tflops()
    print(f"yardsticks: copy {copy_bps / 1e12:.2f} TB/s, bf16 matmul {tflops:.0f} TFLOP/s", flush=True)
    llm = LLM(model=args.model)
    model = llm.engine.executor.runner.model
    moe = moe_layers(model)[0]
    figures = {"copy_bytes_per_s": copy_bps, "matmul_tflops": tflops,
               "experts": moe.num_experts, "top_k": moe.top_k, "hidden": moe.hidden, "intermediate": moe.inter_part}
    decode = decode_roofline(llm, 1, args.decode_context, 64, copy_bps, profile=not args.no_profile)
    step_bytes = decode_step_bytes(model, 1) + decode["kv_bytes"]
    decode.update(weight_bytes_read=step_bytes - decode["kv_bytes"], roofline_ms=step_bytes / copy_bps * 1e3)
    decode["fraction_of_roofline"] = decode["roofline_ms"] / decode["ms_per_step"]
    figures["decode_batch1"] = decode
    print(f"batch-1 decode: {decode['ms_per_step']:.2f} ms per step, {100 * decode['fraction_of_roofline']:.0f}% "
          f"of the {decode['roofline_ms']:.2f} ms roofline ({step_bytes / 1e9:.2f} GB a step)", flush=True)
    for tokens in args.tokens:
        res = figures[f"layer_{tokens}_tokens"] = layer_alone(moe, tokens, copy_bps, tflops)
        print(f"fused-MoE layer, {tokens} tokens: {res['ms']:.3f} ms, {100 * res['fraction_of_bound']:.0f}% of the "
              f"{res['bound']} bound ({res['bytes_per_s'] / 1e12:.2f} TB/s, {res['tflops']:.0f} TFLOP/s)", flush=True)
    for tokens in (1, 2, 4, 8):
        res = figures[f"experts_{tokens}_tokens"] = experts_alone(moe, tokens, copy_bps)
        best = min(res["ms"], key=res["ms"].get)
        print(f"experts alone, {tokens} tokens: grouped GEMM {1e3 * res['ms']['grouped_gemm']:.1f} us, "
              f"matrix-vector {1e3 * res['ms']['gemv_default']:.1f} us (best {best}: {1e3 * res['ms'][best]:.1f} us, "
              f"{100 * res['fraction_of_copy_bandwidth'][best]:.0f}% of copy bandwidth)", flush=True)
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    path = write_result("moe", settings, figures, args.out_dir)
    print(f"wrote {path}")
    llm.shutdown()
    return figures


if __name__ == "__main__":
    main()
