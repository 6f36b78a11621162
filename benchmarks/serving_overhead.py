"""Serve overhead: the same load through the whole cluster (HTTP -> Serve proxy -> ingress -> router -> engine
replica) and straight into one in-process AsyncEngine, on the same model and engine settings.

    python benchmarks/serving_overhead.py                        # default model, CPU, concurrency 1 4 16
    python benchmarks/serving_overhead.py --model /ckpt --max-concurrency 64 256 --device cuda
    python benchmarks/serving_overhead.py --paired --num-prompts 64     # per-prompt differences, c=1

Prefix caching is off in both (each sweep point reuses nothing). Reports, per concurrency, the TTFT p50
difference (cluster - in-process) and the cluster's output throughput as a share of the in-process engine's.
Writes benchmarks/results/serving-overhead-*.json and a PNG of both latency curves.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import local_serve  # noqa: E402
from benchmarks.proc_cpu import CPUMeter, format_rows  # noqa: E402
from benchmarks.report import write_result  # noqa: E402
from benchmarks.serving import (InProcessBackend, OpenAIBackend, make_dataset, model_vocab, plot,  # noqa: E402
                                sweep)


def engine_options(args) -> dict:
    # cpu_threads: a CPU replica otherwise takes every core it may use, whatever OMP_NUM_THREADS says.
    opts = dict(model=args.model, enable_prefix_caching=False, max_num_seqs=args.max_num_seqs,
                cpu_threads=args.threads)
    if args.device:
        opts["device"] = args.device
    return opts


async def in_process(args, requests) -> list[dict]:
    from engine import AsyncEngine

    engine = AsyncEngine(**engine_options(args))
    try:
        return await sweep(lambda: InProcessBackend(engine), requests, [float("inf")], args.max_concurrency, {},
                           args.warmup, log=lambda s: print("in-process", s, flush=True), cpu_meter=CPUMeter)
    finally:
        engine.shutdown()


def through_cluster_config(args):
    from cluster.config import ClusterConfig, ModelConfig

    return ClusterConfig(app_name="overhead", ingress_replicas=args.ingress_replicas,
                         engine_in_ingress=args.engine_in_ingress,
                         http={"direct_ingress": True if args.direct_ingress else False if args.serve_proxy else None}, models=[ModelConfig(
        name="bench", num_cpus_per_replica=args.threads, **engine_options(args),
        **({} if args.stream_chunk_rate is None else {"stream_chunk_rate": args.stream_chunk_rate}))])


def through_cluster(args, requests) -> list[dict]:
    base_url = local_serve.start(through_cluster_config(args))
    try:
        return asyncio.run(sweep(lambda: OpenAIBackend(base_url, "bench"), requests, [float("inf")],
                                 args.max_concurrency, {}, args.warmup,
                                 log=lambda s: print("cluster", s, flush=True), cpu_meter=CPUMeter))
    finally:
        local_serve.stop()
        wait_for_free_gpu()


def wait_for_free_gpu(timeout_s: float = 60.0) -> None:
    """Ray's replica process exits a little after Ray stops; wait until its GPU memory is back."""
    import time

    import torch

    if not torch.cuda.is_available():
        return
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        free, total = torch.cuda.mem_get_info()
        if free > 0.9 * total:
            return
        time.sleep(1)


async def paired(args, requests) -> dict:
    """Both alive at once, one request at a time, each prompt sent to both (ABBA order): the per-prompt differences
    cancel the machine's drift, which swamps a few ms between separate runs. Beside an idle cluster, the in-process
    engine shares the CPUs with Ray's own processes too, so this measures the request path alone, on a machine
    with cores to spare for them."""
    import random
    import statistics
    import time

    from benchmarks.serving import Result
    from engine import AsyncEngine

    base_url = local_serve.start(through_cluster_config(args))
    engine = AsyncEngine(**engine_options(args))
    pairs = []  # (in-process, cluster) Results of each prompt
    try:
        async with OpenAIBackend(base_url, "bench") as cluster, InProcessBackend(engine) as local:
            for req in requests[:args.warmup]:
                for backend in (cluster, local):
                    await backend.send(req, Result(start=time.perf_counter()))
            for i, req in enumerate(requests):
                results = {}
                for name, backend in ((("cluster", cluster), ("local", local)) if i % 4 in (0, 3) else
                                      (("local", local), ("cluster", cluster))):
                    results[name] = Result(start=time.perf_counter())
                    await backend.send(req, results[name])
                assert results["local"].ok and results["cluster"].ok, (results["local"].error, results["cluster"].error)
                pairs.append((results["local"], results["cluster"]))
    finally:
        engine.shutdown()
        local_serve.stop()
    rng = random.Random(0)
    metrics = {"ttft_ms": lambda r: 1e3 * r.ttft, "e2e_ms": lambda r: 1e3 * r.e2e,
               "tpot_ms": lambda r: 1e3 * (r.e2e - r.ttft) / max(1, r.output_tokens - 1)}

    def summary(xs: list[float]) -> dict:
        boot = sorted(statistics.median(rng.choices(xs, k=len(xs))) for _ in range(2000))
        return {"median": statistics.median(xs), "mean": statistics.fmean(xs),
                "median_ci95": [boot[50], boot[1949]], "samples": xs}

    return {"pairs": len(pairs), **{k: summary([f(b) - f(a) for a, b in pairs]) for k, f in metrics.items()},
            "in_process_median": {k: statistics.median(f(a) for a, _ in pairs) for k, f in metrics.items()}}


