"""`strata bench`: load on an OpenAI-compatible server, measured as `vllm bench serve` measures it, with its main
flags and its JSON result fields.

    strata bench [--base-url URL] [--model NAME] [--num-prompts N] [--random-input-len N] [--random-output-len N]
                 [--request-rate R] [--max-concurrency N] [--goodput ttft:MS tpot:MS e2el:MS] [--save-result]

Prompts are random token ids (below --vocab-size), sent to /v1/completions as `prompt: [ids]`, streamed, with
`ignore_eos` and a fixed `max_tokens`, so every request makes exactly its output length; one SSE chunk is one
arrival of tokens. Arrivals are Poisson at --request-rate (inf: all at once), at most --max-concurrency in flight.
This module is the load client; benchmarks/serving.py (a source checkout's benchmark script) adds the shared
workloads, an in-process engine, sweeps and plots on top of it.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import math
import random
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from cluster.api_client import ServerError, openai_client, pick_model


@dataclass
class Request:
    prompt: list[int]
    output_len: int


@dataclass
class Result:
    ok: bool = False
    error: str = ""
    start: float = 0.0
    ttft: float = 0.0
    e2e: float = 0.0
    itls: list[float] = field(default_factory=list)
    prompt_tokens: int = 0
    output_tokens: int = 0

    def arrived(self) -> None:
        """Tokens arrived now: the first time sets TTFT, later ones add an inter-token latency."""
        now = time.perf_counter()
        if not self.ttft:
            self.ttft = now - self.start
        else:
            self.itls.append(now - self.start - self.e2e)
        self.e2e = now - self.start  # the latest arrival so far; the final value once the stream ends


class OpenAIBackend:
    """Streams /v1/completions over HTTP; one SSE chunk is one arrival of tokens."""

    def __init__(self, base_url: str, model: str, api_key: str | None = None, timeout: float = 3600):
        self.url = base_url.rstrip("/") + "/v1/completions"
        self.model = model
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.timeout = timeout
        self.session = None

    async def __aenter__(self):
        import aiohttp

        self.session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self.timeout),
                                             connector=aiohttp.TCPConnector(limit=0))
        return self

    async def __aexit__(self, *exc):
        await self.session.close()

    async def send(self, req: Request, result: Result) -> None:
        body = {"model": self.model, "prompt": req.prompt, "max_tokens": req.output_len, "temperature": 0,
                "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
        async with self.session.post(self.url, json=body, headers=self.headers) as resp:
            if resp.status != 200:
                result.error = f"HTTP {resp.status}: {(await resp.text())[:200]}"
                return
            async for raw in resp.content:
                line = raw.strip()
                if not line.startswith(b"data:"):
                    continue
                data = line[5:].strip()
                if data == b"[DONE]":
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    result.error = chunk["error"].get("message", str(chunk["error"]))
                    return
                if chunk.get("choices"):
                    result.arrived()
                if chunk.get("usage"):
                    result.prompt_tokens = chunk["usage"]["prompt_tokens"]
                    result.output_tokens = chunk["usage"]["completion_tokens"]
        result.e2e = time.perf_counter() - result.start
        result.ok = result.output_tokens == req.output_len
        if not result.ok:
            result.error = f"{result.output_tokens} of {req.output_len} tokens (usage missing or short)"


async def run_load(backend, requests: list[Request], request_rate: float = math.inf,
                   max_concurrency: int | None = None, seed: int = 0) -> tuple[list[Result], float]:
    """Send every request (Poisson arrivals at request_rate, at most max_concurrency in flight); returns the
    results in request order and the wall time from the first send to the last answer."""
    rng = random.Random(seed)
    gate = asyncio.Semaphore(max_concurrency) if max_concurrency else None
    results = [Result() for _ in requests]

    async def one(req: Request, result: Result) -> None:
        if gate:
            await gate.acquire()
        try:
            result.start = time.perf_counter()
            await backend.send(req, result)
        except Exception as e:  # noqa: BLE001 - a failed request is a figure, not a crash of the benchmark
            result.error = f"{type(e).__name__}: {e}"
        finally:
            if gate:
                gate.release()

    t0 = time.perf_counter()
    tasks = []
    for req, result in zip(requests, results):
        tasks.append(asyncio.create_task(one(req, result)))
        if request_rate != math.inf:
            await asyncio.sleep(rng.expovariate(request_rate))
    await asyncio.gather(*tasks)
    return results, time.perf_counter() - t0


def summarize(results: list[Result], seconds: float, slos: dict[str, float] | None = None) -> dict:
    import numpy as np

    ok = [r for r in results if r.ok]
    out_tokens = sum(r.output_tokens for r in ok)
    in_tokens = sum(r.prompt_tokens for r in ok)
    tpots = [(r.e2e - r.ttft) / (r.output_tokens - 1) for r in ok if r.output_tokens > 1]
    series = {"ttft_ms": [r.ttft for r in ok], "tpot_ms": tpots, "itl_ms": [x for r in ok for x in r.itls],
              "e2e_ms": [r.e2e for r in ok]}
    figures = {"completed": len(ok), "failed": len(results) - len(ok),
               "errors": sorted({r.error for r in results if not r.ok})[:5], "duration_s": seconds,
               "request_throughput": len(ok) / seconds, "output_throughput": out_tokens / seconds,
               "total_token_throughput": (in_tokens + out_tokens) / seconds,
               "input_tokens": in_tokens, "output_tokens": out_tokens}
    for name, xs in series.items():
        ms = np.asarray(xs, dtype=float) * 1e3
        figures[name] = ({"mean": float(ms.mean()), **{f"p{q}": float(np.percentile(ms, q)) for q in (50, 90, 99)}}
                         if len(ms) else {})
    if slos:
        good = [r for r in ok if meets(r, slos)]
        figures["goodput"] = len(good) / seconds
        figures["slos_ms"] = slos
    return figures


def meets(r: Result, slos: dict[str, float]) -> bool:
    tpot = (r.e2e - r.ttft) / (r.output_tokens - 1) if r.output_tokens > 1 else 0.0
    have = {"ttft": r.ttft, "tpot": tpot, "e2e": r.e2e}
    return all(have[k] * 1e3 <= v for k, v in slos.items())


def parse_slos(items: list[str] | None) -> dict[str, float]:
    slos = {}
    for item in items or []:
        key, _, value = item.partition(":")
        key = "e2e" if key == "e2el" else key  # vllm's name
        if key not in ("ttft", "tpot", "e2e") or not value:
            raise ValueError(f"--goodput takes ttft:MS, tpot:MS or e2e:MS (e2el:MS), got {item!r}")
        slos[key] = float(value)
    return slos


# -- strata bench -------------------------------------------------------------------------------------------------
VLLM_METRICS = {"ttft": "TTFT", "tpot": "TPOT", "itl": "ITL", "e2el": "E2EL"}


def random_requests(num_prompts: int, input_len: int, output_len: int, vocab: int, seed: int) -> list[Request]:
    import numpy as np

    rng = np.random.default_rng(seed)
    return [Request(rng.integers(0, vocab, size=input_len).tolist(), output_len) for _ in range(num_prompts)]


def vllm_result(results: list[Result], seconds: float, slos: dict[str, float], metrics: list[str],
                percentiles: list[float]) -> dict:
    """The figures of one run under `vllm bench serve`'s JSON keys (times in ms, the per-request lists in s)."""
    import numpy as np

    ok = [r for r in results if r.ok]
    series = {"ttft": [r.ttft for r in ok], "tpot": [(r.e2e - r.ttft) / (r.output_tokens - 1) for r in ok
                                                     if r.output_tokens > 1],
              "itl": [x for r in ok for x in r.itls], "e2el": [r.e2e for r in ok]}
    out_tokens, in_tokens = sum(r.output_tokens for r in ok), sum(r.prompt_tokens for r in ok)
    result = {"duration": seconds, "completed": len(ok), "failed": len(results) - len(ok),
              "total_input_tokens": in_tokens, "total_output_tokens": out_tokens,
              "request_throughput": len(ok) / seconds,
              "request_goodput": sum(meets(r, slos) for r in ok) / seconds if slos else None,
              "output_throughput": out_tokens / seconds, "total_token_throughput": (in_tokens + out_tokens) / seconds}
    for metric in metrics:
        ms = np.asarray(series[metric], dtype=float) * 1e3 if series[metric] else np.zeros(1)
        result[f"mean_{metric}_ms"], result[f"median_{metric}_ms"] = float(ms.mean()), float(np.median(ms))
        result[f"std_{metric}_ms"] = float(ms.std())
        for p in percentiles:
            result[f"p{int(p) if int(p) == p else p}_{metric}_ms"] = float(np.percentile(ms, p))
    result.update(input_lens=[r.prompt_tokens for r in results], output_lens=[r.output_tokens for r in results],
                  ttfts=[r.ttft for r in results], itls=[r.itls for r in results], errors=[r.error for r in results])
    return result


