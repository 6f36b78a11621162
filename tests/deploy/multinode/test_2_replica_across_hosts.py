"""One engine replica with its pipeline stages on different hosts of the `ray up` cluster (replica_driver.py
runs it on the head): greedy tokens equal one process's, the process group's connections run between the hosts'
own addresses, and a firewall between the stages makes the start fail within distributed_init_timeout_s, naming
the rank, its host and the address it could not reach."""
from __future__ import annotations

import json
import os
import select
import subprocess
import sys
import time

import pytest

from tests.support.paths import ROOT

pytestmark = pytest.mark.slow

PROMPTS = ["The hosts of a cluster", "Pipeline stages talk over"]
MAX_TOKENS = 8
INIT_TIMEOUT_S = 8


def run_replica(cluster, pp: int, tp: int = 1, before_start=None, timeout_s: float = 60) -> tuple[list, dict]:
    """(the hosts of bundle 0, 1, ..., the driver's result); `before_start(hosts)` runs once the placement group
    is placed and before the replica starts."""
    args = {"pp": pp, "tp": tp, "prompts": PROMPTS, "max_tokens": MAX_TOKENS, "timeout_s": timeout_s}
    log_path = cluster.hosts.dir / "replica_driver.log"
    log = log_path.open("a")
    driver = subprocess.Popen(cluster.head.command([sys.executable, "-m", "tests.deploy.multinode.replica_driver",
                                                    json.dumps(args)]),
                              cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},  # nsenter leaves the cwd
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, text=True)
    try:
        try:
            hosts = _message(driver, "hosts", timeout=90)
            if before_start:
                before_start(hosts)
            driver.stdin.write("start\n")
            driver.stdin.flush()
            return hosts, _message(driver, "result", timeout=timeout_s + 120)
        except AssertionError as e:
            log.flush()
            raise AssertionError(f"{e}; its log ends:\n{log_path.read_text()[-3000:]}") from None
    finally:
        driver.stdin.close()  # the driver exits when its stdin closes
        try:
            driver.wait(timeout=30)
        except subprocess.TimeoutExpired:
            driver.kill()
            driver.wait()
        log.close()


def _message(driver: subprocess.Popen, key: str, timeout: float):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not select.select([driver.stdout], [], [], max(0.0, deadline - time.monotonic()))[0]:
            break
        line = driver.stdout.readline()
        if not line:
            raise AssertionError(f"the replica driver exited ({driver.wait()}) before sending {key!r}")
        message = json.loads(line)
        if key in message:
            return message[key]
    raise AssertionError(f"no {key!r} from the replica driver within {timeout:g} s")


@pytest.fixture(scope="module")
def one_process_tokens():
    from engine import LLM, SamplingParams

    with LLM("demo", device="cpu", num_kv_blocks=64, max_num_seqs=4, enforce_eager=True) as llm:
        outs = llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=MAX_TOKENS), use_tqdm=False)
        return [o.outputs[0].token_ids for o in outs]


def test_pp2_across_hosts_decodes_the_tokens_of_one_process_over_the_hosts_own_addresses(cluster, hosts,
                                                                                          one_process_tokens):
    placed, result = run_replica(cluster, pp=2)
    assert "error" not in result, result["error"]
    assert result["tokens"] == one_process_tokens
    ranks = result["ranks"]
    assert [r["ip"] for r in ranks] == placed and len(set(placed)) == 2  # one stage per host
    assert set(placed) <= {h.ip for h in hosts}
    # The connections between the two ranks' processes (the rendezvous store and gloo's pairs): matched by
    # their endpoints, each side's local address is its own host's, never loopback or another interface.
    first, second = ranks
    links = [(local, peer) for state, local, peer in first["sockets"] if state == "ESTAB"
             and [s for s in second["sockets"] if s[0] == "ESTAB" and (s[1], s[2]) == (peer, local)]]
    assert links, (first["sockets"], second["sockets"])
    for local, peer in links:
        assert (host_of(local), host_of(peer)) == (first["ip"], second["ip"]), links


def host_of(endpoint: str) -> str:
    """The IPv4 address of an `ss` endpoint: 10.0.0.1:80, or [::ffff:10.0.0.1]:80 on a dual-stack socket."""
    return endpoint.rsplit(":", 1)[0].strip("[]").removeprefix("::ffff:")


def test_a_firewall_between_the_stages_fails_the_start_in_time_naming_rank_host_and_address(cluster, hosts):
    by_ip = {h.ip: h for h in hosts}
    blocked = {}

    def block(placed):
        rank0, rank1 = placed
        blocked["host"] = by_ip[rank1]
        blocked["peer"] = rank0
        blocked["host"].block(rank0)  # rank 1's host can open no connection to rank 0's

    try:
        placed, result = run_replica(cluster, pp=2, before_start=block, timeout_s=INIT_TIMEOUT_S)
    finally:
        if blocked:
            blocked["host"].unblock()
    assert "error" in result, result
    error = result["error"]
    assert "rank 1 " in error and blocked["host"].ip in error and f"tcp://{blocked['peer']}:" in error, error
    assert "distributed_init_timeout_s" in error, error
