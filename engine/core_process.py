"""CoreProcess: the engine loop (engine/core_runner.py) in a process of its own, as vLLM v1 runs its EngineCore.

The caller's process keeps the requests' streams and tokenizes; the engine process schedules, runs the model,
detokenizes and sends each step's deltas back. One Unix socket connects them: commands in, `(deltas, stats)` out
(one message per step, pickled). The step loop then never waits for the GIL of a server that streams every token.
One device, one process: tensor and pipeline parallel engines keep their loop on a thread (their Ray workers
already run the model in processes of their own).
"""
from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from multiprocessing.connection import Client, Listener
from collections.abc import Callable

from engine.config import EngineConfig
from engine.errors import EngineDeadError
from engine.outputs import EngineStats, StreamDelta
from engine.request_validation import RequestLimits

logger = logging.getLogger("strata")

START_TIMEOUT_S = 1800.0  # loading a large checkpoint and capturing CUDA graphs takes minutes


class CoreProcess:
    """Same interface as core_runner.CoreThread."""

    def __init__(self, config: EngineConfig, publish: Callable[[list[StreamDelta]], None],
                 on_death: Callable[[BaseException], None]):
        # A fresh interpreter (`python -m engine.core_process`), not multiprocessing's spawn, which would run the
        # caller's __main__ again (a Ray worker's, a script's). It connects back over a Unix socket.
        authkey = os.urandom(32)
        socket_dir = tempfile.mkdtemp(prefix="strata-engine-")
        try:
            with Listener(os.path.join(socket_dir, "core.sock"), "AF_UNIX", authkey=authkey) as listener:
                env = {**os.environ, "STRATA_ENGINE_AUTHKEY": authkey.hex()}
                self._process = subprocess.Popen([sys.executable, "-m", "engine.core_process", listener.address],
                                                 env=env)
                self._conn = self._accept(listener)
        finally:
            shutil.rmtree(socket_dir, ignore_errors=True)
        self._conn.send(config.model_dump())
        self._send_lock = threading.Lock()
        ready = self._conn.poll(START_TIMEOUT_S) and self._conn.recv()
        if not ready or ready[0] != "ready":
            self._process.kill()
            raise RuntimeError(f"the engine process failed to start: {ready[1] if ready else 'no answer'}")
        info = ready[1]
        self.limits: RequestLimits = info["limits"]
        self.max_num_seqs: int = info["max_num_seqs"]
        self._stats: EngineStats = info["stats"]
        self._publish, self._on_death = publish, on_death
        self._error: BaseException | None = None
        self._last_message = time.monotonic()
        self._busy = False
        self._reader = threading.Thread(target=self._read, name="strata-engine-results", daemon=True)
        self._reader.start()

    def _accept(self, listener: Listener):
        """The engine process's connection; raises if the process ends first."""
        listener._listener._socket.settimeout(1.0)  # noqa: SLF001 - accept() has no timeout of its own
        while True:
            try:
                return listener.accept()
            except TimeoutError:
                if self._process.poll() is not None:
                    raise RuntimeError(f"the engine process exited with code {self._process.returncode} before "
                                       "it connected") from None

    def send(self, command: tuple) -> None:
        with self._send_lock:  # event loops of several threads may submit
            try:
                self._conn.send(command)
            except (OSError, BrokenPipeError) as e:
                raise EngineDeadError(f"the engine process is gone: {e}") from e

    def stats(self) -> EngineStats:
        return self._stats

    @property
    def error(self) -> BaseException | None:
        if self._error is None and self._process.poll() is not None:
            return EngineDeadError(f"the engine process exited with code {self._process.returncode}")
        return self._error

    def check_health(self, stall_seconds: float) -> None:
        # The process sends a message every step, and every second while idle: silence means a stuck step.
        silent = time.monotonic() - self._last_message
        if silent > stall_seconds:
            raise EngineDeadError(f"engine loop stalled: no word from the engine process for {silent:.0f} s")

    def shutdown(self) -> None:
        try:
            self.send(("stop",))
        except EngineDeadError:
            pass
        try:
            self._process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self._process.kill()
        self._reader.join(timeout=5)
        self._conn.close()

    def _read(self) -> None:
        try:
            while True:
                message = self._conn.recv()
                self._last_message = time.monotonic()
                if message[0] == "dead":
                    raise EngineDeadError(message[1])
                _, deltas, stats = message
                self._stats = stats
                if deltas:
                    self._publish(deltas)
        except (EOFError, OSError):  # the process ended: a stop, or a crash
            try:
                code = self._process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                code = None
            if code == 0:
                return
            self._error = EngineDeadError(f"the engine process ended (exit code {code})")
        except BaseException as e:  # noqa: BLE001
            self._error = e
        logger.error("engine process failed: %s", self._error)
        self._on_death(self._error)


def _main(address: str) -> None:
    """The engine process: connect, build the core, report ready, run the loop until told to stop."""
    from engine.core import EngineCore
    from engine.core_runner import CoreRunner

    # The engine's log lines, at the level its server runs at (`strata serve --log-level` sets STRATA_LOG_LEVEL
    # for every process of the cluster, and this one inherits it).
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(levelname)s %(asctime)s engine-core: %(message)s", "%m-%d %H:%M:%S"))
    logger.addHandler(handler)
    logger.setLevel(os.environ.get("STRATA_LOG_LEVEL", "info").upper())
    logger.propagate = False
    conn = Client(address, "AF_UNIX", authkey=bytes.fromhex(os.environ.pop("STRATA_ENGINE_AUTHKEY")))
    try:
        core = EngineCore(EngineConfig.model_validate(conn.recv()))
    except BaseException as e:  # noqa: BLE001 - the caller raises it
        conn.send(("failed", f"{type(e).__name__}: {e}"))
        return
    conn.send(("ready", {"limits": core.limits, "max_num_seqs": core.setup.max_num_seqs, "stats": core.stats()}))
    runner: CoreRunner | None = None

    def take(wait: bool) -> list[tuple]:
        taken = []
        while conn.poll(1.0 if wait and not taken else 0):
            command = conn.recv()
            if command[0] == "stop":
                runner.stopped = True
                break
            taken.append(command)
        return taken

    runner = CoreRunner(core, take, lambda deltas, stats: conn.send(("step", deltas, stats)))
    try:
        runner.run()
        if runner.error is not None:
            conn.send(("dead", f"{type(runner.error).__name__}: {runner.error}"))
    except BaseException as e:  # noqa: BLE001
        logger.exception("engine loop died")
        conn.send(("dead", f"engine loop died: {e!r}"))
    finally:
        core.shutdown()


if __name__ == "__main__":
    _main(sys.argv[1])
