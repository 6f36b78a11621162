"""The floor under any cross-GPU all-reduce of a decode step: how long one GPU takes to see a flag another GPU
stores into its memory (symmetric memory over NVLink, system-scope release/acquire, as engine/kernels/
reduce_site.py signals). One program on each of two GPUs bounces a counter N times; one-way latency is the time
over 2N.

    python benchmarks/experiments/nvlink_pingpong.py --round-trips 20000 --out-dir $OUT

No Ray: one process per GPU (torch.multiprocessing), NCCL only for the symmetric-memory rendezvous.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))


def _kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def pingpong(own_ptr, peer_addr_ptr, rank, n):
        """own_ptr: int32 [2] here; peer_addr_ptr: the address of the other GPU's [2]. Rank 0 writes slot 0 there
        and waits on its own slot 1; rank 1 answers."""
        peer = tl.load(peer_addr_ptr).to(tl.pointer_type(tl.int32))
        for i in range(1, n + 1):
            if rank == 0:
                tl.atomic_xchg(peer, i, sem="release", scope="sys")
                seen = tl.atomic_add(own_ptr + 1, 0, sem="acquire", scope="sys")
                while seen < i:
                    seen = tl.atomic_add(own_ptr + 1, 0, sem="acquire", scope="sys")
            else:
                seen = tl.atomic_add(own_ptr, 0, sem="acquire", scope="sys")
                while seen < i:
                    seen = tl.atomic_add(own_ptr, 0, sem="acquire", scope="sys")
                tl.atomic_xchg(peer + 1, i, sem="release", scope="sys")

    return pingpong


def _rank(rank: int, port: int, args, queue) -> None:
    import torch
    import torch.distributed as dist
    import torch.distributed._symmetric_memory as symm_mem

    device = torch.device("cuda", rank)
    torch.cuda.set_device(device)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("nccl", rank=rank, world_size=2, device_id=device)
    flags = symm_mem.empty(2, dtype=torch.int32, device=device)
    handle = symm_mem.rendezvous(flags, dist.group.WORLD.group_name)
    peer_addr = torch.tensor([handle.buffer_ptrs[1 - rank] + flags.data_ptr() - handle.buffer_ptrs[rank]],
                             dtype=torch.int64, device=device)
    pingpong = _kernel()
    one_way_us = []
    for rep in range(args.repeats + 1):  # the first compiles and warms up
        flags.zero_()
        torch.cuda.synchronize()
        dist.barrier()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        pingpong[(1,)](flags, peer_addr, rank, args.round_trips, num_warps=1)
        end.record()
        torch.cuda.synchronize()
        if rep:
            one_way_us.append(1e3 * start.elapsed_time(end) / (2 * args.round_trips))
    dist.barrier()
    if rank == 0:
        queue.put(one_way_us)
    dist.destroy_process_group()


def main(argv=None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--round-trips", type=int, default=20000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out-dir", type=Path, default=None)
    args = ap.parse_args(argv)
    import socket
    import statistics

    import torch.multiprocessing as mp

    from benchmarks.report import write_result

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_rank, args=(r, port, args, queue)) for r in range(2)]
    for p in procs:
        p.start()
    one_way = queue.get(timeout=300)
    for p in procs:
        p.join(timeout=60)
    figures = {"one_way_us": one_way, "one_way_us_median": statistics.median(one_way),
               "round_trip_us_median": 2 * statistics.median(one_way)}
    print(f"NVLink flag, one way: {figures['one_way_us_median']:.2f} us (runs: {[round(x, 3) for x in one_way]})")
    print("wrote", write_result("nvlink_pingpong", vars(args) | {"out_dir": str(args.out_dir)}, figures, args.out_dir))


if __name__ == "__main__":
    main()
