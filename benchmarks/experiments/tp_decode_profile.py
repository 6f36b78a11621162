"""Where the GPU time of one batch-1 decode step goes, at TP=1 and TP=2: each rank captures the step (embedding,
layers, norm, LM head) as one CUDA graph, times its replays, and profiles a few with torch.profiler for every
kernel's time and the gaps between kernels. Variants show what a change could buy before it is built:
`one_shot` all-reduces with separate one-shot kernels instead of inside the gemvs (ReduceSites), `no_allreduce`
captures the same graph with the TP all-reduces left out (wrong numbers, right timing).

    python benchmarks/experiments/tp_decode_profile.py --model /tmp/llama3-8b-random --tp 1 2 --out-dir $OUT

No Ray: one process per rank (torch.multiprocessing), the engine's own process-group setup and ModelRunner.
Writes tp-decode-profile-<device>-<commit>.json.
"""
from __future__ import annotations

import argparse
import collections
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

BLOCK = 16


def _kernel_family(name: str) -> str:
    for key in ("gemv", "attention", "rotary", "one_shot_all_reduce", "nccl", "rms_norm", "embedding", "reshape"):
        if key in name.lower():
            return key
    return name[:60]


def _profile(graph, replays: int) -> dict:
    import torch
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(replays):
            graph.replay()
        torch.cuda.synchronize()
    kernels = sorted(((e.time_range.start, e.time_range.end, e.name) for e in prof.events()
                      if e.device_type == DeviceType.CUDA), key=lambda k: k[0])
    if not kernels:
        return {"kernels_seen": 0}
    by_family, count = collections.defaultdict(float), collections.Counter()
    busy = 0.0
    for start, end, name in kernels:
        fam = _kernel_family(name)
        by_family[fam] += (end - start) / replays
        count[fam] += 1
        busy += end - start
    span = kernels[-1][1] - kernels[0][0]
    return {"kernels_per_step": len(kernels) / replays, "busy_us_per_step": busy / replays,
            "span_us_per_step": span / replays,
            "families": {k: {"us_per_step": round(v, 1), "calls_per_step": count[k] / replays}
                         for k, v in sorted(by_family.items(), key=lambda kv: -kv[1])}}


def _rank(rank: int, world: int, port: int, args, queue) -> None:
    import torch

    from engine.model_runner import ModelRunner
    from engine.models.loader import load_hf_config
    from engine.parallel_state import TPGroup, init_distributed

    device = torch.device("cuda", rank)
    torch.cuda.set_device(device)
    tp = TPGroup()
    if world > 1:
        tp, _ = init_distributed(rank, world, world, "127.0.0.1", port, 120.0, device, "127.0.0.1")
    cfg = load_hf_config(Path(args.model))
    # As the engine's decode graphs are captured: for the longest context, which picks split-KV attention.
    max_len = getattr(cfg, "max_position_embeddings", 8192)
    runner = ModelRunner(Path(args.model), cfg, torch.bfloat16, device, max_model_len=max_len,
                         block_size=BLOCK, seed=0, tp=tp, max_num_seqs=1, enforce_eager=True)
    blocks = -(-(args.ctx + 1) // BLOCK)
    runner.allocate_kv_cache(blocks + 1)
    from engine.layers.attention import AttentionMetadata

    i32 = dict(dtype=torch.int32, device=device)
    ids = torch.tensor([7], device=device)
    positions = torch.tensor([args.ctx - 1], device=device)
    meta = AttentionMetadata(slot_mapping=positions.clone(), query_start_loc=torch.tensor([0, 1], **i32),
                             seq_lens=torch.tensor([args.ctx], **i32),
                             block_tables=torch.arange(blocks, **i32)[None], max_query_len=1,
                             max_seq_len=max_len, query_lens_cpu=[1], seq_lens_cpu=[args.ctx])
    model = runner.model

    def step():
        hidden, _ = model(ids, positions, meta)
        return model.logits(hidden).argmax(-1)

    results, sites = {}, tp.reduce_sites
    for variant in args.variants:
        if variant != "base" and world == 1:
            continue
        tp.reduce_sites = sites if variant == "base" else []  # one_shot: the all-reduce kernels of before
        if variant == "no_allreduce":
            tp.all_reduce = lambda x: x  # instance attribute shadows the method for this capture only
        with torch.inference_mode():
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                for _ in range(3):
                    step()  # Triton compiles outside the graph
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                step()
        if "all_reduce" in vars(tp):
            del tp.all_reduce
        for _ in range(20):
            graph.replay()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        start.record()
        for _ in range(args.replays):
            graph.replay()
        end.record()
        torch.cuda.synchronize()
        results[variant] = {"ms_per_step": start.elapsed_time(end) / args.replays, **_profile(graph, 10),
                            "fused_all_reduce": bool(tp.reduce_sites)}
        del graph
    if rank == 0:
        queue.put(results)
    if world > 1:
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


def main(argv=None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--tp", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--ctx", type=int, default=256, help="context of the decoding sequence (W1 averages 256)")
    ap.add_argument("--replays", type=int, default=500)
    ap.add_argument("--variants", nargs="+", default=["base", "one_shot", "no_allreduce"])
    ap.add_argument("--out-dir", type=Path, default=None)
    args = ap.parse_args(argv)

    import torch.multiprocessing as mp

    from benchmarks.report import device_name, git_commit, write_result
    from engine.parallel_state import open_store

    figures = {}
    for world in args.tp:
        store = open_store(world, 120.0) if world > 1 else None
        ctx = mp.get_context("spawn")
        queue = ctx.Queue()
        procs = [ctx.Process(target=_rank, args=(r, world, store.port if store else 0, args, queue))
                 for r in range(world)]
        for p in procs:
            p.start()
        figures[f"tp{world}"] = queue.get(timeout=600)
        for p in procs:
            p.join(timeout=120)
        print(f"TP={world}:", json.dumps(figures[f"tp{world}"], indent=1))
    settings = {"model": args.model, "ctx": args.ctx, "replays": args.replays, "variants": args.variants}
    name = f"tp-decode-profile-{device_name().split()[1].lower()}-{git_commit()}"
    path = write_result("tp_decode_profile", settings, figures, args.out_dir,
                        path=Path(args.out_dir or "benchmarks/results") / f"{name}.json")
    print("wrote", path)


if __name__ == "__main__":
    main()