def print_result(result: dict, metrics: list[str], percentiles: list[float]) -> None:
    """vllm's summary table."""
    def row(name: str, value) -> None:
        print(f"{name:<40} {value:<10.2f}" if isinstance(value, float) else f"{name:<40} {value:<10}")

    print("{s:{c}^{n}}".format(s=" Serving Benchmark Result ", n=50, c="="))
    row("Successful requests:", result["completed"])
    row("Failed requests:", result["failed"])
    row("Benchmark duration (s):", result["duration"])
    row("Total input tokens:", result["total_input_tokens"])
    row("Total generated tokens:", result["total_output_tokens"])
    row("Request throughput (req/s):", result["request_throughput"])
    if result["request_goodput"] is not None:
        row("Request goodput (req/s):", result["request_goodput"])
    row("Output token throughput (tok/s):", result["output_throughput"])
    row("Total token throughput (tok/s):", result["total_token_throughput"])
    titles = {"ttft": "Time to First Token", "tpot": "Time per Output Token (excl. 1st token)",
              "itl": "Inter-token Latency", "e2el": "End-to-end Latency"}
    for metric in metrics:
        print("{s:{c}^{n}}".format(s=titles[metric], n=50, c="-"))
        name = VLLM_METRICS[metric]
        row(f"Mean {name} (ms):", result[f"mean_{metric}_ms"])
        row(f"Median {name} (ms):", result[f"median_{metric}_ms"])
        for p in percentiles:
            word = int(p) if int(p) == p else p
            row(f"P{word} {name} (ms):", result[f"p{word}_{metric}_ms"])
    print("=" * 50)


