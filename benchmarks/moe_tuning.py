"""Tune the fused-MoE kernel's tile sizes for one expert shape on this GPU; writes vLLM-format config files.

For each token count, times the whole fused_experts (gate/up, SiLU-and-mul, down) over a grid of tile sizes
around vLLM's defaults and keeps the fastest; the default is always among the candidates, so a tuned entry is
never slower than the default as measured here. The file goes to engine/kernels/configs/ (or --config-dir),
named as vLLM names it, and the timings to a JSON under benchmarks/results/.

    python benchmarks/moe_tuning.py --experts 128 --hidden 2048 --intermediate 768 --top-k 8   # Qwen3-30B-A3B
"""
from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from pathlib import Path

import torch

sys.path[0] = str(Path(__file__).resolve().parents[1])

from benchmarks.kernel_bench import bench_ms  # noqa: E402
from benchmarks.report import write_result  # noqa: E402

TOKENS = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096]


def candidates(num_tokens: int, num_experts: int, top_k: int) -> list[dict]:
    from engine.kernels.moe_tile_configs import default_config

    per_expert = num_tokens * top_k / num_experts
    block_m = [16, 32] if per_expert <= 16 else [32, 64] if per_expert <= 64 else [64, 128]
    grid = [dict(BLOCK_SIZE_M=m, BLOCK_SIZE_N=n, BLOCK_SIZE_K=k, GROUP_SIZE_M=1 if m <= 32 else 16, num_warps=w,
                 num_stages=s)
            for m, n, k, w, s in itertools.product(block_m, [64, 128, 256], [64, 128], [4, 8], [3, 4])]
    default = dict(default_config(num_tokens, num_experts, top_k), num_warps=4, num_stages=3)
    return [default] + [c for c in grid if c != default]


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--experts", type=int, default=128)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--intermediate", type=int, default=768, help="per rank (after a tensor-parallel split)")
    ap.add_argument("--top-k", type=int, default=8)
    ap.add_argument("--tokens", type=int, nargs="+", default=TOKENS)
    ap.add_argument("--seconds-per-count", type=float, default=20.0,
                    help="stop trying candidates for a token count after this long (the default is tried first)")
    ap.add_argument("--config-dir", type=Path, default=None)
    ap.add_argument("--out-dir", type=Path, default=None)
    args = ap.parse_args(argv)
    from engine.kernels import topk_route
    from engine.kernels.fused_moe import fused_experts
    from engine.kernels.moe_tile_configs import CONFIG_DIR, config_file_name

    torch.manual_seed(0)
    e, h, i, k = args.experts, args.hidden, args.intermediate, args.top_k
    w13 = torch.randn(e, 2 * i, h, dtype=torch.bfloat16, device="cuda") * 0.02
    w2 = torch.randn(e, h, i, dtype=torch.bfloat16, device="cuda") * 0.02
    best, timings = {}, {}
    for tokens in args.tokens:
        x = torch.randn(tokens, h, dtype=torch.bfloat16, device="cuda")
        weights, ids = topk_route(torch.randn(tokens, e, device="cuda"), k, True, "softmax")
        tried, started = [], time.perf_counter()
        for config in candidates(tokens, e, k):
            if tried and time.perf_counter() - started > args.seconds_per_count:
                break
            try:
                ms = bench_ms(lambda: fused_experts(x, w13, w2, weights, ids, config=config), iters=20)
            except Exception as err:  # noqa: BLE001 - a tile that does not fit this GPU is skipped
                print(f"  {tokens} tokens: {config} failed: {type(err).__name__}", flush=True)
                continue
            tried.append((ms, config))
        tried.sort(key=lambda t: t[0])
        best[str(tokens)] = tried[0][1]
        default_ms = next(ms for ms, c in tried if c == candidates(tokens, e, k)[0])
        timings[str(tokens)] = {"best_ms": tried[0][0], "default_ms": default_ms, "tried": len(tried),
                                "speedup_vs_default": default_ms / tried[0][0]}
        print(f"{tokens} tokens: {tried[0][0]:.3f} ms (default {default_ms:.3f} ms) of {len(tried)} configs: "
              f"{tried[0][1]}", flush=True)
    device = torch.cuda.get_device_name()
    out = Path(args.config_dir or CONFIG_DIR) / config_file_name(e, i, device)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(best, indent=4) + "\n")
    print(f"wrote {out}")
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    path = write_result("moe-tuning", settings, {"per_token_count": timings, "configs": best}, args.out_dir)
    print(f"wrote {path}")
    return timings


if __name__ == "__main__":
    main()
