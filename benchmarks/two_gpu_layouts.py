"""One model laid out on two GPUs in several ways, each through the whole Ray Serve stack (issue 26): TP=2, EP=2
(each expert whole on one rank, `enable_expert_parallel`) and two independent TP=1 replicas; `tp1` is one GPU for
reference. For each layout, over HTTP:
  W1      the one W1 request alone: ms per output token (batch-1 latency);
  W3      every W3 request at once: output tok/s;
  poisson the first --num-prompts W3 requests at --request-rate (Poisson arrivals): TTFT and TPOT p50 and p99.
The offline engine's figures for the same layouts come from benchmarks/throughput.py (--tp 2,
--enable-expert-parallel) and benchmarks/replicas.py; benchmarks/gpu_parallel.sh runs all of them.

    python benchmarks/two_gpu_layouts.py --model /dev/shm/qwen3-30b-a3b --layouts tp2 ep2 replicas2 --request-rate 8
"""
from __future__ import annotations

import argparse
import asyncio
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import local_serve  # noqa: E402
from benchmarks.report import write_result  # noqa: E402
from benchmarks.serving import OpenAIBackend, make_dataset, model_vocab, sweep  # noqa: E402

LAYOUTS = {  # ModelConfig fields of each layout
    "tp1": {},
    "tp2": {"tensor_parallel_size": 2},
    "ep2": {"tensor_parallel_size": 2, "enable_expert_parallel": True},
    "replicas2": {"min_replicas": 2, "max_replicas": 2},
}


def layout_config(name: str, args):
    from cluster.config import ClusterConfig, ModelConfig

    engine = dict(model=args.model, max_num_seqs=args.max_num_seqs, **({"device": args.device} if args.device else {}))
    return ClusterConfig(app_name=f"layout-{name}", models=[ModelConfig(name="bench", **engine, **LAYOUTS[name])])


def run_layout(name: str, args) -> dict:
    """Deploy the layout on a local Ray, run the three loads, stop everything."""
    import ray
    from ray import serve

    vocab = model_vocab(args.model)
    base_url = local_serve.start(layout_config(name, args), num_cpus=args.num_cpus)
    backend = lambda: OpenAIBackend(base_url, "bench")  # noqa: E731
    log = lambda s: print(f"{name}: {s}", flush=True)  # noqa: E731
    try:
        w1 = make_dataset("W1", 0, 0, 0, vocab)
        w3 = make_dataset("W3", args.limit or 0, 0, 0, vocab)
        (one,) = asyncio.run(sweep(backend, w1, [math.inf], [1], {}, args.warmup, log))
        (burst,) = asyncio.run(sweep(backend, w3, [math.inf], [None], {}, 0, log))
        (poisson,) = asyncio.run(sweep(backend, w3[:args.num_prompts], [args.request_rate], [None], {}, 0, log))
        ms_per_token = 1000 * one["duration_s"] / max(one["output_tokens"], 1)
        return {"W1_ms_per_output_token": ms_per_token, "W1": one, "W3": burst, "poisson": poisson}
    finally:
        serve.shutdown()
        ray.shutdown()


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--layouts", nargs="+", choices=list(LAYOUTS), default=["tp2", "ep2", "replicas2"])
    ap.add_argument("--device", default=None, help="default: the engine's choice (CUDA where there is one)")
    ap.add_argument("--request-rate", type=float, default=8.0, help="Poisson arrivals, requests/s")
    ap.add_argument("--num-prompts", type=int, default=300, help="W3 requests in the Poisson run")
    ap.add_argument("--limit", type=int, default=None, help="only the first N W3 requests in the all-at-once run")
    ap.add_argument("--max-num-seqs", type=int, default=256)
    ap.add_argument("--num-cpus", type=int, default=16, help="the local Ray's CPUs")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--out-dir", type=Path, default=None)
    args = ap.parse_args(argv)
    figures, path = {}, None
    for name in args.layouts:
        figures[name] = run_layout(name, args)
        f = figures[name]
        print(f"{name}: W1 {f['W1_ms_per_output_token']:.2f} ms/token, W3 {f['W3']['output_throughput']:.1f} out "
              f"tok/s, at {args.request_rate} req/s TTFT p50 {f['poisson']['ttft_ms'].get('p50', math.nan):.1f} "
              f"p99 {f['poisson']['ttft_ms'].get('p99', math.nan):.1f} ms, TPOT p50 "
              f"{f['poisson']['tpot_ms'].get('p50', math.nan):.1f} p99 {f['poisson']['tpot_ms'].get('p99', math.nan):.1f}"
              " ms", flush=True)
        settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
        path = write_result("two-gpu-layouts", settings, figures, args.out_dir, path)  # rewritten after each
    print(f"wrote {path}")
    return figures


if __name__ == "__main__":
    main()