def bench_command(args) -> int:
    slos = parse_slos(args.goodput)  # bad input raises ValueError: one line and exit status 2 (cli.main)
    metrics = [m.strip() for m in args.percentile_metrics.split(",") if m.strip()]
    if unknown := [m for m in metrics if m not in VLLM_METRICS]:
        raise ValueError(f"--percentile-metrics takes {', '.join(VLLM_METRICS)}; got {unknown[0]}")
    try:
        percentiles = [float(p) for p in args.metric_percentiles.split(",")]
    except ValueError:
        raise ValueError(f"--metric-percentiles takes numbers such as 50,99; got {args.metric_percentiles!r}") from None
    try:
        model = pick_model(openai_client(args.base_url, args.api_key), args.model)
    except ServerError as e:
        print(f"strata bench: {e}", file=sys.stderr)
        return 1
    base_url = args.base_url.rstrip("/").removesuffix("/v1")
    requests = random_requests(args.num_prompts, args.random_input_len, args.random_output_len, args.vocab_size,
                               args.seed)
    rate = args.request_rate
    print(f"{len(requests)} requests of {args.random_input_len} tokens in, {args.random_output_len} out, to {model} at "
          f"{base_url}; request rate {rate}, max concurrency {args.max_concurrency}", flush=True)

    async def run() -> tuple[list[Result], float]:
        async with OpenAIBackend(base_url, model, args.api_key) as backend:
            if args.num_warmups:
                await run_load(backend, requests[:args.num_warmups], max_concurrency=1)
            return await run_load(backend, requests, rate, args.max_concurrency, args.seed)

    results, seconds = asyncio.run(run())
    result = vllm_result(results, seconds, slos, metrics, percentiles)
    print_result(result, metrics, percentiles)
    if errors := sorted({r.error for r in results if not r.ok}):
        print(f"{len(errors)} kinds of error, e.g.: {errors[0]}", file=sys.stderr)
    if args.save_result:
        header = {"date": datetime.now().strftime("%Y%m%d-%H%M%S"), "endpoint_type": "openai", "label": args.label,
                  "model_id": model, "tokenizer_id": None, "num_prompts": args.num_prompts,
                  "request_rate": rate if rate != math.inf else "inf", "burstiness": 1.0,
                  "max_concurrency": args.max_concurrency}
        name = args.result_filename or (f"{args.label or 'strata'}-{rate}qps"
                                        f"{f'-concurrency{args.max_concurrency}' if args.max_concurrency else ''}-"
                                        f"{model.replace('/', '_')}-{header['date']}.json")
        path = Path(args.result_dir or ".") / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({**header, **result}, indent=2))
        print(f"wrote {path}")
    return 0 if result["failed"] == 0 else 1


