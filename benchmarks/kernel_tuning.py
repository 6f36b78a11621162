"""Tile sweeps on CUDA: paged attention (prefill, decode) and the skinny decode matmul against cuBLAS.

    python benchmarks/kernel_tuning.py                  # both sweeps, Llama-3-8B shapes, TP=1 and TP=2
    python benchmarks/kernel_tuning.py --only gemv
    python benchmarks/kernel_tuning.py --only fusions   # batch-1 layer: norm/residual folded into the gemvs

Every candidate runs inside a CUDA graph that repeats it over enough distinct buffers to defeat the L2 cache (as
decode does: the next layer's weights are never cached), so a figure is the kernel's steady-state time without
launch overhead. Each candidate is first checked against the torch reference. The engine's current heuristic is
timed too, so the JSON shows what a change of heuristic would gain. Writes benchmarks/results/kernel-tuning-*.json.
"""
from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.kernel_bench import paged_setup  # noqa: E402
from benchmarks.report import write_result  # noqa: E402

L2_DEFEAT_BYTES = 256 << 20


def try_candidate(run, cfg, **tags) -> dict:
    """run(cfg) -> its figures; a tile the compiler rejects (too large for registers or shared memory) is recorded
    as an error instead of ending the sweep."""
    try:
        return {"config": list(cfg), **tags, **run(cfg)}
    except Exception as e:  # noqa: BLE001
        return {"config": list(cfg), **tags, "error": type(e).__name__}


def fastest(candidates: list[dict], max_abs_err: float) -> dict:
    return min((c for c in candidates if "ms" in c and c["max_abs_err"] < max_abs_err), key=lambda c: c["ms"])


def graph_ms(fns, reps: int = 5) -> float:
    """Mean ms of one call, with calls fns[0], fns[1], ... (distinct buffers) captured back to back in a graph."""
    for f in fns:
        f()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for f in fns:
            f()
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps / len(fns)


# -- skinny matmul ------------------------------------------------------------------------------------------
GEMV_SHAPES = {  # name: (N, K) of nn.Linear weights, Llama-3-8B
    "qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336),
    "lm_head": (128256, 4096),
    "qkv_tp2": (3072, 4096), "o_tp2": (4096, 2048), "gate_up_tp2": (14336, 4096), "down_tp2": (4096, 7168),
    "lm_head_tp2": (64128, 4096),
}


def gemv_candidates(m: int):
    from engine.kernels.gemv import GemvConfig

    if m == 1:
        grid = itertools.product([4, 8, 16, 32], [256, 512, 1024], [4, 8], [2, 3, 4])
    else:
        grid = itertools.product([8, 16, 32], [64, 128, 256], [4, 8], [3])
    return [GemvConfig(*c) for c in grid]


