"""Containers of this repository's images, run by podman, each on a host of its own: a network namespace joined
to a bridge in this machine's namespace. Nothing binds a port on this machine's own network, so a container's
Ray (6379, 8265) and Serve (8000) never meet anyone else's; the test reaches them at their hosts' addresses.

Needs root, podman and runc (podman's default crun refuses this machine's hybrid cgroups, hence runc and the
cgroupfs manager). Every name carries the test process's pid: leftovers of a process that died are removed
at the next start (sweep_leftovers), everything else by close().
"""
from __future__ import annotations

import atexit
import json
import os
import re
import subprocess
from dataclasses import dataclass, field

PODMAN = ["podman", "--runtime", "runc", "--cgroup-manager=cgroupfs"]
PREFIX = "strata-it"
# The machine's hard limits are lower than podman's defaults and cannot be raised.
ULIMITS = ["--ulimit", "nofile=4096:4096", "--ulimit", "nproc=4096:4096"]


def run(argv: list[str], timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=check)


def podman(*args: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess:
    return run([*PODMAN, *args], timeout=timeout, check=check)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _owner_is_gone(name: str) -> bool:
    """Whether `name` is one of ours (it holds its test process's pid) and that process has ended."""
    m = re.search(rf"{PREFIX}-(\d+)-|^stb(\d+)$", name)
    return bool(m) and not _alive(int(m[1] or m[2]))


def sweep_leftovers() -> None:
    """Remove the containers, namespaces and bridges of earlier test processes that are gone."""
    for name in podman("ps", "-a", "--format", "{{.Names}}").stdout.split():
        if _owner_is_gone(name):
            podman("rm", "-f", "-t", "0", name, check=False)
    for line in run(["ip", "netns", "list"]).stdout.splitlines():
        if line and _owner_is_gone(line.split()[0]):
            run(["ip", "netns", "delete", line.split()[0]], check=False)
    for line in run(["ip", "-o", "link", "show", "type", "bridge"]).stdout.splitlines():
        name = line.split(": ")[1].split("@")[0]
        if _owner_is_gone(name):
            run(["ip", "link", "delete", name], check=False)


@dataclass
class Host:
    name: str   # the network namespace, /run/netns/NAME
    ip: str


@dataclass
class Network:
    """A bridge stbPID with SUBNET.1 in this namespace, and hosts SUBNET.2, .3, ... on it."""
    subnet: str = ""
    hosts: list[Host] = field(default_factory=list)
    containers: list[str] = field(default_factory=list)

    def __post_init__(self):
        pid = os.getpid()
        self.bridge = f"stb{pid}"
        taken = run(["ip", "-o", "-4", "addr"]).stdout
        for third in [pid % 200 + 20, *range(20, 220)]:
            subnet = f"10.213.{third}"
            if f" {subnet}." not in taken:
                self.subnet = subnet
                break
        run(["ip", "link", "add", self.bridge, "type", "bridge"])
        run(["ip", "addr", "add", f"{self.subnet}.1/24", "dev", self.bridge])
        run(["ip", "link", "set", self.bridge, "up"])
        atexit.register(self.close)  # if a fixture's finalizer never ran

    def add_host(self, role: str) -> Host:
        host = Host(f"{PREFIX}-{os.getpid()}-{role}", f"{self.subnet}.{len(self.hosts) + 2}")
        veth = f"stv{os.getpid()}{len(self.hosts)}"[:15]
        self.hosts.append(host)
        ns = ["ip", "-n", host.name]
        run(["ip", "netns", "add", host.name])
        run(["ip", "link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", host.name])
        run(["ip", "link", "set", veth, "master", self.bridge, "up"])
        run([*ns, "addr", "add", f"{host.ip}/24", "dev", "eth0"])
        for link in ("eth0", "lo"):
            run([*ns, "link", "set", link, "up"])
        # A default route through an address no one holds: Ray finds its node's address the usual way (the
        # source of a route to the internet), and whatever were sent that way would stay unanswered on the bridge.
        run([*ns, "route", "add", "default", "via", f"{self.subnet}.254", "src", host.ip])
        return host

    def start(self, image: str, host: Host, *, entrypoint: list[str], args: list[str], env: dict[str, str],
              options: list[str] = ()) -> str:
        """A detached container on `host` (its hostname is the host's role); its name."""
        name = host.name
        env_args = [a for k, v in env.items() for a in ("--env", f"{k}={v}")]
        podman("run", "-d", "--name", name, "--hostname", name.rsplit("-", 1)[1],
               "--network", f"ns:/run/netns/{host.name}", "--dns", "127.0.0.1", *ULIMITS, *options, *env_args,
               "--entrypoint", json.dumps(entrypoint), image, *args)
        self.containers.append(name)
        return name

    def close(self) -> None:
        """Idempotent: removes what is left."""
        for name in self.containers:
            podman("rm", "-f", "-t", "0", name, check=False)
        for host in self.hosts:
            run(["ip", "netns", "delete", host.name], check=False)
        run(["ip", "link", "delete", self.bridge], check=False)
        self.containers, self.hosts = [], []


def logs(container: str, tail: int = 60) -> str:
    out = podman("logs", "--tail", str(tail), container, check=False)
    return out.stdout + out.stderr


def shell(container: str, command: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """`command` in a login shell inside the container, as the image's user."""
    return podman("exec", container, "bash", "-lc", command, timeout=timeout, check=False)

