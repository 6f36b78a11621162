"""Online serving benchmark, the way `vllm bench serve` measures: load on any OpenAI-compatible endpoint.

    python benchmarks/serving.py --base-url http://127.0.0.1:8000 --model smollm2-135m-instruct \\
        --dataset random --input-len 128 --output-len 64 --num-prompts 64 --max-concurrency 1 4 16
    python benchmarks/serving.py --base-url ... --dataset W3 --max-concurrency 256      # shared workload W3
    python benchmarks/serving.py --base-url ... --dataset sharegpt --request-rate 1 2 4 --goodput ttft:500 tpot:50

Prompts are token ids (sent as `prompt: [ids]` to /v1/completions, streamed, `ignore_eos` with a fixed
`max_tokens`, so every request makes exactly its output length). Datasets: `random` (uniform ids, fixed
lengths), `sharegpt` (ShareGPT-like lognormal lengths, as W3), `W1`/`W2`/`W3` (exactly
benchmarks/workloads.py), `prefix` (groups of requests sharing a long system prompt, interleaved).
Load: Poisson arrivals at `--request-rate` (inf: all at once), capped at `--max-concurrency` requests in flight;
several values of either sweep the load, one run per value. Per run: TTFT, TPOT, ITL and E2E latency
(mean/p50/p90/p99, ms), request and token throughput, and goodput (requests/s meeting every `--goodput` SLO).
Writes benchmarks/results/serving-<label>-*.json and a PNG of latency against achieved throughput.
`benchmarks/serving_overhead.py` and `benchmarks/serving_routing.py` use this module's `run_load` in-process.
The load client itself (requests, the OpenAI backend, `run_load`, `summarize`) is cluster/bench.py, which
`strata bench` runs from an installed Strata; this script adds the shared workloads, the in-process engine, sweeps
and plots.
"""
from __future__ import annotations

import argparse
import asyncio
import math
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.report import write_result  # noqa: E402
from benchmarks.workloads import WORKLOADS  # noqa: E402
from cluster.bench import (OpenAIBackend, Request, Result, meets, parse_slos, run_load,  # noqa: E402, F401
                           summarize)


# -- datasets -----------------------------------------------------------------------------------------------------
def make_dataset(name: str, num_prompts: int, input_len: int, output_len: int, vocab: int, seed: int = 0,
                 prefix_len: int = 512, num_groups: int = 8) -> list[Request]:
    rng = np.random.default_rng(seed)
    if name in WORKLOADS:
        prompts, outs = WORKLOADS[name]()
        reqs = [Request([t % vocab for t in p], o) for p, o in zip(prompts, outs)]
        return reqs[:num_prompts] if num_prompts else reqs
    if name == "random":
        return [Request(rng.integers(0, vocab, size=input_len).tolist(), output_len) for _ in range(num_prompts)]
    if name == "sharegpt":
        prompts, outs = WORKLOADS["W3"](n=num_prompts, vocab=vocab, seed=seed)
        return [Request(p, o) for p, o in zip(prompts, outs)]
    if name == "prefix":
        # num_groups system prompts of prefix_len tokens; each request = its group's prompt + input_len own tokens.
        systems = [rng.integers(0, vocab, size=prefix_len).tolist() for _ in range(num_groups)]
        groups = rng.integers(0, num_groups, size=num_prompts)
        return [Request(systems[g] + rng.integers(0, vocab, size=input_len).tolist(), output_len) for g in groups]
    raise ValueError(f"unknown dataset {name!r}: use random, sharegpt, prefix, or one of {', '.join(WORKLOADS)}")


def model_vocab(model: str) -> int:
    """Vocabulary size of a local or built-in model (token ids of the datasets are drawn below it)."""
    from engine.model_source import resolve_model
    from engine.models.loader import load_hf_config

    return load_hf_config(resolve_model(model)).vocab_size


# -- the in-process backend ---------------------------------------------------------------------------------------
class InProcessBackend:
    """The same requests straight into an AsyncEngine in this process: no HTTP, no Ray."""

    def __init__(self, engine):
        self.engine = engine
        self.count = 0

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc):
        pass

    async def send(self, req: Request, result: Result) -> None:
        from engine import SamplingParams

        self.count += 1
        params = SamplingParams(temperature=0, max_tokens=req.output_len, ignore_eos=True)
        async for delta in self.engine.add_request(f"bench-{self.count}", req.prompt, params):
            if delta.error:
                result.error = delta.error
                return
            if delta.token_ids:
                result.arrived()
                result.output_tokens += len(delta.token_ids)
        result.e2e = time.perf_counter() - result.start
        result.prompt_tokens = len(req.prompt)
        result.ok = result.output_tokens == req.output_len


