"""Prefix-aware vs power-of-two routing, two engine replicas, on requests that share long system prompts.

    python benchmarks/serving_routing.py           # default model, CPU, 16 system prompts of 512 tokens

The prefix working set (groups x prefix blocks) is larger than one replica's KV cache but fits in two: with
power-of-two choices every replica sees every prompt and evicts, while prefix-aware routing keeps each
prompt's requests on the replica that cached it. The same requests run once per policy, each on fresh
replicas; reports prefix-cache hit rate (the replicas' own counters), TTFT and throughput.
Writes benchmarks/results/serving-routing-*.json and a PNG.
"""
from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import local_serve  # noqa: E402
from benchmarks.report import write_result  # noqa: E402
from benchmarks.serving import OpenAIBackend, make_dataset, model_vocab, plot, sweep  # noqa: E402

NAME = "bench"


def cluster_config(args, routing: str):
    from cluster.config import ClusterConfig, ModelConfig

    return ClusterConfig(app_name="routing", routing=routing, models=[ModelConfig(
        model=args.model, name=NAME, min_replicas=2, max_replicas=2, num_kv_blocks=args.kv_blocks,
        max_num_seqs=args.max_num_seqs, num_cpus_per_replica=1, routing_stats_period_s=0.5,
        **({"device": args.device} if args.device else {}))])


def hit_counts() -> dict:
    stats = local_serve.engine_stats("routing", NAME)
    queries = sum(s["prefix_cache_queries"] for s in stats)
    hits = sum(s["prefix_cache_hits"] for s in stats)
    return {"queries": queries, "hits": hits, "per_replica": [
        {"replica": s["replica"], "queries": s["prefix_cache_queries"], "hits": s["prefix_cache_hits"]}
        for s in stats]}


def run_policy(args, base_url: str, requests) -> dict:
    before = hit_counts()
    points = asyncio.run(sweep(lambda: OpenAIBackend(base_url, NAME), requests, [args.request_rate],
                               [args.max_concurrency], {}, warmup=0, log=lambda s: print(s, flush=True)))
    after = hit_counts()
    queries, hits = after["queries"] - before["queries"], after["hits"] - before["hits"]
    return {**points[0], "prefix_cache_queries": queries, "prefix_cache_hits": hits,
            "prefix_cache_hit_rate": hits / queries if queries else 0.0, "replicas": after["per_replica"]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--device")
    ap.add_argument("--num-prompts", type=int, default=160)
    ap.add_argument("--num-groups", type=int, default=16)
    ap.add_argument("--prefix-len", type=int, default=512)
    ap.add_argument("--input-len", type=int, default=32, help="each request's own tokens after the prefix")
    ap.add_argument("--output-len", type=int, default=16)
    ap.add_argument("--kv-blocks", type=int, default=320, help="per replica: about 9 of the 16 prefixes")
    ap.add_argument("--max-num-seqs", type=int, default=8)
    ap.add_argument("--max-concurrency", type=int, default=8)
    ap.add_argument("--request-rate", type=float, default=float("inf"))
    ap.add_argument("--vocab", type=int, default=10000, help="token ids are drawn below this and the model's vocab")
    ap.add_argument("--out-dir", type=Path)
    args = ap.parse_args()
    vocab = min(args.vocab, model_vocab(args.model))
    requests = make_dataset("prefix", args.num_prompts, args.input_len, args.output_len, vocab,
                            prefix_len=args.prefix_len, num_groups=args.num_groups)
    results = {}
    base_url = local_serve.start(cluster_config(args, "prefix_aware"))
    try:
        for routing in ("prefix_aware", "power_of_two"):
            if routing != "prefix_aware":
                local_serve.redeploy(cluster_config(args, routing))
            print(f"-- {routing}", flush=True)
            results[routing] = run_policy(args, base_url, requests)
            r = results[routing]
            print(f"{routing}: hit rate {100 * r['prefix_cache_hit_rate']:.1f}%, TTFT p50 {r['ttft_ms']['p50']:.0f} "
                  f"ms p99 {r['ttft_ms']['p99']:.0f} ms, {r['output_throughput']:.1f} out tok/s", flush=True)
    finally:
        local_serve.stop()
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    settings["request_rate"] = str(args.request_rate)
    path = write_result("serving-routing", settings, results, args.out_dir)
    plot({k: [v] for k, v in results.items()}, path.with_suffix(".png"),
         f"routing: {args.num_groups} system prompts x {args.prefix_len} tokens, 2 replicas")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
