"""Hosts with their own addresses on one machine: each a network namespace on a private bridge, running its own
sshd, for tests of what crosses hosts (`ray up` over SSH, process groups, firewalls, a host going down).

A host is a network + PID + mount + UTS namespace. Its network: `eth0` with 10.213.X.(10+i)/24 on a bridge the
harness creates (the bridge has .1, the default gateway), and a firewall that rejects any destination outside
that subnet and loopback, so nothing a test starts can reach further. Its PID namespace makes `ray stop` on it
see only its own processes; killing its first process (a shell that reaps orphans) ends every process in it.
Its mount namespace keeps the machine's filesystem, shared as on a cluster with one NFS (the venv is the same
everywhere), except its own /tmp and /dev/shm, and its own writes to /root (an overlay: the machine's /root
below, where pyenv or caches may live, and the host's changes on top), as on separate machines.

Needs root, `ip`, `nsenter`/`unshare` (util-linux), sshd (openssh-server) and nft (nftables); `ensure_packages`
installs the Debian packages when missing. Names start with PREFIX and the test process's pid, so `sweep` can
remove what a killed run left behind without touching another live run's hosts.
"""
from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from tests.support.paths import ROOT

PREFIX = "smn"  # strata multinode: netns smn<pid>h<i>, bridge smn<pid>b, veths smn<pid>v<i>
STATE = Path("/var/tmp/strata-hosts")  # outside /tmp, which each host has its own of
PACKAGES = {"sshd": "openssh-server", "ssh": "openssh-client", "ssh-keygen": "openssh-client", "nft": "nftables",
            "rsync": "rsync", "ss": "iproute2", "nsenter": "util-linux", "ps": "procps"}
SSHD = "/usr/sbin/sshd"


def missing_requirements() -> str | None:
    """Why hosts cannot be made here (None when they can)."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    if not Path("/sys/class/net").exists() or shutil.which("ip") is None:
        return "no `ip` (iproute2)"
    return None


def ensure_packages() -> None:
    """apt-get install the Debian packages whose commands are missing (CI is a clean Debian run as root)."""
    missing = sorted({pkg for cmd, pkg in PACKAGES.items() if not shutil.which(cmd, path=f"/usr/sbin:/sbin:"
                                                                                        f"{os.environ['PATH']}")})
    if not missing:
        return
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    if subprocess.run(["apt-get", "install", "-y", "-q", *missing], env=env, capture_output=True).returncode:
        subprocess.run(["apt-get", "update", "-q"], env=env, check=True, capture_output=True)
        subprocess.run(["apt-get", "install", "-y", "-q", *missing], env=env, check=True, capture_output=True)


@dataclass
class Host:
    name: str  # h0, h1, ...
    ip: str
    netns: str
    init: subprocess.Popen = field(repr=False)  # `unshare`, whose child is the host's first process

    @property
    def pid(self) -> int:
        """The host's first process (pid 1 inside it), as the machine sees it."""
        children = Path(f"/proc/{self.init.pid}/task/{self.init.pid}/children").read_text().split()
        return int(children[0])

    def command(self, argv: list[str] | str) -> list[str]:
        """argv run inside the host: its network, processes, mounts and hostname."""
        argv = ["bash", "-lc", argv] if isinstance(argv, str) else argv
        return ["nsenter", "-t", str(self.pid), "-n", "-p", "-m", "-u", "--", *argv]

    def run(self, argv: list[str] | str, timeout: float = 60, check: bool = True, **kw) -> subprocess.CompletedProcess:
        result = subprocess.run(self.command(argv), capture_output=True, text=True, timeout=timeout, **kw)
        if check and result.returncode:
            raise RuntimeError(f"{argv!r} on {self.name} ({self.ip}) failed ({result.returncode}):\n"
                               f"{result.stdout}\n{result.stderr}")
        return result

    def block(self, peer_ip: str) -> None:
        """A firewall rule: this host can open no TCP connection to `peer_ip` (SYNs dropped, so connecting hangs
        as it does behind a real firewall) except SSH. Connections the peer opens still work."""
        rules = (f"table inet strata_block {{\n chain output {{\n type filter hook output priority -10;\n"
                 f" ip daddr {peer_ip} tcp dport != 22 ct state new drop\n }}\n}}\n")
        self.run(["nft", "-f", "-"], input=rules)

    def unblock(self) -> None:
        self.run(["nft", "delete", "table", "inet", "strata_block"])

    def link(self, up: bool) -> None:
        """Take the host's interface down (the host is gone from the network) or up again."""
        self.run(["ip", "link", "set", "eth0", "up" if up else "down"])


