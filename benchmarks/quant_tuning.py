"""Tune the quantized matmuls' tiles (FP8 scaled_mm, INT4 int4_mm) for Llama-3-8B's weight shapes on this GPU;
writes vLLM-format config files (engine/kernels/quant_tile_configs.py reads them).

One row (batch-1 decode) times the matrix-vector kernel the decode layers call (kernels/gemv.py, with the shape's
RMSNorm, SiLU-and-mul or residual add folded in, and for FP8 W8A8 x's per-token quantization; for 16-bit weights
also with the RMSNorm as a kernel of its own before it, and a tuned entry records which was faster); other row
counts time scaled_mm (x quantized once before it) and int4_mm. Tensor-core FP8 entries are also timed once with
Triton's default accumulation (`fast_accumulation_ms`), to show what promoting every FP8 instruction's sum costs,
and through torch._scaled_mm (`torch_scaled_mm_ms`), which the engine takes at those row counts, also with its
fast accumulation (`torch_scaled_mm_fast_ms`). For each shape and
row count, every candidate runs in a CUDA graph over enough weight copies to defeat the L2
cache (benchmarks/kernel_tuning.py's graph_ms) after a check against the torch reference; the engine's current
choice is always timed first, so a tuned entry is never slower than it as measured here. cuBLAS bf16 on the same
shape is timed as the yardstick, and the weights' bytes over the time give TB/s. Stops trying candidates for a
case after --seconds-per-case (the current choice and the fastest so far are kept).

    python benchmarks/quant_tuning.py                        # FP8 and INT4, Llama-3-8B shapes, TP=1
    python benchmarks/quant_tuning.py --dtypes fp8_w8a8 --shapes gate_up down --rows 1 16 256
    python benchmarks/quant_tuning.py --dtypes bf16 --rows 1 --model /root/gemma2-9b   # 16-bit batch-1 gemv tiles
"""
from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.kernel_tuning import GEMV_SHAPES, L2_DEFEAT_BYTES, graph_ms  # noqa: E402
from benchmarks.report import write_result  # noqa: E402

ROWS = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096]
SHAPES = ["qkv", "o", "gate_up", "down"]
GROUP = 128
DECODE_FUSIONS = {"qkv": {"norm": True}, "gate_up": {"norm": True, "gated": True}, "o": {"residual": True},
                  "down": {"residual": True}}  # what models/llama.py decode_one folds into each projection


SHAPES_BY_NAME = dict(GEMV_SHAPES)
NORM_DTYPE = [torch.bfloat16]  # Gemma keeps its norm weights (1 + w) in float32: --model sets that


def model_shapes(model: Path) -> dict[str, tuple[int, int]]:
    """(N, K) of a checkpoint's projections at TP=1, named "qkv@<folder>" etc. (DECODE_FUSIONS by the name's
    first part; the LM head has none)."""
    cfg = json.loads((model / "config.json").read_text())
    cfg = cfg.get("text_config", cfg)
    if cfg.get("model_type", "").startswith("gemma"):
        NORM_DTYPE[0] = torch.float32
    hidden, heads = cfg["hidden_size"], cfg["num_attention_heads"]
    head_dim = cfg.get("head_dim") or hidden // heads
    kv_heads = cfg.get("num_key_value_heads", heads)
    shapes = {"qkv": ((heads + 2 * kv_heads) * head_dim, hidden), "o": (hidden, heads * head_dim),
              "lm_head": (cfg["vocab_size"], hidden)}
    if "intermediate_size" in cfg and not cfg.get("num_experts") and not cfg.get("num_local_experts"):
        shapes.update(gate_up=(2 * cfg["intermediate_size"], hidden), down=(hidden, cfg["intermediate_size"]))
    return {f"{name}@{model.name}": shape for name, shape in shapes.items()}