def add_bench_parser(commands) -> None:
    bench_p = commands.add_parser("bench", help="Load an OpenAI-compatible server and report TTFT, TPOT, ITL and "
                                                "throughput, as `vllm bench serve` does.")
    bench_p.add_argument("--base-url", default="http://127.0.0.1:8000", help="The server (default: %(default)s).")
    bench_p.add_argument("--model", help="Served model name (default: the server's first).")
    bench_p.add_argument("--api-key", help="Bearer key for the server (default: $OPENAI_API_KEY).")
    bench_p.add_argument("--dataset-name", choices=["random"], default="random",
                         help="Prompts: random token ids of fixed lengths (the only dataset here).")
    bench_p.add_argument("--num-prompts", type=int, default=100, help="Requests to send (default: %(default)s).")
    bench_p.add_argument("--random-input-len", type=int, default=1024, help="Prompt tokens (default: %(default)s).")
    bench_p.add_argument("--random-output-len", type=int, default=128, help="Output tokens (default: %(default)s).")
    bench_p.add_argument("--vocab-size", type=int, default=500,
                         help="Token ids are drawn below this; inside any model's vocabulary by default "
                              "(default: %(default)s).")
    bench_p.add_argument("--request-rate", type=float, default=math.inf,
                         help="Requests per second, Poisson arrivals; inf sends them all at once (default: inf).")
    bench_p.add_argument("--max-concurrency", type=int, help="Most requests in flight (default: no limit).")
    bench_p.add_argument("--goodput", nargs="+", metavar="KEY:MS",
                         help="SLOs of a good request, e.g. ttft:500 tpot:50 e2el:10000 (ms).")
    bench_p.add_argument("--percentile-metrics", default="ttft,tpot,itl",
                         help="Which of ttft,tpot,itl,e2el to report (default: %(default)s).")
    bench_p.add_argument("--metric-percentiles", default="99", help="Percentiles to report (default: %(default)s).")
    bench_p.add_argument("--num-warmups", type=int, default=0, help="Requests sent first, not counted (default: 0).")
    bench_p.add_argument("--seed", type=int, default=0)
    bench_p.add_argument("--save-result", action="store_true", help="Write the result as JSON (vllm's keys).")
    bench_p.add_argument("--result-dir", help="Folder of the JSON file (default: here).")
    bench_p.add_argument("--result-filename", help="Name of the JSON file (default: from the label, rate and model).")
    bench_p.add_argument("--label", help="A name for this run, in the JSON and its file name.")
    bench_p.set_defaults(run=bench_command)