def keep_visible_under_tmp(tmp: Path) -> str:
    """Shell that mounts the checkout into a host's own /tmp at its own path, where the checkout (and with it the
    venv) lives under /tmp, as a CI clone may: bound into the host's tmp folder before that replaces /tmp."""
    if not ROOT.is_relative_to("/tmp"):
        return ""
    inside = tmp / ROOT.relative_to("/tmp")
    return f"mkdir -p {inside} && mount --bind {ROOT} {inside} && "


class Hosts:
    """N hosts on a bridge, each with sshd on port 22 accepting `key` for root. Use as a context manager."""

    def __init__(self, n: int):
        self.tag = f"{PREFIX}{os.getpid()}"
        self.subnet = f"10.213.{os.getpid() % 250 + 1}"
        self.gateway = f"{self.subnet}.1"
        self.bridge = f"{self.tag}b"
        self.dir = STATE / self.tag
        self.key = self.dir / "id_ed25519"
        self.n = n
        self.hosts: list[Host] = []

    def __enter__(self) -> "Hosts":
        sweep()
        try:
            self._start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __getitem__(self, i: int) -> Host:
        return self.hosts[i]

    def __iter__(self):
        return iter(self.hosts)

    def _start(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(self.key)], check=True)
        shutil.copy(f"{self.key}.pub", self.dir / "authorized_keys")
        Path("/run/sshd").mkdir(exist_ok=True)  # sshd's privilege separation directory
        _ip("link", "add", self.bridge, "type", "bridge")
        _ip("addr", "add", f"{self.gateway}/24", "dev", self.bridge)
        _ip("link", "set", self.bridge, "up")
        for i in range(self.n):
            self.hosts.append(self._host(i))
        for h in self.hosts:
            _wait_port(h.ip, 22)

    def _host(self, i: int) -> Host:
        name, ip, netns, veth = f"h{i}", f"{self.subnet}.{10 + i}", f"{self.tag}h{i}", f"{self.tag}v{i}"
        _ip("netns", "add", netns)
        _ip("link", "add", veth, "type", "veth", "peer", "name", f"{veth}p")
        _ip("link", "set", f"{veth}p", "netns", netns)
        _ip("link", "set", veth, "master", self.bridge, "up")
        for args in ([f"link set {veth}p name eth0"], [f"addr add {ip}/24 dev eth0"], ["link set eth0 up"],
                     ["link set lo up"], [f"route add default via {self.gateway}"]):
            _ip("-n", netns, *args[0].split())
        # Only this subnet and loopback: a host has nowhere else to send anything.
        rules = (f"table inet strata {{\n chain output {{\n type filter hook output priority 0; policy accept;\n"
                 f" oif lo accept\n ip daddr {self.subnet}.0/24 accept\n reject\n }}\n}}\n")
        subprocess.run(["ip", "netns", "exec", netns, "nft", "-f", "-"], input=rules, text=True, check=True)
        root = self.dir / name
        home, tmp = root / "home", root / "tmp"
        for d in (home, tmp):
            d.mkdir(parents=True, exist_ok=True)
        tmp.chmod(0o1777)
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(root / "host_key")], check=True)
        (root / "sshd_config").write_text(
            f"ListenAddress {ip}\nPort 22\nHostKey {root / 'host_key'}\nPidFile none\n"
            f"AuthorizedKeysFile {self.dir / 'authorized_keys'}\nPermitRootLogin prohibit-password\n"
            f"PasswordAuthentication no\nKbdInteractiveAuthentication no\nUsePAM no\nStrictModes no\n"
            f"MaxStartups 100\nMaxSessions 100\n"
            # The checkout under test, whatever the venv's editable install points at (CI: this same clone).
            f"SetEnv PYTHONPATH={ROOT} RAY_USAGE_STATS_ENABLED=0\n")
        # The host's first process: own /root, /tmp and /dev/shm, a hostname, then sshd; bash stays pid 1 and
        # reaps the daemons that `ray start` leaves behind.
        boot = (f"mount -t tmpfs tmpfs {home} && mkdir {home}/upper {home}/work && mount -t overlay overlay "
                f"-o lowerdir=/root,upperdir={home}/upper,workdir={home}/work /root && "
                f"{keep_visible_under_tmp(tmp)}mount --rbind {tmp} /tmp && mount -t tmpfs tmpfs /dev/shm && "
                f"hostname {self.tag}-{name} && {SSHD} -D -e -f {root / 'sshd_config'} "
                f"> {root / 'sshd.log'} 2>&1 & while true; do wait; sleep 1; done")
        init = subprocess.Popen(["ip", "netns", "exec", netns, "unshare", "--pid", "--fork", "--mount-proc",
                                 "--mount", "--uts", "--propagation", "private", "--kill-child", "bash", "-c", boot],
                                preexec_fn=_die_with_parent, stdin=subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        return Host(name, ip, netns, init)

    def close(self) -> None:
        for h in self.hosts:
            h.init.kill()  # --kill-child: its child, pid 1 of the host, dies, and the kernel ends the rest
            h.init.wait(timeout=30)
        _remove(self.tag)


def _die_with_parent() -> None:
    """In the child before exec: SIGKILL when the test process dies, so an interrupted run leaves no host."""
    import ctypes

    ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True)