def sweep_gemv(rows: list[int]) -> dict:
    from engine.kernels.gemv import gemv, gemv_config, gemv_ref

    results = {}
    for name, (n, k) in GEMV_SHAPES.items():
        copies = max(2, -(-L2_DEFEAT_BYTES // (n * k * 2)))
        weights = [torch.randn(n, k, dtype=torch.bfloat16, device="cuda") * k ** -0.5 for _ in range(copies)]
        weight_bytes = n * k * 2
        for m in rows:
            x = torch.randn(m, k, dtype=torch.bfloat16, device="cuda")
            ref = gemv_ref(x, weights[0])
            cublas = graph_ms([lambda w=w: F.linear(x, w) for w in weights])

            def run(cfg):
                err = (gemv(x, weights[0], None, cfg).float() - ref.float()).abs().max().item()
                return {"ms": graph_ms([lambda w=w: gemv(x, w, None, cfg) for w in weights]), "max_abs_err": err}

            row = {"n": n, "k": k, "m": m, "cublas_ms": cublas, "cublas_tb_per_s": weight_bytes / cublas / 1e9,
                   "configs": [try_candidate(run, cfg) for cfg in gemv_candidates(m)]}
            best = fastest(row["configs"], 0.1)
            default = gemv_config(m)
            row["default"] = {"config": list(default), "ms": graph_ms([lambda w=w: gemv(x, w) for w in weights])}
            row["best"] = best
            row["best_tb_per_s"] = weight_bytes / best["ms"] / 1e9
            row["best_vs_cublas"] = cublas / best["ms"]
            results[f"{name}_m{m}"] = row
            print(f"gemv {name} m={m}: cublas {cublas * 1e3:.1f} us ({row['cublas_tb_per_s']:.2f} TB/s), "
                  f"best {best['config']} {best['ms'] * 1e3:.1f} us ({row['best_tb_per_s']:.2f} TB/s), "
                  f"default {row['default']['ms'] * 1e3:.1f} us", flush=True)
        del weights
        torch.cuda.empty_cache()
    return results


FUSIONS = {  # name: (N, K, gemv options) of the batch-1 decode layer (models/llama.py decode_one), Llama-3-8B
    "qkv+norm": (6144, 4096, {"norm": True}), "o+residual": (4096, 4096, {"residual": True}),
    "gate_up+norm": (28672, 4096, {"gated": True, "norm": True}), "down+residual": (4096, 14336, {"residual": True}),
    "qkv+norm_tp2": (3072, 4096, {"norm": True}), "o+residual_tp2": (4096, 2048, {"residual": True}),
    "gate_up+norm_tp2": (14336, 4096, {"gated": True, "norm": True}),
    "down+residual_tp2": (4096, 7168, {"residual": True}),
}


def fusion_candidates():
    from engine.kernels.gemv import GemvConfig

    return [GemvConfig(*c) for c in itertools.product([2, 4, 8, 16], [512, 1024, 2048], [4, 8], [2])]


def sweep_fusions() -> dict:
    """Each batch-1 layer gemv with its RMSNorm / residual add folded in, against the plain gemv plus the separate
    fused-add-RMSNorm kernel it replaces; the folded form's tiles swept."""
    from engine.kernels import fused_add_rms_norm
    from engine.kernels.gemv import gemv, gemv_ref

    results = {}
    hidden = torch.randn(1, 4096, dtype=torch.bfloat16, device="cuda")
    residuals = [torch.randn(1, 4096, dtype=torch.bfloat16, device="cuda") for _ in range(64)]
    norm_w = torch.ones(4096, dtype=torch.bfloat16, device="cuda")
    norm_ms = graph_ms([lambda r=r: fused_add_rms_norm(hidden, r, norm_w, 1e-5) for r in residuals])
    results["fused_add_rms_norm_ms"] = norm_ms
    print(f"fused_add_rms_norm [1, 4096]: {norm_ms * 1e3:.1f} us", flush=True)
    for name, (n, k, opts) in FUSIONS.items():
        copies = max(2, -(-L2_DEFEAT_BYTES // (n * k * 2)))
        weights = [torch.randn(n, k, dtype=torch.bfloat16, device="cuda") * k ** -0.5 for _ in range(copies)]
        x = torch.randn(1, k, dtype=torch.bfloat16, device="cuda")
        gated = opts.get("gated", False)
        norm = (torch.rand(k, dtype=torch.bfloat16, device="cuda") + 0.5, 1e-5) if opts.get("norm") else None
        out_n = n // 2 if gated else n
        residual = torch.zeros(1, out_n, dtype=torch.bfloat16, device="cuda") if opts.get("residual") else None
        ref = gemv_ref(x, weights[0], None, gated, norm)

        def fused(cfg=None, w=weights[0]):
            return gemv(x, w, None, cfg, gated=gated, norm=norm, residual=residual)

        def run(cfg):
            if residual is not None:
                residual.zero_()
            err = (fused(cfg).float() - ref.float()).abs().max().item()
            return {"ms": graph_ms([lambda w=w: fused(cfg, w) for w in weights]), "max_abs_err": err}

        plain = graph_ms([lambda w=w: gemv(x, w, None, gated=gated) for w in weights])
        row = {"n": n, "k": k, "options": opts, "plain_ms": plain,
               "fused_default_ms": graph_ms([lambda w=w: fused(None, w) for w in weights]),
               "configs": [try_candidate(run, cfg) for cfg in fusion_candidates()]}
        row["best"] = fastest(row["configs"], 0.1)
        results[name] = row
        print(f"{name}: plain {plain * 1e3:.1f} us, folded {row['fused_default_ms'] * 1e3:.1f} us (default tiles), "
              f"best {row['best']['config']} {row['best']['ms'] * 1e3:.1f} us", flush=True)
        del weights
        torch.cuda.empty_cache()
    return results


# -- paged attention ----------------------------------------------------------------------------------------
ATTENTION_CASES = {  # name: (num_seqs, context, query tokens per sequence)
    "prefill_1x4096": (1, 4096, 4096),
    "prefill_4x1024": (4, 1024, 1024),
    "chunk_2x512_over_2048": (2, 2048, 512),
    "decode_b64_ctx2048": (64, 2048, 1),
    "decode_b1_ctx384": (1, 384, 1),
}


def attention_candidates(q_len: int):
    from engine.kernels.paged_attention import TileConfig

    if q_len == 1:
        grid = itertools.product([16], [32, 64, 128], [2, 4, 8], [2, 3, 4], [None])
    else:  # maxnreg 128: two 8-warp (four 4-warp) programs per SM, where the compiler alone takes ~190 registers
        grid = itertools.product([64, 128], [32, 64, 128], [4, 8], [2, 3], [None, 128])
    return [TileConfig(*c) for c in grid]


def sweep_attention(cases: list[str] | None = None) -> dict:
    from engine.kernels.paged_attention import paged_attention_ref, tile_config, unified_attention, use_split_kv

    results = {}
    for name, (seqs, ctx, q_len) in ATTENTION_CASES.items():
        if cases and name not in cases:
            continue
        q, kc, vc, qsl, seq_lens, tables = paged_setup(seqs, ctx, q_len)
        kv_bytes = 2 * seqs * ctx * kc.shape[2] * kc.shape[3] * 2
        flops = 4 * q.shape[1] * q.shape[2] * seqs * (q_len * ctx - q_len * (q_len - 1) / 2)  # causal pairs
        out = torch.empty_like(q)
        ref = paged_attention_ref(q, kc, vc, torch.empty_like(q), qsl, seq_lens, tables, 128 ** -0.5, q_len, ctx)
        copies = 1 if q_len > 1 else max(1, -(-L2_DEFEAT_BYTES // kv_bytes))
        caches = [(kc, vc)] + [(kc.clone(), vc.clone()) for _ in range(copies - 1)]

        def timed(cfg, split=None):
            unified_attention(q, kc, vc, out, qsl, seq_lens, tables, 128 ** -0.5, q_len, ctx, split, cfg)
            err = (out.float() - ref.float()).abs().max().item()
            ms = graph_ms([lambda k=k, v=v: unified_attention(q, k, v, out, qsl, seq_lens, tables, 128 ** -0.5,
                                                              q_len, ctx, split, cfg) for k, v in caches])
            return {"config": list(cfg) if cfg else None, "ms": ms, "max_abs_err": err,
                    "tflops": flops / ms / 1e9, "kv_tb_per_s": kv_bytes / ms / 1e9}

        row = {"num_seqs": seqs, "context": ctx, "q_len": q_len,
               "configs": [try_candidate(lambda c: timed(c, split), cfg, split=split)
                           for cfg in attention_candidates(q_len)
                           for split in ([False, True] if q_len == 1 else [False])]}
        row["default"] = timed(None) | {"config": list(tile_config(4, q_len, q_len == 1 and use_split_kv(seqs, 8, 1, ctx)))}
        row["best"] = fastest(row["configs"], 0.05)
        results[name] = row
        b, d = row["best"], row["default"]
        print(f"attention {name}: default {d['config']} {d['ms'] * 1e3:.1f} us ({d['tflops']:.0f} TFLOP/s, "
              f"{d['kv_tb_per_s']:.2f} TB/s KV); best {b['config']} split={b['split']} {b['ms'] * 1e3:.1f} us "
              f"({b['tflops']:.0f} TFLOP/s, {b['kv_tb_per_s']:.2f} TB/s KV)", flush=True)
        del caches
        torch.cuda.empty_cache()
    return results


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", choices=["gemv", "attention", "fusions"], default=None)
    ap.add_argument("--gemv-rows", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--attention-cases", nargs="+", choices=list(ATTENTION_CASES), help="default: all")
    ap.add_argument("--out-dir", type=Path, default=None)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks/kernel_tuning.py needs a CUDA GPU")
    figures = {}
    if args.only in (None, "attention"):
        figures["attention"] = sweep_attention(args.attention_cases)
    if args.only in (None, "gemv"):
        figures["gemv"] = sweep_gemv(args.gemv_rows)
    if args.only in (None, "fusions"):
        figures["fusions"] = sweep_fusions()
    print("wrote", write_result("kernel-tuning", vars(args) | {"out_dir": None}, figures, args.out_dir))
    return figures


if __name__ == "__main__":
    main()