def candidates(m: int, dtype: str, norm: bool = False):
    from engine.kernels.quant_tile_configs import TileConfig, gemv_rows

    if m == 1 and dtype == "fp8_w8a8":  # the folded matrix-vector kernel quantizing x itself (gemv.py QUANT_X):
        # rows of weights a program, K tile, warps, stages; likeliest first. Wide row tiles share x's
        # quantization among more rows; narrow ones give the narrow layers (o, down: N 4,096) more programs.
        # Taken in turns with tensor-core tiles (fp8_one_row.py: 15 of 16 rows padding, the quantization and
        # folds as kernels of their own), which read gate/up's weights faster on an H100
        folded = itertools.product([1], [16, 8, 32, 64], [1024, 512, 2048], [8, 4], [2, 3])
        tiles = itertools.product([16], [32, 64, 128], [128, 256], [4, 8], [3, 4])
        grid = [c for pair in itertools.zip_longest(folded, tiles) for c in pair if c is not None]
    elif m == 1 and dtype == "bf16":  # the 16-bit gemv, with a shape's RMSNorm folded in or run before it
        grid = itertools.product([1], [4, 8, 2, 16], [1024, 2048, 512], [4, 8], [2, 3, 4], [True, False] if norm
                                 else [True])
    elif m == 1:  # the folded INT4 gemv (gemv_int4.py): its SASS needs 4.3-5.2 instructions a weight at 8-32 rows
        grid = itertools.product([1], [16, 8, 32, 4], [1024, 2048, 512, 256], [4, 8], [2, 3, 4])
    elif m <= gemv_rows(dtype):  # BLOCK_M is M
        grid = itertools.product([1], [4, 8, 16, 32], [256, 512, 1024, 2048], [4, 8], [2, 3, 4])
    else:
        block_m = [16] if m <= 16 else [16, 32, 64] if m <= 64 else [64, 128]
        grid = itertools.product(block_m, [64, 128, 256], [64, 128, 256] if dtype == "fp8_w8a8" else [64, 128],
                                 [4, 8], [3, 4])
    return [TileConfig(*c) for c in grid]