def compare(local: list[dict], cluster: list[dict]) -> list[dict]:
    return [{"max_concurrency": a["max_concurrency"],
             "ttft_p50_overhead_ms": b["ttft_ms"]["p50"] - a["ttft_ms"]["p50"],
             "ttft_p99_overhead_ms": b["ttft_ms"]["p99"] - a["ttft_ms"]["p99"],
             "tpot_p50_overhead_ms": b["tpot_ms"]["p50"] - a["tpot_ms"]["p50"],
             "throughput_ratio": b["output_throughput"] / a["output_throughput"]}
            for a, b in zip(local, cluster)]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--device", help="cpu or cuda (default: the engine's auto)")
    ap.add_argument("--dataset", default="random")
    ap.add_argument("--num-prompts", type=int, default=48)
    ap.add_argument("--input-len", type=int, default=256)
    ap.add_argument("--output-len", type=int, default=64)
    ap.add_argument("--max-concurrency", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--max-num-seqs", type=int, default=64)
    ap.add_argument("--ingress-replicas", type=int, default=1, help="HTTP ingress replicas (ClusterConfig key)")
    ap.add_argument("--direct-ingress", action="store_true", help="the ingress serves HTTP itself (http key; the "
                    "default with one ingress replica)")
    ap.add_argument("--serve-proxy", action="store_true", help="through Serve's HTTP proxy (http.direct_ingress: "
                    "false)")
    ap.add_argument("--engine-in-ingress", action="store_true", help="the engine runs in the ingress (ClusterConfig key)")
    ap.add_argument("--stream-chunk-rate", type=float, help="ModelConfig key (0: a chunk per token)")
    ap.add_argument("--threads", type=int, default=2,
                    help="torch CPU threads in both (the engines' cpu_threads, the replica's CPUs)")
    ap.add_argument("--warmup", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=10000, help="token ids are drawn below this and the model's vocab")
    ap.add_argument("--env", nargs="*", default=[], type=lambda kv: tuple(kv.split("=", 1)), metavar="KEY=VALUE",
                    help="environment of both engines (e.g. OMP_WAIT_POLICY=PASSIVE)")
    ap.add_argument("--paired", action="store_true",
                    help="cluster and in-process engine alive together, each prompt to both in turn (c=1)")
    ap.add_argument("--out-dir", type=Path)
    args = ap.parse_args()
    for key, value in args.env:  # before Ray starts: its processes, the replica's included, inherit them
        os.environ[key] = value
    os.environ["OMP_NUM_THREADS"] = str(args.threads)  # OpenMP in this process and, through Ray, the replica
    import torch

    torch.set_num_threads(args.threads)
    vocab = min(args.vocab, model_vocab(args.model))
    requests = make_dataset(args.dataset, args.num_prompts, args.input_len, args.output_len, vocab)
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    if args.paired:
        figures = asyncio.run(paired(args, requests))
        for key in ("ttft_ms", "e2e_ms", "tpot_ms"):
            f = figures[key]
            print(f"paired {key} overhead: median {f['median']:+.2f} (95% CI {f['median_ci95'][0]:+.2f} to "
                  f"{f['median_ci95'][1]:+.2f}), mean {f['mean']:+.2f} over {figures['pairs']} prompts; in-process "
                  f"median {figures['in_process_median'][key]:.2f}")
        print(f"wrote {write_result('serving-overhead-paired', settings, figures, args.out_dir)}")
        return 0
    cluster = through_cluster(args, requests)  # first: its replica process frees the GPU when Ray stops
    local = asyncio.run(in_process(args, requests))
    comparison = compare(local, cluster)
    for name, points in (("cluster", cluster), ("in-process", local)):
        for p in points:
            print(f"{name}, concurrency {p['max_concurrency']}: CPU per process\n{format_rows(p['cpu'])}")
    for c in comparison:
        print(f"concurrency {c['max_concurrency']}: TTFT p50 overhead {c['ttft_p50_overhead_ms']:+.1f} ms, "
              f"throughput {100 * c['throughput_ratio']:.1f}% of in-process")
    path = write_result("serving-overhead", settings,
                        {"in_process": local, "cluster": cluster, "comparison": comparison}, args.out_dir)
    plot({"in-process AsyncEngine": local, "cluster (HTTP + Serve)": cluster}, path.with_suffix(".png"),
         f"Serve overhead: {args.model}, {args.dataset} {args.input_len}/{args.output_len}")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
