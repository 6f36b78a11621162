"""Is the engine's CPU compute slower inside a Ray actor than in a plain process? (Serve overhead diagnosis.)

The same offline engine (`LLM`, same model, same thread count) lives in three homes: this process, a Ray actor
and a spawned subprocess. Each in turn runs the same timed request, one home at a time, round robin, so the
machine's drift cancels out of the per-round differences: prefill (max_tokens=1) and a fixed-length decode.

    python benchmarks/experiments/process_compute.py --model /tmp/smollm2-135m-random --threads 2 --rounds 12
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))


class Home:
    """One engine and the timed request."""

    def __init__(self, model: str, threads: int, input_len: int, output_len: int):
        os.environ["OMP_NUM_THREADS"] = str(threads)
        import numpy as np
        import torch

        from benchmarks.serving import model_vocab
        from engine import LLM, SamplingParams

        torch.set_num_threads(threads)
        self.llm = LLM(model, device="cpu", cpu_threads=threads, enable_prefix_caching=False)
        self.prompt = np.random.default_rng(0).integers(0, min(1000, model_vocab(model)), size=input_len).tolist()
        self.first = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
        self.full = SamplingParams(max_tokens=output_len, temperature=0.0, ignore_eos=True)
        self.output_len = output_len

    def run(self) -> dict:
        t0 = time.perf_counter()
        self.llm.generate([self.prompt], self.first, use_tqdm=False)
        t1 = time.perf_counter()
        self.llm.generate([self.prompt], self.full, use_tqdm=False)
        t2 = time.perf_counter()
        return {"prefill_ms": 1e3 * (t1 - t0), "decode_ms_per_token": 1e3 * ((t2 - t1) - (t1 - t0)) /
                (self.output_len - 1), "pid": os.getpid()}


def _subprocess_home(conn, *args) -> None:
    home = Home(*args)
    conn.send("ready")
    while conn.recv() == "run":
        conn.send(home.run())


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="demo")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--input-len", type=int, default=256)
    ap.add_argument("--output-len", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=12)
    ap.add_argument("--out-dir", type=Path)
    args = ap.parse_args()
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    import ray

    from benchmarks.report import write_result

    home_args = (args.model, args.threads, args.input_len, args.output_len)
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    actor = ray.remote(num_cpus=args.threads)(Home).remote(*home_args)
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_subprocess_home, args=(child, *home_args), daemon=True)
    proc.start()
    here = Home(*home_args)
    assert parent.recv() == "ready"

    def subprocess_run() -> dict:
        parent.send("run")
        return parent.recv()

    homes = {"this process": here.run, "ray actor": lambda: ray.get(actor.run.remote()),
             "subprocess": subprocess_run}
    for run in homes.values():
        run()  # warm-up
    rows = {name: [] for name in homes}
    for i in range(args.rounds):
        order = list(homes) if i % 2 == 0 else list(reversed(homes))
        for name in order:
            rows[name].append(homes[name]())
        print(f"round {i}: " + ", ".join(f"{n} {rows[n][-1]['prefill_ms']:.1f} / "
                                         f"{rows[n][-1]['decode_ms_per_token']:.2f} ms" for n in homes), flush=True)
    parent.send("stop")
    figures = {}
    for name, samples in rows.items():
        figures[name] = {key: statistics.median(s[key] for s in samples)
                         for key in ("prefill_ms", "decode_ms_per_token")}
        for key in ("prefill_ms", "decode_ms_per_token"):
            diffs = [s[key] - b[key] for s, b in zip(samples, rows["this process"])]
            figures[name][f"{key}_vs_this_process_median"] = statistics.median(diffs)
        print(name, {k: round(v, 2) for k, v in figures[name].items()})
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    print("wrote", write_result("process-compute", settings, {**figures, "rounds": rows}, args.out_dir))
    ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
