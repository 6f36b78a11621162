"""All-reduce latency on the GPUs of one host, at the sizes a tensor-parallel decode step reduces
([tokens, hidden] bf16, twice per layer): NCCL against PyTorch's symmetric-memory one-shot all-reduce
(peer-to-peer loads over NVLink; not multicast, which the device machines keep off), eagerly and inside a
CUDA graph of 64 calls (how decode steps run).

    python benchmarks/experiments/allreduce.py --gpus 2 --out-dir $OUT

Writes allreduce-<device>-*.json.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

HIDDEN = 4096
ROWS = [1, 8, 64, 256]
CALLS_PER_GRAPH = 64


def _time_us(fn, iters: int) -> float:
    import torch

    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    torch.cuda.synchronize()
    return 1e6 * (time.perf_counter() - start) / iters


def _graph_us(body, calls: int = CALLS_PER_GRAPH, replays: int = 50) -> float:
    import torch

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        body()  # warm-up outside the graph, as capture requires
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            body()
    return _time_us(graph.replay, replays) / calls


def worker(rank: int, world: int, port: int, queue) -> None:
    import torch
    import torch.distributed as dist

    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            device_id=torch.device("cuda", rank))
    results = []
    symm = None
    try:
        import torch.distributed._symmetric_memory as symm_mem

        symm = symm_mem.empty(max(ROWS) * HIDDEN, dtype=torch.bfloat16, device=f"cuda:{rank}")
        symm_mem.rendezvous(symm, dist.group.WORLD.group_name)
        one_shot = torch.ops.symm_mem.one_shot_all_reduce_out
    except Exception as e:  # noqa: BLE001 - report and go on with NCCL alone
        symm_error = f"{type(e).__name__}: {e}"
        symm = None
    for rows in ROWS:
        x = torch.randn(rows, HIDDEN, dtype=torch.bfloat16, device=f"cuda:{rank}")
        row = {"rows": rows, "bytes": x.numel() * 2}
        row["nccl_eager_us"] = _time_us(lambda: dist.all_reduce(x), 500)
        row["nccl_graph_us"] = _graph_us(lambda: dist.all_reduce(x))
        if symm is not None:
            buf = symm[:rows * HIDDEN].view(rows, HIDDEN)
            out = torch.empty_like(x)
            group = dist.group.WORLD.group_name

            def call():
                buf.copy_(x)
                one_shot(buf, "sum", group, out)

            try:
                call()
                expected = x.clone()
                dist.all_reduce(expected)
                torch.cuda.synchronize()
                row["symm_one_shot_correct"] = bool(torch.allclose(out.float(), expected.float(), atol=0.1))
                row["symm_one_shot_eager_us"] = _time_us(call, 500)
                row["symm_one_shot_graph_us"] = _graph_us(call)
            except Exception as e:  # noqa: BLE001
                row["symm_one_shot_error"] = f"{type(e).__name__}: {e}"[:300]
        else:
            row["symm_one_shot_error"] = symm_error[:300]
        results.append(row)
    if rank == 0:
        queue.put({"device": torch.cuda.get_device_name(0), "gpus": world, "hidden": HIDDEN, "results": results})
    dist.barrier()
    dist.destroy_process_group()


def main(argv=None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--gpus", type=int, default=2)
    ap.add_argument("--out-dir", type=Path, default=Path("benchmarks/results"))
    args = ap.parse_args(argv)
    import torch.multiprocessing as mp

    from benchmarks.report import write_result

    os.environ.setdefault("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = 29500 + os.getpid() % 1000
    procs = [ctx.Process(target=worker, args=(r, args.gpus, port, queue)) for r in range(args.gpus)]
    for p in procs:
        p.start()
    result = queue.get(timeout=300)
    for p in procs:
        p.join(timeout=60)
    for r in result["results"]:
        print(json.dumps(r))
    result.pop("device")  # write_result records the device itself
    print("wrote", write_result("allreduce", {"gpus": args.gpus, "hidden": HIDDEN, "calls_per_graph": CALLS_PER_GRAPH},
                                result, args.out_dir))


if __name__ == "__main__":
    main()