# -- sweeps and plots ---------------------------------------------------------------------------------------------
async def sweep(backend_factory, requests: list[Request], rates: list[float], concurrencies: list[int | None],
                slos: dict, warmup: int = 2, log=print, cpu_meter=None) -> list[dict]:
    """One run per (rate, concurrency) point, after `warmup` requests that are not counted. `cpu_meter`
    (proc_cpu.CPUMeter) adds each point's CPU time per process under "cpu"."""
    points = []
    async with backend_factory() as backend:
        if warmup:
            await run_load(backend, requests[:warmup], max_concurrency=1)
        for rate in rates:
            for conc in concurrencies:
                meter = cpu_meter() if cpu_meter else None
                results, seconds = await run_load(backend, requests, rate, conc)
                figures = summarize(results, seconds, slos)
                if meter:
                    figures["cpu"] = meter.stop(figures["output_tokens"], seconds)
                figures.update(request_rate=rate if rate != math.inf else "inf", max_concurrency=conc)
                log(f"rate={figures['request_rate']} concurrency={conc}: {figures['completed']} ok "
                    f"{figures['failed']} failed, {figures['output_throughput']:.1f} out tok/s, TTFT p50 "
                    f"{figures['ttft_ms'].get('p50', float('nan')):.1f} ms p99 "
                    f"{figures['ttft_ms'].get('p99', float('nan')):.1f}, TPOT p50 "
                    f"{figures['tpot_ms'].get('p50', float('nan')):.1f} ms")
                points.append(figures)
    return points


def plot(series: dict[str, list[dict]], path: Path, title: str) -> None:
    """TTFT and TPOT percentiles against achieved output throughput, one line per series."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for label, points in series.items():
        xs = [p["output_throughput"] for p in points]
        for ax, metric in zip(axes, ("ttft_ms", "tpot_ms")):
            for q, style in (("p50", "-o"), ("p99", "--x")):
                ax.plot(xs, [p[metric].get(q, float("nan")) for p in points], style, label=f"{label} {q}")
    for ax, name in zip(axes, ("TTFT (ms)", "TPOT (ms)")):
        ax.set_xlabel("output tokens/s")
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--base-url", default="http://127.0.0.1:8000")
    ap.add_argument("--model", required=True, help="served model name (the request's `model`)")
    ap.add_argument("--api-key")
    ap.add_argument("--dataset", default="random", help="random, sharegpt, prefix, W1, W2 or W3")
    ap.add_argument("--num-prompts", type=int, default=200, help="0 with W1/W2/W3: the whole workload")
    ap.add_argument("--input-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--prefix-len", type=int, default=512, help="shared system prompt length (prefix dataset)")
    ap.add_argument("--num-groups", type=int, default=8, help="distinct system prompts (prefix dataset)")
    ap.add_argument("--vocab", type=int, default=10000, help="token ids are drawn below this")
    ap.add_argument("--request-rate", type=float, nargs="+", default=[math.inf], help="requests/s; inf: at once")
    ap.add_argument("--max-concurrency", type=int, nargs="+", default=[None])
    ap.add_argument("--goodput", nargs="*", help="SLOs such as ttft:500 tpot:50 e2e:10000 (ms)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--label", default="endpoint")
    ap.add_argument("--out-dir", type=Path)
    ap.add_argument("--no-plot", action="store_true")
    args = ap.parse_args(argv)
    try:
        slos = parse_slos(args.goodput)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    try:
        requests = make_dataset(args.dataset, args.num_prompts, args.input_len, args.output_len, args.vocab,
                                prefix_len=args.prefix_len, num_groups=args.num_groups)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    print(f"{len(requests)} requests ({args.dataset}) to {args.base_url}", flush=True)
    points = asyncio.run(sweep(lambda: OpenAIBackend(args.base_url, args.model, args.api_key), requests,
                               args.request_rate, args.max_concurrency, slos, args.warmup))
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "api_key"}
    settings["request_rate"] = [str(r) for r in args.request_rate]
    path = write_result(f"serving-{args.label}", settings, {"points": points}, args.out_dir)
    if not args.no_plot:
        plot({args.label: points}, path.with_suffix(".png"), f"{args.label}: {args.dataset}")
    print(f"wrote {path}")
    return 0 if all(p["failed"] == 0 for p in points) else 1


if __name__ == "__main__":
    sys.exit(main())