def make_case(dtype: str, name: str, n: int, k: int, copies: int):
    """Weight copies of one shape, made once; returns calls_for(m) -> (per-copy calls taking a config, the
    reference output of the first copy)."""
    from engine.kernels.fp8 import FP8, per_token_quant_fp8
    from engine.kernels.gemv import GemvConfig, gemv, gemv_ref
    from engine.kernels.int4 import int4_mm, int4_mm_ref
    from engine.kernels.rms_norm import rms_norm
    from engine.kernels.scaled_mm import library_scaled_mm, scaled_mm, scaled_mm_ref

    if dtype == "fp8_w8a8":
        ws = [(torch.randn(n, k, device="cuda") * 4).to(FP8) for _ in range(copies)]
        w_scale = torch.rand(n, device="cuda") / 100
    elif dtype == "bf16":
        ws = [torch.randn(n, k, dtype=torch.bfloat16, device="cuda") * k ** -0.5 for _ in range(copies)]
    else:
        ws = [torch.randint(-2 ** 31, 2 ** 31 - 1, (n, k // 8), dtype=torch.int32, device="cuda")
              for _ in range(copies)]
        scales = torch.rand(n, k // GROUP, device="cuda", dtype=torch.bfloat16) / 100

    def decode_gemv(x: torch.Tensor):  # one row: the matrix-vector kernel the decode layers call
        fusion = DECODE_FUSIONS.get(name.split("@")[0], {})
        norm = (torch.rand(k, dtype=NORM_DTYPE[0], device="cuda") + 0.5, 1e-5) if fusion.get("norm") else None
        gated = fusion.get("gated", False)
        residual = torch.randn(1, n, dtype=torch.bfloat16, device="cuda") if fusion.get("residual") else None
        out = torch.empty(1, n // 2 if gated else n, dtype=torch.bfloat16, device="cuda")

        quant = dict(weight_scale=scales, int4_group=GROUP) if dtype == "int4_w4a16" else \
            dict(weight_scale=w_scale, quant_x=True) if dtype == "fp8_w8a8" else {}

        def call(cfg, w):  # out=: residual + product lands in out, and residual stays as it is
            if norm and not cfg.fold_norm:  # as gemv does with such a tuned entry
                return gemv(rms_norm(x, *norm), w, None, GemvConfig(*cfg[1:5]), gated=gated, residual=residual,
                            out=out)
            tiles = cfg if dtype == "fp8_w8a8" else GemvConfig(*cfg[1:5])  # FP8: its tensor-core route too
            return gemv(x, w, None, tiles, gated=gated, norm=norm, residual=residual, out=out, **quant)
        return [lambda cfg, w=w: call(cfg, w) for w in ws], gemv_ref(x, ws[0], None, gated, norm, residual, **quant)

    def calls_for(m: int):
        x = torch.randn(m, k, dtype=torch.bfloat16, device="cuda")
        if m == 1:
            return decode_gemv(x)
        if dtype == "fp8_w8a8":
            x_q, x_scale = per_token_quant_fp8(x)
            ref = scaled_mm_ref(x_q, x_scale, ws[0], w_scale, torch.bfloat16)

            def fp8_call(cfg, w, precise=True):  # no config and not precise: torch._scaled_mm's fast accumulation
                if cfg is None and not precise:
                    return library_scaled_mm(x_q, x_scale, w, w_scale, torch.bfloat16, fast_accum=True)
                return scaled_mm(x_q, x_scale, w, w_scale, torch.bfloat16, config=cfg, precise=precise)
            return [lambda cfg, w=w, precise=True: fp8_call(cfg, w, precise) for w in ws], ref
        ref = int4_mm_ref(x, "pack", (ws[0], scales), GROUP)
        return [lambda cfg, w=w: int4_mm(x, "pack", (w, scales), GROUP, config=cfg) for w in ws], ref

    return calls_for


def write_tiles(path: Path, best: dict) -> None:
    """Write a shape's tuned entries (row count -> vLLM-format tile) into its config file; row counts not tuned
    in this run keep the entries the file had."""
    path.parent.mkdir(parents=True, exist_ok=True)
    earlier = json.loads(path.read_text()) if path.exists() else {}
    merged = dict(sorted({**earlier, **best}.items(), key=lambda item: int(item[0])))
    path.write_text(json.dumps(merged, indent=4) + "\n")


def tune(dtype: str, name: str, rows: list[int], seconds: float, gemv_seconds: float) -> tuple[dict, dict]:
    from engine.kernels.quant_tile_configs import MAX_GEMV_ROWS, TileConfig, tile_config, tuned_tile

    n, k = SHAPES_BY_NAME[name]
    weight_bytes = n * k * {"fp8_w8a8": 1, "bf16": 2}.get(dtype, 0.5)
    copies = max(2, -(-L2_DEFEAT_BYTES // int(weight_bytes)))
    calls_for = make_case(dtype, name, n, k, copies)
    bf16 = [torch.randn(n, k, dtype=torch.bfloat16, device="cuda") for _ in range(max(2, copies // 2))]
    best, timings = {}, {}
    for m in rows:
        calls, ref = calls_for(m)
        x = torch.randn(m, k, dtype=torch.bfloat16, device="cuda")
        cublas = graph_ms([lambda w=w: F.linear(x, w) for w in bf16])
        current = tile_config(m, n, k, dtype, torch.device("cuda"))
        if dtype == "bf16":
            from engine.kernels.gemv import gemv_config
            fusion = DECODE_FUSIONS.get(name.split("@")[0], {})
            current = tuned_tile(m, n, k, dtype, torch.device("cuda")) or TileConfig(
                1, *gemv_config(1, fusion.get("norm", False), fusion.get("gated", False)))
        tried, started = [], time.perf_counter()
        has_norm = DECODE_FUSIONS.get(name.split("@")[0], {}).get("norm", False)
        for cfg in [current] + [c for c in candidates(m, dtype, has_norm) if c != current]:
            if tried and time.perf_counter() - started > (gemv_seconds if m == 1 else seconds):
                break
            try:
                err = (calls[0](cfg).float() - ref.float()).abs().max().item()
                if err > 0.05 * ref.float().abs().max().item() + 1e-3:
                    print(f"  {name} m={m} {tuple(cfg)}: wrong ({err:.3g})", flush=True)
                    continue
                tried.append((graph_ms([lambda c=c: c(cfg) for c in calls]), cfg))
            except Exception as e:  # noqa: BLE001 - a tile the compiler rejects on this GPU is skipped
                print(f"  {name} m={m} {tuple(cfg)}: {type(e).__name__}", flush=True)
        fastest_ms, fastest = min(tried, key=lambda t: t[0])
        current_ms = next(ms for ms, c in tried if c == current)
        fast_acc = {}
        if dtype == "fp8_w8a8" and m > MAX_GEMV_ROWS:
            fast_acc["torch_scaled_mm_ms"] = graph_ms([lambda c=c: c(None) for c in calls])  # no tiles: the library
            fast_acc["torch_scaled_mm_error"] = (calls[0](None).float() - ref.float()).abs().max().item()
            fast_acc["torch_scaled_mm_fast_ms"] = graph_ms([lambda c=c: c(None, precise=False) for c in calls])
            fast_acc["torch_scaled_mm_fast_error"] = (calls[0](None, precise=False).float()
                                                      - ref.float()).abs().max().item()
            fast_acc["fast_accumulation_ms"] = graph_ms([lambda c=c: c(fastest, precise=False) for c in calls])
            fast_out = calls[0](fastest, precise=False).float()
            fast_acc["fast_accumulation_error"] = (fast_out - ref.float()).abs().max().item()
        best[str(m)] = fastest.as_vllm()
        timings[str(m)] = {"best_ms": fastest_ms, "best": list(fastest), "current_ms": current_ms,
                           "current": list(current), "tried": len(tried), "cublas_bf16_ms": cublas,
                           "best_tb_per_s": weight_bytes / fastest_ms / 1e9, "vs_cublas_bf16": cublas / fastest_ms,
                           **fast_acc}
        print(f"{dtype} {name} (N={n}, K={k}) m={m}: {fastest_ms * 1e3:.1f} us {tuple(fastest)} "
              f"({weight_bytes / fastest_ms / 1e9:.2f} TB/s; current {current_ms * 1e3:.1f} us; cuBLAS bf16 "
              f"{cublas * 1e3:.1f} us) of {len(tried)}"
              + (f"; fast accumulation {fast_acc['fast_accumulation_ms'] * 1e3:.1f} us, torch._scaled_mm "
                 f"{fast_acc['torch_scaled_mm_ms'] * 1e3:.1f} us ({fast_acc['torch_scaled_mm_fast_ms'] * 1e3:.1f} "
                 "fast)" if fast_acc else ""), flush=True)
    return best, timings


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dtypes", nargs="+", choices=["fp8_w8a8", "int4_w4a16", "bf16"],
                    default=["fp8_w8a8", "int4_w4a16"])
    ap.add_argument("--shapes", nargs="+", choices=list(GEMV_SHAPES), default=None,
                    help=f"default {' '.join(SHAPES)}; with --model, which of its projections (default all)")
    ap.add_argument("--model", type=Path, default=None,
                    help="a checkpoint folder: tune its projections' shapes (qkv, o, gate_up, down, lm_head) instead")
    ap.add_argument("--rows", type=int, nargs="+", default=ROWS)
    ap.add_argument("--seconds-per-case", type=float, default=6.0)
    ap.add_argument("--gemv-seconds", type=float, default=30.0, help="for one row (batch-1 decode), which W1 is")
    ap.add_argument("--config-dir", type=Path, default=None)
    ap.add_argument("--out-dir", type=Path, default=None)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks/quant_tuning.py needs a CUDA GPU")
    from engine.kernels.quant_tile_configs import CONFIG_DIR, config_file_name

    torch.manual_seed(0)
    shapes = args.shapes or SHAPES
    if args.model:
        SHAPES_BY_NAME.update(model_shapes(args.model))
        shapes = [name for name in SHAPES_BY_NAME if name.endswith(f"@{args.model.name}")
                  and (args.shapes is None or name.split("@")[0] in args.shapes)]
    figures = {}
    for dtype, name in itertools.product(args.dtypes, shapes):
        best, timings = tune(dtype, name, args.rows, args.seconds_per_case, args.gemv_seconds)
        n, k = SHAPES_BY_NAME[name]
        out = Path(args.config_dir or CONFIG_DIR) / config_file_name(n, k, dtype, torch.cuda.get_device_name())
        write_tiles(out, best)
        print(f"wrote {out}", flush=True)
        figures[f"{dtype}_{name}"] = {"n": n, "k": k, "per_row_count": timings}
    settings = {key: (str(v) if isinstance(v, Path) else v) for key, v in vars(args).items()}
    print("wrote", write_result("quant-tuning", settings, figures, args.out_dir))
    return figures


if __name__ == "__main__":
    main()
