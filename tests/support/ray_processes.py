"""The worker processes of this test's Ray (other Rays may run on the machine), found by their process title."""
from __future__ import annotations

import psutil


def local_raylets() -> set[int]:
    """The raylet of the Ray this process started."""
    import ray

    node = ray._private.worker._global_node
    return {info.process.pid for info in node.all_processes.get("raylet", [])}


def processes(title: str, raylets: set[int] | None = None) -> list[psutil.Process]:
    """Live worker processes, children of `raylets` (default: this process's Ray), whose title (Ray sets it to
    `ray::<ActorClass>.<method>`) holds `title`."""
    raylets = local_raylets() if raylets is None else raylets
    found = []
    for p in psutil.process_iter(["cmdline", "status", "ppid"]):
        try:
            cmd = " ".join(p.info["cmdline"] or [])
            if p.info["ppid"] in raylets and title in cmd and p.info["status"] != psutil.STATUS_ZOMBIE:
                found.append(p)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return found
