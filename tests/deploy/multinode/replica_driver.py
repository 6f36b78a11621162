"""Runs on the head host of a `ray up` cluster: one engine replica whose pipeline stages are on different hosts.

    python -m tests.deploy.multinode.replica_driver '{"pp": 2, "tp": 1, "prompts": [...], "max_tokens": 8}'

A placement group with one bundle per rank, STRICT_SPREAD (every rank on its own host), and the replica's
process in bundle 0, as a Serve replica sits in its own placement group: the engine's Ray executor takes the
bundles. Speaks JSON lines on stdout:
  1. {"hosts": [ip of bundle 0, ip of bundle 1, ...]} once the group is placed; then waits for a line on stdin
     (the test may set up a firewall between those hosts first), and exits if stdin closes instead;
  2. {"result": {"tokens": [...], "ranks": [{rank, ip, pid, sockets: [[state, local, peer], ...]}, ...]}} on
     success, the sockets seen by `ss` on each rank's own host while the replica runs; or
     {"result": {"error": "..."}} when the replica failed to start.
"""
from __future__ import annotations

import json
import subprocess
import sys

import ray
from ray.util.placement_group import placement_group, placement_group_table
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy, PlacementGroupSchedulingStrategy


@ray.remote(num_cpus=0)
def sockets_of(pid: int) -> list[list[str]]:
    """TCP sockets of process `pid` on the host this task runs on."""
    out = subprocess.run(["ss", "-Htanp"], capture_output=True, text=True, check=True).stdout
    rows = [line.split() for line in out.splitlines() if f"pid={pid}," in line]
    return [[row[0], row[3], row[4]] for row in rows]


@ray.remote(num_cpus=0)
def replica(args: dict) -> dict:
    from engine import LLM, SamplingParams

    try:
        llm = LLM("demo", device="cpu", pipeline_parallel_size=args["pp"], tensor_parallel_size=args["tp"],
                  distributed_init_timeout_s=args.get("timeout_s", 60), num_kv_blocks=64, max_num_seqs=4,
                  enforce_eager=True)
    except Exception as e:  # noqa: BLE001 - reported to the test, which checks the message
        return {"error": f"{type(e).__name__}: {e}"}
    with llm:
        outs = llm.generate(args["prompts"], SamplingParams(temperature=0, max_tokens=args["max_tokens"]),
                            use_tqdm=False)
        ranks = llm.engine.executor.worker_nodes()
        for r in ranks:
            r["sockets"] = ray.get(sockets_of.options(scheduling_strategy=NodeAffinitySchedulingStrategy(
                r["node_id"], soft=False)).remote(r["pid"]))
        return {"tokens": [o.outputs[0].token_ids for o in outs], "ranks": ranks}


def main() -> None:
    args = json.loads(sys.argv[1])
    ray.init(address="auto", logging_level="ERROR", log_to_driver=False)
    world = args["pp"] * args["tp"]
    pg = placement_group([{"CPU": 1}] * world, strategy="STRICT_SPREAD")
    ray.get(pg.ready(), timeout=60)
    ips = {n["NodeID"]: n["NodeManagerAddress"] for n in ray.nodes()}
    bundles = placement_group_table(pg)["bundles_to_node_id"]
    print(json.dumps({"hosts": [ips[bundles[i]] for i in range(world)]}), flush=True)
    if not sys.stdin.readline():  # the test went away
        return
    strategy = PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=0,
                                                placement_group_capture_child_tasks=True)
    print(json.dumps({"result": ray.get(replica.options(scheduling_strategy=strategy).remote(args))}), flush=True)


if __name__ == "__main__":
    main()
