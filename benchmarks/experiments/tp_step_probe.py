"""Where a batch-1 decode step of a tensor-parallel engine spends its time: host profiles of the driver and of
every worker, sampled by py-spy (carried in .whl) while one long greedy decode runs.

    python benchmarks/experiments/tp_step_probe.py --model /tmp/llama3-8b-random --tp 2 --out-dir $OUT

Prints ms per token and, per process, the functions holding the most samples (own time, and on the stack);
writes the raw py-spy profiles next to a JSON summary in --out-dir.
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))


def top_frames(raw: Path, n: int = 25) -> dict:
    own, on_stack, total = collections.Counter(), collections.Counter(), 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack:
            continue
        count, frames = int(count), stack.split(";")
        total += count
        own[frames[-1]] += count
        for frame in set(frames):
            on_stack[frame] += count
    share = lambda c: {k: round(v / max(total, 1), 4) for k, v in c.most_common(n)}  # noqa: E731
    return {"samples": total, "own": share(own), "on_stack": share(on_stack)}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--tp", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=3000)
    ap.add_argument("--seconds", type=float, default=6.0, help="py-spy sampling window")
    ap.add_argument("--out-dir", type=Path, default=Path("benchmarks/results"))
    args = ap.parse_args(argv)

    from engine import LLM, SamplingParams

    llm = LLM(model=args.model, tensor_parallel_size=args.tp)
    prompt = [[(7 * i) % 10000 for i in range(128)]]
    llm.generate(prompt, SamplingParams(max_tokens=32, ignore_eos=True), use_tqdm=False)  # warm up
    executor = llm.engine.executor
    pids = {"driver": os.getpid()}
    for info in getattr(executor, "infos", []):
        pids[f"worker{len(pids) - 1}"] = info["pid"]
    spy = shutil.which("py-spy")
    args.out_dir.mkdir(parents=True, exist_ok=True)
    procs = {}
    if spy:
        for name, pid in pids.items():
            out = args.out_dir / f"tp{args.tp}-pyspy-{name}.txt"
            procs[name] = (out, subprocess.Popen(
                [spy, "record", "-p", str(pid), "-d", str(int(args.seconds)), "-r", "500", "-f", "raw",
                 "--nonblocking", "--threads", "-o", str(out)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE))
    start = time.perf_counter()
    llm.generate(prompt, SamplingParams(max_tokens=args.tokens, ignore_eos=True), use_tqdm=False)
    elapsed = time.perf_counter() - start
    result = {"tp": args.tp, "tokens": args.tokens, "ms_per_token": 1000 * elapsed / args.tokens, "profiles": {}}
    print(f"tp={args.tp}: {result['ms_per_token']:.3f} ms/token over {args.tokens} tokens", flush=True)
    for name, (out, proc) in procs.items():
        _, err = proc.communicate(timeout=60)
        if out.exists():
            result["profiles"][name] = top_frames(out)
            print(f"--- {name} ({result['profiles'][name]['samples']} samples), own time:")
            for frame, share in list(result["profiles"][name]["own"].items())[:15]:
                print(f"  {share:6.1%} {frame[:160]}")
        else:
            print(f"--- {name}: py-spy failed: {err.decode()[-300:]}")
    (args.out_dir / f"tp{args.tp}-step-probe.json").write_text(json.dumps(result, indent=1))
    llm.shutdown()


if __name__ == "__main__":
    main()
