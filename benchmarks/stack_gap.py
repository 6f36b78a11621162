"""Where the online/offline gap comes from: one workload (W3 by default) through each layer of the stack, on
the same model and engine settings, each stage in its own process so each gets the whole GPU.

    python benchmarks/stack_gap.py --model /tmp/llama3-8b-random            # all stages, one JSON
    python benchmarks/stack_gap.py --model demo --device cpu --num-prompts 64 --ttft-prompts 8   # CPU smoke run

Stages, from the engine outwards:
- offline:    `LLM.generate` on every prompt at once (W1 too, batch-1 decode);
- in_process: an `AsyncEngine` in this process, fed by asyncio tasks as a server would;
- ingress:    the whole HTTP stack with the engine inside the ingress (`engine_in_ingress`): HTTP, FastAPI, SSE;
- cluster:    the default layout: HTTP -> ingress -> router -> engine replica (a Serve handle stream per request),
              the one ingress replica serving HTTP itself.
A stage name may add `+process` or `+thread` (where the engine loop runs, `engine_core_process`) and, for the HTTP
stages, `+proxy` (through Serve's HTTP proxy, `http.direct_ingress: false`) or `+direct` (`http.direct_ingress:
true`): `--stages cluster,cluster+proxy,cluster+process`.
Each online stage runs three points: concurrency 1 on `--ttft-prompts` prompts (TTFT and TPOT), concurrency 256,
and every prompt at once. Prefix caching is off everywhere: the points reuse the same prompts.
Writes benchmarks/results/stack-gap-*.json with every stage's figures and the ratios the targets are set on.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import math
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.report import write_result  # noqa: E402
from benchmarks.serving import (InProcessBackend, OpenAIBackend, Request, make_dataset, model_vocab,  # noqa: E402
                                run_load, summarize)

STAGES = ("offline", "in_process", "ingress", "cluster")


def engine_options(args, stage: str = "") -> dict:
    opts = dict(model=args.model, enable_prefix_caching=False)
    if args.device:
        opts["device"] = args.device
    if args.max_num_seqs:
        opts["max_num_seqs"] = args.max_num_seqs
    if "+process" in stage or "+thread" in stage:  # else the engine's default (its own process with CUDA)
        opts["engine_core_process"] = "+process" in stage
    return opts


def offline(args, requests: list[Request]) -> dict:
    from benchmarks.throughput import run_engine, warm_up
    from benchmarks.workloads import WORKLOADS
    from engine import LLM

    llm = LLM(**engine_options(args))
    try:
        vocab = model_vocab(args.model)
        prompts, outs = [r.prompt for r in requests], [r.output_len for r in requests]
        warm_up(llm, prompts, vocab)
        figures = {"all_at_once": run_engine(llm, prompts, outs)}
        w1_prompts, w1_outs = WORKLOADS["W1"](vocab=min(vocab, 10000))
        runs = [run_engine(llm, w1_prompts, w1_outs) for _ in range(args.w1_repeats)]
        figures["w1"] = sorted(runs, key=lambda r: r["output_tok_s"])[len(runs) // 2]  # the median run
        if len(runs) > 1:
            figures["w1_runs_tok_s"] = [r["output_tok_s"] for r in runs]
        return figures
    finally:
        llm.shutdown()


async def load_points(backend, requests: list[Request], ttft_prompts: int, warmup: int) -> dict:
    async with backend:
        await run_load(backend, requests[-warmup:], max_concurrency=1)
        points = {}
        for name, reqs, conc in (("c1", requests[:ttft_prompts], 1), ("c256", requests, 256),
                                 ("all_at_once", requests, None)):
            results, seconds = await run_load(backend, reqs, math.inf, conc)
            points[name] = summarize(results, seconds)
            p = points[name]
            print(f"  {name}: {p['completed']} ok {p['failed']} failed, {p['output_throughput']:.1f} out tok/s, "
                  f"TTFT p50 {p['ttft_ms'].get('p50', math.nan):.2f} ms, TPOT p50 "
                  f"{p['tpot_ms'].get('p50', math.nan):.2f} ms", flush=True)
        return points


def in_process(args, requests: list[Request], stage: str) -> dict:
    from engine import AsyncEngine

    async def run():
        engine = AsyncEngine(**engine_options(args, stage))
        try:
            return await load_points(InProcessBackend(engine), requests, args.ttft_prompts, args.warmup)
        finally:
            engine.shutdown()

    return asyncio.run(run())


def through_http(args, requests: list[Request], stage: str) -> dict:
    from benchmarks import local_serve
    from cluster.config import ClusterConfig, ModelConfig

    config = ClusterConfig(app_name="stackgap", engine_in_ingress=stage.startswith("ingress"),
                           http={"direct_ingress": True if "+direct" in stage else False if "+proxy" in stage else None}, models=[ModelConfig(
        name="bench", max_ongoing_requests=len(requests) + 8, max_queue_size=len(requests) + 8,
        **engine_options(args, stage))])
    base_url = local_serve.start(config, num_cpus=args.num_cpus)
    try:
        return asyncio.run(load_points(OpenAIBackend(base_url, "bench"), requests, args.ttft_prompts, args.warmup))
    finally:
        local_serve.stop()


def run_stage(args, stage: str) -> dict:
    requests = make_dataset(args.workload, args.num_prompts, 0, 0, min(10000, model_vocab(args.model)))
    if stage == "offline":
        return offline(args, requests)
    if stage.startswith("in_process"):
        return in_process(args, requests, stage)
    return through_http(args, requests, stage)


def ratios(stages: dict) -> dict:
    """The issue's targets: whole stack / offline with all prompts at once, whole stack / in-process at
    concurrency 256, and the TTFT p50 difference at concurrency 1."""
    out = {}
    offline_all = stages.get("offline", {}).get("all_at_once", {}).get("output_tok_s")
    local = stages.get("in_process")
    for name, s in stages.items():
        if name == "offline":
            continue
        r = {}
        if offline_all:
            r["all_at_once_vs_offline"] = s["all_at_once"]["output_throughput"] / offline_all
        if local and name != "in_process":
            r["c256_vs_in_process"] = s["c256"]["output_throughput"] / local["c256"]["output_throughput"]
            r["c1_ttft_p50_minus_in_process_ms"] = s["c1"]["ttft_ms"]["p50"] - local["c1"]["ttft_ms"]["p50"]
            r["c1_tpot_p50_minus_in_process_ms"] = s["c1"]["tpot_ms"]["p50"] - local["c1"]["tpot_ms"]["p50"]
        out[name] = r
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--device", help="cpu or cuda (default: the engine's auto)")
    ap.add_argument("--workload", default="W3")
    ap.add_argument("--num-prompts", type=int, default=0, help="first N prompts of the workload (0: all)")
    ap.add_argument("--ttft-prompts", type=int, default=32, help="prompts sent one at a time for TTFT")
    ap.add_argument("--warmup", type=int, default=8)
    ap.add_argument("--max-num-seqs", type=int)
    ap.add_argument("--w1-repeats", type=int, default=1, help="offline: W1 runs, the median reported")
    ap.add_argument("--num-cpus", type=int, default=8, help="CPUs of the local Ray cluster")
    ap.add_argument("--stages", default=",".join(STAGES))
    ap.add_argument("--stage", help=argparse.SUPPRESS)  # internal: run one stage, print its JSON last
    ap.add_argument("--label", default="", help="added to the result's file name")
    ap.add_argument("--out-dir", type=Path)
    args = ap.parse_args()
    if args.stage:
        print("STAGE-RESULT " + json.dumps(run_stage(args, args.stage)), flush=True)
        return 0
    stages = {}
    forwarded = [a for a in sys.argv[1:]]
    for stage in args.stages.split(","):
        print(f"stage {stage}", flush=True)
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, __file__, *forwarded, "--stage", stage], stdout=subprocess.PIPE,
                              text=True)
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("STAGE-RESULT ")]
        sys.stdout.write("".join(ln + "\n" for ln in proc.stdout.splitlines() if not ln.startswith("STAGE-RESULT")))
        if proc.returncode != 0 or not lines:
            print(f"stage {stage} failed (exit {proc.returncode})", flush=True)
            continue
        stages[stage] = json.loads(lines[-1].removeprefix("STAGE-RESULT "))
        print(f"stage {stage} done in {time.perf_counter() - t0:.0f} s", flush=True)
    figures = {"stages": stages, "ratios": ratios(stages)}
    if "offline" in stages:
        off = stages["offline"]
        print(f"offline all_at_once={off['all_at_once']['output_tok_s']:.1f} w1={off['w1']['output_tok_s']:.1f}"
              + (f" w1_runs={[round(x, 1) for x in off['w1_runs_tok_s']]}" if "w1_runs_tok_s" in off else ""))
    for name, r in figures["ratios"].items():
        print(name, " ".join(f"{k}={v:.3f}" for k, v in r.items()))
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "stage"}
    name = "stack-gap" + (f"-{args.label}" if args.label else "")
    print(f"wrote {write_result(name, settings, figures, args.out_dir)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
