"""Soak: mixed load against a two-replica cluster for a long while; nothing may fail but the intended 429s.

    python benchmarks/soak.py                         # 15 minutes, the demo model, two CPU replicas
    python benchmarks/soak.py --duration 120 --warmup 30

It starts a local Ray and Serve (or joins `--address`), deploys the model, and runs `--clients` clients that send
one request after another: completions and chats, whole and streamed, prompts of 4 to ~300 tokens, 1 to 256
output tokens; a tenth of the streams are abandoned after a few tokens (a client that goes away). Every
`--burst-every` seconds a burst of `--burst-size` extra requests overflows the queues: those are the intended 429s.

At the end it checks, and writes with the figures under benchmarks/results/soak-*.json:
- no request failed except 429s (each with Retry-After) while a burst was in flight;
- resident memory of every Serve process (proxy, ingress, engine replicas, controller) is flat after warm-up:
  it grows at most `--rss-tolerance-mib`, and (over 5 minutes or more) at most `--rss-slope-tolerance` MiB/min;
- every KV block is free once the load stops (engine stats asked of the replicas);
- the metrics agree with the client: requests by status (abandoned streams are the ingress's 499s), prompt tokens,
  and generation tokens (at least what the client received; abandoned streams may have made a few more).
Exit status 1 when a check fails.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import local_serve  # noqa: E402
from benchmarks.report import write_result  # noqa: E402

APP = "soak"
WORDS = ("the quick brown fox jumps over a lazy dog while serving engines batch many requests and keep a paged "
         "cache of keys and values in blocks so that the accelerator stays busy").split()


@dataclass
class Record:
    kind: str  # "steady" | "burst"
    stream: bool
    chat: bool
    status: int | None = None
    prompt_tokens: int = 0  # the client's own count (the server's usage when it sent one)
    completion_tokens: int = 0  # tokens the client received
    abandoned: bool = False
    error: str | None = None
    retry_after: str | None = None
    start: float = 0.0  # time.monotonic() when sent
    seconds: float = 0.0


# -- cluster ------------------------------------------------------------------------------------------------------
def start_cluster(args) -> str:
    from cluster.config import ClusterConfig, ModelConfig

    config = ClusterConfig(app_name=APP, models=[ModelConfig(
        model=args.model, name="soak", min_replicas=args.replicas, max_replicas=args.replicas,
        max_num_seqs=args.max_ongoing, max_ongoing_requests=args.max_ongoing, max_queue_size=args.max_queue,
        num_kv_blocks=args.kv_blocks, max_model_len=args.max_model_len)])
    return local_serve.start(config, num_cpus=args.num_cpus, address=args.address, port=args.port)


def serve_processes() -> dict[int, str]:
    """pid -> name of the Serve processes of our Ray on this machine (all local Serve processes when we joined
    a cluster someone else started)."""
    import re

    import psutil
    import ray

    node = ray._private.worker._global_node
    raylets = {info.process.pid for info in getattr(node, "all_processes", {}).get("raylet", [])}
    out = {}
    for p in psutil.process_iter(["cmdline", "ppid"]):
        try:
            cmd = " ".join(p.info["cmdline"] or [])
            name = re.search(r"(ServeReplica:[\w-]+:[\w-]+|ProxyActor|ServeController)", cmd)
            if name and (not raylets or p.info["ppid"] in raylets):
                out[p.pid] = name.group(1)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return out


def rss_mib(pids: dict[int, str]) -> dict[str, float]:
    import psutil

    out = {}
    for pid, name in pids.items():
        try:
            out[f"{name}#{pid}"] = psutil.Process(pid).memory_info().rss / 2 ** 20
        except psutil.NoSuchProcess:
            out[f"{name}#{pid}"] = float("nan")
    return out


def engine_stats() -> list[dict]:
    return local_serve.engine_stats(APP, "soak")


def scrape(base_url: str) -> dict[str, dict[tuple, float]]:
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    out: dict[str, dict[tuple, float]] = {}
    for family in text_string_to_metric_families(httpx.get(f"{base_url}/metrics", timeout=60).text):
        for sample in family.samples:
            out.setdefault(sample.name, {})[tuple(sorted(sample.labels.items()))] = sample.value
    return out


# -- load ---------------------------------------------------------------------------------------------------------
class Load:
    def __init__(self, base_url: str, args, tokenizer):
        self.base_url, self.args, self.tokenizer = base_url, args, tokenizer
        self.records: list[Record] = []
        self.bursts_at: list[tuple[float, float]] = []  # (start, end) of each burst, time.monotonic()
        self.rng = random.Random(args.seed)

    def during_burst(self, r: Record) -> bool:
        return any(r.start <= end and start <= r.start + r.seconds for start, end in self.bursts_at)

    def request(self, kind: str) -> tuple[Record, str, dict]:
        rng = self.rng
        words = rng.choice([4, 16, 64, 200])
        text = " ".join(rng.choice(WORDS) for _ in range(rng.randint(max(1, words // 2), words)))
        chat = rng.random() < 0.3
        stream = rng.random() < 0.5
        max_tokens = rng.choice([1, 8, 32, 96, 256]) if kind == "steady" else 32
        body = {"model": "soak", "max_tokens": max_tokens, "stream": stream, "temperature": rng.choice([0, 0.8]),
                "ignore_eos": True}
        if stream:
            body["stream_options"] = {"include_usage": True}
        if chat:
            messages = [{"role": "user", "content": text}]
            body["messages"] = messages
            from engine.tokenizer import apply_chat_template
            prompt_tokens = len(apply_chat_template(self.tokenizer, messages))
        else:
            body["prompt"] = text
            prompt_tokens = len(self.tokenizer.encode(text))
        record = Record(kind, stream, chat, prompt_tokens=prompt_tokens)
        # A tenth of the long streams are abandoned after a few tokens.
        record.abandoned = stream and max_tokens >= 32 and rng.random() < 0.1
        return record, "/v1/chat/completions" if chat else "/v1/completions", body

    async def send(self, client, kind: str) -> None:
        record, path, body = self.request(kind)
        t0 = record.start = time.monotonic()
        try:
            async with client.stream("POST", self.base_url + path, json=body) as r:
                record.status, record.retry_after = r.status_code, r.headers.get("retry-after")
                if r.status_code != 200:
                    await r.aread()
                    record.error = r.text[:300] if r.status_code != 429 else None
                elif not body["stream"]:
                    await r.aread()
                    data = r.json()
                    record.completion_tokens = data["usage"]["completion_tokens"]
                    record.prompt_tokens = data["usage"]["prompt_tokens"]
                else:
                    await self._read_stream(r, record)
        except Exception as e:  # noqa: BLE001 - a transport error is a failure to report
            record.error = f"{type(e).__name__}: {e}"
        record.seconds = time.monotonic() - t0
        self.records.append(record)

    async def _read_stream(self, r, record: Record) -> None:
        chunks, done = 0, False
        async for line in r.aiter_lines():
            if not line.startswith("data: "):
                continue
            payload = line.removeprefix("data: ")
            if payload == "[DONE]":
                done = True
                break
            event = json.loads(payload)
            if "error" in event:
                record.error = json.dumps(event["error"])[:300]
            elif event.get("usage"):
                record.completion_tokens = event["usage"]["completion_tokens"]
                record.prompt_tokens = event["usage"]["prompt_tokens"]
            elif event.get("choices"):
                chunks += 1
                if record.abandoned and chunks >= 3:
                    return  # leaving the `async with` closes the connection mid-stream
        if not done and record.error is None:
            record.error = "the stream ended without [DONE]"

    async def client(self, deadline: float) -> None:
        import httpx

        async with httpx.AsyncClient(timeout=self.args.request_timeout) as client:
            while time.monotonic() < deadline:
                await self.send(client, "steady")

    async def bursts(self, deadline: float) -> None:
        import httpx

        limits = httpx.Limits(max_connections=self.args.burst_size)
        async with httpx.AsyncClient(timeout=self.args.request_timeout, limits=limits) as client:
            while time.monotonic() + self.args.burst_every < deadline:
                await asyncio.sleep(self.args.burst_every)
                start = time.monotonic()
                await asyncio.gather(*(self.send(client, "burst") for _ in range(self.args.burst_size)))
                self.bursts_at.append((start, time.monotonic()))

    async def run(self, seconds: float, on_sample) -> None:
        deadline = time.monotonic() + seconds
        tasks = [asyncio.create_task(self.client(deadline)) for _ in range(self.args.clients)]
        tasks.append(asyncio.create_task(self.bursts(deadline)))
        start = time.monotonic()
        while time.monotonic() < deadline:
            await asyncio.sleep(min(self.args.sample_every, max(0.0, deadline - time.monotonic())))
            await asyncio.to_thread(on_sample, time.monotonic() - start)
        await asyncio.gather(*tasks)


# -- checks -------------------------------------------------------------------------------------------------------
def memory_trend(samples: list[tuple[float, dict[str, float]]], warmup: float) -> dict[str, dict]:
    """Per process: RSS at the end of warm-up and at the end, growth, and the least-squares slope after warm-up."""
    after = [(t, s) for t, s in samples if t >= warmup] or samples[-1:]
    out = {}
    for name in after[0][1]:
        points = [(t, s[name]) for t, s in after if name in s and s[name] == s[name]]
        if len(points) < 2:
            continue
        ts, ys = zip(*points)
        mt, my = sum(ts) / len(ts), sum(ys) / len(ys)
        var = sum((t - mt) ** 2 for t in ts) or 1.0
        slope = sum((t - mt) * (y - my) for t, y in points) / var * 60
        out[name] = {"start_mib": round(ys[0], 1), "end_mib": round(ys[-1], 1), "growth_mib": round(ys[-1] - ys[0], 1),
                     "slope_mib_per_min": round(slope, 2)}
    return out


def check(load: Load, memory: dict, stats: list[dict], metrics: dict, args) -> dict[str, str | None]:
    """Each check: None when it holds, else what went wrong."""
    records = load.records
    by_status = Counter(r.status for r in records)
    failures = [r for r in records if r.error is not None or r.status not in (200, 429)]
    failures = [r for r in failures if not (r.abandoned and r.status == 200 and r.error is None)]
    unintended_429 = [r for r in records if r.status == 429 and not load.during_burst(r)]
    bad_retry_after = [r for r in records if r.status == 429 and not (r.retry_after or "").isdigit()]
    requests = {dict(k).get("status"): v for k, v in metrics.get("strata_requests_total", {}).items()
                if dict(k).get("model") == "soak"}
    completed = sum(1 for r in records if r.status == 200 and not r.abandoned)
    abandoned = sum(1 for r in records if r.status == 200 and r.abandoned)
    engine_prompt = sum(s["prompt_tokens"] for s in stats)
    engine_gen = sum(s["generation_tokens"] for s in stats)
    client_prompt = sum(r.prompt_tokens for r in records if r.status == 200)
    client_gen = sum(r.completion_tokens for r in records if r.status == 200 and not r.abandoned)
    # The slope says something only over a long enough window: Python's allocators settle for minutes.
    judge_slope = args.duration - args.warmup >= 300
    grown = {k: v for k, v in memory.items() if v["growth_mib"] > args.rss_tolerance_mib
             or (judge_slope and v["slope_mib_per_min"] > args.rss_slope_tolerance)}
    return {
        "no_unintended_errors": f"{len(failures)} failed, e.g. {failures[:3]}" if failures else None,
        "429s_only_in_bursts": f"{len(unintended_429)} requests got 429 outside the bursts" if unintended_429 else None,
        "429s_carry_retry_after": f"{len(bad_retry_after)} without Retry-After" if bad_retry_after else None,
        "rss_flat_after_warmup": f"grew: {grown}" if grown else None,
        "kv_blocks_all_free": None if stats and all(s["kv_blocks_used"] == 0 and s["running"] == 0
                                                    and s["waiting"] == 0 for s in stats)
        else f"engine stats at the end: {[(s['kv_blocks_used'], s['running'], s['waiting']) for s in stats]}",
        "metrics_requests_match": None if (requests.get("200", 0) == completed and requests.get("429", 0)
                                           == by_status[429] and requests.get("499", 0) == abandoned)
        else f"metrics {requests} vs client 200={completed} 429={by_status[429]} abandoned={abandoned}",
        "metrics_prompt_tokens_match": None if engine_prompt == client_prompt
        else f"engines counted {engine_prompt} prompt tokens, the client sent {client_prompt}",
        "metrics_generation_tokens_consistent": None if client_gen <= engine_gen <= client_gen + 256 * abandoned
        else f"engines generated {engine_gen} tokens, the client received {client_gen} (+{abandoned} abandoned)",
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--duration", type=float, default=900.0, help="seconds of load (default: 15 minutes)")
    ap.add_argument("--warmup", type=float, default=120.0, help="seconds before the memory baseline")
    ap.add_argument("--model", default="demo")
    ap.add_argument("--replicas", type=int, default=2)
    ap.add_argument("--clients", type=int, default=8, help="steady clients, one request at a time each")
    ap.add_argument("--max-ongoing", type=int, default=8, help="requests one replica runs at once")
    ap.add_argument("--max-queue", type=int, default=8, help="requests waiting for a replica before 429")
    ap.add_argument("--burst-every", type=float, default=60.0)
    ap.add_argument("--burst-size", type=int, default=48)
    ap.add_argument("--kv-blocks", type=int, default=512)
    ap.add_argument("--max-model-len", type=int, default=1024)
    ap.add_argument("--sample-every", type=float, default=10.0)
    ap.add_argument("--request-timeout", type=float, default=300.0)
    ap.add_argument("--rss-tolerance-mib", type=float, default=64.0, help="growth allowed per process after warm-up")
    ap.add_argument("--rss-slope-tolerance", type=float, default=2.0,
                    help="MiB per minute allowed after warm-up (checked when that lasts 5 minutes or more)")
    ap.add_argument("--num-cpus", type=int, default=8, help="logical CPUs of the local Ray")
    ap.add_argument("--address", default=None, help="join this Ray cluster instead of starting one")
    ap.add_argument("--port", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out-dir", type=Path, default=None)
    args = ap.parse_args(argv)

    from engine.model_source import resolve_model
    from engine.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(resolve_model(args.model))
    t_start = time.monotonic()
    base_url = start_cluster(args)
    print(f"cluster up in {time.monotonic() - t_start:.0f} s at {base_url}; {args.duration:g} s of load", flush=True)
    pids = serve_processes()
    samples: list[tuple[float, dict[str, float]]] = []
    load = Load(base_url, args, tokenizer)

    def sample(t: float) -> None:
        samples.append((t, rss_mib(pids)))
        done = Counter(r.status for r in load.records)
        print(f"[{t:6.0f} s] {len(load.records)} requests {dict(done)}; RSS MiB "
              f"{ {k.split('#')[0].split(':')[-1]: round(v) for k, v in samples[-1][1].items()} }", flush=True)

    try:
        sample(0.0)
        asyncio.run(load.run(args.duration, sample))
        stats = []
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:  # abandoned streams are aborted asynchronously
            stats = engine_stats()
            if stats and all(s["kv_blocks_used"] == 0 and s["running"] == 0 and s["waiting"] == 0 for s in stats):
                break
            time.sleep(1)
        time.sleep(2)
        metrics = scrape(base_url)
        stats = engine_stats()
    finally:
        local_serve.stop()

    memory = memory_trend(samples, args.warmup)
    checks = check(load, memory, stats, metrics, args)
    by_status = Counter(str(r.status) for r in load.records)
    lat = sorted(r.seconds for r in load.records if r.status == 200 and not r.abandoned)
    figures = {
        "requests": len(load.records), "by_status": dict(by_status),
        "abandoned_streams": sum(1 for r in load.records if r.abandoned and r.status == 200),
        "failed": sum(1 for r in load.records if r.error is not None),
        "completion_tokens_received": sum(r.completion_tokens for r in load.records),
        "latency_s": {"p50": lat[len(lat) // 2], "p99": lat[int(len(lat) * 0.99)]} if lat else None,
        "p99_429_s": sorted(r.seconds for r in load.records if r.status == 429)[
            int(by_status["429"] * 0.99)] if by_status["429"] else None,
        "engine": [{k: s[k] for k in ("replica", "prompt_tokens", "generation_tokens", "preemptions", "steps",
                                      "kv_blocks_used", "kv_blocks_total")} for s in stats],
        "memory": memory, "checks": checks, "passed": all(v is None for v in checks.values()),
    }
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    path = write_result("soak", settings, figures, out_dir=args.out_dir)
    print(json.dumps({"checks": checks, "by_status": figures["by_status"], "memory": memory}, indent=2))
    print(f"{'PASSED' if figures['passed'] else 'FAILED'}; wrote {path}")
    return 0 if figures["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