def _wait_port(ip: str, port: int, timeout: float = 30) -> None:
    import socket

    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection((ip, port), timeout=1).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise TimeoutError(f"no sshd at {ip}:{port} after {timeout:g} s")
            time.sleep(0.1)


def _remove(tag: str) -> None:
    """Every namespace, process, link and file of run `tag`."""
    for netns in _listed(["ip", "netns", "list"]):
        if netns.startswith(tag + "h"):
            for pid in _listed(["ip", "netns", "pids", netns]):
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except ProcessLookupError:
                    pass
            subprocess.run(["ip", "netns", "del", netns], capture_output=True)
    for link in _listed(["ip", "-o", "link", "show"], field_index=1):
        name = link.rstrip(":").split("@")[0]
        if name.startswith(tag):
            subprocess.run(["ip", "link", "del", name], capture_output=True)
    shutil.rmtree(STATE / tag, ignore_errors=True)


def _listed(cmd: list[str], field_index: int = 0) -> list[str]:
    out = subprocess.run(cmd, capture_output=True, text=True).stdout
    return [line.split()[field_index] for line in out.splitlines() if len(line.split()) > field_index]


def sweep() -> None:
    """Remove what runs whose test process is gone left behind (killed with SIGKILL, machine crash)."""
    tags = {m.group(0) for name in _listed(["ip", "netns", "list"]) + _listed(["ip", "-o", "link", "show"], 1)
            if (m := re.match(rf"{PREFIX}\d+", name))}
    tags |= {p.name for p in STATE.glob(f"{PREFIX}*")} if STATE.exists() else set()
    for tag in tags:
        if not Path(f"/proc/{tag.removeprefix(PREFIX)}").exists():
            _remove(tag)
