"""How much an idle local Ray cluster slows an in-process engine on the same CPUs, and whether lowering the
priority of Ray's daemons (raylet, GCS, log monitor, agents) takes that back.

    python benchmarks/experiments/idle_cluster_ttft.py --rounds 2 --nice 15

Each round runs the same load (c=1) into one in-process AsyncEngine three times: with no cluster, beside an idle
cluster serving the same model (started by a child process), and beside one whose daemons run at niceness
--nice. Interleaved, so that the machine's drift shows up in every condition alike.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import psutil  # noqa: E402

from benchmarks.proc_cpu import RAY_PROCESSES, label  # noqa: E402
from benchmarks.report import write_result  # noqa: E402
from benchmarks.serving import InProcessBackend, make_dataset, model_vocab, sweep  # noqa: E402


def hold_cluster(model: str, threads: int) -> None:
    """Child process: serve `model` on a local cluster until stdin closes."""
    from benchmarks import local_serve
    from cluster.config import ClusterConfig, ModelConfig

    config = ClusterConfig(app_name="idle", models=[ModelConfig(name="idle", model=model, num_cpus_per_replica=threads,
                                                                cpu_threads=threads)])
    local_serve.start(config)
    print("ready", flush=True)
    sys.stdin.read()
    local_serve.stop()


def start_cluster(model: str, threads: int, nice: int | None) -> tuple[subprocess.Popen, list[str]]:
    proc = subprocess.Popen([sys.executable, __file__, "--hold", model, "--threads", str(threads)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    for line in proc.stdout:
        if line.strip() == "ready":
            break
    reniced = []
    if nice is not None:
        for p in psutil.Process(proc.pid).children(recursive=True):
            if label(p) in RAY_PROCESSES:
                p.nice(nice)
                reniced.append(label(p))
    time.sleep(5)  # past the deploy's own bustle
    return proc, reniced


def stop_cluster(proc: subprocess.Popen) -> None:
    proc.stdin.close()
    proc.wait(timeout=60)


async def measure(args, requests) -> list[dict]:
    from engine import AsyncEngine

    engine = AsyncEngine(model=args.model, enable_prefix_caching=False, cpu_threads=args.threads)
    runs = []
    try:
        for r in range(args.rounds):
            for condition, nice in (("no cluster", None), ("idle cluster", None),
                                    (f"idle cluster, daemons at nice {args.nice}", args.nice)):
                proc, reniced = None, []
                if condition != "no cluster":
                    proc, reniced = await asyncio.to_thread(start_cluster, args.model, args.threads, nice)
                try:
                    point = (await sweep(lambda: InProcessBackend(engine), requests, [float("inf")], [1], {}, 2,
                                         log=lambda s: None))[0]
                finally:
                    if proc:
                        await asyncio.to_thread(stop_cluster, proc)
                runs.append({"round": r, "condition": condition, "reniced": reniced,
                             "ttft_p50_ms": point["ttft_ms"]["p50"], "tpot_p50_ms": point["tpot_ms"]["p50"]})
                print(f"round {r}, {condition}: TTFT p50 {point['ttft_ms']['p50']:.1f} ms, "
                      f"TPOT p50 {point['tpot_ms']['p50']:.1f} ms", flush=True)
    finally:
        engine.shutdown()
    return runs


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--num-prompts", type=int, default=12)
    ap.add_argument("--input-len", type=int, default=256)
    ap.add_argument("--output-len", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--nice", type=int, default=15)
    ap.add_argument("--hold", metavar="MODEL", help=argparse.SUPPRESS)
    ap.add_argument("--out-dir", type=Path)
    args = ap.parse_args()
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    if args.hold:
        hold_cluster(args.hold, args.threads)
        return 0
    import torch

    torch.set_num_threads(args.threads)
    requests = make_dataset("random", args.num_prompts, args.input_len, args.output_len,
                            min(10000, model_vocab(args.model)))
    runs = asyncio.run(measure(args, requests))
    path = write_result("idle-cluster-ttft", {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
                        {"runs": runs}, args.out_dir)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
