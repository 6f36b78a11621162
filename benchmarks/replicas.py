"""N independent engine replicas, one GPU each, sharing one workload (request i goes to replica i % N): the
data-parallel baseline that pipeline parallelism is measured against.

    python benchmarks/replicas.py --model /tmp/llama3-8b-random --replicas 2 --workload W3

Each replica is its own process with its own GPU (CUDA_VISIBLE_DEVICES); all build their engines, warm up,
then start together. Output throughput = all output tokens / (last finish - first start).
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.report import write_result  # noqa: E402
from benchmarks.throughput import load_workload, run_engine  # noqa: E402


def replica(rank: int, args, barrier, results) -> None:
    os.environ["CUDA_VISIBLE_DEVICES"] = str(args.first_gpu + rank)
    from engine import LLM, SamplingParams

    t0 = time.perf_counter()
    llm = LLM(model=args.model, max_num_seqs=args.max_num_seqs)
    start_s = time.perf_counter() - t0
    prompts, out_lens, _ = load_workload(args.workload, llm.engine.setup.hf_config.vocab_size, args.limit)
    prompts, out_lens = prompts[rank::args.replicas], out_lens[rank::args.replicas]
    llm.generate([prompts[0][:32]], SamplingParams(max_tokens=8, ignore_eos=True), use_tqdm=False)
    barrier.wait()
    began = time.time()
    res = run_engine(llm, prompts, out_lens)
    results.put(dict(res, rank=rank, began=began, ended=time.time(), engine_start_seconds=start_s,
                     num_prompts=len(prompts)))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--replicas", type=int, default=2)
    ap.add_argument("--first-gpu", type=int, default=0)
    ap.add_argument("--workload", default="W3")
    ap.add_argument("--limit", type=int)
    ap.add_argument("--max-num-seqs", type=int, default=256)
    ap.add_argument("--out-dir", type=Path)
    args = ap.parse_args()
    ctx = mp.get_context("spawn")
    barrier, results = ctx.Barrier(args.replicas), ctx.Queue()
    procs = [ctx.Process(target=replica, args=(r, args, barrier, results)) for r in range(args.replicas)]
    for p in procs:
        p.start()
    per_replica = [results.get(timeout=1800) for _ in procs]
    for p in procs:
        p.join()
    seconds = max(r["ended"] for r in per_replica) - min(r["began"] for r in per_replica)
    tokens = sum(r["output_tokens"] for r in per_replica)
    figures = {args.workload: {"seconds": seconds, "output_tokens": tokens, "output_tok_s": tokens / seconds,
                               "replicas": sorted(per_replica, key=lambda r: r["rank"])}}
    print(f"{args.replicas} replicas, {args.workload}: {tokens / seconds:.1f} output tok/s")
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    print(f"wrote {write_result('replicas', settings, figures, args.out_dir)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
