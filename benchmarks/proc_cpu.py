"""CPU time of this process and every process it started (a local Ray cluster's raylet, GCS, Serve's controller,
proxy and replicas), per process and per busy thread, over one stretch of a benchmark.

    meter = CPUMeter()
    ...                                   # the load
    rows = meter.stop(output_tokens, seconds)

Threads are named as the kernel knows them (`/proc/PID/task/TID/comm`): torch's OpenMP workers inherit their
creator's name, so the engine loop and its OpenMP worker show as two threads of one name and their own ids.
"""
from __future__ import annotations

import os

import psutil

# Ray's own processes, recognised by their command line (Ray workers retitle themselves "ray::Actor...").
RAY_PROCESSES = ("raylet", "gcs_server", "log_monitor", "dashboard", "monitor.py", "runtime_env")


def label(p: psutil.Process) -> str:
    if p.pid == os.getpid():
        return "benchmark process (client; in-process engine)"
    cmd = p.cmdline()
    titled = next((c for c in cmd if c.startswith("ray::")), None)
    if titled:
        return titled.split(".")[0]  # the controller retitles itself with the method it runs
    joined = " ".join(cmd)
    return next((name for name in RAY_PROCESSES if name in joined), p.name())


def snapshot() -> dict[int, tuple[str, float, dict[str, float]]]:
    """pid -> (label, CPU seconds, {"name:tid": CPU seconds})."""
    me = psutil.Process()
    out = {}
    for p in [me, *me.children(recursive=True)]:
        try:
            with p.oneshot():
                times = p.cpu_times()
                threads = {}
                for t in p.threads():
                    try:
                        with open(f"/proc/{p.pid}/task/{t.id}/comm") as f:
                            name = f.read().strip()
                    except OSError:
                        name = "?"
                    threads[f"{name}:{t.id}"] = t.user_time + t.system_time
                out[p.pid] = (label(p), times.user + times.system, threads)
        except psutil.Error:  # exited meanwhile
            pass
    return out


class CPUMeter:
    def __init__(self):
        self.start = snapshot()

    def stop(self, output_tokens: int, seconds: float, min_share: float = 0.002) -> list[dict]:
        """Each process that used at least `min_share` of a core: CPU seconds, ms per output token, share of one
        core, and its threads that took at least 5% of its time. Busiest first."""
        rows = []
        for pid, (name, cpu, threads) in snapshot().items():
            _, cpu0, threads0 = self.start.get(pid, (name, 0.0, {}))
            used = cpu - cpu0
            if used < min_share * seconds:
                continue
            busy = {k: v - threads0.get(k, 0.0) for k, v in threads.items()}
            busy = {k: round(v, 2) for k, v in sorted(busy.items(), key=lambda kv: -kv[1]) if v >= 0.05 * used}
            rows.append({"process": name, "pid": pid, "cpu_s": round(used, 3),
                         "ms_per_output_token": round(1e3 * used / max(1, output_tokens), 3),
                         "share_of_core": round(used / seconds, 4), "threads_cpu_s": busy})
        return sorted(rows, key=lambda r: -r["cpu_s"])


def format_rows(rows: list[dict]) -> str:
    return "\n".join(f"    {r['process']:<48} {r['cpu_s']:7.2f} s  {r['ms_per_output_token']:6.2f} ms/token  "
                     f"{100 * r['share_of_core']:5.1f}% of a core" for r in rows)
